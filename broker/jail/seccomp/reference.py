"""A reference for what a seccomp policy decides, read from the policy text.

    Reference(path, default=None).decide(nr, args, arch) -> "allow" |
        "errno N" | "log" | "trap" | "trace" | "user-notify" |
        "kill-thread" | "kill-process"

This is the oracle the compiled programs are checked against
(tests/test_seccomp_conformance.py), so it shares nothing with the compiler
but data: it does not use parser.py, policy.py, compiler.py or bpf.py.  It
reads the text itself, the way minijail's C parser does (split a statement
at ':', a filter at ';', an expression at '||' then '&&', an atom at its
operator), rather than evaluating the parser's AST, because that AST is not
the text: it has already applied most of the meaning this is meant to
check.  `EXPR; ACTION` arrives there as two rules, `return` without a value
as kill, `kill` as "the default", @denylist rules with their meaning
changed, statements for another architecture dropped, constants folded and
names resolved through libseccomp.  A mistake in any of those steps would be
shared by an evaluator of the AST and invisible to the check.

Shared with the compiler, as data only: the constants table generated from
this machine's headers (constants.py; the reference does its own `|`, `~`
and parentheses), and, for syscalls newer than the installed headers,
syscall_names.NEWER_THAN_LIBSECCOMP.  Syscall names otherwise come from the
kernel headers' asm/unistd_64.h, not from libseccomp.

The meaning implemented (minijail0(5) and the module docs of parser.py and
compiler.py, which are this project's specification):

* wrong architecture (seccomp_data.arch is not this machine's AUDIT_ARCH,
  e.g. i386 through int 0x80): kill-process, whatever the default;
  on x86_64 an x32 number (0x40000000 <= nr < 0x80000000): kill-process;
* a listed syscall: its filters in order of appearance (across statements
  and @include files); the first whose condition holds decides; when none
  does, the syscall falls through to the default;
* `EXPR` alone: allow when EXPR holds; `EXPR; ACTION` at the top level:
  allow when EXPR holds, else ACTION; inside `{...}` and in a @denylist
  policy `EXPR; ACTION` is ACTION when EXPR holds;
* actions: 1 / allow, `return N` (errno N; bare `return` is kill), kill
  (the default action), kill-process, kill-thread, trap, trace, log,
  user-notify;
* the default action: the caller's (kill-process, kill-thread, trap, log),
  else @default's (`kill` meaning kill-process), else kill-process; unlisted
  syscalls get it, or allow in a @denylist policy;
* atoms compare unsigned 64-bit values: == != < <= > >=, `&` is
  (arg & V) != 0, `in` is (arg & ~V) == 0.
"""
from __future__ import annotations

import glob
import os
import re

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7, "riscv64": 0xC00000F3}
CALLER_DEFAULTS = ("kill-process", "kill-thread", "trap", "log")
_WORDS = {"allow", "kill", "kill-process", "kill-thread", "trap", "trace", "log",
          "user-notify"}
_ATOM = re.compile(r"\s*arg(\d+)\s*(==|!=|<=|>=|<|>|&|in(?=[\s~(]))\s*(\S.*?)\s*$")
_VALUE_TOKEN = re.compile(r"\s*(\(|\)|\||~|[A-Za-z_][A-Za-z0-9_]*|-?[0-9][0-9A-Za-z]*)")


class ReferenceError(ValueError):
    pass


def _unistd() -> dict[str, int]:
    """name -> number from the kernel headers' asm/unistd_64.h."""
    machine = os.uname().machine
    header = {"x86_64": "unistd_64.h", "aarch64": "unistd.h", "riscv64": "unistd.h"}[machine]
    paths = glob.glob(f"/usr/include/*/asm/{header}") + [f"/usr/include/asm/{header}"]
    table: dict[str, int] = {}
    for path in paths:
        try:
            with open(path) as f:
                for m in re.finditer(r"^#define __NR_([a-z0-9_]+)\s+(\d+)\s*$", f.read(), re.M):
                    table.setdefault(m.group(1), int(m.group(2)))
        except OSError:
            continue
    return table


_names: dict[str, int] | None = None


def syscall_number(name: str) -> int | None:
    global _names
    if _names is None:
        from .syscall_names import NEWER_THAN_LIBSECCOMP
        _names = dict(NEWER_THAN_LIBSECCOMP.get(os.uname().machine, {}))
        _names.update(_unistd())          # the headers win where both know a name
    return _names.get(name)


def _c_number(text: str) -> int:
    """strtoull(text, 0): hex, octal, decimal; a '-' wraps to 64 bits."""
    neg = text.startswith("-")
    body = text[1:] if neg else text
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
        v = int(body, 16)
    elif re.fullmatch(r"0[0-7]*", body):
        v = int(body, 8)
    elif re.fullmatch(r"[0-9]+", body):
        v = int(body)
    else:
        raise ReferenceError(f"not a number: {text!r}")
    return (-v if neg else v) & U64


def _split(text: str, sep: str) -> list[str]:
    """Split at `sep` outside (), [] and {}."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            out.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    out.append(text[start:])
    return out


class Reference:
    """One policy file's decisions (see the module doc)."""

    def __init__(self, path: str | os.PathLike, default: str | None = None,
                 constants=None):
        self.path = os.fspath(path)
        self.machine = os.uname().machine
        self.audit_arch = AUDIT_ARCH[self.machine]
        self._constants = constants
        # nr -> [(dnf or None, action)]; dnf = [[(arg, op, value), ...], ...]
        self.rules: dict[int, list[tuple[list | None, str]]] = {}
        self.policy_default: str | None = None
        self.denylist = False
        self._read(self.path, 0)
        if default is not None:
            if default not in CALLER_DEFAULTS:
                raise ReferenceError(f"caller default {default!r}")
            self.kill = default
        elif self.policy_default and self.policy_default != "kill":
            self.kill = self.policy_default
        else:
            self.kill = "kill-process"
        self.unlisted = "allow" if self.denylist else self.kill

    # -- reading ---------------------------------------------------------------

    def _read(self, path: str, depth: int) -> None:
        if depth > 16:
            raise ReferenceError(f"{path}: includes nested too deep")
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        pending = ""
        for raw in lines:
            line = raw.split("#", 1)[0].rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            stmt, pending = (pending + line).strip(), ""
            if stmt:
                self._statement(stmt, path, depth)
        if pending.strip():
            self._statement(pending.strip(), path, depth)

    def _statement(self, stmt: str, path: str, depth: int) -> None:
        if stmt.startswith("@"):
            word, _, arg = stmt.partition(" ")
            arg = arg.strip()
            if word == "@include":
                self._read(os.path.normpath(os.path.join(os.path.dirname(path), arg)),
                           depth + 1)
            elif word == "@frequency":
                pass                                   # ordering only, no meaning
            elif word == "@default":
                self.policy_default = arg
            elif word == "@denylist":
                self.denylist = True
            else:
                raise ReferenceError(f"{path}: directive {word}")
            return
        head, colon, body = stmt.partition(":")
        if not colon:
            raise ReferenceError(f"{path}: no ':' in {stmt!r}")
        numbers = self._syscalls(head.strip(), path)
        body = body.strip()
        if body.startswith("{") and body.endswith("}"):
            filters = [self._filter(f.strip()) for f in _split(body[1:-1], ",")]
        else:
            filters = self._top_filter(body)
        for nr in numbers:
            self.rules.setdefault(nr, []).extend(filters)

    def _syscalls(self, head: str, path: str) -> list[int]:
        parts = _split(head[1:-1], ",") if head.startswith("{") else [head]
        out = []
        for part in parts:
            m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\[(.*)\])?\s*", part)
            if not m:
                raise ReferenceError(f"{path}: syscall {part!r}")
            name, meta = m.groups()
            if meta is not None and not self._for_this_arch(meta):
                continue
            nr = _c_number(name) if name[0].isdigit() else syscall_number(name)
            if nr is None:
                raise ReferenceError(f"{path}: unknown syscall {name!r}")
            out.append(nr)
        return out

    def _for_this_arch(self, meta: str) -> bool:
        for pair in meta.split(";"):
            key, _, values = pair.partition("=")
            if key.strip() == "arch" and self.machine not in [v.strip() for v in
                                                              values.split(",")]:
                return False
        return True

    def _top_filter(self, body: str) -> list[tuple[list | None, str]]:
        parts = body.split(";")
        if len(parts) > 2:
            raise ReferenceError(f"two ';' in {body!r}")
        if not parts[0].lstrip().startswith("arg"):
            return [(None, self._action(parts[0]))]
        dnf = self._expression(parts[0])
        if len(parts) == 1:
            return [(dnf, "allow")]
        action = self._action(parts[1])
        if self.denylist:
            return [(dnf, action)]
        return [(dnf, "allow"), (None, action)]

    def _filter(self, text: str) -> tuple[list | None, str]:
        parts = text.split(";")
        if not parts[0].lstrip().startswith("arg"):
            return (None, self._action(parts[0]))
        return (self._expression(parts[0]),
                self._action(parts[1]) if len(parts) > 1 else "allow")

    def _action(self, text: str) -> str:
        words = text.split()
        if not words:
            raise ReferenceError("no action")
        if words[0] == "return":
            if len(words) == 1:
                return "kill"
            return f"errno {self._value(' '.join(words[1:]))}"
        if len(words) != 1:
            raise ReferenceError(f"action {text!r}")
        w = words[0]
        if w in _WORDS:
            return w
        if w[0].isdigit() and _c_number(w) == 1:
            return "allow"
        raise ReferenceError(f"action {text!r}")

    def _expression(self, text: str) -> list[list[tuple[int, str, int]]]:
        dnf = []
        for clause in text.split("||"):
            conj = []
            for atom in clause.split("&&"):
                m = _ATOM.fullmatch(atom)
                if not m:
                    raise ReferenceError(f"atom {atom!r}")
                arg = int(m.group(1))
                if arg > 5:
                    raise ReferenceError(f"arg{arg}")
                conj.append((arg, m.group(2), self._value(m.group(3))))
            dnf.append(conj)
        return dnf

    def _value(self, text: str) -> int:
        tokens = _VALUE_TOKEN.findall(text)
        if "".join(tokens) != re.sub(r"\s+", "", text):
            raise ReferenceError(f"value {text!r}")
        pos = 0

        def value() -> int:
            nonlocal pos
            v = term()
            while pos < len(tokens) and tokens[pos] == "|":
                pos += 1
                v |= term()
            return v

        def term() -> int:
            nonlocal pos
            neg = tokens[pos] == "~"
            pos += neg
            t = tokens[pos]
            pos += 1
            if t == "(":
                v = value()
                if tokens[pos] != ")":
                    raise ReferenceError(f"value {text!r}")
                pos += 1
            elif t[0].isdigit() or t[0] == "-":
                v = _c_number(t)
            else:
                v = self._constant(t)
            return ~v & U64 if neg else v

        try:
            v = value()
        except IndexError:
            raise ReferenceError(f"value {text!r}") from None
        if pos != len(tokens):
            raise ReferenceError(f"value {text!r}")
        return v

    def _constant(self, name: str) -> int:
        if self._constants is None:
            from .constants import ensure_constants
            self._constants = ensure_constants()
        v = self._constants.get(name)
        if v is None:
            raise ReferenceError(f"unknown constant {name!r}")
        return v & U64

    # -- deciding --------------------------------------------------------------

    @staticmethod
    def holds(op: str, arg: int, value: int) -> bool:
        if op == "==":
            return arg == value
        if op == "!=":
            return arg != value
        if op == "<":
            return arg < value
        if op == "<=":
            return arg <= value
        if op == ">":
            return arg > value
        if op == ">=":
            return arg >= value
        if op == "&":
            return arg & value != 0
        if op == "in":
            return arg & ~value & U64 == 0
        raise ReferenceError(op)

    def decide(self, nr: int, args=(), arch: int | None = None) -> str:
        if arch is not None and arch & U32 != self.audit_arch:
            return "kill-process"
        nr &= U32
        if self.machine == "x86_64" and 0x40000000 <= nr < 0x80000000:
            return "kill-process"
        rules = self.rules.get(nr)
        if rules is None:
            return self.unlisted
        args = [a & U64 for a in args] + [0] * (6 - len(args))
        holds = self.holds
        for dnf, action in rules:
            if dnf is None or any(all(holds(op, args[i], v) for i, op, v in conj)
                                  for conj in dnf):
                return self.kill if action == "kill" else action
        return self.unlisted
