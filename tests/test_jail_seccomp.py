"""privjail -S / -L / --seccomp-bpf-binary end to end: what the jailed
program's syscalls really get, and which bad inputs are refused before any
process is created.

The program is sysprobe (tests/jail_data/sysprobe.c), built static so that a
test policy lists only the dozen syscalls a static glibc start-up makes plus
the ones under test.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from broker.jail.config import parse_command_line
from broker.jail.launch import EXIT_SETUP, LaunchError, launch
from conftest import ROOT, privjail

GETPPID, GETUID, GETPGRP, PRCTL, SOCKET = 110, 102, 111, 157, 41
PR_GET_DUMPABLE, PR_SET_NAME = 3, 15
AF_UNIX, AF_INET = 1, 2
SOCK_STREAM = 1

# A static glibc program's start-up and exit, and nothing else.
STARTUP = """\
execve: 1
brk: 1
arch_prctl: 1
set_tid_address: 1
set_robust_list: 1
rseq: 1
prlimit64: 1
readlink: 1
getrandom: 1
mprotect: arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE
write: 1
exit_group: 1
"""


@pytest.fixture(scope="module")
def sysprobe():
    """sysprobe, built static where every uid can execute it."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the seccomp test program (make test installs it)")
    d = Path(tempfile.mkdtemp(prefix="privbroker-sysprobe-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    out = d / "sysprobe"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(out),
                    str(ROOT / "tests" / "jail_data" / "sysprobe.c")], check=True)
    yield str(out)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def policy(world_tmp):
    """policy(text) -> path of STARTUP + text, readable by every uid."""
    def write(text: str, name: str = "test.policy") -> str:
        p = world_tmp / name
        p.write_text(STARTUP + text)
        os.chmod(p, 0o644)
        return str(p)
    return write


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(tmp_path / "cache"))


def results(run) -> list[tuple[int, int, int]]:
    return [tuple(int(w) for w in line.split()) for line in run.stdout.splitlines()
            if line[:1].isdigit()]


def call(nr: int, *args: int) -> str:
    return ",".join(str(v) for v in (nr, *args))


# -- allow, kill, errno ----------------------------------------------------------

def test_allowed_program_runs_under_the_filter(sysprobe, policy):
    r = privjail("-n", "-S", policy("getppid: 1\n"), program=[sysprobe, call(GETPPID)])
    assert r.rc == 0, r.stderr
    (nr, ret, err), = results(r)
    assert (nr, err) == (GETPPID, 0) and ret > 0


def test_the_jailed_program_reports_filter_mode_and_no_new_privs(sysprobe, policy):
    r = privjail("-n", "-S", policy("openat: 1\nread: 1\nclose: 1\n"),
                 program=[sysprobe, "status"])
    assert r.rc == 0, r.stderr
    assert "Seccomp:\t2" in r.stdout and "NoNewPrivs:\t1" in r.stdout
    unfiltered = privjail("-n", program=[sysprobe, "status"])
    assert "Seccomp:\t0" in unfiltered.stdout


def test_a_denied_syscall_kills_with_sigsys_status_159(sysprobe, policy):
    r = privjail("-n", "-S", policy("getppid: 1\n"),
                 program=[sysprobe, call(GETPPID), call(GETUID), call(GETPPID)])
    assert r.rc == 128 + signal.SIGSYS == 159, (r.rc, r.stderr)
    assert [x[0] for x in results(r)] == [GETPPID]     # the first ran, then death


def test_return_gives_the_errno(sysprobe, policy):
    r = privjail("-n", "-S", policy("getuid: return EPERM\ngetppid: return 77\n"),
                 program=[sysprobe, call(GETUID), call(GETPPID)])
    assert r.rc == 0, r.stderr
    assert results(r) == [(GETUID, -1, errno.EPERM), (GETPPID, -1, 77)]


def test_argument_filters_pass_and_block_as_written(sysprobe, policy):
    text = ("prctl: arg0 == 0xf\n"
            "socket: arg0 == AF_UNIX\n"
            "close: 1\n")
    ok = privjail("-n", "-S", policy(text),
                  program=[sysprobe, call(PRCTL, PR_SET_NAME, 0), call(SOCKET, AF_UNIX, SOCK_STREAM)])
    assert ok.rc == 0, ok.stderr
    (_, _, e1), (_, fd, e2) = results(ok)
    assert e1 == errno.EFAULT and e2 == 0 and fd >= 0    # prctl ran (bad pointer), socket made
    for denied in (call(PRCTL, PR_GET_DUMPABLE), call(SOCKET, AF_INET, SOCK_STREAM)):
        r = privjail("-n", "-S", policy(text), program=[sysprobe, denied])
        assert r.rc == 159 and results(r) == [], (denied, r.rc, r.stdout)


def test_log_mode_lets_a_denied_syscall_run(sysprobe, policy):
    r = privjail("-n", "-L", "-S", policy("getppid: 1\n"),
                 program=[sysprobe, call(GETUID), call(GETPGRP)])
    assert r.rc == 0, r.stderr
    (nr1, uid, e1), (nr2, pgrp, e2) = results(r)
    assert (nr1, uid, e1) == (GETUID, 0, 0)            # ran, though not in the policy
    assert nr2 == GETPGRP and pgrp > 0 and e2 == 0


def test_other_default_actions(sysprobe, policy):
    trap = privjail("-n", "--seccomp-default=trap", "-S", policy("getppid: 1\n"),
                    program=[sysprobe, call(GETUID)])
    assert trap.rc == 128 + signal.SIGSYS       # SIGSYS delivered, not handled: death
    thread = privjail("-n", "--seccomp-default=kill-thread", "-S", policy("getppid: 1\n"),
                      program=[sysprobe, call(GETUID)])
    assert thread.rc == 128 + signal.SIGSYS     # the only thread: the process dies too
    assert results(thread) == []


# -- the same policy, three ways in ------------------------------------------------

def test_config_file_keys_and_compiled_filter_behave_as_the_flag(sysprobe, policy, world_tmp):
    path = policy("getuid: return 13\n")
    conf = world_tmp / "jail.conf"
    conf.write_text(f"% minijail-config-file v0\n\nn\nS = {path}\n")
    by_config = privjail("--config", str(conf), program=[sysprobe, call(GETUID)])
    bpf = world_tmp / "test.bpf"
    compiled = subprocess.run([*privjail_cmd(), "compile-policy", path, str(bpf)],
                              capture_output=True, text=True, cwd=ROOT)
    assert compiled.returncode == 0, compiled.stderr
    by_binary = privjail("-n", "--seccomp-bpf-binary", str(bpf), program=[sysprobe, call(GETUID)])
    for r in (by_config, by_binary):
        assert r.rc == 0, r.stderr
        assert results(r) == [(GETUID, -1, 13)]


def privjail_cmd():
    from conftest import PRIVJAIL
    return PRIVJAIL


# -- without no_new_privs: the filter goes on before the identity change --------------

def test_without_no_new_privs_the_policy_must_allow_the_identity_change(sysprobe, policy):
    bare = privjail("-u", "nobody", "-g", "nogroup", "-S", policy("getuid: 1\n"),
                    program=[sysprobe, call(GETUID)])
    assert bare.rc == 159                       # setgroups, the first, was killed
    drop = ("setgroups: 1\nsetresgid: 1\nsetresuid: 1\nprctl: 1\ncapget: 1\ncapset: 1\n"
            "close_range: 1\nclose: 1\ngetuid: 1\n")
    ok = privjail("-u", "nobody", "-g", "nogroup", "-S", policy(drop),
                  program=[sysprobe, call(GETUID)])
    assert ok.rc == 0, ok.stderr
    assert results(ok) == [(GETUID, 65534, 0)]


# -- refused before anything is created ---------------------------------------------------

def _children() -> int:
    return len(Path(f"/proc/self/task/{os.getpid()}/children").read_text().split())


@pytest.mark.parametrize("text, says", [
    ("getppid: 1\nfrobnicate: 1\n", "frobnicate"),            # unknown syscall
    ("mmap: arg2 == NO_SUCH_CONSTANT\n", "NO_SUCH_CONSTANT"),  # unresolvable constant
    ("@include /nonexistent/x.policy\n", "/nonexistent/x.policy"),
    ("getppid 1\n", "getppid"),                                # a syntax slip
])
def test_a_policy_that_cannot_compile_is_refused_before_any_process(sysprobe, policy, world_tmp,
                                                                   text, says):
    path = policy(text)
    pidfile = world_tmp / "pid"
    spec = parse_command_line(["-n", "-p", "-f", str(pidfile), "-S", path, sysprobe])
    before = _children()
    with pytest.raises(LaunchError) as e:
        launch(spec)
    assert e.value.step == "seccomp" and says in str(e.value) and path in str(e.value)
    assert _children() == before and not pidfile.exists()
    r = privjail("-n", "-S", path, program=[sysprobe])
    assert r.rc == EXIT_SETUP and says in r.stderr


def test_a_policy_without_execve_is_refused_with_what_to_add(sysprobe, world_tmp):
    p = world_tmp / "noexec.policy"
    p.write_text("read: 1\nwrite: 1\nexit_group: 1\n")
    r = privjail("-n", "-S", str(p), program=[sysprobe])
    assert r.rc == EXIT_SETUP
    assert "execve" in r.stderr and "execve: 1" in r.stderr and str(p) in r.stderr


def test_a_malformed_compiled_filter_is_refused(sysprobe, world_tmp):
    bad = world_tmp / "bad.bpf"
    bad.write_bytes(b"\x06\x00\x00\x00\x00\x00\xff")          # 7 bytes: not whole insns
    r = privjail("-n", "--seccomp-bpf-binary", str(bad), program=[sysprobe])
    assert r.rc == EXIT_SETUP and str(bad) in r.stderr
    r = privjail("-n", "--seccomp-bpf-binary", str(world_tmp / "missing.bpf"), program=[sysprobe])
    assert r.rc == EXIT_SETUP and "missing.bpf" in r.stderr


@pytest.mark.parametrize("flags, says", [
    (["-S", "a.policy", "--seccomp-bpf-binary", "b.bpf"], "already given"),
    (["-L"], "needs a policy"),
    (["--seccomp-bpf-binary", "b.bpf", "-L"], "default action built in"),
    (["-S", "a.policy", "--seccomp-default=allow"], "one of"),
    (["-s"], "strict mode"),
    (["-T", "shared"], "static or dynamic"),
])
def test_inconsistent_seccomp_options_are_named(flags, says):
    r = privjail(*flags, program=["/bin/true"])
    assert r.rc == 1 and says in r.stderr, r.stderr


# -- with Landlock -----------------------------------------------------------------

def test_seccomp_and_landlock_together(sysprobe, policy):
    r = privjail("-n", "--fs-path-rx", os.path.dirname(sysprobe), "--fs-path-ro", "/proc",
                 "-S", policy("openat: 1\nread: 1\nclose: 1\n"), program=[sysprobe, "status"])
    assert r.rc == 0, r.stderr
    assert "Seccomp:\t2" in r.stdout
