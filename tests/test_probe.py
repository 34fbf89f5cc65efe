"""The probe itself, run on the host (no jail): its report must agree with what
this test process observes, and each action must do what it says.

Nothing here imports the project, or the probe: it is run as a program.
"""
import ast
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROBE = str(Path(__file__).resolve().parent / "probe.py")
NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")
KEYS = {"pid", "ppid", "uid", "euid", "suid", "gid", "egid", "sgid", "groups", "caps",
        "securebits", "session_keyring", "no_new_privs", "seccomp", "ns", "ns_links", "visible_pids", "hostname",
        "net_ifaces", "mounts", "proc_readonly", "fds", "fd_targets", "rlimits", "cwd", "env",
        "root_dir_entries", "dev_entries", "argv", "landlock"}
MOUNT_KEYS = {"id", "parent", "root", "mountpoint", "options", "fstype", "source",
              "super_options", "propagation"}


def run_probe(*args, **kw):
    """Run the probe; return (completed process, the JSON lines it printed)."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True,
                       timeout=30, **kw)
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert lines, f"no report; rc={p.returncode} stderr={p.stderr!r}"
    return p, lines


@pytest.fixture(scope="module")
def probed():
    """One plain run shared by the read-only checks: (process, report)."""
    p, lines = run_probe()
    assert p.returncode == 0, p.stderr
    assert len(lines) == 1
    return p, lines[0]


def own_status():
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def has_no_error(value):
    if isinstance(value, dict):
        return "error" not in value and all(has_no_error(v) for v in value.values())
    if isinstance(value, list):
        return all(has_no_error(v) for v in value)
    return True


# -- the program -------------------------------------------------------------------

def test_probe_is_stdlib_only_and_python39_syntax():
    tree = ast.parse(Path(PROBE).read_text(), feature_version=(3, 9))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module.split(".")[0])
    assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names
    assert ast.get_docstring(tree)


# -- the report agrees with the host --------------------------------------------------

def test_report_has_exactly_the_documented_keys(probed):
    _, rep = probed
    optional = {"seccomp_filters"} if "Seccomp_filters" in own_status() else set()
    assert set(rep) == KEYS | optional
    assert has_no_error(rep)
    assert rep["landlock"] is None and rep["argv"] == []


def test_identity(probed):
    _, rep = probed
    assert (rep["uid"], rep["euid"], rep["suid"]) == os.getresuid()
    assert (rep["gid"], rep["egid"], rep["sgid"]) == os.getresgid()
    assert rep["groups"] == sorted(os.getgroups())


def test_pid_ppid_and_visible_pids():
    proc = subprocess.Popen([sys.executable, PROBE], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    rep = json.loads(out)
    assert rep["pid"] == proc.pid and rep["ppid"] == os.getpid()
    assert rep["pid"] in rep["visible_pids"] and os.getpid() in rep["visible_pids"]
    assert rep["visible_pids"] == sorted(rep["visible_pids"])


def test_capabilities_and_process_flags(probed):
    _, rep = probed
    st = own_status()
    caps = rep["caps"]
    assert set(caps) == {"inh", "prm", "eff", "bnd", "amb"}
    assert all(isinstance(v, int) for v in caps.values())
    # The bounding and inheritable sets cross execve unchanged.
    assert caps["bnd"] == int(st["CapBnd"], 16) and caps["inh"] == int(st["CapInh"], 16)
    assert caps["eff"] & ~caps["prm"] == 0 and caps["amb"] & ~caps["prm"] == 0
    assert rep["no_new_privs"] == int(st["NoNewPrivs"])
    assert rep["seccomp"] == int(st["Seccomp"])
    if "Seccomp_filters" in st:
        assert rep["seccomp_filters"] == int(st["Seccomp_filters"])
    assert isinstance(rep["securebits"], int) and rep["securebits"] >= 0


def test_securebits_match_ours(probed):
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    ours = prctl(27, 0, 0, 0, 0)
    keep_caps = 1 << 4            # the only bit execve clears
    assert probed[1]["securebits"] == ours & ~keep_caps


def test_session_keyring_is_ours(probed):
    from broker.jail.syscalls import session_keyring_id
    assert probed[1]["session_keyring"] == session_keyring_id()


def test_namespaces_are_ours(probed):
    _, rep = probed
    for name in NAMESPACES:
        path = f"/proc/self/ns/{name}"
        assert rep["ns"][name] == os.stat(path).st_ino, name
        assert rep["ns_links"][name] == os.readlink(path) == f"{name}:[{rep['ns'][name]}]"


def test_hostname_and_interfaces(probed):
    _, rep = probed
    assert rep["hostname"] == socket.gethostname()
    with open("/proc/net/dev") as f:
        ours = sorted(line.split(":", 1)[0].strip() for line in f.readlines()[2:])
    assert rep["net_ifaces"] == ours and "lo" in ours


def test_mounts(probed):
    _, rep = probed
    mounts = rep["mounts"]
    assert mounts and all(set(m) == MOUNT_KEYS for m in mounts)
    by_point = {m["mountpoint"]: m for m in mounts}
    assert "/" in by_point
    assert by_point["/proc"]["fstype"] == "proc"
    assert rep["proc_readonly"] is ("ro" in by_point["/proc"]["options"].split(","))
    assert all(isinstance(m["id"], int) and isinstance(m["parent"], int) for m in mounts)
    with open("/proc/self/mountinfo") as f:
        ours = {line.split()[0]: line.split() for line in f}
    root = ours[str(by_point["/"]["id"])]
    assert root[4] == "/" and by_point["/"]["options"] == root[5]
    prop = " ".join(root[6:root.index("-")])
    assert by_point["/"]["propagation"] == prop


needs_unshare = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                   reason="needs root and unshare(1)")


@needs_unshare
def test_mountinfo_escapes_are_decoded(tmp_path):
    point = tmp_path / "a b\tc"
    point.mkdir()
    script = 'mount -t tmpfs "my src" "$1" && exec "$2" "$3"'
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        "sh", str(point), sys.executable, PROBE],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.splitlines()[0])
    mine = [m for m in rep["mounts"] if m["mountpoint"] == str(point)]
    assert len(mine) == 1 and mine[0]["fstype"] == "tmpfs" and mine[0]["source"] == "my src"
    assert rep["ns"]["mnt"] != os.stat("/proc/self/ns/mnt").st_ino


@needs_unshare
def test_a_broken_proc_fails_sections_not_the_probe():
    # With an empty tmpfs over /proc, most sections cannot be computed.
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs none /proc && exec "$@"', "sh", sys.executable, PROBE],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert set(rep) == KEYS            # no Seccomp_filters line to see
    for key in ("caps", "no_new_privs", "seccomp", "fds", "fd_targets"):
        assert "error" in rep[key], key
    assert rep["ns"] == rep["ns_links"] == dict.fromkeys(NAMESPACES)
    assert rep["mounts"] is None and rep["proc_readonly"] is None
    assert rep["visible_pids"] == []
    assert rep["uid"] == os.getuid() and isinstance(rep["rlimits"], dict)


def test_fds_exclude_the_listing_fd():
    p, (rep,) = run_probe()
    assert rep["fds"] == [0, 1, 2]
    assert set(rep["fd_targets"]) == {"0", "1", "2"}
    assert rep["fd_targets"]["0"] == "/dev/null"


def test_fds_report_inherited_ones_with_their_targets(tmp_path):
    # The probe's listing fds take the lowest free numbers, below this one.
    target = tmp_path / "held"
    target.write_text("")
    fd = os.open(target, os.O_RDONLY)
    try:
        p, (rep,) = run_probe(pass_fds=(fd,))
    finally:
        os.close(fd)
    assert fd > 4 and rep["fds"] == [0, 1, 2, fd]
    assert rep["fd_targets"][str(fd)] == str(target)


def test_rlimits_are_ours(probed):
    _, rep = probed
    names = [n for n in dir(resource) if n.startswith("RLIMIT_")]
    assert sorted(rep["rlimits"]) == sorted(names)
    plain = lambda v: -1 if v == resource.RLIM_INFINITY else v   # noqa: E731
    for name in names:
        soft, hard = resource.getrlimit(getattr(resource, name))
        assert rep["rlimits"][name] == [plain(soft), plain(hard)], name


def test_cwd_env_and_listings(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROBE_MARK": "x=y z"}
    p, (rep,) = run_probe("--sleep", "0", cwd=tmp_path, env=env)
    assert rep["cwd"] == os.path.realpath(tmp_path)
    assert rep["env"]["PROBE_MARK"] == "x=y z" and rep["env"]["PATH"] == env["PATH"]
    assert rep["argv"] == ["--sleep", "0"]
    assert rep["root_dir_entries"] == sorted(os.listdir("/"))
    assert "null" in rep["dev_entries"] and rep["dev_entries"] == sorted(rep["dev_entries"])


# -- actions ------------------------------------------------------------------------

def test_exit_code():
    p, lines = run_probe("--exit", "7")
    assert p.returncode == 7 and lines[0]["argv"] == ["--exit", "7"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGPIPE])
def test_kill_self(sig):
    p, lines = run_probe("--kill-self", str(int(sig)), "--exit", "3")
    assert p.returncode == -sig and len(lines) == 1


def test_kill_self_survival_is_reported():
    p, lines = run_probe("--kill-self", str(int(signal.SIGCHLD)), "--exit", "3")
    assert p.returncode == 3
    assert lines[1] == {"kill_self": int(signal.SIGCHLD), "survived": True}


def test_sleep():
    start = time.monotonic()
    p, _ = run_probe("--sleep", "0.3")
    assert p.returncode == 0 and time.monotonic() - start >= 0.3


def test_touch_and_read(tmp_path):
    new, missing_dir = tmp_path / "new", tmp_path / "nope" / "f"
    new_existing = tmp_path / "kept"
    new_existing.write_text("keep me")
    p, lines = run_probe("--touch", str(new), "--touch", str(missing_dir),
                         "--touch", str(new_existing), "--read", str(new_existing),
                         "--read", str(missing_dir), "--read", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert lines[1:] == [
        {"touch": str(new), "ok": True, "errno": None},
        {"touch": str(missing_dir), "ok": False, "errno": errno.ENOENT},
        {"touch": str(new_existing), "ok": True, "errno": None},
        {"read": str(new_existing), "ok": True, "errno": None},
        {"read": str(missing_dir), "ok": False, "errno": errno.ENOENT},
        {"read": str(tmp_path), "ok": False, "errno": errno.EISDIR},
    ]
    assert new.exists() and new_existing.read_text() == "keep me"


def test_actions_run_in_order(tmp_path):
    f = tmp_path / "f"
    p, lines = run_probe("--read", str(f), "--touch", str(f), "--read", str(f),
                         "--exit", "5", "--touch", str(tmp_path / "never"))
    assert p.returncode == 5
    assert [line["ok"] for line in lines[1:]] == [False, True, True]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--exit"], ["--exit", "x"], ["--sleep", "soon"],
                                  ["--touch", "/tmp/x", "--kill-self"]])
def test_malformed_actions_exit_2_after_the_report(args, tmp_path):
    p, lines = run_probe(*args)
    assert p.returncode == 2
    assert lines[0]["argv"] == args and set(lines[1]) == {"error"} and len(lines) == 2


def processes_with(marker):
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def ppid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


def test_spawn_orphans(tmp_path):
    marker = f"orphan-probe-{os.getpid()}-{time.monotonic_ns()}.py"
    probe = tmp_path / marker
    shutil.copy(PROBE, probe)
    proc = subprocess.Popen([sys.executable, str(probe), "--spawn-orphans", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.wait(timeout=10) == 0
    orphans = processes_with(marker)          # the grandchildren, still asleep
    assert len(orphans) == 3
    assert all(ppid_of(pid) != proc.pid for pid in orphans)
    out = proc.stdout.read()                  # EOF once the orphans are gone
    proc.stdout.close()
    assert len(out.splitlines()) == 1 and json.loads(out)["argv"] == ["--spawn-orphans", "3"]
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                 signal.SIGUSR1, signal.SIGUSR2])
def test_wait_signal(tmp_path, sig):
    log = tmp_path / "signals"
    # --signal-log may come after --wait-signal: it is an option, not a step.
    proc = subprocess.Popen([sys.executable, PROBE, "--wait-signal", "--signal-log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["pid"] == proc.pid
        assert json.loads(proc.stdout.readline()) == {"waiting": True}
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 100 + sig
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert log.read_text().split() == [str(int(sig))]
