"""Jail cgroups (broker/jail/cgroups.py) for real: limits the kernel enforces,
kill-all, accounting, removal, and bad input refused before anything exists.

This machine mounts v1 memory, pids, cpu, cpuacct, devices and freezer
hierarchies plus a v2 hierarchy with no controllers: privjail uses v1; the v2
code is driven for real on the controller-less unified hierarchy where it can
be (kill-all, removal, accounting of CPU time) and for its refusals.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from broker import wire
from broker.jail import cgroups
from broker.jail import config as C
from broker.jail.cgroups import V1, V2, Limits, System
from broker.jail.spec import DeviceRule, JailSpec, SpecError, validate
from conftest import JAIL_PYTHON, PRIVJAIL, ROOT, processes_with

SYSTEM = System.probe()
V2_SYSTEM = System.probe(prefer=V2)
V1_FULL = SYSTEM.version == V1 and all(SYSTEM.hierarchy(c) is not None for c in
                                       ("memory", "pids", "cpu", "cpuacct", "devices", "freezer"))
# The unified hierarchy with its controllers for our cgroup's children: not
# on this project's machines (tests/test_vm_cgroup2.py runs this file in a
# VM that has it).
V2_FULL = SYSTEM.version == V2 and all(SYSTEM.hierarchy(c) is not None for c in
                                       ("memory", "pids", "cpu"))
needs_v1 = pytest.mark.skipif(
    not V1_FULL, reason="needs cgroup v1 memory, pids, cpu, cpuacct, devices and freezer hierarchies")
needs_v2 = pytest.mark.skipif(
    not V2_FULL, reason="needs cgroup v2 with the memory, pids and cpu controllers "
                        "(tests/test_vm_cgroup2.py)")
needs_limits = pytest.mark.skipif(not (V1_FULL or V2_FULL), reason="needs the v1 hierarchies "
                                  "or cgroup v2 with the memory, pids and cpu controllers")
needs_v2_mount = pytest.mark.skipif(V2_SYSTEM.version != V2, reason="no cgroup2 mount")
needs_device_control = pytest.mark.skipif(
    not (V1_FULL or SYSTEM.version == V2),
    reason="needs the v1 hierarchies or cgroup v2 (its device programs need no controller)")


def all_hierarchies() -> list[cgroups.Hierarchy]:
    """v1 and v2 alike, whichever System.probe would pick."""
    with open("/proc/self/mountinfo") as f, open("/proc/self/cgroup") as g:
        return cgroups.parse_mounts(f.read(), g.read(), cgroups._known_v1_controllers("/proc"))


def cgroup_dirs(prefix: str) -> set[str]:
    """Every cgroup named prefix* beside where jail cgroups go (our own
    cgroup), in every hierarchy."""
    found = set()
    for h in all_hierarchies():
        d = h.dir_of(h.own)
        for entry in os.listdir(d):
            if entry.startswith(prefix) and os.path.isdir(os.path.join(d, entry)):
                found.add(os.path.join(d, entry))
    return found


def run_privjail(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """privjail ARGS; the result's .left is every cgroup that run left behind
    (its cgroups are named privjail-ITS_PID-...)."""
    p = subprocess.Popen([*PRIVJAIL, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.left = cgroup_dirs(f"privjail-{p.pid}-")
    return r


def alive(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line has marker."""
    out = []
    for pid in processes_with(marker):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


# A double fork with setsid: the grandchild is in its own session, re-parented
# away from the program, and survives the program's exit unless the jail's
# cgroup takes it.
ESCAPE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)        # a daemon: holds no pipe of its caller open
        time.sleep(1000)
    os._exit(0)
time.sleep(float(sys.argv[1]))
"""


# ===========================================================================
# Parsing and validation: bad input gets a named error
# ===========================================================================

def error(*flags: str) -> str:
    with pytest.raises(C.ConfigError) as e:
        C.parse_command_line([*flags, "--", "/bin/true"])
    return str(e.value)


@pytest.mark.parametrize("text,size", [("8M", 8 << 20), ("8m", 8 << 20), ("1G", 1 << 30),
                                       ("4194304", 4 << 20), ("8192K", 8 << 20),
                                       ("1T", 1 << 40)])
def test_memory_limit_sizes(text, size):
    assert C.parse_command_line(["--memory-limit", text, "/bin/true"]).memory_limit == size


def test_memory_limit_as_a_share_of_ram():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    page = os.sysconf("SC_PAGE_SIZE")
    for pct in ("25%", "12.5%", "100%"):
        got = C.parse_command_line(["--memory-limit", pct, "/bin/true"]).memory_limit
        assert got == int(ram * float(pct[:-1]) / 100) // page * page


@pytest.mark.parametrize("text,message", [
    ("-5M", "expected a size like 512M"),
    ("10X", "expected a size like 512M"),
    ("1.5G", "expected a size like 512M"),
    ("M", "expected a size like 512M"),
    ("twelve", "expected a size like 512M"),
    ("150%", "a share of RAM must be above 0% and at most 100%, got '150%'"),
    ("0%", "a share of RAM must be above 0% and at most 100%"),
    ("-5%", "expected a percentage like 25% (of RAM)"),
    ("1.2.3%", "expected a percentage like 25% (of RAM)"),
    ("0", "below the smallest memory limit, 4M"),
    ("1M", "below the smallest memory limit, 4M"),
])
def test_bad_memory_limits_are_named(text, message):
    msg = error("--memory-limit", text)
    assert msg.startswith("option --memory-limit: ") and message in msg, msg


@pytest.mark.parametrize("flags,message", [
    (("--pids-limit", "0"), "option --pids-limit: '0' is out of range (1 to 4194304)"),
    (("--pids-limit", "-3"), "option --pids-limit: expected a number of tasks like 64"),
    (("--pids-limit", "lots"), "option --pids-limit: expected a number of tasks like 64"),
    (("--pids-limit", "5000000"), "out of range"),
    (("--cpu-weight", "0"), "option --cpu-weight: '0' is out of range (1 to 10000)"),
    (("--cpu-weight", "10001"), "out of range (1 to 10000)"),
    (("--cpu-quota", "0%"), "option --cpu-quota: '0%' is out of range"),
    (("--cpu-quota", "half"), "option --cpu-quota: expected a share of one CPU"),
    (("--cpu-quota", "-50%"), "expected a share of one CPU"),
    (("--device-allow", "x 1:3 rwm"), "option --device-allow: expected a device rule"),
    (("--device-allow", "c 1 rwm"), "expected a device rule like 'c 1:3 rwm'"),
    (("--device-allow", "c a:3 rwm"), "expected a device rule"),
    (("--device-allow", "c 1:3"), "expected a device rule"),
    (("--device-allow", "c 1:3 rwx"), "access must be some of r, w, m"),
    (("--device-allow", "c 1:3 rr"), "access must be some of r, w, m"),
    (("--cgroup-parent", "relative/path"), "must be an absolute cgroup path"),
    (("--cgroup-parent", "/a/../b"), "must be an absolute cgroup path"),
    (("--own-cgroup", "-i"), "cannot be combined with -i"),
    (("--pids-limit", "5", "-i"), "cannot be combined with -i"),
])
def test_bad_cgroup_flags_are_named(flags, message):
    msg = error(*flags)
    assert message in msg, msg


def test_device_rules_parse_like_devices_allow():
    spec = C.parse_command_line(["--device-allow", "c 1:3 rwm", "--device-allow", "b *:* m",
                                 "--device-allow", "c 136:* rw", "--device-allow", "a",
                                 "/bin/true"])
    assert spec.device_allow == (DeviceRule("c", 1, 3, "rwm"), DeviceRule("b", None, None, "m"),
                                 DeviceRule("c", 136, None, "rw"),
                                 DeviceRule("a", None, None, "rwm"))
    assert [cgroups.format_device_rule(r) for r in spec.device_allow] == \
        ["c 1:3 rwm", "b *:* m", "c 136:* rw", "a"]


def test_profile_keys_in_a_config_file(tmp_path):
    conf = tmp_path / "limits.conf"
    conf.write_text("% minijail-config-file v0\n"
                    "memory-limit = 256M\npids-limit = 32\ncpu-weight = 50\n"
                    "cpu-quota = 150%\ndevice-allow = c 1:3 rwm\ndevice-allow = c 1:5 r\n"
                    "own-cgroup\n")
    spec = C.parse_command_line(["--config", str(conf), "/bin/true"])
    assert (spec.memory_limit, spec.pids_limit, spec.cpu_weight, spec.cpu_quota) == \
        (256 << 20, 32, 50, 150)
    assert spec.device_allow == (DeviceRule("c", 1, 3, "rwm"), DeviceRule("c", 1, 5, "r"))
    assert spec.own_cgroup and cgroups.wants_cgroup(spec)


@pytest.mark.parametrize("fields,message", [
    (dict(memory_limit=-1), "memory limit (--memory-limit) must be at least 4M"),
    (dict(memory_limit=True), "memory limit"),
    (dict(pids_limit=0), "pids limit (--pids-limit) must be 1 to"),
    (dict(cpu_weight=20000), "CPU weight (--cpu-weight) must be 1 to 10000"),
    (dict(cpu_quota=0), "CPU quota (--cpu-quota) must be 1%"),
    (dict(device_allow=(DeviceRule("q", 1, 3, "r"),)), "type must be a, b or c"),
    (dict(device_allow=(DeviceRule("c", -1, 3, "r"),)), "major and minor must be numbers"),
    (dict(device_allow=(DeviceRule("c", 1, 3, ""),)), "access must be some of r, w, m"),
])
def test_spec_validation_names_the_field(fields, message):
    with pytest.raises(SpecError) as e:
        validate(JailSpec(argv=("/bin/true",), **fields))
    assert message in str(e.value)


def test_limits_survive_the_launcher_wire():
    spec = C.parse_command_line(["-p", "--memory-limit", "64M", "--pids-limit", "9",
                                 "--cpu-weight", "200", "--cpu-quota", "50%",
                                 "--device-allow", "c 1:3 rwm", "--device-allow", "c *:* m",
                                 "--cgroup-parent", "/x", "/bin/true"])
    back = wire.spec_from_wire(json.loads(json.dumps(wire.spec_to_wire(spec))))
    assert back == spec
    bad = wire.spec_to_wire(spec)
    bad["device_allow"] = ["c 1:3 rwm"]
    with pytest.raises(wire.WireError):
        wire.spec_from_wire(bad)
    bad = wire.spec_to_wire(spec)
    bad["pids_limit"] = "9"
    with pytest.raises(wire.WireError):
        wire.spec_from_wire(bad)


# ===========================================================================
# Which version: decided in one place, from mountinfo and /proc/self/cgroup
# ===========================================================================

HYBRID_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/pids rw,nosuid shared:16 - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
"""
HYBRID_SELF = "12:pids:/system.slice/x.service\n5:cpu,cpuacct:/system.slice\n" \
              "4:memory:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n" \
              "0::/system.slice/x.service\n"
KNOWN = {"memory", "cpu", "cpuacct", "pids", "devices", "freezer", "cpuset", "blkio"}


def test_parse_mounts_hybrid_layout():
    hs = cgroups.parse_mounts(HYBRID_MOUNTINFO, HYBRID_SELF, KNOWN)
    by = {h.mountpoint: h for h in hs}
    assert set(by) == {"/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory",
                       "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/pids"}
    assert by["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert by["/sys/fs/cgroup/cpu,cpuacct"].own == "/system.slice"
    assert by["/sys/fs/cgroup/unified"].version == V2
    assert by["/sys/fs/cgroup/memory"].dir_of("/system.slice/x.service/j") == \
        "/sys/fs/cgroup/memory/system.slice/x.service/j"


def test_parse_mounts_container_root_and_escapes():
    # a container sees its own cgroup as the mount's root
    mi = r"40 30 0:33 /docker/abc /sys/fs/cgroup/my\040pids rw - cgroup cgroup rw,pids" + "\n"
    (h,) = cgroups.parse_mounts(mi, "3:pids:/docker/abc\n", KNOWN)
    assert h.mountpoint == "/sys/fs/cgroup/my pids"
    assert h.dir_of("/docker/abc/j1") == "/sys/fs/cgroup/my pids/j1"
    assert h.dir_of("/docker/abc") == "/sys/fs/cgroup/my pids"
    assert h.dir_of("/other/j1") is None


def test_this_machine_is_probed_once_into_one_version():
    assert SYSTEM.version in (V1, V2, None)
    if SYSTEM.version == V1:
        # hybrid: v1 wins as soon as it mounts a limit controller
        assert {c for h in SYSTEM.hierarchies for c in h.controllers} >= {"memory", "pids"}
        assert all(h.version == V1 for h in SYSTEM.hierarchies)


def test_no_cgroup_filesystem_is_unsupported():
    with pytest.raises(cgroups.Unsupported) as e:
        System(None, ()).create("pbt-none", Limits(pids=5))
    assert "no cgroup file system" in str(e.value)


# ===========================================================================
# Real limits through privjail
# ===========================================================================

ALLOCATE = "x = bytearray(256 << 20); print('survived')"


@needs_limits
@pytest.mark.parametrize("flags", [["-p"], ["-u", "nobody", "-g", "nogroup"]],
                         ids=["init-in-pid-ns", "program-is-top"])
def test_over_the_memory_limit_the_oom_killer_ends_the_jail(flags):
    r = run_privjail(*flags, "--memory-limit", "32M", "--", JAIL_PYTHON, "-c", ALLOCATE)
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    assert "survived" not in r.stdout
    assert "killed by the OOM killer: it hit its memory limit (33554432 bytes)" in r.stderr
    assert r.left == set()                              # the cgroup is gone


@needs_limits
def test_under_the_memory_limit_nothing_happens():
    r = run_privjail("-p", "--memory-limit", "128M", "--", JAIL_PYTHON, "-c",
                     "x = bytearray(32 << 20); print('fine')")
    assert (r.returncode, r.stdout.strip()) == (0, "fine"), r.stderr
    assert "OOM" not in r.stderr


FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@needs_limits
def test_a_fork_bomb_stops_at_the_pids_limit_and_the_host_stays_responsive():
    limit = 40
    p = subprocess.Popen([*PRIVJAIL, "-p", "--pids-limit", str(limit), "--", JAIL_PYTHON,
                          "-c", FORK_BOMB], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        pids_dir = SYSTEM.hierarchy("pids").dir_of(SYSTEM.hierarchy("pids").own)
        deadline = time.monotonic() + 20
        cg = None
        while cg is None and time.monotonic() < deadline:
            found = [e for e in os.listdir(pids_dir) if e.startswith(f"privjail-{p.pid}-")]
            cg = os.path.join(pids_dir, found[0]) if found else None
            time.sleep(0.01)
        assert cg, "privjail made no pids cgroup"
        # The bomb fills its cgroup and keeps trying...
        while cgroups._read_int(f"{cg}/pids.current") < limit and time.monotonic() < deadline:
            time.sleep(0.05)
        peak, spawn_times = 0, []
        for _ in range(8):
            # the processes there, not pids.current: the kernel charges a fork
            # before it refuses it, so a reader may see the limit plus the
            # forks being refused at that instant (seen: 41 of 40)
            with open(f"{cg}/cgroup.procs") as f:
                peak = max(peak, len(f.read().split()))
            # ...while the host still starts processes promptly.
            t = time.monotonic()
            subprocess.run(["/bin/true"], check=True, timeout=10)
            spawn_times.append(time.monotonic() - t)
            time.sleep(0.1)
        assert peak == limit
        assert cgroups._read_key(f"{cg}/pids.events", "max") > 0     # forks were refused
        assert max(spawn_times) < 2.0, spawn_times
    finally:
        p.send_signal(signal.SIGTERM)            # forwarded to the jail
        rc = p.wait(timeout=20)
    assert rc == 128 + signal.SIGTERM
    assert not [e for e in os.listdir(pids_dir) if e.startswith(f"privjail-{p.pid}-")]


DEVICE_PROBE = """
import errno, json, os, sys
seen = {}
for name, mode in (("/dev/null", "r+b"), ("/dev/zero", "rb"), ("/dev/zero", "r+b"),
                   ("/dev/full", "rb")):
    try:
        open(name, mode).close()
        seen[f"{name} {mode}"] = "ok"
    except OSError as e:
        seen[f"{name} {mode}"] = errno.errorcode[e.errno]
try:
    os.mknod(sys.argv[1], 0o600 | 0o020000, os.makedev(1, 1))    # /dev/mem's numbers
    seen["mknod"] = "ok"
    os.unlink(sys.argv[1])
except OSError as e:
    seen["mknod"] = errno.errorcode[e.errno]
seen["uid"] = os.getuid()
print(json.dumps(seen))
"""


@needs_device_control
@pytest.mark.parametrize("ns", [[], ["-p", "-v"]], ids=["host-dev", "pid-and-mount-ns"])
def test_devices_outside_the_allow_list_cannot_be_opened_even_by_root(ns, world_tmp):
    """v1: the devices controller; v2 (in the VM): the device program."""
    node = str(world_tmp / "mem")
    r = run_privjail(*ns, "--allow-forbidden-intersection", "--device-allow", "c 1:3 rwm",
                     "--device-allow", "c 1:5 r", "--", JAIL_PYTHON, "-c", DEVICE_PROBE, node)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen == {"/dev/null r+b": "ok", "/dev/zero rb": "ok", "/dev/zero r+b": "EPERM",
                    "/dev/full rb": "EPERM", "mknod": "EPERM", "uid": 0}
    # the same program without an allow list: root may do all of it
    r = run_privjail(*ns, "--allow-forbidden-intersection", "--", JAIL_PYTHON, "-c",
                     DEVICE_PROBE, node)
    assert set(json.loads(r.stdout).values()) == {"ok", 0}


@needs_limits
def test_kill_all_takes_what_double_forked_out_of_the_program():
    marker = f"escape-{time.monotonic_ns()}"
    r = run_privjail("-u", "nobody", "-g", "nogroup", "--own-cgroup", "--", JAIL_PYTHON,
                     "-c", ESCAPE, "0.3", marker)
    assert r.returncode == 0, r.stderr
    assert alive(marker) == []                          # nothing left, not even a zombie
    assert processes_with(marker) == []
    assert r.left == set()
    # Without its own cgroup the grandchild does outlive the jail: the test
    # above is not vacuous.
    r = run_privjail("-u", "nobody", "-g", "nogroup", "--", JAIL_PYTHON, "-c", ESCAPE,
                     "0.3", marker)
    try:
        assert r.returncode == 0, r.stderr
        assert alive(marker)
    finally:
        for pid in alive(marker):
            os.kill(pid, signal.SIGKILL)


@needs_limits
def test_bad_flags_leave_no_cgroup_behind():
    for flags in (["--memory-limit", "-5M"], ["--memory-limit", "10X"],
                  ["--memory-limit", "150%"], ["--pids-limit", "-1"],
                  ["--device-allow", "c 1:3 rwx"]):
        r = run_privjail("-p", *flags, "--", "/bin/true")
        assert r.returncode == 1 and f"option {flags[0]}:" in r.stderr, (flags, r.stderr)
        assert r.left == set()


@needs_v1
def test_a_create_that_fails_halfway_takes_back_what_it_made():
    """The parent exists in the freezer and pids hierarchies only: the
    directories made there are removed when the memory one cannot be."""
    parent = f"pbt-parent-{os.getpid()}"
    made = []
    for c in ("freezer", "pids"):
        h = SYSTEM.hierarchy(c)
        d = h.dir_of(f"/{parent}")
        os.mkdir(d)
        made.append(d)
    try:
        r = run_privjail("-p", "--cgroup-parent", f"/{parent}", "--pids-limit", "10", "--",
                         "/bin/true")
        assert r.returncode == 252, r.stderr
        assert "jail setup failed at step 'cgroup'" in r.stderr
        assert "No such file or directory" in r.stderr and "memory" in r.stderr
        for d in made:
            assert os.listdir(d) and not [e for e in os.listdir(d) if e.startswith("privjail-")]
    finally:
        for d in made:
            os.rmdir(d)


@needs_limits
def test_cgroup_parent_puts_the_jail_there(world_tmp):
    parent = f"pbt-parent-{os.getpid()}"
    made = [h.dir_of(f"/{parent}") for h in SYSTEM.plan(Limits(pids=10))]
    for d in made:
        os.mkdir(d)
    try:
        r = run_privjail("-p", "--cgroup-parent", f"/{parent}", "--pids-limit", "10", "--",
                         "/bin/cat", "/proc/self/cgroup")
        assert r.returncode == 0, r.stderr
        # v1: "N:pids:/parent/privjail-..." and one line for each other
        # hierarchy (memory, ...); v2: the one line "0::/parent/privjail-..."
        for h in SYSTEM.plan(Limits(pids=10)):
            assert f":{h.proc_key()}:/{parent}/privjail-" in r.stdout, (h, r.stdout)
        assert all(not [e for e in os.listdir(d) if e.startswith("privjail-")] for d in made)
    finally:
        for d in made:
            os.rmdir(d)


# ===========================================================================
# The API on its own: kill-all, accounting, removal, on v1 and on v2
# ===========================================================================

def _procs_fds(dirs) -> list[int]:
    return [os.open(f"{d}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for d in dirs]


def _join(fds: list[int]) -> None:
    for fd in fds:
        os.write(fd, b"0")          # "0": the writing process itself


def spawn_in(cg: cgroups.Cgroup, *argv: str) -> subprocess.Popen:
    """argv, in the cgroup from before its exec (it joins itself)."""
    fds = _procs_fds(cg.dirs.values())
    try:
        return subprocess.Popen(list(argv), preexec_fn=lambda: _join(fds),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        for fd in fds:
            os.close(fd)


def _versions():
    out = []
    if SYSTEM.version == V1:
        out.append(pytest.param(SYSTEM, id="v1"))
    if V2_SYSTEM.version == V2:
        out.append(pytest.param(V2_SYSTEM, id="v2"))
    return out


@pytest.mark.parametrize("system", _versions())
def test_add_moves_a_process_in_everywhere_and_names_a_pid_it_cannot(system):
    cg = system.create(f"pbt-{os.getpid()}-add", Limits())
    p = subprocess.Popen(["sleep", "30"])
    try:
        cg.add(p.pid)
        with open(f"/proc/{p.pid}/cgroup") as f:
            lines = f.read().splitlines()
        for h, path in cg.paths.items():
            assert f"{h.proc_key()}:{path}" in [l.split(":", 1)[1] for l in lines], (h, lines)
        assert cg.pids() == [p.pid]
        p.kill()
        p.wait()
        with pytest.raises(cgroups.CgroupError, match=f"cannot move pid {p.pid}"):
            cg.add(p.pid)           # reaped: no such process
    finally:
        p.kill()
        p.wait()
        assert cg.destroy() is True


@pytest.mark.parametrize("system", _versions())
def test_kill_all_leaves_nothing_and_the_cgroup_goes(system):
    marker = f"killall-{system.version}-{time.monotonic_ns()}"
    cg = system.create(f"pbt-{os.getpid()}-{marker[-6:]}", Limits())
    try:
        top = spawn_in(cg, sys.executable, "-c", ESCAPE, "1000", marker)
        deadline = time.monotonic() + 10
        while len(alive(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        members = cg.pids()
        assert len(alive(marker)) == 2 and set(alive(marker)) <= set(members)
        assert cg.kill_all() is True
        assert cg.pids() == [] and cg.empty()
        top.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert alive(marker) == []
    finally:
        assert cg.destroy() is True
    assert not any(os.path.exists(d) for d in cg.dirs.values())


@pytest.mark.parametrize("system", _versions())
def test_signal_members_never_leaves_the_cgroup(system):
    cg = system.create(f"pbt-{os.getpid()}-sig", Limits())
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        inside = spawn_in(cg, "sleep", "30")
        deadline = time.monotonic() + 5
        while inside.pid not in cg.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cg.contains(inside.pid) and not cg.contains(outsider.pid)
        # even if told to, an outsider's pid from a stale list is checked first
        assert cg.signal_members(signal.SIGTERM) == 1
        assert inside.wait(timeout=10) == -signal.SIGTERM
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()
        cg.destroy()


@pytest.mark.parametrize("system", _versions())
def test_accounting_reads_cpu_memory_and_pids(system):
    cg = system.create(f"pbt-{os.getpid()}-stats", Limits())
    try:
        p = spawn_in(cg, sys.executable, "-c",
                     "import time\nx = bytearray(24 << 20)\nt = time.process_time()\n"
                     "while time.process_time() - t < 0.3: pass\ntime.sleep(30)")
        accounts_memory = cg.dir("memory") and (system.version == V1 or "memory" in
                                                system.hierarchies[0].controllers)
        # Both, not just the CPU time: on a slow machine (the VM of
        # tests/test_vm_cgroup2.py) Python's start alone takes 0.25 s of CPU.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = cg.stats()
            if (st.cpu_usec or 0) >= 250_000 and \
                    (not accounts_memory or (st.memory_bytes or 0) >= 24 << 20):
                break
            time.sleep(0.05)
        st = cg.stats()
        assert st.cpu_usec >= 250_000
        assert st.pids == 1
        if accounts_memory:
            assert st.memory_bytes >= 24 << 20
            assert st.oom_kills == 0
        p.kill()
        p.wait()
    finally:
        cg.destroy()


@needs_v1
def test_cpu_quota_and_weight_are_enforced():
    cg = SYSTEM.create(f"pbt-{os.getpid()}-cpu", Limits(cpu_quota=20, cpu_weight=50))
    try:
        assert cgroups._read_int(f"{cg.dir('cpu')}/cpu.shares") == 512
        assert cgroups._read_int(f"{cg.dir('cpu')}/cpu.cfs_quota_us") == 20_000
        p = spawn_in(cg, sys.executable, "-c",
                     "import time\nt = time.monotonic()\n"
                     "while time.monotonic() - t < 1.0: pass")
        p.wait(timeout=30)
        used = cg.stats().cpu_usec
        assert 100_000 <= used <= 400_000, used      # ~20% of the 1 s it ran for
    finally:
        cg.destroy()


@needs_v1
def test_memory_limit_and_oom_count_on_v1():
    cg = SYSTEM.create(f"pbt-{os.getpid()}-oom", Limits(memory=16 << 20))
    try:
        assert cgroups._read_int(f"{cg.dir('memory')}/memory.limit_in_bytes") == 16 << 20
        p = spawn_in(cg, sys.executable, "-c", ALLOCATE)
        assert p.wait(timeout=30) == -signal.SIGKILL
        assert cg.oom_kills() == 1
    finally:
        cg.destroy()


@needs_v2
def test_cpu_weight_and_quota_on_v2():
    """cpu.weight and cpu.max as written, and what the kernel makes of them:
    a busy loop under a 20% quota gets about a fifth of a CPU, and two busy
    loops sharing one CPU split it by their weights (200 against 50)."""
    cg = SYSTEM.create(f"pbt-{os.getpid()}-cpu", Limits(cpu_quota=20, cpu_weight=50))
    heavy = SYSTEM.create(f"pbt-{os.getpid()}-cpu200", Limits(cpu_weight=200))
    light = SYSTEM.create(f"pbt-{os.getpid()}-cpu50", Limits(cpu_weight=50))
    procs = []
    try:
        assert cgroups._read(f"{cg.dir('cpu')}/cpu.weight").strip() == "50"
        assert cgroups._read(f"{cg.dir('cpu')}/cpu.max").split() == ["20000", "100000"]
        assert cgroups._read(f"{heavy.dir('cpu')}/cpu.weight").strip() == "200"
        assert cgroups._read(f"{heavy.dir('cpu')}/cpu.max").split() == ["max", "100000"]
        busy = [sys.executable, "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"]
        procs = [spawn_in(c, *busy) for c in (cg, heavy, light)]
        time.sleep(1.5)                            # past Python's start
        before, t0 = [c.stats().cpu_usec for c in (cg, heavy, light)], time.monotonic()
        time.sleep(3.0)
        after, t1 = [c.stats().cpu_usec for c in (cg, heavy, light)], time.monotonic()
        quota, w200, w50 = ((a - b) / 1e6 / (t1 - t0) for a, b in zip(after, before))
        assert 0.1 <= quota <= 0.3, quota            # ~20% of one CPU
        assert w200 > 2 * w50, (w200, w50)           # ~4:1 of what CPU 0 had left
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for c in (cg, heavy, light):
            c.destroy()


@needs_v2
def test_memory_limit_and_oom_count_on_v2():
    cg = SYSTEM.create(f"pbt-{os.getpid()}-oom", Limits(memory=16 << 20))
    try:
        assert cgroups._read_int(f"{cg.dir('memory')}/memory.max") == 16 << 20
        if os.path.exists(f"{cg.dir('memory')}/memory.swap.max"):
            assert cgroups._read_int(f"{cg.dir('memory')}/memory.swap.max") == 0
        assert cg.oom_kills() == 0
        p = spawn_in(cg, sys.executable, "-c", ALLOCATE)
        assert p.wait(timeout=60) == -signal.SIGKILL
        assert cg.oom_kills() == 1
        assert cgroups._read_key(f"{cg.dir('memory')}/memory.events", "max") > 0
    finally:
        assert cg.destroy() is True
    assert not os.path.exists(cg.dir("memory"))


@needs_v2_mount
def test_a_v2_device_program_refuses_what_no_rule_allows(world_tmp):
    """The program devfilter builds, attached by create() to a cgroup of the
    v2 hierarchy (this machine's unified mount, with no controllers: device
    programs need none), enforced by the kernel on a root process in it."""
    node = str(world_tmp / "mem")
    cg = V2_SYSTEM.create(f"pbt-{os.getpid()}-devbpf",
                          Limits(devices=(DeviceRule("c", 1, 3, "rwm"), DeviceRule("c", 1, 5, "r"))))
    try:
        fds = _procs_fds(cg.dirs.values())
        try:
            inside = subprocess.run([JAIL_PYTHON, "-c", DEVICE_PROBE, node], capture_output=True,
                                    text=True, timeout=60, preexec_fn=lambda: _join(fds))
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        assert cg.destroy() is True
    assert json.loads(inside.stdout) == {
        "/dev/null r+b": "ok", "/dev/zero rb": "ok", "/dev/zero r+b": "EPERM",
        "/dev/full rb": "EPERM", "mknod": "EPERM", "uid": 0}, inside.stderr
    # the same probe outside that cgroup: root may do all of it (not vacuous)
    outside = subprocess.run([JAIL_PYTHON, "-c", DEVICE_PROBE, node], capture_output=True,
                             text=True, timeout=60)
    assert set(json.loads(outside.stdout).values()) == {"ok", 0}, outside.stderr


@needs_v2_mount
def test_a_device_program_that_cannot_be_installed_is_a_named_error_and_leaves_nothing():
    """Without CAP_SYS_ADMIN and CAP_BPF the kernel refuses the program:
    create() says so, and the cgroup it had made is gone."""
    name = f"pbt-{os.getpid()}-devnocap"
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from broker.jail import cgroups, syscalls\n"
            "from broker.jail.spec import DeviceRule\n"
            "eff, prm, inh = syscalls.capget()\n"
            "gone = ~((1 << 21) | (1 << 39))          # CAP_SYS_ADMIN, CAP_BPF\n"
            "syscalls.capset(eff & gone, prm & gone, inh & gone)\n"
            "try:\n"
            "    cgroups.System.probe(prefer=cgroups.V2).create(%r, cgroups.Limits(\n"
            "        devices=(DeviceRule('c', 1, 3, 'rwm'),)))\n"
            "except cgroups.CgroupError as e:\n"
            "    print(e.step, e)\n" % (str(ROOT), name))
    r = subprocess.run([JAIL_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("devices "), (r.stdout, r.stderr)
    assert "cannot install the device allow list" in r.stdout and "CAP_SYS_ADMIN" in r.stdout
    assert cgroup_dirs(name) == set()


@needs_v2_mount
def test_v2_refuses_missing_controllers_before_making_anything():
    before = cgroup_dirs(f"pbt-{os.getpid()}-")
    offered = V2_SYSTEM.hierarchies[0].controllers
    if "memory" not in offered:                # this machine: no v2 controllers
        with pytest.raises(cgroups.Unsupported) as e:
            V2_SYSTEM.create(f"pbt-{os.getpid()}-mem", Limits(memory=64 << 20))
        assert "memory controller(s) are not available" in str(e.value)
    assert cgroup_dirs(f"pbt-{os.getpid()}-") == before


@needs_v2_mount
def test_enter_leaf_moves_a_daemon_below_its_delegated_cgroup():
    """A stand-in for privbrokerd under systemd's Delegate=yes: a process in
    its own v2 cgroup moves into <own>/privbrokerd and reports <own>."""
    h = V2_SYSTEM.hierarchies[0]
    own = h.dir_of(h.own)
    delegated = os.path.join(own, f"pbt-{os.getpid()}-svc")
    os.mkdir(delegated)
    try:
        code = ("import sys; from broker.jail import cgroups\n"
                f"open('{delegated}/cgroup.procs', 'w').write('0')\n"
                "print(cgroups.enter_leaf('privbrokerd', prefer=cgroups.V2))\n"
                "print(open('/proc/self/cgroup').read().splitlines()[-1])")
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        rel = h.own.rstrip("/") + f"/pbt-{os.getpid()}-svc"
        assert p.stdout.split() == [rel, f"0::{rel}/privbrokerd"]
    finally:
        for d in (os.path.join(delegated, "privbrokerd"), delegated):
            if os.path.isdir(d):
                os.rmdir(d)


@pytest.mark.parametrize("system", _versions())
def test_members_of_a_cgroup_below_the_jails_are_found_and_killed(system):
    """A process in a cgroup made below the jail's is still the jail's: seen
    by pids() and empty() (which skip listing a leaf directory), killed by
    destroy(), and both directories go."""
    cg = system.create(f"pbt-{os.getpid()}-nest", Limits())
    top = cg.dirs[cg._procs_hierarchy]
    below = os.path.join(top, "inner")
    os.mkdir(below)
    try:
        fds = _procs_fds([below])
        try:
            p = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: _join(fds))
        finally:
            os.close(fds[0])
        deadline = time.monotonic() + 5
        while p.pid not in cg.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.pid in cg.pids() and not cg.empty()
        assert cg.destroy() is True
        assert p.wait(timeout=10) == -signal.SIGKILL
        assert not os.path.exists(below) and not os.path.exists(top)
    finally:
        if os.path.isdir(below):
            os.rmdir(below)
        cg.destroy()
    assert not any(os.path.exists(d) for d in cg.dirs.values())


@pytest.mark.parametrize("system", _versions())
def test_a_cgroup_whose_processes_are_gone_is_removed_at_once(system):
    cg = system.create(f"pbt-{os.getpid()}-gone", Limits())
    spawn_in(cg, "/bin/true").wait(timeout=10)
    assert cg.empty()
    assert cg.destroy(timeout=0) is True           # no kill-all, no waiting
    assert not any(os.path.exists(d) for d in cg.dirs.values())


def test_the_remembered_probe_follows_a_change_of_mount_table():
    """System.current() is probe() remembered; once the mount table reads
    differently (here: the pids hierarchy unmounted in a private mount
    namespace) it probes again."""
    from broker.jail import syscalls as sc
    h = SYSTEM.hierarchy("pids")
    if h is None:
        pytest.skip("no pids hierarchy")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            first = System.current()
            same = System.current() is first and first == System.probe()
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            sc.umount2(h.mountpoint, sc.MNT_DETACH)
            after = System.current()
            os.write(w, json.dumps([same, first.hierarchy("pids") is not None,
                                    after.hierarchy("pids") is None]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        assert json.loads(f.read()) == [True, True, True] and status == 0


@needs_v1
def test_a_rename_is_all_or_nothing_and_v2_refuses_it():
    """Cgroup.rename (a seed's cgroup gets the jail's name, launch.py): when
    the name is taken in one hierarchy, every directory keeps the old name
    and the cgroup can still be removed."""
    old, new = f"pbt-{os.getpid()}-ren-a", f"pbt-{os.getpid()}-ren-b"
    cg = SYSTEM.create(old, Limits())
    last = list(cg.dirs.values())[-1]
    taken = os.path.join(os.path.dirname(last), new)
    os.mkdir(taken)
    try:
        with pytest.raises(cgroups.CgroupError) as e:
            cg.rename(new)
        assert e.value.step == "rename"
        assert all(os.path.basename(d) == old and os.path.isdir(d) for d in cg.dirs.values())
        assert cg.name == old
    finally:
        os.rmdir(taken)
    cg.rename(new)
    assert all(os.path.basename(d) == new and os.path.isdir(d) for d in cg.dirs.values())
    assert cg.destroy() is True
    assert cgroup_dirs(f"pbt-{os.getpid()}-ren") == set()
    if V2_SYSTEM.version == V2:
        v2 = V2_SYSTEM.create(old, Limits())
        try:
            with pytest.raises(cgroups.Unsupported):
                v2.rename(new)
        finally:
            assert v2.destroy() is True
