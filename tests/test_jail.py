"""privjail end to end: each flag, alone and combined, as the probe inside sees it."""
from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import stat
import subprocess
import time

import pytest

from conftest import (JAIL_PYTHON, PRIVJAIL, PROBE, PROBE_DIR, ROOT, host_ns, mount_table,
                      privjail, processes_with)

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = 65534
MINIMAL = ["--profile", "minimalistic-mountns"]
CAP_CHOWN, CAP_FOWNER, CAP_NET_RAW, CAP_SYS_ADMIN = 0, 3, 13, 21


def bit(*caps: int) -> int:
    return sum(1 << c for c in caps)


def mountpoints(report: dict) -> dict[str, dict]:
    return {m["mountpoint"]: m for m in report["mounts"]}


# -- namespaces ---------------------------------------------------------------

@pytest.mark.parametrize("flag,ns", [("-v", "mnt"), ("-e", "net"), ("-l", "ipc"),
                                     ("--uts", "uts"), ("-N", "cgroup"), ("-p", "pid")])
def test_each_namespace_flag_gives_its_own_namespace(flag, ns):
    r = privjail(flag)
    assert r.rc == 0, r.stderr
    seen = r.report["ns"]
    assert seen[ns] != host_ns(ns)
    # and only that one (plus the mount ns that -p implies)
    implied = {"pid": {"mnt"}}.get(ns, set())
    for other in ("mnt", "net", "ipc", "uts", "cgroup", "pid", "user"):
        if other != ns and other not in implied:
            assert seen[other] == host_ns(other), other


def test_pid_namespace_runs_an_init_and_sees_only_the_jail():
    r = privjail("-p")
    assert r.rc == 0, r.stderr
    assert r.report["pid"] == 2 and r.report["ppid"] == 1
    assert r.report["visible_pids"] == [1, 2]
    assert r.report["proc_readonly"] is True      # -p implies -r


def test_program_as_pid_1():
    r = privjail("-I")
    assert r.rc == 0, r.stderr
    assert r.report["pid"] == 1
    assert r.report["visible_pids"] == [1]


def test_net_namespace_has_only_loopback():
    r = privjail("-e")
    assert r.report["net_ifaces"] == ["lo"]


def test_uts_namespace_with_hostname():
    r = privjail("--uts=jailbox")
    assert r.report["hostname"] == "jailbox"
    assert os.uname().nodename != "jailbox"


def test_user_namespace_with_maps():
    r = privjail("-U", "-m0 100000 10", "-M0 100000 10", "-u", "3", "-g", "4")
    assert r.rc == 0, r.stderr
    assert r.report["ns"]["user"] != host_ns("user")
    assert r.report["uid"] == 3 and r.report["gid"] == 4


# -- identity and privilege ----------------------------------------------------

def test_uid_gid_drop_clears_groups_and_caps():
    r = privjail("-u", "nobody", "-g", "nogroup")
    rep = r.report
    assert (rep["uid"], rep["euid"], rep["suid"]) == (NOBODY,) * 3
    assert (rep["gid"], rep["egid"], rep["sgid"]) == (NOGROUP,) * 3
    assert rep["groups"] == []
    assert rep["caps"]["prm"] == rep["caps"]["eff"] == rep["caps"]["amb"] == 0


def test_supplementary_groups_added():
    r = privjail("-u", "nobody", "-g", "nogroup", "--add-suppl-group", "4242")
    assert r.report["groups"] == [4242]


def test_root_with_capability_mask_keeps_exactly_the_mask():
    r = privjail("-c", "cap_chown,cap_fowner+eip")
    caps = r.report["caps"]
    assert caps["eff"] == caps["prm"] == caps["bnd"] == bit(CAP_CHOWN, CAP_FOWNER)
    assert caps["amb"] == 0


def test_non_root_keeps_caps_through_ambient():
    r = privjail("-u", "nobody", "-g", "nogroup", "-c", hex(bit(CAP_NET_RAW)), "--ambient")
    caps = r.report["caps"]
    assert caps["amb"] == caps["eff"] == caps["prm"] == bit(CAP_NET_RAW)
    assert caps["bnd"] == bit(CAP_NET_RAW)


def test_non_root_without_ambient_loses_caps_at_exec():
    r = privjail("-u", "nobody", "-g", "nogroup", "-c", hex(bit(CAP_NET_RAW)))
    caps = r.report["caps"]
    assert caps["eff"] == caps["prm"] == caps["amb"] == 0
    assert caps["bnd"] == bit(CAP_NET_RAW)


def test_securebits_locked_by_default_and_skippable():
    locked = privjail("-u", "nobody", "-g", "nogroup", "-c", "cap_net_raw+eip", "--ambient")
    # NOROOT | NO_SETUID_FIXUP with locks; KEEP_CAPS is cleared by exec.
    assert locked.report["securebits"] & 0b1111 == 0b1111
    skipped = privjail("-u", "nobody", "-g", "nogroup", "-c", "cap_net_raw+eip", "--ambient",
                       "-B", "0x3")
    assert skipped.report["securebits"] & 0b11 == 0
    assert skipped.report["securebits"] & 0b1100 == 0b1100


def test_no_new_privs():
    assert privjail().report["no_new_privs"] == 0
    assert privjail("-n").report["no_new_privs"] == 1


def test_rlimits():
    r = privjail("-R", "RLIMIT_NOFILE,64,128", "-R", "RLIMIT_CORE,0,unlimited")
    assert r.report["rlimits"]["RLIMIT_NOFILE"] == [64, 128]
    assert r.report["rlimits"]["RLIMIT_CORE"] == [0, -1]


# -- filesystem -----------------------------------------------------------------

def test_minimalistic_profile(tmp_path):
    r = privjail("-p", *MINIMAL)
    assert r.rc == 0, r.stderr
    mp = mountpoints(r.report)
    assert mp["/"]["options"].startswith("ro")
    assert mp["/proc"]["fstype"] == "proc" and r.report["proc_readonly"]
    assert mp["/tmp"]["fstype"] == "tmpfs"
    assert mp["/dev"]["fstype"] == "tmpfs"
    assert set(r.report["dev_entries"]) == {
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "fd",
        "stdin", "stdout", "stderr", "ptmx"}
    assert "sys" in r.report["root_dir_entries"]


def test_read_only_and_writable_binds(tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    r = privjail("-v", "-b", f"{ro}", "-b", f"{rw},{rw},1",
                 probe_args=["--touch", f"{ro}/f", "--touch", f"{rw}/f"])
    assert r.rc == 0, r.stderr
    touch_ro, touch_rw = r.reports[1], r.reports[2]
    assert not touch_ro["ok"] and touch_ro["errno"] == errno.EROFS
    assert touch_rw["ok"] and (rw / "f").exists()


def test_filesystem_mount_with_flags_and_data(tmp_path):
    r = privjail("-v", "-k", f"tmpfs,{tmp_path},tmpfs,MS_NODEV|MS_NOEXEC|MS_NOSUID,size=1M")
    m = mountpoints(r.report)[str(tmp_path)]
    assert m["fstype"] == "tmpfs"
    assert {"nodev", "noexec", "nosuid"} <= set(m["options"].split(","))
    assert "size=1024k" in m["super_options"]


def _usr_merged_root(root):
    """A directory that runs /usr/bin/python3 once /usr is bound into it."""
    for d in ("usr", "tests", "proc"):
        (root / d).mkdir()
    for link in ("lib", "lib64", "bin"):
        (root / link).symlink_to(f"usr/{link}")


def test_chroot(tmp_path):
    _usr_merged_root(tmp_path)
    r = privjail("-v", "-C", str(tmp_path), "-b", "/usr", "-b", f"{PROBE_DIR},/tests",
                 program=["/usr/bin/python3", "/tests/probe.py"])
    assert r.rc == 0, r.stderr
    assert set(r.report["root_dir_entries"]) == {"usr", "lib", "lib64", "bin", "tests", "proc"}
    assert r.report["cwd"] == "/"


def test_pivot_root_into_a_directory(tmp_path):
    _usr_merged_root(tmp_path)
    r = privjail("-p", "-P", str(tmp_path), "-b", "/usr", "-b", f"{PROBE_DIR},/tests",
                 program=["/usr/bin/python3", "/tests/probe.py"])
    assert r.rc == 0, r.stderr
    assert set(r.report["root_dir_entries"]) == {"usr", "lib", "lib64", "bin", "tests", "proc"}
    assert r.report["visible_pids"] == [1, 2]
    assert mountpoints(r.report)["/proc"]["fstype"] == "proc"


def test_mount_propagation_default_slave():
    r = privjail("-v")
    root = mountpoints(r.report)["/"]
    assert r.report["ns"]["mnt"] != host_ns("mnt")
    # the host's / is private here; slave of a private mount stays private,
    # so what we check is that the jail's / is not shared with the host.
    assert "shared" not in root["propagation"]


# -- environment, fds, cwd ------------------------------------------------------

def test_env_reset_and_add():
    # /usr/bin/env, not the probe: python adds LC_CTYPE to a C-locale environment.
    r = privjail("--env-reset", "--env-add", "A=1", "--env-add", "B=x=y",
                 program=["/usr/bin/env"])
    assert r.stdout.splitlines() == ["A=1", "B=x=y"]


def test_no_fd_leaks_into_the_jail():
    r_fd, w_fd = os.pipe()
    os.set_inheritable(r_fd, True)
    try:
        r = privjail("-p", pass_fds=(r_fd,))
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert r.report["fds"] == [0, 1, 2]


# -- init, signals, exit status ----------------------------------------------------

def test_exit_code_propagates():
    assert privjail("-p", probe_args=["--exit", "7"]).rc == 7
    assert privjail(probe_args=["--exit", "9"]).rc == 9


def test_signal_death_becomes_128_plus_signal():
    assert privjail("-p", probe_args=["--kill-self", "9"]).rc == 128 + 9
    assert privjail(probe_args=["--kill-self", "15"]).rc == 128 + 15


def test_init_reaps_orphans():
    # Five orphans are re-parented to the jail's pid 1; once they exit, none
    # is left as a zombie.
    script = ("for i in 1 2 3 4 5; do (sleep 0.3 &) ; done; sleep 0.1; "
              "echo orphans $(grep -l '^PPid:.1$' /proc/[0-9]*/status | wc -l); sleep 0.6; "
              "for s in /proc/[0-9]*/stat; do read -r line < $s && echo \"$line\"; done")
    r = privjail("-p", program=["/bin/sh", "-c", script])
    assert r.rc == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "orphans 6"           # the five sleeps, and sh itself
    states = [line.rsplit(")", 1)[1].split()[0] for line in lines[1:]]
    assert len(states) == 2 and "Z" not in states, r.stdout   # pid 1 and sh only


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                 signal.SIGUSR1, signal.SIGUSR2])
def test_signals_are_forwarded_to_the_program(tmp_path, sig):
    log = tmp_path / "signals"
    proc = subprocess.Popen(
        [*PRIVJAIL, "-p", "-v", "-b", f"{tmp_path},{tmp_path},1", "--", JAIL_PYTHON, PROBE,
         "--signal-log", str(log), "--wait-signal"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()                                   # the report
    assert '"waiting"' in proc.stdout.readline()             # the handlers are in place
    proc.send_signal(sig)
    rc = proc.wait(timeout=10)
    assert rc == 100 + sig
    assert log.read_text().split() == [str(int(sig))]


def test_die_with_parent_kills_the_jail(tmp_path):
    marker = f"dwp-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen([*PRIVJAIL, "-p", "--die-with-parent", "--", "/bin/sh", "-c",
                             "sleep 30", marker], cwd=ROOT)
    deadline = time.monotonic() + 5
    while not processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker), "the jail never started"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


def test_detached_jail_outlives_privjail(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    rc = subprocess.call([*PRIVJAIL, "--allow-forbidden-intersection", "-i", "-v",
                          "-b", f"{tmp_path},{tmp_path},1", "--",
                          # written aside and renamed: the test polls for the name, and a
                          # plain `>` makes the name before the write (seen in CI: '' read)
                          "/bin/sh", "-c", f"sleep 1; echo done > {out}.tmp; mv {out}.tmp {out}"],
                         cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    assert rc == 0
    assert time.monotonic() - start < 1 and not out.exists()   # returned at once
    deadline = time.monotonic() + 5
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text() == "done\n"


def test_pidfile_names_the_jails_init(tmp_path):
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([*PRIVJAIL, "-p", "-f", str(pidfile), "--", "/bin/sleep", "2"],
                            cwd=ROOT)
    deadline = time.monotonic() + 5
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    with open(f"/proc/{pid}/status") as f:
        nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
    assert nspid == [str(pid), "1"]
    proc.kill()
    proc.wait()


# -- failures leave nothing behind ---------------------------------------------------

def test_failed_mount_reports_the_step_and_leaves_nothing(tmp_path):
    before = mount_table()
    marker = f"fail-{time.monotonic_ns()}"
    r = privjail("-p", *MINIMAL, "-b", "/does/not/exist", program=["/bin/sleep", "5", marker])
    assert r.rc == 251
    assert "mounts" in r.stderr and "/does/not/exist" in r.stderr
    assert mount_table() == before
    assert processes_with(marker) == []


def test_missing_program_is_127_and_unexecutable_is_126(tmp_path):
    r = privjail("-p", program=["/no/such/program"])
    assert r.rc == 127 and "No such file" in r.stderr
    f = tmp_path / "notexec"
    f.write_text("#!/bin/sh\n")
    r = privjail("-p", program=[str(f)])
    assert r.rc == 126 and "Permission denied" in r.stderr


def test_identity_failure_reports_step():
    # a gid outside the user namespace's map cannot be taken
    r = privjail("-U", "-m0 100000 1", "-M0 100000 1", "-g", "5")
    assert r.rc == 252
    assert "step 'identity'" in r.stderr and "setresgid(5)" in r.stderr


def test_bad_flag_is_a_usage_error_and_launches_nothing():
    marker = f"bad-{time.monotonic_ns()}"
    r = privjail("-R", "NOT_A_LIMIT,1,2", program=["/bin/sleep", "5", marker])
    assert r.rc == 1
    assert "-R" in r.stderr
    assert processes_with(marker) == []


# -- combined: the ChromeOS sandboxing guide's example (minus seccomp) --------------

def test_chromeos_guide_example_config(world_tmp):
    tmp_path = world_tmp
    conf = tmp_path / "svc.conf"
    conf.write_text(
        "% minijail-config-file v0\n"
        "e\nl\nN\np\nuts\nprofile=minimalistic-mountns\nn\nu = nobody\ng = nogroup\n"
        "mount = /run,/run,tmpfs,MS_NODEV|MS_NOEXEC|MS_NOSUID,mode=755,size=10M\n"
        f"bind-mount = {tmp_path}\n"
        f"bind-mount = {tmp_path}/data,,1\n")
    (tmp_path / "data").mkdir(mode=0o777)
    os.chmod(tmp_path / "data", 0o777)
    r = privjail("--config", str(conf), probe_args=["--touch", f"{tmp_path}/data/x",
                                                    "--touch", f"{tmp_path}/y"])
    assert r.rc == 0, r.stderr
    rep = r.report
    for ns in ("net", "ipc", "cgroup", "pid", "uts", "mnt"):
        assert rep["ns"][ns] != host_ns(ns), ns
    assert rep["uid"] == NOBODY and rep["no_new_privs"] == 1
    mp = mountpoints(rep)
    assert mp["/run"]["fstype"] == "tmpfs"
    assert {"nodev", "noexec", "nosuid"} <= set(mp["/run"]["options"].split(","))
    assert r.reports[1]["ok"] and not r.reports[2]["ok"]
    assert r.reports[2]["errno"] == errno.EROFS


# -- Landlock --------------------------------------------------------------------

def _landlock_probe(world_tmp, *flags):
    for d in ("rw", "other"):
        (world_tmp / d).mkdir()
        os.chmod(world_tmp / d, 0o777)     # only Landlock may say no
    return privjail("-v", "-n", "--fs-default-paths", "--fs-path-ro", "/proc",
                    "--fs-path-ro", str(PROBE_DIR), "--fs-path-rw", f"{world_tmp}/rw",
                    "-b", f"{world_tmp},{world_tmp},1", *flags,
                    probe_args=["--touch", f"{world_tmp}/rw/x", "--touch", f"{world_tmp}/other/x",
                                "--read", "/etc/passwd", "--read", "/etc/hostname"])


def test_landlock_rules_hold_inside_the_jail(world_tmp):
    r = _landlock_probe(world_tmp)
    assert r.rc == 0, r.stderr
    rw, other, passwd, hostname = r.reports[1:]
    assert rw["ok"] and (world_tmp / "rw" / "x").exists()
    assert not other["ok"] and other["errno"] == errno.EACCES
    assert not (world_tmp / "other" / "x").exists()
    assert passwd["ok"]
    assert not hostname["ok"] and hostname["errno"] == errno.EACCES


def test_landlock_as_non_root_user(world_tmp):
    r = _landlock_probe(world_tmp, "-u", "nobody", "-g", "nogroup")
    assert r.rc == 0, r.stderr
    assert r.report["uid"] == NOBODY
    assert r.reports[1]["ok"] and not r.reports[2]["ok"]


def test_landlock_rule_for_a_missing_path_fails_the_launch():
    r = privjail("-n", "--fs-path-ro", "/does/not/exist")
    assert r.rc == 252
    assert "landlock" in r.stderr and "/does/not/exist" in r.stderr


# -- more flags ------------------------------------------------------------------

def test_inherit_the_users_supplementary_groups(throwaway_user):
    name, uid, gid, extra = throwaway_user
    r = privjail("-u", name, "-g", name, "-G")
    assert r.rc == 0, r.stderr
    assert (r.report["uid"], r.report["gid"]) == (uid, gid)
    assert r.report["groups"] == sorted({gid, extra})


@pytest.mark.parametrize("mode,expect", [("shared", "shared:"), ("unbindable", "unbindable"),
                                         ("private", "")])
def test_propagation_modes(mode, expect):
    r = privjail("-v", f"-K{mode}")
    prop = mountpoints(r.report)["/"]["propagation"]
    assert prop.startswith(expect) if expect else prop == ""


def test_mount_dev_alone():
    r = privjail("-v", "-d")
    mp = mountpoints(r.report)
    assert mp["/dev"]["fstype"] == "tmpfs"
    assert mp["/dev/pts"]["fstype"] == "devpts"
    assert "null" in r.report["dev_entries"] and "sda" not in r.report["dev_entries"]


DEV_NODE_CHECK = r"""
import errno, json, os, stat
out = {}
for name in ("null", "zero", "full", "random", "urandom", "tty"):
    st = os.stat("/dev/" + name)
    out[name] = {"chr": stat.S_ISCHR(st.st_mode), "rdev": st.st_rdev,
                 "mode": stat.S_IMODE(st.st_mode)}
with open("/dev/null", "r+b", buffering=0) as f:
    out["null_io"] = [f.write(b"x"), f.read(1).hex()]
with open("/dev/zero", "rb") as f:
    out["zero_read"] = f.read(4).hex()
with open("/dev/urandom", "rb") as f:
    out["urandom_len"] = len(f.read(16))
try:
    with open("/dev/full", "wb", buffering=0) as f:
        f.write(b"x")
    out["full_write"] = "ok"
except OSError as e:
    out["full_write"] = errno.errorcode[e.errno]
out["ids"] = [os.getuid(), os.getgid()]
out["mounted"] = sorted(line.split()[4] for line in open("/proc/self/mountinfo")
                        if line.split()[4].startswith("/dev/") and line.split()[4] != "/dev/pts")
print(json.dumps(out))
"""


@pytest.mark.parametrize("flags,bound,ids", [
    (["-u", "nobody", "-g", "nogroup"], False, [NOBODY, NOGROUP]),
    (["-U", "-m0 100000 10", "-M0 100000 10", "-u", "0", "-g", "0"], True, [0, 0]),
    (["-U", "-m1000 1000 1", "-M1000 1000 1", "-u", "1000", "-g", "1000"], True, [1000, 1000]),
], ids=["host-root-makes-nodes", "user-ns-binds-them", "user-ns-without-0"])
def test_minimal_dev_nodes_are_the_hosts_devices_and_work(flags, bound, ids):
    """-d's nodes open the host's devices, with their modes, for an
    unprivileged program.  Without a user namespace they are nodes of the
    jail's own (mknod, no mount each); in one, where mknod is refused, binds
    of the host's: both ways are checked, and the mount table says which
    was taken.  In a user namespace this also needs A to take ids the maps
    give first (the nodes' files could have no owner): the namespace's root,
    or, where 0 is not mapped, the jail's own -u/-g."""
    r = privjail("-v", "-d", *flags, program=[JAIL_PYTHON, "-c", DEV_NODE_CHECK])
    assert r.rc == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["ids"] == ids
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        host = os.stat("/dev/" + name)
        assert seen[name] == {"chr": True, "rdev": host.st_rdev,
                              "mode": stat.S_IMODE(host.st_mode)}, name
    assert seen["null_io"] == [1, ""]             # takes the write, reads end of file
    assert seen["zero_read"] == "00000000" and seen["urandom_len"] == 16
    assert seen["full_write"] == "ENOSPC"
    nodes = {f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty")}
    assert (nodes <= set(seen["mounted"])) if bound else not (nodes & set(seen["mounted"]))


def test_minimal_dev_in_a_user_namespace_mapping_no_id_of_the_setup_says_why():
    """Neither 0 nor a -u/-g mapped: the setup keeps the overflow ids, -d
    cannot make its files, and the error says what to map."""
    r = privjail("-v", "-d", "-U", "-m1000 1000 1", "-M1000 1000 1",
                 program=["/bin/true"])
    assert r.rc == 251, r.stderr                       # a mount step failed
    assert "Value too large" in r.stderr and "map 0, or pass -u/-g ids" in r.stderr


def test_setup_ids_are_ids_the_maps_give():
    from dataclasses import replace

    from broker.jail.launch import setup_ids
    from broker.jail.spec import IdMap, JailSpec
    base = JailSpec(argv=("/bin/true",), namespaces=frozenset({"user"}))

    def ids(uid_map, gid_map, uid=None, gid=None):
        return setup_ids(replace(base, uid_map=tuple(IdMap(*m) for m in uid_map),
                                 gid_map=tuple(IdMap(*m) for m in gid_map), uid=uid, gid=gid))
    assert ids([(0, 100000, 10)], [(0, 100000, 10)], 3, 4) == (0, 0)     # root first
    assert ids([(1000, 1000, 1)], [(1000, 1000, 1)], 1000, 1000) == (1000, 1000)
    assert ids([(1000, 5000, 10)], [(2000, 6000, 1)], 1009, 2000) == (1009, 2000)
    assert ids([(1000, 5000, 10)], [(2000, 6000, 1)], 1010, 2001) == (None, None)   # past the ends
    assert ids([(1000, 1000, 1)], [(1000, 1000, 1)]) == (None, None)     # no -u/-g, no 0
    assert ids([(1000, 1000, 1)], [(0, 100000, 1)], None, 7) == (None, 0)


def test_binds_into_a_minimal_dev_land_on_it():
    """-d with a bind into /dev (minimalistic-mountns's -b /dev/log wherever
    journald runs): the bind is made on the minimal /dev once it is built,
    its destination created there, not refused nor hidden under the tmpfs."""
    r = privjail("-v", "-P", "/var/empty", "-b", "/", "-b", "/proc", "-d",
                 "-b", "/dev/zero,/dev/log")
    assert r.rc == 0, r.stderr
    mp = mountpoints(r.report)
    assert mp["/dev"]["fstype"] == "tmpfs" and "/dev/log" in mp
    assert "log" in r.report["dev_entries"] and "null" in r.report["dev_entries"]


def test_tmpfs_tmp_with_size():
    m = mountpoints(privjail("-v", "-t16M").report)["/tmp"]
    assert m["fstype"] == "tmpfs" and "size=16384k" in m["super_options"]


def test_cwd_inside_the_jail():
    assert privjail("--cwd", "/etc").report["cwd"] == "/etc"


def test_mount_with_bind_and_readonly_flags(tmp_path):
    r = privjail("-v", "-k", f"/etc,{tmp_path},none,MS_BIND|MS_RDONLY",
                 probe_args=["--read", f"{tmp_path}/passwd", "--touch", f"{tmp_path}/new"])
    assert r.rc == 0, r.stderr
    assert r.reports[1]["ok"]
    assert r.reports[2]["errno"] == errno.EROFS


def test_new_session_keyring():
    from broker.jail.syscalls import session_keyring_id
    ours = session_keyring_id()
    assert privjail("-p").report["session_keyring"] == ours        # inherited, as minijail
    fresh = privjail("-p", "-w", "-u", "nobody", "-g", "nogroup").report["session_keyring"]
    assert isinstance(fresh, int) and fresh != ours


def test_enter_a_mount_namespace(tmp_path):
    """-V joins an existing mount namespace: the jail sees a mount that exists
    only there."""
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs marker {tmp_path} && touch {tmp_path}/only-there"
                               f" && echo ready && exec sleep 30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        ns = f"/proc/{holder.pid}/ns/mnt"
        inside = privjail("-p", "-V", ns, program=["/bin/ls", str(tmp_path)])
        assert inside.rc == 0, inside.stderr
        assert inside.stdout.split() == ["only-there"]
        assert not (tmp_path / "only-there").exists()                # not in ours
        bad = privjail("-p", "-V", "/no/such/ns", program=["/bin/true"])
        assert bad.rc == 252 and "/no/such/ns" in bad.stderr
        notns = privjail("-p", "-V", "/etc/hostname", program=["/bin/true"])
        assert notns.rc == 252 and "setns" in notns.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_dev_node_that_is_no_character_device_is_refused(tmp_path):
    """-d copies (or binds) only character devices: a host 'node' that is
    anything else is a named error, and nothing is made in its place."""
    from broker.jail import mounts
    fake = tmp_path / "null"
    fake.write_text("not a device\n")
    fd = os.open(fake, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with pytest.raises(mounts.MountError, match="not a character device"):
            mounts._copy_node(fd, str(tmp_path / "jail-null"))
    finally:
        os.close(fd)
    assert not (tmp_path / "jail-null").exists()
