"""generate_policy: a starting policy from strace -f output, and the CLI entries."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from broker.jail.seccomp import (compile_policy, generate_policy, main_compile, main_generate,
                                 parse_policy)
from test_seccomp_support import ROOT, seccomp_cache

__all__ = ["seccomp_cache"]

LOG = """\
1234  execve("/bin/prog", ["prog"], 0x7ffd /* 3 vars */) = 0
1234  brk(NULL)                         = 0x55d0
1234  mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f00
1234  mmap(0x7f10, 1400832, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_FIXED, 3, 0x26000) = 0x7f10
1234  mprotect(0x7f20, 16384, PROT_READ)  = 0
1234  arch_prctl(ARCH_SET_FS, 0x7f30) = 0
1234  ioctl(1, TCGETS, 0x7ffe)  = -1 ENOTTY (Inappropriate ioctl for device)
1234  ioctl(3, SNDCTL_TMR_TIMEBASE or TCGETS, {c_iflag=ICRNL}) = 0
1234  ioctl(3, _IOC(_IOC_READ|_IOC_WRITE, 0x64, 0x1, 0x8), 0x7ffe) = 0
1234  ioctl(3, 0xc0106461, 0x7ffe) = 0
1234  ioctl(3, FANCY_UNKNOWN_REQUEST, 0x7ffe) = 0
1234  socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, 0) = 4
[pid  1235] 12:00:01.123456 socket(AF_INET6, SOCK_DGRAM, IPPROTO_IP) = 5
1235  prctl(PR_SET_NAME, "worker, (1)") = 0
1235  prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) = 0
1235  futex(0x7f40, FUTEX_WAIT_PRIVATE, 0, NULL <unfinished ...>
1234  futex(0x7f40, FUTEX_WAKE_PRIVATE, 1) = 1
1235  <... futex resumed>)              = 0
1235  syscall_0x1c6(0x1, 0x2) = -1 ENOSYS (Function not implemented)
1235  bogus_call(1) = 0
1234  --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED} ---
1234  write(1, "a, b (c)", 8)            = 8
1234  write(1, "x", 1)                  = 1
1234  exit_group(0)                     = ?
1234  +++ exited with 0 +++
"""


def rules_of(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rule = line.partition(": ")
            out[name] = rule
    return out


def test_generated_policy_from_an_strace_log(tmp_path):
    text = generate_policy(LOG)
    rules = rules_of(text)
    assert rules["mmap"] == "arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE"
    assert rules["mprotect"] == "arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE"
    assert rules["socket"] == "arg0 == AF_UNIX || arg0 == AF_INET6"
    assert rules["prctl"] == "arg0 == PR_SET_NAME || arg0 == PR_SET_NO_NEW_PRIVS"
    assert rules["ioctl"] == ("arg1 == TCGETS || arg1 == 0xc0086401 || arg1 == 0xc0106461")
    assert "FANCY_UNKNOWN_REQUEST" in text and "left out" in text       # said, not used
    assert "# bogus_call: not a syscall" in text
    assert rules["futex_wake"] == "1"                                   # syscall_0x1c6 = 454
    assert rules["arch_prctl"] == "1"
    for basic in ("restart_syscall", "exit", "exit_group", "rt_sigreturn"):
        assert rules[basic] == "1"
    names = [line.split(":")[0] for line in text.splitlines() if line and line[0] != "#"]
    assert names.index("ioctl") < names.index("write") < names.index("brk")   # by frequency
    assert names.count("futex") == 1                                     # resumed: not twice
    p = tmp_path / "gen.policy"
    p.write_text(text)
    assert len(parse_policy(p).syscalls) == len(names)
    compile_policy(p)


def test_writable_executable_mappings_in_the_trace_are_listed_exactly():
    text = generate_policy("mmap(NULL, 4096, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE, -1, 0)"
                           " = 0x1\nmmap(NULL, 4096, PROT_READ, MAP_PRIVATE, -1, 0) = 0x2\n")
    assert rules_of(text)["mmap"] == "arg2 == PROT_READ|PROT_WRITE|PROT_EXEC || arg2 == PROT_READ"


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed")
def test_a_traced_program_runs_under_its_generated_policy(tmp_path):
    true = shutil.which("true")
    log = tmp_path / "true.log"
    subprocess.run(["strace", "-f", "-o", str(log), true], check=True)
    assert main_generate([str(log), "-o", str(tmp_path / "true.policy")]) == 0
    assert main_compile([str(tmp_path / "true.policy"), str(tmp_path / "true.bpf")]) == 0
    child = (f"import os, sys, resource; sys.path.insert(0, {str(ROOT)!r}); import prctl\n"
             "from broker.jail.seccomp.load import prepare_filter\n"
             "prog = prepare_filter(open(sys.argv[1], 'rb').read())\n"
             "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
             "prctl.set_no_new_privs(True)\nprog.load()\nos.execv(sys.argv[2], sys.argv[2:])\n")
    run = lambda *argv: subprocess.run([sys.executable, "-c", child,  # noqa: E731
                                        str(tmp_path / "true.bpf"), *argv],
                                       capture_output=True, timeout=60)
    assert run(true).returncode == 0
    # ls lists a directory (getdents64, ...), which true never does
    assert run(shutil.which("ls"), "/").returncode == -signal.SIGSYS


def test_cli_compile_reports_errors_and_writes_programs(tmp_path, capsys):
    bad = tmp_path / "bad.policy"
    bad.write_text("read: 1\nwrite: arg0 == NOPE\n")
    assert main_compile([str(bad), str(tmp_path / "out.bpf")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:16: unknown constant 'NOPE'" in err
    assert not (tmp_path / "out.bpf").exists()
    good = tmp_path / "good.policy"
    good.write_text("read: 1\n")
    assert main_compile([str(good), str(tmp_path / "out.bpf"), "--default", "log",
                         "--disasm"]) == 0
    assert (tmp_path / "out.bpf").read_bytes() == compile_policy(good, "log")
    assert "ret log" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main_compile([str(good), str(tmp_path / "x.bpf"), "--default", "allow"])
    assert e.value.code == 2


def test_cli_generate_to_stdout_and_missing_input(tmp_path, capsys):
    log = tmp_path / "x.log"
    log.write_text("read(0, \"\", 1) = 0\n")
    assert main_generate([str(log)]) == 0
    assert "read: 1" in capsys.readouterr().out
    assert main_generate([str(tmp_path / "absent.log")]) == 1
    assert "cannot read" in capsys.readouterr().err
