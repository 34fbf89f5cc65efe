"""How a jail with an init starts its program (broker/jail/launch.py,
`_become_init`): when init can take every restriction the program gets
(no capability left, no_new_privs, no seccomp filter), init takes them
itself and starts the program with posix_spawn; otherwise it forks a child
that takes them.  Either way the program must see the same jail, and init
must hold no more than before.

The fork path is forced here with a seccomp filter that allows everything
(a compiled one-instruction program): the only thing it changes for the
program is the Seccomp line of /proc/self/status."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import replace

import pytest

from broker.jail import config
from broker.jail.launch import _program_may_be_spawned
from conftest import JAIL_PYTHON, privjail

SECCOMP_RET_ALLOW = 0x7FFF0000
NOBODY = "65534"
BASE = ["-p", "-v", "-e", "--uts", "-l", "-n", "-c", "0", "-u", NOBODY, "-g", NOBODY]


@pytest.fixture(scope="module")
def allow_all(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bpf") / "allow-all.bpf"
    path.write_bytes(struct.pack("=HBBI", 0x06, 0, 0, SECCOMP_RET_ALLOW))   # BPF_RET|BPF_K
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    return str(path)


def _spec(*flags: str):
    return config.parse_command_line([*flags, "--", "/bin/true"])


def test_the_spawn_path_is_taken_exactly_when_init_can_hold_it_all():
    assert _program_may_be_spawned(_spec(*BASE), None)
    assert not _program_may_be_spawned(_spec(*BASE), object())          # a seccomp filter
    no_nnp = [f for f in BASE if f != "-n"]
    assert not _program_may_be_spawned(_spec(*no_nnp), None)
    with_caps = BASE[:BASE.index("-c")] + ["-c", "0x400"] + BASE[BASE.index("-c") + 2:]
    assert not _program_may_be_spawned(_spec(*with_caps), None)         # CAP_NET_BIND_SERVICE
    no_mask = BASE[:BASE.index("-c")] + BASE[BASE.index("-c") + 2:]
    assert not _program_may_be_spawned(_spec(*no_mask), None)           # caps left as they fall
    assert not _program_may_be_spawned(replace(_spec(*BASE), ambient=True), None)


# What the program sees, and must see alike on both paths (the probe's keys).
SAME = ("pid", "ppid", "uid", "euid", "suid", "gid", "egid", "sgid", "groups", "caps",
        "securebits", "no_new_privs", "visible_pids", "hostname", "net_ifaces", "fds",
        "rlimits", "cwd", "env", "root_dir_entries", "proc_readonly")


def test_the_program_sees_the_same_jail_spawned_or_forked(allow_all):
    spawned = privjail(*BASE).report
    forked = privjail(*BASE, "--seccomp-bpf-binary", allow_all).report
    assert (spawned["seccomp"], forked["seccomp"]) == (0, 2)      # the paths did differ
    for key in SAME:
        assert spawned[key] == forked[key], key
    assert spawned["fds"] == [0, 1, 2]
    assert spawned["caps"] == {"inh": 0, "prm": 0, "eff": 0, "bnd": 0, "amb": 0}
    assert spawned["pid"] == 2 and spawned["ppid"] == 1


SIGNALS = r"""
import json
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines()
              if ":\t" in l)
print(json.dumps({k: status[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt")}))
"""


def test_the_program_starts_with_no_signal_blocked_and_none_of_ours_ignored(allow_all):
    """Nothing blocked; ignored only what python3 itself ignores at start
    (SIGPIPE, SIGXFSZ).  Signals 32 and 33 are left out of the comparison:
    they are glibc's own (SIGCANCEL, SIGSETXID), which glibc programs can
    neither see nor change; glibc's posix_spawn sets them to SIG_IGN in the
    child (the spawn path), and a process started that way anywhere above
    privjail passes the same on through every fork and exec (the fork path
    then shows it too)."""
    python_ignores = (1 << 12) | (1 << 24)
    glibc_internal = (1 << 31) | (1 << 32)
    for extra in ((), ("--seccomp-bpf-binary", allow_all)):
        r = privjail(*BASE, *extra, program=[JAIL_PYTHON, "-S", "-c", SIGNALS])
        assert r.rc == 0, r.stderr
        got = json.loads(r.stdout)
        assert int(got["SigBlk"], 16) == 0, (extra, got)
        assert int(got["SigIgn"], 16) & ~glibc_internal == python_ignores, (extra, got)


def test_an_inheritable_fd_of_the_launcher_never_reaches_the_program(allow_all):
    """privjail's own fd 0-2 pass on (no fds were asked for), nothing else:
    not even an fd the launcher left inheritable."""
    r, w = os.pipe()
    leak = os.dup2(w, 77, inheritable=True)
    try:
        for extra in ((), ("--seccomp-bpf-binary", allow_all)):
            run = privjail(*BASE, *extra, pass_fds=(leak,))
            assert run.report["fds"] == [0, 1, 2], (extra, run.report["fds"])
    finally:
        for fd in (r, w, leak):
            os.close(fd)


AS_ROOT = [f for f in BASE if f not in ("-u", "-g", NOBODY)]     # uid 0, no capability


@pytest.mark.parametrize("flags,uid", [(BASE, NOBODY), (AS_ROOT, "0")], ids=["nobody", "root"])
def test_init_holds_what_the_program_holds_and_cannot_be_inspected_by_it(flags, uid):
    """On the spawn path init takes the program's restrictions itself: the
    program (same uid) cannot read init's environment (init is not dumpable:
    a uid change would clear that by itself, root without capabilities needs
    it said) nor gain anything over it."""
    r = privjail(*flags, probe_args=["--read", "/proc/1/environ"])
    assert r.rc == 0, r.stderr
    reads = {x["read"]: x for x in r.reports[1:] if "read" in x}
    assert not reads["/proc/1/environ"]["ok"]                     # EACCES: not dumpable
    # init's own status, as the program can read it
    r = privjail(*flags, program=["/bin/cat", "/proc/1/status"])
    status = dict(line.split(":\t", 1) for line in r.stdout.splitlines() if ":\t" in line)
    assert status["Uid"].split() == [uid] * 4
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, field
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "0"


def test_path_search_uses_the_programs_path_and_its_first_executable_hit(tmp_path):
    """As os.execvpe: PATH from the program's environment, in order; a match
    that cannot be executed is skipped when a later one can, and is the
    error when none can."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "true").write_text("#!/bin/sh\nexit 9\n")        # not executable (0644)
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    r = privjail(*BASE, "--env-reset", "--env-add", f"PATH=/nonexistent:{d}:/usr/bin:/bin",
                 program=["true"])
    assert r.rc == 0, r.stderr
    r = privjail(*BASE, "--env-reset", "--env-add", f"PATH={d}", program=["true"])
    assert r.rc == 126 and "exec" in r.stderr, (r.rc, r.stderr)
    r = privjail(*BASE, "--env-reset", "--env-add", "PATH=/nonexistent:/usr/bin",
                 program=["no-such-program-here"])
    assert r.rc == 127 and "exec" in r.stderr, (r.rc, r.stderr)


def test_a_program_that_cannot_be_executed_is_the_exec_steps_error():
    r = privjail(*BASE, program=["/etc/hostname"])
    assert r.rc == 126 and "step 'exec'" in r.stderr, (r.rc, r.stderr)
    r = privjail(*BASE, program=["/no/such/program"])
    assert r.rc == 127 and "step 'exec'" in r.stderr, (r.rc, r.stderr)
