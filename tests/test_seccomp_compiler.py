"""The compiled program means what the policy says, for every input tried.

Three oracles: `evaluate()` (the policy's meaning, written directly from the
rules) on generated policies and inputs; libseccomp's own compilation of the
same policy where libseccomp can express it; and fixed cases.
"""
from __future__ import annotations

import os
import tempfile

import pyseccomp
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from broker.jail.seccomp import PolicyError, bpf, compile_policy, compiled_filter
from broker.jail.seccomp.compiler import cache_key, compile_parsed, evaluate
from broker.jail.seccomp.policy import (ALLOW, KILL, Action, Atom, Policy, Rule,
                                        SyscallRules)
from test_seccomp_support import seccomp_cache, write_policy

__all__ = ["seccomp_cache"]
U64 = (1 << 64) - 1
ARCH = 0xC000003E
NRS = [0, 1, 2, 3, 9, 16, 41, 60, 157, 231, 435, 462]
OPS = ["==", "!=", "<", "<=", ">", ">=", "&", "in"]

interesting = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 0xF, 0x10, 0x7FFFFFFF, 0x80000000,
                               0xFFFFFFFF, 0x100000000, 0x100000001, 0xFFFFFFFF00000000,
                               0x8000000000000000, U64 - 1, U64])
values = st.one_of(interesting, st.integers(0, U64), st.integers(0, 64))
atoms = st.builds(Atom, st.integers(0, 5), st.sampled_from(OPS), values)
conditions = st.lists(st.lists(atoms, min_size=1, max_size=3).map(tuple),
                      min_size=1, max_size=3).map(tuple)
actions = st.one_of(st.just(ALLOW), st.just(KILL),
                    st.builds(Action, st.just("errno"), st.integers(0, 4095)),
                    st.sampled_from([Action("log"), Action("trap"), Action("kill-thread"),
                                     Action("kill-process"), Action("user-notify"),
                                     Action("trace")]))


@st.composite
def rule_lists(draw):
    rules = [Rule(draw(conditions), draw(actions))
             for _ in range(draw(st.integers(0, 3)))]
    if not rules or draw(st.booleans()):
        rules.append(Rule(None, draw(actions)))
    return tuple(rules)


@st.composite
def policies(draw):
    nrs = draw(st.lists(st.sampled_from(NRS), unique=True, max_size=8))
    syscalls = tuple(SyscallRules(str(nr), nr, draw(rule_lists())) for nr in nrs)
    freq = tuple((nr, draw(st.integers(0, 100))) for nr in nrs) if draw(st.booleans()) else ()
    return Policy("<generated>", syscalls, default=draw(st.sampled_from([None, "kill-thread",
                                                                        "trap"])),
                  denylist=draw(st.booleans()), frequencies=freq)


@st.composite
def inputs_for(draw, policy):
    """A syscall and arguments, biased to hit the policy's constants and edges."""
    consts = [a.value for s in policy.syscalls for r in s.rules if r.condition
              for c in r.condition for a in c]
    near = st.sampled_from(consts).flatmap(
        lambda v: st.sampled_from([v, (v - 1) & U64, (v + 1) & U64, v ^ (1 << 32),
                                   v & 0xFFFFFFFF, v & ~0xFFFFFFFF & U64])) if consts else values
    nr = draw(st.one_of(st.sampled_from(NRS), st.sampled_from([0x40000000, 0x40000001,
                                                               0xFFFFFFFF, 999])))
    args = tuple(draw(st.one_of(near, values)) for _ in range(6))
    return nr, args


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), policy=policies(),
       default=st.sampled_from([None, "kill-process", "kill-thread", "trap", "log"]))
def test_program_matches_the_policy_meaning(data, policy, default):
    program = compile_parsed(policy, default)
    for _ in range(25):
        nr, args = data.draw(inputs_for(policy))
        want = evaluate(policy, nr, args, default, ARCH)
        got = bpf.run(program, bpf.seccomp_data(nr, ARCH, args))
        assert got == want, (nr, [hex(a) for a in args], hex(got), hex(want),
                             bpf.disassemble(program))


def test_wrong_architecture_and_x32_are_killed_whatever_the_default():
    policy = Policy("<p>", (SyscallRules("read", 0, (Rule(None, ALLOW),)),), denylist=True)
    program = compile_parsed(policy, "log")
    assert bpf.run(program, bpf.seccomp_data(0, ARCH)) == bpf.RET_ALLOW
    assert bpf.run(program, bpf.seccomp_data(5, ARCH)) == bpf.RET_ALLOW        # denylist
    assert bpf.run(program, bpf.seccomp_data(0, 0x40000003)) == bpf.RET_KILL_PROCESS  # i386
    assert bpf.run(program, bpf.seccomp_data(0x40000000, ARCH)) == bpf.RET_KILL_PROCESS
    assert bpf.run(program, bpf.seccomp_data(0x40000000 + 59, ARCH)) == bpf.RET_KILL_PROCESS


def test_defaults_apply_to_unlisted_fallthrough_and_kill():
    policy = Policy("<p>", (
        SyscallRules("read", 0, (Rule(((Atom(0, "==", 0),),), ALLOW),)),
        SyscallRules("write", 1, (Rule(None, KILL),)),
        SyscallRules("open", 2, (Rule(None, Action("kill-process")),))))
    for default, ret in [(None, bpf.RET_KILL_PROCESS), ("log", bpf.RET_LOG),
                         ("trap", bpf.RET_TRAP), ("kill-thread", bpf.RET_KILL_THREAD)]:
        program = compile_parsed(policy, default)
        run = lambda nr, a0=0: bpf.run(program, bpf.seccomp_data(nr, ARCH, (a0,)))  # noqa
        assert run(0) == bpf.RET_ALLOW
        assert run(0, 1) == ret            # falls through
        assert run(1) == ret               # kill = the default
        assert run(3) == ret               # unlisted
        assert run(2) == bpf.RET_KILL_PROCESS   # explicit kill-process stays
    with pytest.raises(ValueError):
        compile_parsed(policy, "allow")


def test_policy_default_directive_and_caller_override(tmp_path):
    p = write_policy(tmp_path, "@default trap\nread: 1\n", harness=False)
    data = lambda prog: bpf.run(prog, bpf.seccomp_data(3, ARCH))  # noqa: E731
    assert data(compile_policy(p)) == bpf.RET_TRAP
    assert data(compile_policy(p, "log")) == bpf.RET_LOG


# -- libseccomp as a second oracle ----------------------------------------------------

_SCMP_OP = {"==": pyseccomp.EQ, "!=": pyseccomp.NE, "<": pyseccomp.LT, "<=": pyseccomp.LE,
            ">": pyseccomp.GT, ">=": pyseccomp.GE}


@st.composite
def libseccomp_policies(draw):
    """Allow-lists libseccomp expresses correctly: a rule compares an argument
    at most once (libseccomp refuses more), and no argument is compared in two
    rules of one syscall (libseccomp 2.5.4 merges such rules wrongly: see
    test_overlapping_rules_that_libseccomp_merges_wrongly)."""
    syscalls = []
    for nr in draw(st.lists(st.sampled_from(NRS), unique=True, min_size=1, max_size=6)):
        if draw(st.booleans()):
            syscalls.append(SyscallRules(str(nr), nr, (Rule(None, ALLOW),)))
            continue
        conds = []
        free = draw(st.permutations(range(6)))
        for _ in range(draw(st.integers(1, 3))):
            if not free:
                break
            k = draw(st.integers(1, min(3, len(free))))
            args, free = free[:k], free[k:]
            conj = []
            for a in args:
                op = draw(st.sampled_from(OPS))
                v = draw(values)
                if op == "&":        # a single bit: (arg & b) == b
                    v = 1 << draw(st.integers(0, 63))
                conj.append(Atom(a, op, v))
            conds.append(tuple(conj))
        syscalls.append(SyscallRules(str(nr), nr, (Rule(tuple(conds), ALLOW),)))
    return Policy("<generated>", tuple(syscalls))


def libseccomp_program(policy: Policy) -> bytes:
    f = pyseccomp.SyscallFilter(pyseccomp.KILL_PROCESS)
    for s in policy.syscalls:
        for r in s.rules:
            if r.condition is None:
                f.add_rule(pyseccomp.ALLOW, s.number)
                continue
            for conj in r.condition:
                args = []
                for a in conj:
                    if a.op == "in":
                        args.append(pyseccomp.Arg(a.arg, pyseccomp.MASKED_EQ, ~a.value & U64, 0))
                    elif a.op == "&":
                        args.append(pyseccomp.Arg(a.arg, pyseccomp.MASKED_EQ, a.value, a.value))
                    else:
                        args.append(pyseccomp.Arg(a.arg, _SCMP_OP[a.op], a.value))
                f.add_rule(pyseccomp.ALLOW, s.number, *args)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), policy=libseccomp_policies())
def test_program_agrees_with_libseccomp(data, policy):
    ours = compile_parsed(policy)
    theirs = libseccomp_program(policy)
    for _ in range(30):
        nr, args = data.draw(inputs_for(policy))
        nr = nr if nr < 0x40000000 else 999
        sd = bpf.seccomp_data(nr, ARCH, args)
        assert bpf.run(ours, sd) == bpf.run(theirs, sd), (nr, [hex(a) for a in args])


def test_overlapping_rules_that_libseccomp_merges_wrongly():
    # Found by the differential test: libseccomp 2.5.4 compiles these three
    # rules so that read(0, 0, 0) is ALLOWED (it grafts rule 2's "arg1 != 1"
    # under rule 3's "arg0 >= 0").  None of the rules holds for all-zero
    # arguments, so the policy kills; the program here does.
    policy = Policy("<p>", (SyscallRules("read", 0, (Rule((
        (Atom(0, "==", 1),),
        (Atom(0, ">", 0), Atom(1, "!=", 1)),
        (Atom(0, ">=", 0), Atom(1, "==", 0), Atom(2, "==", 1))), ALLOW),)),))
    sd = bpf.seccomp_data(0, ARCH, (0, 0, 0))
    assert evaluate(policy, 0, (0, 0, 0), None, ARCH) == bpf.RET_KILL_PROCESS
    assert bpf.run(compile_parsed(policy), sd) == bpf.RET_KILL_PROCESS
    assert bpf.run(compile_parsed(policy), bpf.seccomp_data(0, ARCH, (1, 0, 0))) == \
        bpf.RET_ALLOW


# -- the assembler's long jumps --------------------------------------------------------

@pytest.mark.parametrize("n", [10, 70, 300, 400])
def test_long_policies_keep_their_meaning(n):
    big = Rule(tuple((Atom(1, "==", 0x1000 + i),) for i in range(n)), ALLOW)
    syscalls = (SyscallRules("ioctl", 16, (big,)),) + tuple(
        SyscallRules(str(nr), nr, (Rule(((Atom(0, "<", nr),),), Action("errno", nr)),
                                   Rule(None, ALLOW)))
        for nr in range(100, 100 + n // 3))
    policy = Policy("<big>", syscalls)
    program = compile_parsed(policy)
    insns = bpf.decode(program)
    assert all(i.jt <= 255 and i.jf <= 255 for i in insns)
    for nr, a0, a1 in [(16, 0, 0x1000), (16, 0, 0x1000 + n - 1), (16, 0, 0x1000 + n),
                       (100, 0, 0), (100, 200, 0), (100 + n // 3 - 1, 5, 0), (99, 0, 0)]:
        sd = bpf.seccomp_data(nr, ARCH, (a0, a1))
        assert bpf.run(program, sd) == evaluate(policy, nr, (a0, a1), None, ARCH)


def test_too_large_a_program_is_refused(tmp_path):
    values = " || ".join(f"arg1 == {i}" for i in range(1100))
    p = write_policy(tmp_path, f"ioctl: {values}\n", harness=False)
    with pytest.raises(PolicyError) as e:
        compile_policy(p)
    assert "at most 4096" in str(e.value)


# -- compile once, load many -------------------------------------------------------

def test_cache_key_follows_contents_includes_and_default(tmp_path):
    inc = tmp_path / "inc.policy"
    inc.write_text("read: 1\n")
    main = write_policy(tmp_path, "@include ./inc.policy\nwrite: 1\n", harness=False)
    k1 = cache_key(main)
    assert k1 == cache_key(main)
    assert cache_key(main, "log") != k1
    inc.write_text("read: return 1\n")
    k2 = cache_key(main)
    assert k2 != k1
    main.write_text("@include ./inc.policy\nwrite: 1\n# comment\n")
    assert cache_key(main) != k2


def test_cached_filter_follows_an_included_change(tmp_path):
    inc = tmp_path / "inc.policy"
    inc.write_text("read: 1\n")
    main = write_policy(tmp_path, "@include ./inc.policy\n", harness=False)
    first = compiled_filter(main)
    inc.write_text("read: return 1\n")
    second = compiled_filter(main)
    assert first != second == compile_policy(main)


def test_an_untrusted_cache_entry_is_ignored(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(cache))
    main = write_policy(tmp_path, "read: 1\n", harness=False)
    good = compiled_filter(main)
    entry = cache / "filters" / f"{cache_key(main)}.bpf"
    assert entry.read_bytes() == good
    allow_all = bpf.encode([bpf.Insn(bpf.RET, bpf.RET_ALLOW)])
    entry.write_bytes(allow_all)
    os.chmod(entry, 0o666)                  # writable by others: not believed
    assert compiled_filter(main) == good
    entry.write_bytes(allow_all)
    os.chmod(entry, 0o644)
    os.chown(entry, 12345, 12345)           # someone else's file: not believed
    assert compiled_filter(main) == good


def test_a_cached_filter_error_is_still_reported(tmp_path):
    main = write_policy(tmp_path, "read: fnord\n", harness=False)
    with pytest.raises(PolicyError):
        compiled_filter(main)


def test_a_wide_dispatch_tree_keeps_its_meaning():
    # 400 unconditional syscalls: the search tree itself spans more than 255
    # instructions, so its own branches need trampolines.
    syscalls = tuple(SyscallRules(str(nr), nr, (Rule(None, Action("errno", nr % 4096)),))
                     for nr in range(0, 800, 2))
    policy = Policy("<wide>", syscalls)
    program = compile_parsed(policy)
    assert len(bpf.decode(program)) > 600
    for nr in range(0, 802):
        sd = bpf.seccomp_data(nr, ARCH)
        assert bpf.run(program, sd) == evaluate(policy, nr, (), None, ARCH), nr


def test_the_program_cache_keeps_only_the_newest(tmp_path, monkeypatch):
    from broker.jail.seccomp import filter_cache
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(cache))
    monkeypatch.setattr(filter_cache, "KEEP", 3)
    monkeypatch.setattr(filter_cache._prune, "__defaults__", (3,))
    for i in range(6):
        compiled_filter(write_policy(tmp_path, f"read: return {i}\n", harness=False))
    assert len(list((cache / "filters").glob("*.bpf"))) == 3
