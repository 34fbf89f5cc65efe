"""Shared helpers for the seccomp tests (and a check of the helpers themselves).

Every seccomp test module imports `seccomp_cache` (an autouse fixture that
points the cache at a private directory, shared across the session so the
constants table is generated once) and the helpers below.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "seccomp_data"
CORPUS = ROOT.parent / "shared" / "corpus" / "chromeos" / "seccomp"

# x86_64 numbers used by the tests
NR = {"read": 0, "write": 1, "mmap": 9, "mprotect": 10, "ioctl": 16, "getpid": 39,
      "socket": 41, "getppid": 110, "getuid": 102, "prctl": 157, "mseal": 462,
      "uname": 63, "getpgrp": 111, "madvise": 28}
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE_ANON = 0x22
AF_UNIX, AF_INET, AF_NETLINK = 1, 2, 16
PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME = 3, 15, 16

# What the child needs between loading the filter and exiting, added to a test
# policy for each syscall it does not mention itself.
HARNESS = {
    "write": "1", "exit_group": "1", "exit": "1", "brk": "1", "munmap": "1",
    "mmap": "arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE", "madvise": "1", "futex": "1",
    "rt_sigreturn": "1", "rt_sigprocmask": "1", "rt_sigaction": "1",
}


def _private_cache_dir() -> str:
    d = os.path.join(tempfile.gettempdir(), f"privbroker-seccomp-test-cache-{os.geteuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


@pytest.fixture(autouse=True)
def seccomp_cache(monkeypatch):
    """All seccomp tests cache in one private directory (not the system's)."""
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", _private_cache_dir())
    yield


def write_policy(directory: Path, text: str, name: str = "test.policy",
                 harness: bool = True) -> Path:
    """A policy file with `text`, plus the harness rules it does not override."""
    mentioned = set(re.findall(r"^\s*([a-z_0-9]+)\s*:", text, re.M))
    lines = [text.rstrip("\n")]
    if harness:
        lines += [f"{name_}: {rule}" for name_, rule in HARNESS.items()
                  if name_ not in mentioned]
    p = directory / name
    p.write_text("\n".join(lines) + "\n")
    return p


@dataclass
class Outcome:
    returncode: int
    results: list[tuple[int, int]]      # (return value, errno) of each call that returned
    stderr: str
    pid: int = 0

    @property
    def killed_by_sigsys(self) -> bool:
        return self.returncode == -signal.SIGSYS

    @property
    def survived(self) -> bool:
        return self.returncode == 0


_CHILD = r"""
import ctypes, json, os, resource, sys
sys.path.insert(0, {root!r})
import prctl
from broker.jail.seccomp.load import prepare_filter
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
with open(sys.argv[1], 'rb') as f:
    prog = prepare_filter(f.read())
calls = [(nr, [ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF) for a in args])
         for nr, *args in json.loads(sys.argv[2])]
out = bytearray(64 * len(calls) + 64)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
prctl.set_no_new_privs(True)
prog.load()
for nr, args in calls:
    r = libc.syscall(nr, *args)
    e = ctypes.get_errno() if r == -1 else 0
    os.write(1, b'%d %d\n' % (r, e))
os._exit(0)
"""


def run_filtered(program: bytes, calls: list[tuple[int, ...]], workdir: Path) -> Outcome:
    """In a fresh process: set no_new_privs, load `program`, make each call
    (nr, *args) through syscall(2), report each result; exit 0."""
    bpf_path = workdir / f"prog-{os.getpid()}-{len(list(workdir.iterdir()))}.bpf"
    bpf_path.write_bytes(program)
    p = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT)), str(bpf_path),
                          json.dumps([list(c) for c in calls])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate(timeout=60)
    results = [tuple(int(x) for x in line.split()) for line in stdout.splitlines() if line]
    return Outcome(p.returncode, results, stderr, p.pid)


def test_harness_runs_a_program_under_an_allow_everything_filter(tmp_path):
    from broker.jail.seccomp import bpf
    allow_all = bpf.encode([bpf.Insn(bpf.RET, bpf.RET_ALLOW)])
    out = run_filtered(allow_all, [(NR["getppid"],)], tmp_path)
    assert out.survived, out.stderr
    assert out.results == [(os.getpid(), 0)]
