"""Policy -> seccomp BPF program (raw struct sock_filter array, as minijail's
compile tool writes it), and the on-disk cache of compiled programs.

The program is generated here rather than through libseccomp's rule API,
because that API cannot say what minijail policies say: libseccomp 2.5.4
refuses two comparisons on one argument in a rule (EINVAL: no ranges, no
"arg0 != A && arg0 != B" for the complement of a `; return` line; upstream
libseccomp#118, runc#2737), drops a syscall's conditional rules when an
unconditional rule is added for it, has no "(arg & mask) != 0", leaves the
combination of several rules of one syscall unspecified (libseccomp#225),
and was measured here to merge overlapping rules wrongly (a read(0, 0, 0)
allowed that no rule allows: see the tests).  minijail's own compilers
generate BPF directly too.  libseccomp still names the syscalls
(syscall_names.py), and the tests check generated programs against
libseccomp's for the policies it compiles correctly, and against
`evaluate()` (the policy's meaning) on many inputs.

Meaning, for a syscall number and arguments:
  * wrong architecture (e.g. i386 int 0x80 from a 64-bit process), or an
    x32 syscall number on x86_64: kill the process, whatever the default;
  * a listed syscall: its rules in order, the first whose condition holds
    decides; when none holds it "falls through";
  * an unlisted syscall, or one that falls through: the default action
    (kill-process unless the caller or @default says otherwise), or allow in
    a @denylist policy.
  * the `kill` action (and a bare `return`) is the default action, so that
    -L (log) turns the policy's kills into logs as minijail does.

Program shape: check arch, load the number, reject x32, a binary search over
the listed numbers (hot syscalls from @frequency checked first) whose leaves
return directly for unconditional rules or jump to the syscall's argument
block; each argument test compares full 64-bit values as two 32-bit halves.
"""
from __future__ import annotations

import os

from . import bpf, syscall_names
from .errors import PolicyError
from .policy import CALLER_DEFAULTS, Action, Atom, Policy

U64 = (1 << 64) - 1
_LEAF = 4               # a binary search subtree this small is a linear chain
_HOT = 4                # at most this many @frequency-hot syscalls checked first

_FIXED = {
    "allow": bpf.RET_ALLOW, "kill-process": bpf.RET_KILL_PROCESS,
    "kill-thread": bpf.RET_KILL_THREAD, "trap": bpf.RET_TRAP, "trace": bpf.RET_TRACE,
    "log": bpf.RET_LOG, "user-notify": bpf.RET_USER_NOTIF,
}


def effective_default(policy: Policy, default: str | None) -> str:
    """The default action's name: the caller's, else @default's, else kill-process."""
    if default is not None:
        if default not in CALLER_DEFAULTS:
            raise ValueError(f"default action must be one of {', '.join(CALLER_DEFAULTS)}, "
                             f"not {default!r}")
        return default
    if policy.default and policy.default != "kill":
        return policy.default
    return "kill-process"


class _Actions:
    def __init__(self, policy: Policy, default: str | None):
        self.kill = _FIXED[effective_default(policy, default)]
        self.unlisted = bpf.RET_ALLOW if policy.denylist else self.kill

    def value(self, action: Action) -> int:
        if action.kind == "kill":
            return self.kill
        if action.kind == "errno":
            return bpf.RET_ERRNO | (action.value & bpf.RET_DATA)
        return _FIXED[action.kind]


# -- the meaning (reference) -------------------------------------------------

def atom_holds(atom: Atom, arg: int) -> bool:
    a, v = arg & U64, atom.value
    return {"==": a == v, "!=": a != v, "<": a < v, "<=": a <= v, ">": a > v,
            ">=": a >= v, "&": a & v != 0, "in": a & ~v & U64 == 0}[atom.op]


def evaluate(policy: Policy, nr: int, args=(0,) * 6, default: str | None = None,
             arch: int | None = None) -> int:
    """What the compiled program must return for this call (the reference)."""
    audit, _le = syscall_names.audit_arch()
    if arch is not None and arch != audit:
        return bpf.RET_KILL_PROCESS
    nr &= 0xFFFFFFFF
    if syscall_names.arch() == "x86_64" and 0x40000000 <= nr < 0x80000000:
        return bpf.RET_KILL_PROCESS
    acts = _Actions(policy, default)
    args = tuple(args) + (0,) * (6 - len(args))
    entry = policy.rules_for(nr)
    if entry is None:
        return acts.unlisted
    for rule in entry.rules:
        if rule.condition is None or any(all(atom_holds(a, args[a.arg]) for a in conj)
                                         for conj in rule.condition):
            return acts.value(rule.action)
    return acts.unlisted


# -- code generation -----------------------------------------------------------

class _Gen:
    def __init__(self, policy: Policy, default: str | None):
        self.policy = policy
        self.acts = _Actions(policy, default)
        self.audit, self.little = syscall_names.audit_arch()
        self.asm = bpf.Assembler()

    def _offsets(self, arg: int) -> tuple[int, int]:
        lo = 16 + 8 * arg
        return (lo, lo + 4) if self.little else (lo + 4, lo)

    def atom(self, atom: Atom, ok: bpf.Label, fail: bpf.Label) -> None:
        asm = self.asm
        lo_off, hi_off = self._offsets(atom.arg)
        v = atom.value
        vhi, vlo = v >> 32, v & 0xFFFFFFFF
        op = atom.op
        if op in ("==", "!="):
            on_eq, on_ne = (ok, fail) if op == "==" else (fail, ok)
            l1 = bpf.Label()
            asm.ld(hi_off)
            asm.jump(bpf.JEQ, vhi, l1, on_ne)
            asm.label(l1)
            asm.ld(lo_off)
            asm.jump(bpf.JEQ, vlo, on_eq, on_ne)
        elif op in (">", ">=", "<", "<="):
            # a > v  <=>  hi > vhi || (hi == vhi && lo > vlo); < and <= are the negations
            strict = op in (">", "<=")
            yes, no = (ok, fail) if op in (">", ">=") else (fail, ok)
            l1, l2 = bpf.Label(), bpf.Label()
            asm.ld(hi_off)
            asm.jump(bpf.JGT, vhi, yes, l1)
            asm.label(l1)
            asm.jump(bpf.JEQ, vhi, l2, no)
            asm.label(l2)
            asm.ld(lo_off)
            asm.jump(bpf.JGT if strict else bpf.JGE, vlo, yes, no)
        elif op == "&":                     # (a & v) != 0
            self._any_bits(hi_off, vhi, lo_off, vlo, ok, fail)
        elif op == "in":                    # (a & ~v) == 0
            c = ~v & U64
            self._any_bits(hi_off, c >> 32, lo_off, c & 0xFFFFFFFF, fail, ok)
        else:                               # pragma: no cover - the parser allows no other
            raise AssertionError(op)

    def _any_bits(self, hi_off, mhi, lo_off, mlo, some, none) -> None:
        """Jump to `some` if any bit of (mhi:mlo) is set in the argument, else `none`."""
        asm = self.asm
        if mhi:
            l1 = bpf.Label()
            asm.ld(hi_off)
            asm.jump(bpf.JSET, mhi, some, l1)
            asm.label(l1)
        if mlo:
            asm.ld(lo_off)
            asm.jump(bpf.JSET, mlo, some, none)
        else:
            asm.ja(none)

    def block(self, entry) -> None:
        asm = self.asm
        for rule in entry.rules:
            ret = self.acts.value(rule.action)
            if rule.condition is None:
                asm.ret(ret)
                return
            for conj in rule.condition:
                fail = bpf.Label()
                for atom in conj:
                    ok = bpf.Label()
                    self.atom(atom, ok, fail)
                    asm.label(ok)
                asm.ret(ret)
                asm.label(fail)
        asm.ret(self.acts.unlisted)

    def tree(self, entries) -> None:
        asm = self.asm
        if len(entries) <= _LEAF:
            rets: dict[int, bpf.Label] = {}
            for nr, target in entries:
                if isinstance(target, int):
                    target = rets.setdefault(target, bpf.Label())
                nxt = bpf.Label()
                asm.jump(bpf.JEQ, nr, target, nxt)
                asm.label(nxt)
            asm.ret(self.acts.unlisted)
            for value, lbl in rets.items():
                asm.label(lbl)
                asm.ret(value)
            return
        mid = len(entries) // 2
        left, right = bpf.Label(), bpf.Label()
        asm.jump(bpf.JGE, entries[mid][0], right, left)
        asm.label(left)
        self.tree(entries[:mid])
        asm.label(right)
        self.tree(entries[mid:])

    def program(self) -> list[bpf.Insn]:
        asm = self.asm
        arch_ok, bad = bpf.Label(), bpf.Label()
        asm.ld(4)                                      # seccomp_data.arch
        asm.jump(bpf.JEQ, self.audit, arch_ok, bad)
        asm.label(bad)
        asm.ret(bpf.RET_KILL_PROCESS)
        asm.label(arch_ok)
        asm.ld(0)                                      # seccomp_data.nr
        dispatch = bpf.Label()
        if syscall_names.arch() == "x86_64":           # x32 numbers: never a way around
            high, x32 = bpf.Label(), bpf.Label()
            asm.jump(bpf.JGE, 0x40000000, high, dispatch)
            asm.label(high)
            asm.jump(bpf.JGE, 0x80000000, dispatch, x32)
            asm.label(x32)
            asm.ret(bpf.RET_KILL_PROCESS)
        asm.label(dispatch)

        targets = {}
        blocks = []
        for entry in self.policy.syscalls:
            action = entry.unconditional
            if action is not None:
                targets[entry.number] = self.acts.value(action)
            else:
                lbl = bpf.Label(entry.name)
                targets[entry.number] = lbl
                blocks.append((lbl, entry))

        hot = [nr for nr, count in sorted(self.policy.frequencies, key=lambda p: -p[1])
               if count > 0 and nr in targets][:_HOT]
        if hot:
            rets: dict[int, bpf.Label] = {}
            tree = bpf.Label()
            for nr in hot:
                target = targets[nr]
                if isinstance(target, int):
                    target = rets.setdefault(target, bpf.Label())
                nxt = bpf.Label()
                asm.jump(bpf.JEQ, nr, target, nxt)
                asm.label(nxt)
            asm.ja(tree)
            for value, lbl in rets.items():
                asm.label(lbl)
                asm.ret(value)
            asm.label(tree)

        if targets:
            self.tree(sorted(targets.items()))
        else:
            asm.ret(self.acts.unlisted)
        for lbl, entry in blocks:
            asm.label(lbl)
            self.block(entry)
        return asm.assemble()


def compile_parsed(policy: Policy, default: str | None = None) -> bytes:
    """The BPF program for a parsed policy."""
    insns = _Gen(policy, default).program()
    if len(insns) > bpf.MAXINSNS:
        raise PolicyError(f"the compiled filter has {len(insns)} instructions; the kernel "
                          f"accepts at most {bpf.MAXINSNS}: simplify the policy", policy.path)
    return bpf.encode(insns)


def compile_policy(path: str | os.PathLike, default: str | None = None) -> bytes:
    """Parse and compile a policy file: the raw BPF program (sock_filter array).

    `default` is the action for unlisted syscalls (and for rules that fall
    through, and `kill`): one of kill-process, kill-thread, trap, log; None
    means the policy's @default, else kill-process."""
    from .parser import parse_policy
    return compile_parsed(parse_policy(path), default)


# -- compile once, load many: see filter_cache.py ------------------------------

from .filter_cache import cache_key, compiled_filter  # noqa: E402,F401  (re-exported)
