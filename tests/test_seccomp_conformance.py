"""Decision equivalence (issue #10): compiled programs decide what the policies say.

* The reference (reference.py, reading the policy text) is checked on its own
  against hand-written answers.
* The interpreter (bpf_interp.py) is checked against the kernel: every action
  and return value, random programs using every opcode seccomp allows, and
  what the kernel refuses to load.
* Then reference == interpreter on generated tuples for every policy, and
  interpreter == kernel on every tuple a process can make (seccomp_conformance.py).

`make test` runs a sample of the corpus; `make conformance`
(PRIVBROKER_CONFORMANCE=full) runs every corpus policy under every default.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import seccomp_conformance as sc
from broker.jail.seccomp import PolicyError, bpf_interp as bi, compile_policy
from broker.jail.seccomp.reference import Reference, ReferenceError
from test_seccomp_support import CORPUS, DATA, ROOT, seccomp_cache

__all__ = ["seccomp_cache"]
FULL = os.environ.get("PRIVBROKER_CONFORMANCE") == "full"
LANG = sorted((DATA / "conformance").glob("*.policy")) + [DATA / "mtpd-guide-excerpt.policy"]
POLICIES = sorted(CORPUS.glob("*.policy")) if CORPUS.is_dir() else []
DEFAULTS = (None, "kill-thread", "trap", "log")
U64 = (1 << 64) - 1
X86_64 = bi.AUDIT_ARCH_X86_64

needs_runner = pytest.mark.skipif(
    os.uname().machine != "x86_64" or not (shutil.which("gcc") or shutil.which("cc")),
    reason="the kernel runner is x86_64 assembly, built with the C compiler")


def _insn(code, k=0, jt=0, jf=0):
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


# -- the reference, on its own ---------------------------------------------------

def _ref(tmp_path, text, default=None, name="p.policy"):
    p = tmp_path / name
    p.write_text(text)
    return Reference(p, default)


def test_reference_operators_at_their_boundaries(tmp_path):
    r = _ref(tmp_path, "read: arg0 == 5\nwrite: arg0 != 5\nopen: arg0 < 5\nclose: arg0 <= 5\n"
                       "stat: arg0 > 5\nfstat: arg0 >= 5\nlstat: arg0 & 0x104\n"
                       "poll: arg0 in 0x104\n")
    table = {"read": {4: 0, 5: 1, 6: 0}, "write": {4: 1, 5: 0, 6: 1},
             "open": {4: 1, 5: 0, 6: 0}, "close": {4: 1, 5: 1, 6: 0},
             "stat": {4: 0, 5: 0, 6: 1}, "fstat": {4: 0, 5: 1, 6: 1}}
    nrs = {"read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5,
           "lstat": 6, "poll": 7}
    for name, cases in table.items():
        for a0, allowed in cases.items():
            assert r.decide(nrs[name], (a0,)) == ("allow" if allowed else "kill-process"), \
                (name, a0)
    # & : any bit of the mask;  in : no bit outside the mask
    for a0, amp, inn in [(0, False, True), (4, True, True), (0x100, True, True),
                         (0x104, True, True), (1, False, False), (0x105, True, False)]:
        assert (r.decide(6, (a0,)) == "allow") is amp, a0
        assert (r.decide(7, (a0,)) == "allow") is inn, a0
    # unsigned 64-bit: the high half counts, -1 is the largest value
    assert r.decide(0, (5 | 1 << 32,)) == "kill-process"
    assert r.decide(4, (1 << 32,)) == "allow"
    assert r.decide(2, (U64,)) == "kill-process"
    assert r.decide(6, (0x4 << 32,)) == "kill-process"       # & looks at the whole value
    assert r.decide(7, (1 << 40,)) == "kill-process"


def test_reference_values_numbers_and_constants(tmp_path):
    r = _ref(tmp_path, "read: arg0 == 010\nwrite: arg0 == 0x1F\nopen: arg0 == -1\n"
                       "close: arg0 == PROT_READ|PROT_WRITE\nstat: arg0 in ~PROT_EXEC\n"
                       "fstat: arg0 == ~(PROT_READ | 0x10) \nlstat: arg0 == AT_FDCWD\n")
    assert r.decide(0, (8,)) == "allow" and r.decide(0, (10,)) == "kill-process"
    assert r.decide(1, (31,)) == "allow"
    assert r.decide(2, (U64,)) == "allow" and r.decide(2, (0xFFFFFFFF,)) == "kill-process"
    assert r.decide(3, (3,)) == "allow"
    assert r.decide(4, (U64 ^ 4,)) == "allow" and r.decide(4, (4,)) == "kill-process"
    assert r.decide(5, (U64 ^ 0x11,)) == "allow"
    assert r.decide(6, (U64 - 99,)) == "allow"               # AT_FDCWD is -100


def test_reference_actions_and_where_a_semicolon_sends(tmp_path):
    r = _ref(tmp_path, "read: 1\nwrite: allow\nopen: return EPERM\nclose: return\n"
                       "stat: kill\nfstat: trap\nlstat: log\npoll: kill-thread\n"
                       "lseek: return 1\nmmap: arg0 == 1; return 9\n"
                       "mprotect: {arg0 == 1; return 9, arg0 == 2, kill-thread}\n"
                       "munmap: arg0 == 1\nmunmap: arg0 == 2; return 3\n", default="log")
    assert [r.decide(n) for n in range(9)] == [
        "allow", "allow", "errno 1", "log", "log", "trap", "log", "kill-thread", "errno 1"]
    # top level: allowed when it holds, else the action
    assert r.decide(9, (1,)) == "allow" and r.decide(9, (2,)) == "errno 9"
    # in a filter list: the action when it holds
    assert r.decide(10, (1,)) == "errno 9" and r.decide(10, (2,)) == "allow"
    assert r.decide(10, (3,)) == "kill-thread"
    # a syscall in two statements: in order
    assert [r.decide(11, (a,)) for a in (1, 2, 3)] == ["allow", "allow", "errno 3"]
    assert r.decide(12) == "log"                              # unlisted: the default


def test_reference_defaults_denylist_arch_and_includes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inc.policy").write_text("write: 1\n")
    text = ("@include ./sub/inc.policy\n@default trap\nread: arg0 == 0\nclose: kill\n"
            "{open[arch=x86_64], stat[arch=aarch64]}: 1\n# a comment: ignored\n\n"
            "fstat: arg0 == 1 || \\\n  arg0 == 2 # continued\n")
    r = _ref(tmp_path, text)
    assert r.decide(1) == "allow"                              # from the include
    assert r.decide(0, (1,)) == "trap" and r.decide(3) == "trap" and r.decide(99) == "trap"
    assert r.decide(2) == "allow" and r.decide(4) == "trap"    # stat is aarch64 only
    assert r.decide(5, (2,)) == "allow" and r.decide(5, (3,)) == "trap"
    assert _ref(tmp_path, text, default="kill-thread").decide(99) == "kill-thread"
    d = _ref(tmp_path, "@denylist\nptrace: return EPERM\nsocket: arg0 == 2; return 97\n"
                       "read: kill\n")
    assert d.decide(101) == "errno 1" and d.decide(0) == "kill-process"
    assert d.decide(41, (2,)) == "errno 97" and d.decide(41, (1,)) == "allow"
    assert d.decide(1) == "allow"
    k = _ref(tmp_path, "@default kill\nread: kill\n")
    assert k.decide(0) == "kill-process" and k.decide(1) == "kill-process"


def test_reference_wrong_architecture_and_x32_are_killed(tmp_path):
    r = _ref(tmp_path, "@denylist\nptrace: return EPERM\n", default="log")
    assert r.decide(0) == "allow"
    assert r.decide(0, (), bi.AUDIT_ARCH_I386) == "kill-process"
    assert r.decide(0x40000000) == "kill-process"
    assert r.decide(0x40000000 + 59) == "kill-process"
    assert r.decide(0x80000000) == "allow" and r.decide(0x3FFFFFFF) == "allow"


def test_reference_names_come_from_the_kernel_headers_and_agree_with_libseccomp():
    from broker.jail.seccomp import syscall_names
    from broker.jail.seccomp.reference import _unistd, syscall_number
    table = _unistd()
    assert table["read"] == 0 and table["mmap"] == 9 and len(table) > 300
    differ = {n: (v, syscall_names.number(n)) for n, v in table.items()
              if syscall_names.number(n) not in (None, v)}
    assert not differ
    assert syscall_number("mseal") == 462


def test_reference_refuses_what_it_cannot_read(tmp_path):
    for text in ("read arg0 == 1\n", "read: arg9 == 1\n", "read: arg0 === 1\n",
                 "read: arg0 == (1\n", "read: frobnicate\n", "nosuchcall: 1\n",
                 "read: arg0 == NO_SUCH_CONSTANT\n"):
        with pytest.raises(ReferenceError):
            _ref(tmp_path, text)


# -- the interpreter against the kernel --------------------------------------------

@needs_runner
def test_interpreter_verdicts_are_what_the_kernel_does_with_each_return_value():
    # getppid returns arg1's low half as the filter's result: every action,
    # with and without data, and values no action has.
    prog = sc.with_escape(b"".join([
        _insn(0x20, 0), _insn(0x15, 110, 0, 2), _insn(0x20, 24), _insn(0x16),
        _insn(0x06, bi.RET_ERRNO | 4002)]))
    values = [bi.RET_ALLOW, bi.RET_ALLOW | 5, bi.RET_LOG, bi.RET_LOG | 9,
              bi.RET_ERRNO, bi.RET_ERRNO | 1, bi.RET_ERRNO | 13, bi.RET_ERRNO | 4095,
              bi.RET_ERRNO | 4096, bi.RET_ERRNO | 0xFFFF, bi.RET_TRAP, bi.RET_TRAP | 7,
              bi.RET_TRAP | 0xFFFF, bi.RET_TRACE, bi.RET_TRACE | 3, bi.RET_USER_NOTIF,
              bi.RET_USER_NOTIF | 2, bi.RET_KILL_THREAD, bi.RET_KILL_THREAD | 5,
              bi.RET_KILL_PROCESS, bi.RET_KILL_PROCESS | 5, 0x00010000, 0x00020000,
              0x00040000, 0x00060000, 0x12340000, 0x7FBF0000, 0x7FFD0000, 0x7FFE0000,
              0x90000000, 0xC0000000, 0xFFFF0000, 0xFFFFFFFF]
    calls = [(0, 110, [0, v, 0, 0, 0, 0]) for v in values] + [(0, 39, [0] * 6)]
    results = sc.run_in_kernel(prog, calls, mode=1)
    interp = bi.Program(prog)
    ppid = results[0].ret
    assert results[0].status == sc.RETURNED and ppid > 1
    assert results[-1].status == sc.RETURNED and results[-1].ret == -4002
    for (_abi, nr, args), r in zip(calls, results):
        ret = interp.run(nr, X86_64, args, r.ip)
        v = bi.verdict(ret)
        action, _, data = v.partition(" ")
        seen = (r.status, r.ret, r.trap_errno, r.trap_syscall, r.trap_arch)
        if action in ("allow", "log"):
            assert r.status == sc.RETURNED and r.ret == ppid, (hex(ret), v, seen)
        elif action == "errno":
            assert r.status == sc.RETURNED and r.ret == -int(data), (hex(ret), v, seen)
        elif action == "trap":
            assert seen == (sc.TRAPPED, 0, int(data or 0), nr, X86_64), (hex(ret), v, seen)
        elif action in ("trace", "user-notify"):      # no tracer, no listener
            assert r.status == sc.RETURNED and r.ret == -errno.ENOSYS, (hex(ret), v, seen)
        elif action == "kill-thread":
            assert r.status == sc.THREAD_KILLED, (hex(ret), v, seen)
        else:
            assert action == "kill-process" and r.status == sc.PROCESS_KILLED, \
                (hex(ret), v, seen)


def _random_program(rng: random.Random) -> bytes:
    """A valid program using every opcode seccomp allows; every path ends in
    ERRNO|x (x < 4096) except a division by an X of 0 (which returns 0)."""
    LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
    init = []
    for cell in range(16):                             # every scratch cell written first
        init += [_insn(0x00, rng.getrandbits(32)), _insn(0x02, cell)]
    body_len = rng.randint(4, 60)
    epi_at = len(init) + body_len                      # where the epilogue starts
    body = []
    for i in range(body_len):
        pc = len(init) + i
        room = min(epi_at - pc - 1, 255)               # a forward jump within the body
        kind = rng.randrange(13)
        if kind <= 2:
            body.append(_insn(LD | 0x00 | 0x20, 4 * rng.randrange(16)))      # LD W ABS
        elif kind == 3:
            body.append(_insn(rng.choice([LD | 0x00, LDX | 0x00, LD | 0x80, LDX | 0x80]),
                              rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])))
        elif kind == 4:
            body.append(_insn(rng.choice([LD | 0x60, LDX | 0x60, ST, STX]), rng.randrange(16)))
        elif kind == 5:
            body.append(_insn(MISC | rng.choice([0x00, 0x80])))
        elif kind in (6, 7, 8):
            op = rng.choice([0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xA0, 0x80])
            src = rng.choice([0x00, 0x08]) if op != 0x80 else 0
            k = rng.getrandbits(32) if rng.random() < 0.5 else rng.randrange(40)
            if src == 0 and op in (0x60, 0x70):
                k %= 32
            if src == 0 and op == 0x30 and k == 0:
                k = 3
            body.append(_insn(ALU | op | src, k))
        elif kind in (9, 10, 11) and room > 0:
            code = JMP | rng.choice([0x10, 0x20, 0x30, 0x40]) | rng.choice([0x00, 0x08])
            body.append(_insn(code, rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, rng.getrandbits(32)]),
                              rng.randrange(room + 1), rng.randrange(room + 1)))
        elif kind == 12 and room > 0:
            if rng.random() < 0.5:
                body.append(_insn(JMP | 0x00, rng.randrange(room + 1)))                # JA
            else:
                body.append(_insn(RET, bi.RET_ERRNO | rng.randrange(4096)))
        else:
            body.append(_insn(ALU | 0x80))                                          # NEG
    shift = rng.choice([0, 4, 12, 20])                 # which 12 bits of A the errno shows
    epilogue = [_insn(ALU | 0x70, shift), _insn(ALU | 0x50, 0xFFF),
                _insn(ALU | 0x40, bi.RET_ERRNO), _insn(RET | 0x10)]
    return b"".join(init + body + epilogue)


@needs_runner
def test_interpreter_agrees_with_the_kernel_on_random_programs(capsys):
    rng = random.Random(10)
    skip = sc.unfiltered(range(1024)) | sc.unfiltered(range(1024), abi=1)
    ia32 = sc.ia32_available()
    programs = 400 if FULL else 60
    checked = 0
    for n in range(programs):
        program = _random_program(rng)
        bi.check(program)
        prog = sc.with_escape(program)
        calls = []
        for _ in range(40):
            abi = 1 if ia32 and rng.random() < 0.2 else 0
            nr = rng.choice([n for n in range(1024) if n not in skip])
            if abi == 0 and rng.random() < 0.1:
                nr |= 0x40000000
            args = [rng.choice([0, 1, U64, rng.getrandbits(32), rng.getrandbits(64)])
                    for _ in range(6)]
            if abi == 1:
                args = [a & 0xFFFFFFFF for a in args]
            calls.append((abi, nr, args))
        interp = bi.Program(prog)
        for (abi, nr, args), r in zip(calls, sc.run_in_kernel(prog, calls)):
            arch = bi.AUDIT_ARCH_I386 if abi else X86_64
            want = interp.run(nr, arch, args, r.ip)
            if r.status == sc.RETURNED:
                got = bi.RET_ERRNO | -r.ret
            elif r.status == sc.THREAD_KILLED:
                got = bi.RET_KILL_THREAD
            else:
                got = ("status", r.status, r.ret)
            assert got == want, (n, abi, nr, args, hex(r.ip), r, hex(want),
                                 bi.decode(program))
            checked += 1
    with capsys.disabled():
        print(f"\n[bpf interpreter] {programs} random programs, {checked} calls: "
              f"same result as the kernel")


@needs_runner
def test_the_checker_refuses_exactly_what_the_kernel_refuses():
    ok = _insn(0x06, bi.RET_ALLOW)
    cases = {
        "valid": ok,
        "ld len, ret a": _insn(0x80) + _insn(0x16),
        "mod": _insn(0x94, 3) + ok,
        "div by constant 0": _insn(0x34, 0) + ok,
        "lsh 32": _insn(0x64, 32) + ok,
        "rsh 31": _insn(0x74, 31) + ok,
        "ld half word": _insn(0x28, 0) + ok,
        "ld byte": _insn(0x30, 0) + ok,
        "ld indirect": _insn(0x40, 0) + ok,
        "ldx msh": _insn(0xB1, 0) + ok,
        "misaligned": _insn(0x20, 2) + ok,
        "past seccomp_data": _insn(0x20, 64) + ok,
        "last word": _insn(0x20, 60) + ok,
        "ancillary": _insn(0x20, 0xFFFFF000) + ok,
        "ret x": _insn(0x0E),
        "not ending in ret": ok + _insn(0x20, 0),
        "jump past the end": _insn(0x15, 0, 1, 0) + ok,
        "ja past the end": _insn(0x05, 1) + ok,
        "ja to the last": _insn(0x05, 0) + ok,
        "unknown opcode": _insn(0xFF) + ok,
        "scratch read before write": _insn(0x60, 0) + ok,
        "scratch written on one path only": _insn(0x15, 0, 0, 1) + _insn(0x02, 3) +
        _insn(0x60, 3) + ok,
        "scratch written on both paths": _insn(0x15, 0, 1, 0) + _insn(0x02, 3) +
        _insn(0x03, 3) + _insn(0x60, 3) + ok,
        "scratch cell 16": _insn(0x02, 16) + ok,
        "empty": b"",
    }
    rng = random.Random(3)
    base = _random_program(rng)
    for i in range(60 if FULL else 20):                # random damage to a valid program
        b = bytearray(base)
        at = rng.randrange(len(b) // 8) * 8
        field = rng.choice([0, 2, 3, 4])
        if field == 0:
            b[at:at + 2] = struct.pack("=H", rng.choice([rng.getrandbits(16), rng.getrandbits(8)]))
        elif field in (2, 3):
            b[at + field] = rng.getrandbits(8)
        else:
            b[at + 4:at + 8] = struct.pack("=I", rng.choice([rng.getrandbits(32), 64, 62, 17]))
        cases[f"damaged {i}"] = bytes(b)
    outcomes = {0: 0, errno.EINVAL: 0}
    for name, program in cases.items():
        try:
            bi.check(program)
            verdict = 0
        except bi.InvalidFilter:
            verdict = errno.EINVAL
        kernel = sc.load_errno(program)
        assert verdict == kernel, (name, verdict, kernel)
        outcomes[verdict] += 1
    assert outcomes[0] >= 8 and outcomes[errno.EINVAL] >= 20, outcomes


# -- the differential check ----------------------------------------------------------

def _summary(reports) -> str:
    tuples = sum(r.tuples for r in reports)
    kernel = sum(r.kernel_tuples for r in reports)
    bad = sum(len(r.mismatches) for r in reports)
    kbad = sum(len(r.kernel_mismatches) for r in reports)
    verdicts = sum((r.verdicts for r in reports), Counter())
    sizes = sorted(r.tuples for r in reports)
    return (f"{tuples} tuples (per run {sizes[0]}..{sizes[-1]}, median "
            f"{sizes[len(sizes) // 2]}) reference vs interpreter: {bad} mismatches; "
            f"{kernel} of them also run in the kernel: {kbad} mismatches\n"
            f"  verdicts: " + ", ".join(f"{k} {v}" for k, v in verdicts.most_common()))


def _assert_clean(reports):
    for r in reports:
        assert not r.mismatches, (r.policy, r.default, r.mismatches[:10])
        assert not r.kernel_mismatches, (r.policy, r.default, r.kernel_mismatches[:10])


@needs_runner
def test_language_policies_decide_the_same_everywhere(capsys):
    # every form of the language, under every default, through all three
    reports = [sc.check_policy(p, compile_policy(p, d), d, kernel=True)
               for p in LANG for d in DEFAULTS]
    _assert_clean(reports)
    with capsys.disabled():
        print(f"\n[seccomp language] {len(LANG)} policies x {len(DEFAULTS)} defaults: "
              f"{_summary(reports)}")


@needs_runner
def test_far_jumps_and_wide_dispatch_decide_the_same(tmp_path):
    # > 255 instructions between a jump and its target: trampolines
    lines = ["ioctl: " + " || ".join(f"arg1 == {0x1000 + 3 * i:#x} && arg2 != {i}"
                                     for i in range(150)) + "; return ENOTTY",
             "read: " + " || ".join(f"arg0 == {i}" for i in range(200))]
    lines += [f"{nr}: arg0 > {nr}" for nr in range(20, 300, 3)]
    p = tmp_path / "wide.policy"
    p.write_text("\n".join(lines) + "\n")
    program = compile_policy(p)
    assert len(program) // 8 > 1000
    _assert_clean([sc.check_policy(p, program, kernel=True)])


def _corpus_sample():
    if FULL:
        return [(p, d) for p in POLICIES for d in DEFAULTS]
    # a few seconds: every 12th policy, the largest, the first using each of
    # `return`, `&`, `!=` and `&&`, and one under each other default
    picked = POLICIES[::12] + [max(POLICIES, key=lambda p: p.stat().st_size)]
    texts = {p: "\n".join(line.split("#")[0] for line in p.read_text().splitlines())
             for p in POLICIES}
    for feature in (r"\breturn\b", r"\barg\d\s*&\s", "!=", "&&"):
        picked += [next(p for p in POLICIES if re.search(feature, texts[p]))]
    out = [(p, None) for p in dict.fromkeys(picked)]
    out += [(POLICIES[5 + 7 * i], d) for i, d in enumerate(DEFAULTS[1:])]
    return out


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
@needs_runner
def test_corpus_decides_the_same(capsys):
    from broker.jail.seccomp.constants import ensure_constants
    constants = ensure_constants()
    start = time.perf_counter()
    reports, skipped = [], {}
    for path, default in _corpus_sample():
        try:
            program = compile_policy(path, default)
        except PolicyError as e:                       # listed in test_seccomp_corpus
            skipped[path.name] = str(e)
            continue
        reports.append(sc.check_policy(path, program, default, kernel=True,
                                       constants=constants))
    elapsed = time.perf_counter() - start
    _assert_clean(reports)
    with capsys.disabled():
        mode = "full corpus" if FULL else "corpus sample"
        print(f"\n[seccomp conformance] {mode}: {len({r.policy for r in reports})} policies, "
              f"{len(reports)} (policy, default) runs, {_summary(reports)}; "
              f"{elapsed:.1f} s" + (f"; not compiled: {skipped}" if skipped else ""))
        skip = sorted(sc.unfiltered([]))
        if skip:
            print(f"  this kernel does not pass syscall numbers {skip} through seccomp: "
                  f"left out of the kernel runs")


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
def test_every_reachable_instruction_is_exercised(capsys):
    # The tuples reach every instruction of every compiled program but those no
    # input can reach: a leaf of the dispatch search whose numbers are all listed
    # ends in a `ret` nothing falls to (the sweep tries every number up to
    # SWEEP, which covers each range of the search), and a conjunction a policy
    # lists twice is decided by its first copy.
    total = executed = 0
    policies = POLICIES if FULL else POLICIES[::6]
    for path in policies:
        ref = Reference(path)
        prog = bi.Program(compile_policy(path))
        seen: set[int] = set()
        for nr, args, arch in sc.tuples(ref):
            trace: list[int] = []
            prog.run_words(bi.data_words(nr, arch, args), trace)
            seen.update(trace)
        first_arg = min((pc for pc, i in enumerate(prog.insns) if i[0] == 0x20 and i[3] >= 16),
                        default=len(prog.insns))
        missed = [pc for pc in range(len(prog.insns)) if pc not in seen]
        assert all(prog.insns[pc][0] == 0x06 for pc in missed), (path.name, missed)
        in_args = [pc for pc in missed if pc >= first_arg]
        dup = sum(len(dnf) - len({tuple(c) for c in dnf}) for rules in ref.rules.values()
                  for dnf, _ in rules if dnf)
        assert len(in_args) <= dup, (path.name, in_args)
        total += len(prog.insns)
        executed += len(seen)
    with capsys.disabled():
        print(f"\n[seccomp coverage] {len(policies)} programs: {executed}/{total} "
              f"instructions executed by the tuples; the rest are unreachable returns")


_TIMED = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from broker.jail.seccomp import compiled_filter, ensure_constants
t1 = time.perf_counter()
ensure_constants()
t2 = time.perf_counter()
n = 0
for p in sys.argv[1:]:
    n += len(compiled_filter(p)) // 8
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "constants": t2 - t1, "compile": t3 - t2, "insns": n}}))
"""


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
def test_whole_corpus_compile_time_cold_and_cached(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = dict(os.environ, PRIVBROKER_CACHE_DIR=str(cache))
    paths = [str(p) for p in POLICIES]

    def timed():
        p = subprocess.run([sys.executable, "-c", _TIMED.format(root=str(ROOT)), *paths],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    if FULL:
        coldest = timed()                  # nothing cached: the constants table too
        shutil.rmtree(cache / "filters")
    else:
        coldest = None
        from broker.jail.seccomp import constants
        constants.ensure_constants()       # the session's table, copied in
        for f in Path(os.environ["PRIVBROKER_CACHE_DIR"]).glob("constants-*"):
            shutil.copy(f, cache / f.name)
    cold = timed()                         # constants cached, no compiled filter
    cached = timed()                       # every filter cached
    assert cached["insns"] == cold["insns"]
    assert cached["compile"] < cold["compile"]
    with capsys.disabled():
        print(f"\n[seccomp corpus compile] {len(paths)} policies, {cold['insns']} instructions")
        if coldest:
            print(f"  cold, nothing cached: constants table {coldest['constants']:.2f} s, "
                  f"compile {coldest['compile']:.2f} s")
        print(f"  cold (constants table cached): {cold['compile'] * 1000:.0f} ms "
              f"({cold['compile'] * 1000 / len(paths):.2f} ms/policy); "
              f"cached: {cached['compile'] * 1000:.0f} ms "
              f"({cached['compile'] * 1000 / len(paths):.2f} ms/policy); "
              f"imports {cached['import'] * 1000:.0f} ms")
