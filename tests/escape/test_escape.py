"""The escape suite: attacks run inside jails built from the example profiles
(examples/profiles/minimal.conf and filtered.conf, as nobody), each trying
to get out.  Every test asserts two things: the attack did not escape, and
it really ran (its decisive syscall was made and failed the expected way, or
seccomp killed it at that syscall).  An attack that crashes before trying
fails its test.  Where the defence could be doubted, a control shows the
same attack succeeding without it (on the host, or in the weaker profile).

The attack program is attacks.c; what it prints is described there.  The
last test runs every attack not yet run and prints
"escape suite: N tried, 0 escaped".
"""
from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import termios
import time

import pytest

from escapekit import (NOBODY, SIGSYS_STATUS, Report, build_kit, destroy_kit, gone_within,
                       privjail_argv, processes_with, run_in_jail, run_on_host_as_nobody)
from escapekit import ROOT
from test_broker import broker, bus, deployment  # noqa: F401 - fixtures: the real broker

BOTH = ("minimal", "filtered")


@pytest.fixture(scope="module")
def kit():
    k = build_kit()
    yield k
    destroy_kit(k)


@pytest.fixture(scope="module")
def tried():
    """(attack, profile) -> escaped, for the summary."""
    return {}


# -- how an attack's report is judged -----------------------------------------------

def refused(r: Report, *errnos: str) -> bool:
    """The attack ran and its syscall failed with one of errnos; -> escaped."""
    assert r.trying is not None, f"the attack never got to its syscall: {r}"
    assert r.outcome is not None, f"the attack died without reporting: {r}"
    assert r.outcome["errno"] in errnos, f"expected {errnos}: {r}"
    return r.outcome["escaped"]


def killed(r: Report) -> bool:
    """seccomp killed the attack at its decisive syscall; -> escaped (False)."""
    assert r.trying is not None, f"the attack never got to its syscall: {r}"
    assert r.outcome is None and r.rc == SIGSYS_STATUS, f"expected a SIGSYS kill: {r}"
    return False


def succeeded(r: Report) -> None:
    """A control: without the defence the attack works."""
    assert r.outcome is not None and r.outcome["escaped"] is True, f"control failed: {r}"


# -- the attacks: name -> function(kit, profile) -> escaped ---------------------------

CATALOGUE: dict[str, tuple[tuple[str, ...], callable]] = {}


def attack(name: str, profiles=BOTH):
    def register(fn):
        CATALOGUE[name] = (profiles, fn)
        return fn
    return register


# files

@attack("read a world-readable file in the host's /tmp")
def _read_host_tmp(kit, profile):
    # the jail's /tmp is its own tmpfs: the host's /tmp is not there at all
    r = run_in_jail(kit, profile, ["read", str(kit.tmp_secret_path), kit.tmp_secret])
    return refused(r, "ENOENT")


@attack("read a world-readable host file outside Landlock's rules", profiles=("filtered",))
def _read_outside_landlock(kit, profile):
    secret = str(kit.outside / "secret")
    succeeded(run_in_jail(kit, "minimal", ["read", secret, kit.outside_secret]))  # visible
    return refused(run_in_jail(kit, profile, ["read", secret, kit.outside_secret]), "EACCES")


@attack("read /etc/shadow")
def _read_shadow(kit, profile):
    return refused(run_in_jail(kit, profile, ["read", "/etc/shadow"]), "EACCES")


@attack("write a host directory that is world-writable")
def _write_host_dir(kit, profile):
    target = kit.outside / f"pwned-{profile}"
    # minimal: / is bound read-only; filtered: Landlock refuses first
    escaped = refused(run_in_jail(kit, profile, ["write", str(target)]), "EROFS", "EACCES")
    assert not target.exists()
    return escaped


@attack("write outside Landlock's rules (the jail's own /dev/shm)", profiles=("filtered",))
def _write_outside_landlock(kit, profile):
    succeeded(run_in_jail(kit, "minimal", ["write", "/dev/shm/x"]))   # writable otherwise
    return refused(run_in_jail(kit, profile, ["write", "/dev/shm/x"]), "EACCES")


# processes

@attack("see a host process of the same uid")
def _see_host_process(kit, profile):
    assert processes_with(kit.victim_marker) == [kit.victim.pid]
    # given reversed, so that no command line in the jail holds the marker itself
    succeeded(run_on_host_as_nobody(kit, ["see", kit.victim_marker[::-1]]))   # control
    r = run_in_jail(kit, profile, ["see", kit.victim_marker[::-1]])
    escaped = refused(r, "")
    assert int(r.outcome["detail"]) >= 1, r       # the scan saw at least itself
    return escaped


@attack("signal a host process of the same uid")
def _signal_host_process(kit, profile):
    r = run_in_jail(kit, profile, ["signal", str(kit.victim.pid)])
    escaped = refused(r, "ESRCH") if profile == "minimal" else killed(r)
    assert kit.victim.poll() is None, "the host victim died"
    return escaped


@attack("ptrace a host process of the same uid")
def _ptrace_host_process(kit, profile):
    r = run_in_jail(kit, profile, ["ptrace", str(kit.victim.pid)])
    return refused(r, "ESRCH") if profile == "minimal" else killed(r)


@attack("ptrace the jail's init (pid 1, same uid)")
def _ptrace_init(kit, profile):
    r = run_in_jail(kit, profile, ["ptrace", "1"])
    return refused(r, "EPERM") if profile == "minimal" else killed(r)


# the launcher's and the broker's fds

@attack("hold an fd the launcher had (privjail given an extra fd)")
def _own_fds(kit, profile):
    extra = os.open(kit.outside / "secret", os.O_RDONLY)
    try:
        r = run_in_jail(kit, profile, ["fds"], pass_fds=(extra,))
    finally:
        os.close(extra)
    escaped = refused(r, "")
    assert r.outcome["detail"] == "0,1,2 only", r
    return escaped


@attack("reopen the fds of the jail's init through /proc/1/fd")
def _reopen_init_fds(kit, profile):
    return refused(run_in_jail(kit, profile, ["reopen-fds", "1"]), "EACCES")


@attack("take the fds of the jail's init with pidfd_getfd")
def _steal_init_fds(kit, profile):
    r = run_in_jail(kit, profile, ["steal-fds", "1"])
    return refused(r, "EPERM") if profile == "minimal" else killed(r)


# privilege

def _mount_family(op, errno="EPERM"):
    def fn(kit, profile):
        r = run_in_jail(kit, profile, [op])
        return refused(r, errno) if profile == "minimal" else killed(r)
    return fn


attack("mount a tmpfs")(_mount_family("mount"))
attack("remount / read-write")(_mount_family("remount"))
attack("unmount the jail's /tmp")(_mount_family("umount"))
attack("pivot_root")(_mount_family("pivot_root"))


@attack("unshare a user namespace and use its capabilities on the host")
def _userns(kit, profile):
    target = kit.outside / f"userns-{profile}"
    r = run_in_jail(kit, profile, ["userns", "/etc/shadow", str(target)])
    if profile == "filtered":
        return killed(r)
    # unshare itself may be allowed (it is, to unprivileged users); every use of
    # the capabilities it gives on the host's files must fail
    escaped = refused(r, "EPERM", "EACCES", "EROFS", "EINVAL")
    assert r.outcome["detail"] in ("unshare refused", "unshared; read=0 remount=0 create=0"), r
    assert not target.exists()
    return escaped


@attack("exec a setuid-root binary")
def _setuid(kit, profile):
    control = run_on_host_as_nobody(kit, ["whoami"])
    assert control.outcome["detail"].startswith("euid=65534"), control
    succeeded(Report.parse(*_run_host(kit.suid, "whoami")))      # really setuid root
    r = run_in_jail(kit, profile, ["exec", str(kit.suid)])
    assert r.trying is not None and r.outcome is not None, r
    assert r.outcome["attack"] == "whoami", f"the setuid copy did not run: {r}"
    assert r.outcome["errno"] == "", f"CapEff unread: {r}"
    assert r.outcome["detail"] == "euid=65534 capeff=0", r
    return r.outcome["escaped"]


@attack("exec a file-capability binary")
def _fcap(kit, profile):
    succeeded(Report.parse(*_run_host(kit.fcap, "whoami")))      # really gets caps
    r = run_in_jail(kit, profile, ["exec", str(kit.fcap)])
    assert r.trying is not None and r.outcome is not None, r
    if r.outcome["attack"] == "exec":
        # no_new_privs with an emptied bounding set: the kernel refuses the
        # exec outright rather than run it with fewer capabilities
        return refused(r, "EPERM")
    assert r.outcome["detail"] == "euid=65534 capeff=0", r
    return r.outcome["escaped"]


def _run_host(path, *args):
    def nobody():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    p = subprocess.run([str(path), *args], capture_output=True, text=True, preexec_fn=nobody)
    return p.returncode, p.stdout, p.stderr


# seccomp: forbidden syscalls by another entry (filtered.conf's coreutils policy
# allows neither getppid, 32-bit calls, socket(AF_INET) nor io_uring)

def _alt_entry(argv, control_errno=""):
    def fn(kit, profile):
        control = run_in_jail(kit, "minimal", argv)          # no seccomp: the call is real
        assert control.outcome is not None and control.outcome["errno"] == control_errno, control
        return killed(run_in_jail(kit, profile, argv))
    return fn


attack("getppid by syscall(2) with the raw number", ("filtered",))(_alt_entry(["raw", "110"]))
attack("getppid by the 32-bit int 0x80 entry", ("filtered",))(_alt_entry(["int80", "64"]))
attack("socket(AF_INET) by 32-bit socketcall", ("filtered",))(_alt_entry(["int80-socket"]))
# this kernel has no x32 ABI (ENOSYS without a filter); the filter must still kill
attack("getppid by the x32 bit", ("filtered",))(
    _alt_entry(["raw", str(0x40000000 | 110)], control_errno="ENOSYS"))
attack("io_uring_setup", ("filtered",))(_alt_entry(["io_uring"]))


# network (-e: a network namespace of its own, with only lo)

@attack("TCP to a host listener on 127.0.0.1")
def _tcp_lo(kit, profile):
    r = run_in_jail(kit, profile, ["inet", "127.0.0.1", str(kit.tcp_port)])
    escaped = refused(r, "ECONNREFUSED", "ENETUNREACH") if profile == "minimal" else killed(r)
    assert kit.nothing_accepted()
    return escaped


@attack("TCP to the host's own address")
def _tcp_host(kit, profile):
    r = run_in_jail(kit, profile, ["inet", kit.host_ip, str(kit.tcp_port)])
    escaped = refused(r, "ENETUNREACH", "ECONNREFUSED") if profile == "minimal" else killed(r)
    assert kit.nothing_accepted()
    return escaped


@attack("connect to a host abstract unix socket")
def _abstract(kit, profile):
    r = run_in_jail(kit, profile, ["unix", kit.abstract_name])
    escaped = refused(r, "ECONNREFUSED")
    assert kit.nothing_accepted()
    return escaped


@attack("connect to a host unix socket under /tmp (where the test bus lives)")
def _tmp_unix(kit, profile):
    r = run_in_jail(kit, profile, ["unix", str(kit.tmp_unix_path)])
    escaped = refused(r, "ENOENT")
    assert kit.nothing_accepted()
    return escaped


# lifetime

def _detached_jail(kit, profile, marker, flags=()):
    """A jail whose program has double-forked a setsid'd grandchild (running
    as `attacks sleeper MARKER`) and stays; -> the privjail process."""
    p = subprocess.Popen(privjail_argv(kit, profile, ["detach", marker, "stay"], flags), cwd=ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    first, second = p.stdout.readline(), p.stdout.readline()
    p.stdout.close()
    assert '"trying"' in first and '"detached' in second, (first, second)
    assert _wait_for(lambda: processes_with(marker)), "the grandchild never started"
    return p


@attack("outlive the jail: double fork + setsid, then the jail's pid 1 is SIGKILLed",
        ("minimal",))
def _detach_init_killed(kit, profile):
    marker = f"orphan-{os.getpid()}-{time.monotonic_ns()}"
    p = _detached_jail(kit, profile, marker)
    with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
        [init] = [int(x) for x in f.read().split()]   # the jail's pid 1 (privjail reaps it)
    os.kill(init, signal.SIGKILL)
    assert p.wait(timeout=10) == 128 + signal.SIGKILL
    return not gone_within(marker, 5)


@attack("outlive the jail: double fork + setsid, then privjail --die-with-parent is SIGKILLed",
        ("minimal",))
def _detach_launcher_killed(kit, profile):
    # Without --die-with-parent a jail outlives privjail on purpose (as with
    # minijail0); the broker always asks for it.
    marker = f"orphan-{os.getpid()}-{time.monotonic_ns()}"
    p = _detached_jail(kit, profile, marker, flags=("--die-with-parent",))
    p.kill()
    p.wait()
    return not gone_within(marker, 5)


@attack("outlive the jail: double fork + setsid, then the program exits", ("minimal",))
def _detach_exit(kit, profile):
    marker = f"orphan-{os.getpid()}-{time.monotonic_ns()}"
    r = run_in_jail(kit, profile, ["detach", marker])
    assert r.rc == 0 and r.outcome is not None, r
    return not gone_within(marker, 5)


def _wait_for(cond, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# resources

@attack("fill /tmp (a 64 MiB tmpfs in minimalistic-mountns)")
def _fill_tmp(kit, profile):
    r = run_in_jail(kit, profile, ["fill", "/tmp", "256"])
    escaped = refused(r, "ENOSPC")
    assert int(r.outcome["detail"]) <= 64, r
    return escaped


@attack("exhaust pids under -R RLIMIT_NPROC,20,20", ("minimal",))
def _nproc(kit, profile):
    r = run_in_jail(kit, profile, ["nproc", "200"], flags=("-R", "RLIMIT_NPROC,20,20"))
    escaped = refused(r, "EAGAIN")
    assert int(r.outcome["detail"]) < 20, r
    return escaped


# the caller's terminal

@attack("TIOCSTI: type into the caller's terminal")
def _tiocsti(kit, profile):
    master, slave = pty.openpty()

    def caller_with_a_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    try:
        r = run_in_jail(kit, profile, ["tiocsti", "id\n"], stdin=slave,
                        preexec_fn=caller_with_a_terminal)
        os.set_blocking(slave, False)
        try:
            typed = os.read(slave, 100)
        except BlockingIOError:
            typed = b""
    finally:
        os.close(master)
        os.close(slave)
    escaped = refused(r, "EPERM") if profile == "minimal" else killed(r)
    assert typed == b"", f"injected into the caller's terminal: {typed!r}"
    return escaped


# through the real broker, on a private bus (tests/test_broker.py's deployment):
# the jail's stdout is a pipe of ours, the broker's own fds must not be there

def in_broker_jail(request, attack: list[str], until=None) -> Report:
    """Launch `attacks ATTACK` in profile minimal through privbrokerd; with
    until(broker, jail), do that once the attack has reported, instead of
    waiting for the jail to end by itself (until returns True if it closed
    the connection)."""
    from client import Broker
    kit, bus = request.getfixturevalue("kit"), request.getfixturevalue("bus")
    request.getfixturevalue("broker")
    b = Broker(bus.address)
    disconnected = False
    r, w = os.pipe()
    try:
        jail = b.launch("minimal", [str(kit.bin), *attack], stdin=None, stdout=w, stderr=w)
        os.close(w)
        w = None
        with os.fdopen(r, closefd=False) as f:
            lines = [f.readline(), f.readline()] if until else []
            if until:
                disconnected = bool(until(b, jail))
            lines += f.readlines()
        if until is None:
            status = jail.wait(timeout=30)
            rc = status.code if status.signal is None else 128 + status.signal
        else:
            rc = 0
        return Report.parse(rc, "".join(lines), "")
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
        if not disconnected:      # client.Broker.close() a second time hangs
            b.close()


@attack("hold one of the broker's or the launcher's fds", ("broker",))
def _broker_fds(kit, profile, request):
    r = in_broker_jail(request, ["fds"])
    escaped = refused(r, "")
    assert r.outcome["detail"] == "0,1,2 only", r
    return escaped


@attack("take the fds of the broker jail's init with pidfd_getfd", ("broker",))
def _broker_steal(kit, profile, request):
    return refused(in_broker_jail(request, ["steal-fds", "1"]), "EPERM")


@attack("reopen the fds of the broker jail's init through /proc/1/fd", ("broker",))
def _broker_reopen(kit, profile, request):
    return refused(in_broker_jail(request, ["reopen-fds", "1"]), "EACCES")


@attack("ptrace the broker jail's init (pid 1, same uid: root with no capabilities)",
        ("broker",))
def _broker_ptrace_init(kit, profile, request):
    return refused(in_broker_jail(request, ["ptrace", "1"]), "EPERM")


@attack("signal a host process of the same uid from a broker jail", ("broker",))
def _broker_signal(kit, profile, request):
    escaped = refused(in_broker_jail(request, ["signal", str(kit.victim.pid)]), "ESRCH")
    assert kit.victim.poll() is None
    return escaped


@attack("outlive a broker jail: double fork + setsid, then Signal(9)", ("broker",))
def _broker_detach_signal(kit, profile, request):
    marker = f"orphan-{os.getpid()}-{time.monotonic_ns()}"
    in_broker_jail(request, ["detach", marker, "stay"],
                   until=lambda b, jail: (_wait_for(lambda: processes_with(marker)),
                                          jail.signal(9), jail.wait(timeout=20)))
    return not gone_within(marker, 5)


@attack("outlive a broker jail: double fork + setsid, then the caller disconnects",
        ("broker",))
def _broker_detach_disconnect(kit, profile, request):
    marker = f"orphan-{os.getpid()}-{time.monotonic_ns()}"
    in_broker_jail(request, ["detach", marker, "stay"],
                   until=lambda b, jail: (_wait_for(lambda: processes_with(marker)),
                                          b.close(), True)[-1])
    return not gone_within(marker, 5)


# -- the tests ----------------------------------------------------------------------

def _try(request, tried, name, profile):
    key = (name, profile)
    if key not in tried:
        profiles, fn = CATALOGUE[name]
        kit = request.getfixturevalue("kit")
        tried[key] = bool(fn(kit, profile, request) if profile == "broker"
                          else fn(kit, profile))
    return tried[key]


CASES = [pytest.param(name, p, id=f"{p}: {name}")
         for name, (profiles, _) in CATALOGUE.items() for p in profiles]


@pytest.mark.parametrize("name,profile", CASES)
def test_attack_fails(request, tried, name, profile):
    assert _try(request, tried, name, profile) is False, f"{name} escaped under {profile}"


def test_summary(request, tried, capsys):
    failures = []
    for p in CASES:
        name, profile = p.values
        try:
            _try(request, tried, name, profile)
        except AssertionError as e:
            failures.append(f"{profile}: {name}: {e}")
    escaped = sorted(f"{p}: {n}" for (n, p), e in tried.items() if e)
    with capsys.disabled():
        print(f"\nescape suite: {len(tried)} tried, {len(escaped)} escaped")
    assert not failures, "attacks that did not run as they should:\n" + "\n".join(failures)
    assert escaped == []
