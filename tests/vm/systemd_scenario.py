"""Inside the VM, as a systemd service (tests/test_vm_systemd.py): install
the Debian package the way an administrator would and operate
privbrokerd.service under the real systemd (pid 1), the real system bus
(dbus.service) and journald, on cgroup v2.

Every check is one JSON line in /vmjob/checks.jsonl: {"name", "ok", "detail"};
figures (timings, the exposure score) go to /vmjob/figures.json; the journal
and the unit's state to /vmjob/*.txt. The host asserts on those files; this
script asserts nothing itself and goes on after a failed check where it can,
so that one run reports everything. Standard library only (it runs on the
VM's /usr/bin/python3, outside the package it installs).
"""
from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
import traceback

JOB = "/vmjob"
UNIT = "privbrokerd.service"
NAME = "org.privbroker.Broker1"
CALLER, STRANGER = "alice", "mallory"       # a member of group privbroker, and not
figures: dict = {}


def check(name: str, ok: bool, detail="") -> bool:
    line = {"name": name, "ok": bool(ok), "detail": detail if isinstance(detail, (dict, list))
            else str(detail)[-3000:]}
    with open(f"{JOB}/checks.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"vm-check {'ok  ' if ok else 'FAIL'} {name}: {line['detail']}"[:400], flush=True)
    return bool(ok)


def sh(*argv: str, user: str | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    if user:
        argv = ("runuser", "-u", user, "--", *argv)
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, -999, e.stdout or "", f"timeout: {e}")


def show(*props: str) -> dict:
    r = sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def wait_for(what, timeout: float, pause: float = 0.2):
    """what() until it is truthy (returned) or the time is up (its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(pause)


def proc_status(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        return {}


def bus_owner() -> tuple[int, int] | None:
    """(uid, pid) of the connection that owns the broker's name, from the bus."""
    out = []
    for method in ("GetConnectionUnixUser", "GetConnectionUnixProcessID"):
        r = sh("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
               "/org/freedesktop/DBus", f"org.freedesktop.DBus.{method}", f"string:{NAME}")
        m = re.search(r"uint32 (\d+)", r.stdout)
        if not m:
            return None
        out.append(int(m.group(1)))
    return out[0], out[1]


def unit_cgroup() -> str:
    return "/sys/fs/cgroup" + show("ControlGroup").get("ControlGroup", "/nonexistent")


def jail_cgroups() -> list[str]:
    d = "/sys/fs/cgroup/system.slice/privbrokerd.service"
    try:
        return sorted(e for e in os.listdir(d) if e.startswith("privbroker-"))
    except OSError:
        return []


def processes_of(user: str, marker: str) -> list[int]:
    """The jailed `sleep MARKER`s of user (not the client whose arguments
    name them too)."""
    uid = pwd.getpwnam(user).pw_uid
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv[:2] == [b"sleep", marker.encode()]:
                out.append(int(pid))
        except OSError:
            pass
    return out


def start_long_jail(marker: str) -> subprocess.Popen:
    """A jail that lives until something kills it: `privbroker run` as the
    caller, its program `sleep MARKER` (a number of seconds, 1000.N)."""
    return subprocess.Popen(["runuser", "-u", CALLER, "--", "privbroker", "run",
                             "--memory-limit", "64M", "minimal", "--", "/bin/sh", "-c",
                             f"exec sleep {marker}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------

def the_machine() -> None:
    with open("/proc/1/comm") as f:
        check("pid 1 is systemd", f.read().strip() == "systemd")
    with open("/proc/self/mounts") as f:
        cg = [line for line in f if " /sys/fs/cgroup " in line]
    check("cgroup v2 alone on /sys/fs/cgroup", len(cg) == 1 and " cgroup2 " in cg[0], cg)
    r = sh("dpkg-query", "-W", "-f=${Status}", "privbroker")
    check("no privbroker package before the install", "installed" not in r.stdout, r.stdout)


def install(deb: str) -> bool:
    # man-db's dpkg trigger re-indexes every manual page: minutes under TCG
    # and nothing to do with privbroker (Debian skips it without this file)
    if os.path.exists("/var/lib/man-db/auto-update"):
        os.unlink("/var/lib/man-db/auto-update")
    t = time.monotonic()
    r = sh("dpkg", "-i", deb, timeout=600)
    figures["dpkg_install_s"] = round(time.monotonic() - t, 1)
    ok = check("dpkg -i installs the package", r.returncode == 0, r.stdout + r.stderr)
    check("installing starts nothing", show("ActiveState")["ActiveState"] == "inactive",
          show("ActiveState", "LoadState", "FragmentPath"))
    check("the service user exists", sh("id", "privbroker").returncode == 0)
    r = sh("systemd-analyze", "verify", UNIT)
    check("systemd-analyze verify of the installed unit", r.returncode == 0 and not r.stderr.strip(),
          r.stdout + r.stderr)
    sh("useradd", "--create-home", "--groups", "privbroker", CALLER)
    sh("useradd", "--create-home", STRANGER)
    return ok


def bus_activation() -> None:
    """The documented way in: the first call starts the broker (D-Bus
    activation through systemd), nobody runs systemctl."""
    t = time.monotonic()
    r = sh("privbroker", "status", user=CALLER, timeout=180)
    figures["activation_first_call_s"] = round(time.monotonic() - t, 1)
    check("first call activates privbrokerd.service through the bus",
          r.returncode == 0 and show("ActiveState")["ActiveState"] == "active",
          r.stdout + r.stderr)


def identity() -> int:
    st = show("MainPID", "ActiveState", "SubState", "ControlGroup", "NRestarts", "Type")
    main = int(st.get("MainPID", "0"))
    check("the unit is active and running", (st.get("ActiveState"), st.get("SubState")) ==
          ("active", "running"), st)
    ms = proc_status(main)
    with open(f"/proc/{main}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode()
    check("MainPID is the launcher: privbrokerd, uid 0",
          "privbrokerd" in cmd and ms.get("Uid", "").split()[:1] == ["0"], {"cmd": cmd, **{
              k: ms.get(k) for k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs")}})
    with open(f"/proc/{main}/cgroup") as f:
        own = f.read().strip()
    with open(f"/sys/fs/cgroup{st['ControlGroup']}/cgroup.controllers") as f:
        ctrls = f.read().split()
    check("Delegate=yes: the unit's cgroup has memory, pids and cpu",
          {"memory", "pids", "cpu"} <= set(ctrls), ctrls)
    check("the launcher moved into the leaf <unit cgroup>/privbrokerd (Delegate=yes)",
          own == f"0::{st['ControlGroup']}/privbrokerd", own)
    owner = bus_owner()
    front = proc_status(owner[1]) if owner else {}
    svc_uid = pwd.getpwnam("privbroker").pw_uid
    check("the front, user privbroker, owns org.privbroker.Broker1 on the system bus",
          owner is not None and owner[0] == svc_uid and front.get("PPid") == str(main)
          and front.get("Uid", "").split()[:1] == [str(svc_uid)],
          {"owner": owner, "launcher": main, **{k: front.get(k) for k in
                                                ("PPid", "Uid", "CapEff", "CapBnd", "NoNewPrivs",
                                                 "Seccomp", "NSpid")}})
    return main


def launches() -> None:
    uid = pwd.getpwnam(CALLER).pw_uid
    t = time.monotonic()
    r = sh("privbroker", "run", "--memory-limit", "64M", "minimal", "--", "/bin/sh", "-c",
           "id -u; cat /proc/self/cgroup; echo pid=$$", user=CALLER, timeout=180)
    figures["launch_s"] = round(time.monotonic() - t, 2)
    lines = r.stdout.split()
    # pid 2: the jail's init is 1 (a new pid namespace), the program 2
    check("a jailed launch as a member of group privbroker runs as the caller",
          r.returncode == 0 and lines[:1] == [str(uid)] and "pid=2" in lines, r.stdout + r.stderr)
    check("the jail ran in its own cgroup beside the launcher's leaf",
          any(line.startswith("0::/system.slice/privbrokerd.service/privbroker-")
              for line in lines), r.stdout)
    r = sh("privbroker", "run", "minimal", "--", "/bin/true", user=STRANGER, timeout=180)
    check("a caller outside the grant is refused", r.returncode != 0 and
          ("AccessDenied" in r.stderr or "denied" in r.stderr.lower()), r.stdout + r.stderr)
    r = sh("privbroker", "run", "filtered-not-granted", "--", "/bin/true", user=CALLER,
           timeout=180)
    check("a profile outside the caller's grant is refused by the broker",
          r.returncode != 0 and "AccessDenied" in r.stderr, r.stdout + r.stderr)
    r = sh("privbroker", "run", "--memory-limit", "32M", "minimal", "--", "/usr/bin/python3",
           "-c", "x = bytearray(256 << 20)", user=CALLER, timeout=180)
    check("a jail over its memory limit is OOM-killed and the caller is told",
          r.returncode == 137 and "OOM" in r.stderr, (r.returncode, r.stderr))
    r = sh("privjail", "-p", "--profile", "minimalistic-mountns", "--", "/bin/sh", "-c",
           "test -S /dev/log && echo socket")
    check("privjail's minimalistic-mountns binds the journal's /dev/log onto its /dev",
          r.returncode == 0 and r.stdout.strip() == "socket", r.stdout + r.stderr)
    r = sh("busctl", "--system", "get-property", NAME, "/org/privbroker/Broker1", NAME,
           "Version")
    check("busctl reads the broker's properties on the system bus", r.returncode == 0,
          r.stdout + r.stderr)


def seeds_copy_ahead() -> None:
    """Under the unit (no CAP_SYS_PTRACE, ProtectProc=invisible, a caller's
    jail not dumpable), the launcher learns from a seeded launch which pages
    it wrote, and the next seed copies them ahead (broker/jail/warm.py): its
    own launch then takes far fewer page faults from its order to its
    program's start than the first seed's did."""
    # a launcher that has learnt nothing yet (launches() made seeded launches)
    sh("systemctl", "restart", UNIT, timeout=180)
    wait_for(bus_owner, 30)
    main = int(show("MainPID")["MainPID"])

    def children(pid: int) -> list[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def comm(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""

    def minflt(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])

    def seeded_launch_faults() -> tuple[int | None, str]:
        """Faults of the ready seed from its order to its program's start."""
        seed = wait_for(lambda: next((p for p in children(main) if comm(p) == "pb-seed"),
                                     None), 10)
        if seed is None:
            return None, "no seed"
        time.sleep(0.3)                 # made, and done copying
        before = minflt(seed)
        client = subprocess.Popen(["runuser", "-u", CALLER, "--", "privbroker", "run",
                                   "minimal", "--", "/bin/sleep", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        spawned = wait_for(lambda: children(seed), 20, pause=0.01)
        faults = minflt(seed) - before if spawned else None
        out, err = client.communicate(timeout=60)
        return faults, f"seed {seed} rc {client.returncode} {err}"

    sh("privbroker", "run", "minimal", "--", "/bin/true", user=CALLER, timeout=180)   # the shape
    cold, how_cold = seeded_launch_faults()     # the first seed: nothing learnt yet
    warmed, how_warm = seeded_launch_faults()   # learnt from the launch before
    figures["seeded_launch_faults"] = {"cold": cold, "warm": warmed}
    check("a seed made after a seeded launch copies ahead what that launch wrote",
          cold is not None and warmed is not None and warmed < cold / 2,
          {"cold": [cold, how_cold], "warm": [warmed, how_warm],
           "launcher log": sh("journalctl", "-u", "privbrokerd", "-b", "--no-pager",
                              "-o", "cat").stdout[-3000:]})


def stop_ends_jails() -> None:
    marker = f"1000.1{os.getpid()}"
    client = start_long_jail(marker)
    running = wait_for(lambda: processes_of(CALLER, marker) and jail_cgroups(), 120)
    check("a long jail runs in its cgroup", running, {"jails": jail_cgroups()})
    t = time.monotonic()
    r = sh("systemctl", "stop", UNIT, timeout=180)
    figures["stop_s"] = round(time.monotonic() - t, 2)
    check("systemctl stop succeeds", r.returncode == 0 and
          show("ActiveState")["ActiveState"] == "inactive", r.stdout + r.stderr)
    left = wait_for(lambda: not processes_of(CALLER, marker), 10)
    check("stop leaves no jail process", left, processes_of(CALLER, marker))
    check("stop leaves no cgroup (unit's and jails')",
          not os.path.exists("/sys/fs/cgroup/system.slice/privbrokerd.service"),
          jail_cgroups())
    try:
        client.wait(timeout=60)
    except subprocess.TimeoutExpired:
        client.kill()
    check("the caller's client ends too", client.returncode is not None, client.returncode)
    r = sh("journalctl", "-u", UNIT, "-o", "cat", "--no-pager")
    check("the journal has the stop's result", "Deactivated successfully" in r.stdout
          or "Stopped" in r.stdout, r.stdout[-1500:])


def crash_restarts() -> None:
    r = sh("systemctl", "start", UNIT, timeout=180)
    check("systemctl start", r.returncode == 0, r.stdout + r.stderr)
    first = int(show("MainPID")["MainPID"])
    restarts = int(show("NRestarts")["NRestarts"])
    marker = f"1000.2{os.getpid()}"
    client = start_long_jail(marker)
    wait_for(lambda: processes_of(CALLER, marker) or client.poll() is not None, 120)
    check("a long jail runs before the crash", processes_of(CALLER, marker),
          {"client": client.poll(), "jails": jail_cgroups(),
           "output": client.communicate()[1][-1000:] if client.poll() is not None else None})
    os.kill(first, signal.SIGKILL)
    t = time.monotonic()

    def back():
        st = show("MainPID", "ActiveState", "NRestarts")
        return st if (st["ActiveState"] == "active" and int(st["MainPID"]) not in (0, first)
                      and bus_owner()) else None
    st = wait_for(back, 180)
    figures["restart_after_sigkill_s"] = round(time.monotonic() - t, 1)
    check("SIGKILL of MainPID: Restart=on-failure brings it back, name owned again",
          st and int(st["NRestarts"]) == restarts + 1, st or show("MainPID", "ActiveState",
                                                                   "NRestarts", "Result"))
    check("the crash took its jails (KillMode=mixed)",
          wait_for(lambda: not processes_of(CALLER, marker), 30), processes_of(CALLER, marker))
    try:
        client.wait(timeout=60)
    except subprocess.TimeoutExpired:
        client.kill()
    r = sh("privbroker", "run", "minimal", "--", "/bin/echo", "again", user=CALLER, timeout=180)
    check("launches work after the restart", r.returncode == 0 and r.stdout.strip() == "again",
          r.stdout + r.stderr)


def exposure() -> None:
    r = sh("systemd-analyze", "security", "--no-pager", UNIT, timeout=180)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    figures["exposure_online"] = float(m.group(1)) if m else None
    with open(f"{JOB}/security.txt", "w") as f:
        f.write(r.stdout + r.stderr)
    check("systemd-analyze security (online) scores the running unit", m is not None,
          r.stdout[-800:] + r.stderr)


def journal() -> None:
    r = sh("journalctl", "-u", UNIT, "-o", "short-monotonic", "--no-pager")
    with open(f"{JOB}/journal.txt", "w") as f:
        f.write(r.stdout)
    decisions = [line for line in r.stdout.splitlines() if " decision " in line]
    check("journalctl -u privbrokerd has decision lines",
          any("verdict=allowed" in d for d in decisions) and
          any("verdict=refused" in d for d in decisions), decisions[-10:])
    figures["decision_lines"] = len(decisions)


def remove() -> None:
    r = sh("dpkg", "-r", "privbroker", timeout=300)
    check("dpkg -r removes it, the broker stopped first", r.returncode == 0 and
          show("ActiveState")["ActiveState"] == "inactive" and
          not os.path.exists("/usr/lib/privbroker"), r.stdout + r.stderr)


def main() -> None:
    job = json.load(open(f"{JOB}/job.json"))
    started = time.monotonic()
    steps = [the_machine, lambda: install(job["deb"]), bus_activation, identity, launches,
             seeds_copy_ahead, stop_ends_jails, crash_restarts, exposure, journal, remove]
    for step in steps:
        t = time.monotonic()
        try:
            step()
        except Exception:
            check(f"step {getattr(step, '__name__', 'install')} ran to its end", False,
                  traceback.format_exc())
        figures.setdefault("steps_s", []).append(round(time.monotonic() - t, 1))
    figures["scenario_s"] = round(time.monotonic() - started, 1)
    with open("/proc/uptime") as f:
        figures["uptime_at_end_s"] = float(f.read().split()[0])
    with open(f"{JOB}/figures.json", "w") as f:
        json.dump(figures, f)
    sh("systemctl", "status", "--no-pager", "--full", UNIT)
    r = sh("journalctl", "-b", "--no-pager", "-o", "short-monotonic")
    with open(f"{JOB}/journal-boot.txt", "w") as f:
        f.write(r.stdout)


if __name__ == "__main__":
    try:
        main()
    finally:
        with open(f"{JOB}/done", "w") as f:
            f.write("done\n")
        sys.stdout.flush()
