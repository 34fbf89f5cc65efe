"""The parsed form of a policy: plain frozen data, with every name resolved.

A Policy says, per syscall, an ordered list of Rules.  A Rule's condition is
in disjunctive normal form (a tuple of conjunctions, each a tuple of Atoms);
None means "always".  The first rule whose condition holds decides; when
none holds, the syscall "falls through" (see compiler.py for what that
means for each default action).  Unlisted syscalls get the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OPS = ("==", "!=", "<", "<=", ">", ">=", "&", "in")

# Action kinds.  "kill" is the policy's kill action, i.e. the effective
# default action (kill-process unless -L/--default or @default says otherwise);
# the others are exactly what they name.  "errno" carries its value.
ACTIONS = ("allow", "kill", "kill-process", "kill-thread", "trap", "trace", "log",
           "user-notify", "errno")

# Default actions a caller may choose (JailSpec.seccomp_default), and those
# a policy may set with @default (never a permissive one: minijail refuses too).
CALLER_DEFAULTS = ("kill-process", "kill-thread", "trap", "log")
POLICY_DEFAULTS = ("kill-process", "kill-thread", "kill", "trap", "user-notify")


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Atom:
    """arg{arg} {op} {value}; value is unsigned 64-bit."""
    arg: int
    op: str
    value: int

    def __str__(self) -> str:
        return f"arg{self.arg} {self.op} {self.value:#x}"


@dataclass(frozen=True)
class Action:
    kind: str
    value: int = 0          # the errno for "errno"

    def __str__(self) -> str:
        return f"return {self.value}" if self.kind == "errno" else self.kind


ALLOW = Action("allow")
KILL = Action("kill")

Condition = tuple[tuple[Atom, ...], ...]     # DNF: OR of ANDs


@dataclass(frozen=True)
class Rule:
    condition: Condition | None             # None: always
    action: Action
    location: Location = field(compare=False, default=Location("<policy>", 0, 0))


@dataclass(frozen=True)
class SyscallRules:
    name: str
    number: int
    rules: tuple[Rule, ...]
    location: Location = field(compare=False, default=Location("<policy>", 0, 0))

    @property
    def unconditional(self) -> Action | None:
        """The action if the syscall's only rule is unconditional, else None."""
        if len(self.rules) == 1 and self.rules[0].condition is None:
            return self.rules[0].action
        return None


@dataclass(frozen=True)
class Policy:
    path: str
    syscalls: tuple[SyscallRules, ...]       # in order of first appearance
    default: str | None = None               # from @default, if any
    denylist: bool = False                   # @denylist: unlisted syscalls are allowed
    frequencies: tuple[tuple[int, int], ...] = ()   # (syscall number, count) from @frequency
    files: tuple[str, ...] = ()              # every file read (policy, includes, frequency files)

    def rules_for(self, nr: int) -> SyscallRules | None:
        for s in self.syscalls:
            if s.number == nr:
                return s
        return None
