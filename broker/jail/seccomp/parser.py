"""minijail's seccomp policy language -> Policy.

The language is minijail's (minijail0(5); syscall_filter.c for minijail0 -S,
tools/parser.py for its offline compiler).  One statement per line, ``\\`` at
the end of a line continues it, ``#`` starts a comment::

    read: 1                                   # allow (also: allow)
    execve: return EPERM                      # fail with an errno
    mmap: arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE
    socket: arg0 == AF_UNIX; return EPERM     # allowed if ..., else EPERM
    ioctl: arg1 == TCGETS || arg1 == FIONREAD
    prlimit64: arg2 == 0 && arg3 != 0
    ptrace: kill-process                      # also kill, kill-thread, trap,
                                              # trace, log, user-notify
    {open, openat}: arg1 in O_RDONLY|O_CLOEXEC          # several syscalls
    read[arch=x86_64]: 1                      # only on these architectures
    write: {arg0 == 1, arg0 == 2; return EBADF, kill}   # ordered filter list
    @include ./common.policy                  # relative to this file
    @frequency ./hot.frequency                # "syscall: count" lines
    @default kill-thread                      # default for unlisted syscalls
    @denylist                                 # list what to deny; the rest is allowed

Atoms are ``argN OP VALUE`` with N in 0..5 and OP one of == != < <= > >=
(unsigned 64-bit), ``&`` ((arg & VALUE) != 0) and ``in`` ((arg & ~VALUE) == 0).
A VALUE is numbers (decimal, 0x hex, 0 octal, negative numbers as 64-bit
two's complement) and symbolic constants joined by ``|``, each optionally
complemented with ``~`` or parenthesized.

``EXPR; ACTION`` on its own means what minijail0 and its manual say: the
syscall is allowed when EXPR holds, otherwise ACTION is taken.  Inside a
``{...}`` filter list (minijail's offline compiler syntax), and in a
@denylist policy, ``EXPR; ACTION`` means "ACTION when EXPR holds", each
filter tried in order.

A syscall may appear in several statements; their rules are tried in order,
and a rule after an unconditional one (which could never apply) is an error.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from . import constants as _constants
from . import syscall_names
from .errors import PolicyError
from .policy import (ALLOW, KILL, POLICY_DEFAULTS, Action, Atom, Location, Policy, Rule,
                     SyscallRules)

MAX_ARGS = 6
MAX_INCLUDE_DEPTH = 16
MAX_ERRNO = 4095
U64 = (1 << 64) - 1

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#.*)
  | (?P<cont>\\\s*$)
  | (?P<directive>@[A-Za-z_-]*)
  | (?P<num>-?[0-9][0-9A-Za-z_]*)
  | (?P<punct>\|\||&&|==|!=|<=|>=|<|>|\||&|:|;|,|~|\(|\)|\{|\}|\[|\]|=)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_@-]*)
""", re.VERBOSE)

_ACTION_WORDS = {"allow", "kill", "kill-process", "kill-thread", "trap", "trace", "log",
                 "user-notify"}
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}


@dataclass
class Token:
    kind: str           # num ident punct directive path
    text: str
    file: str
    line: int
    column: int         # 1-based
    source: str         # the physical line, for the caret


def _number(text: str) -> int | None:
    """C's strtol(s, 0) forms: 0x hex, 0 octal, decimal; '-' allowed."""
    neg = text.startswith("-")
    body = text[1:] if neg else text
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
        v = int(body, 16)
    elif re.fullmatch(r"0[0-7]*", body):
        v = int(body, 8)
    elif re.fullmatch(r"[1-9][0-9]*", body):
        v = int(body, 10)
    else:
        return None
    return -v if neg else v


class _Source:
    """One file being parsed."""

    def __init__(self, path: str, stack: tuple[str, ...]):
        self.path = path
        self.stack = stack          # realpaths of the including files, outermost first

    def error(self, reason: str, tok: Token | None = None, line: int = 0,
              column: int = 0, source: str | None = None) -> PolicyError:
        if tok is not None:
            return PolicyError(reason, tok.file, tok.line, tok.column, tok.source)
        return PolicyError(reason, self.path, line, column, source)

    def statements(self):
        """Yield lists of tokens, one per logical line."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise self.error(f"not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise self.error(f"cannot read: {e.strerror}") from None
        pending: list[Token] = []
        for number, raw in enumerate(lines, 1):
            raw = raw.rstrip("\r")
            pos = 0
            continued = False
            directive = not pending and raw.lstrip().startswith("@")
            while pos < len(raw):
                if directive and len(pending) == 1 and not raw[pos].isspace() \
                        and raw[pos] != "#":
                    # a directive's argument (a path): everything up to whitespace
                    end = pos
                    while end < len(raw) and not raw[end].isspace():
                        end += 1
                    pending.append(Token("path", raw[pos:end], self.path, number, pos + 1, raw))
                    pos = end
                    continue
                m = _TOKEN.match(raw, pos)
                if not m:
                    raise self.error(f"unexpected character {raw[pos]!r}", line=number,
                                     column=pos + 1, source=raw)
                kind = m.lastgroup
                if kind == "cont":
                    continued = True
                elif kind not in ("ws", "comment"):
                    pending.append(Token(kind, m.group(), self.path, number, pos + 1, raw))
                pos = m.end()
            if continued:
                continue
            if pending:
                yield pending
                pending = []
        if pending:
            yield pending


class _Statement:
    """Cursor over one logical line's tokens."""

    def __init__(self, src: _Source, tokens: list[Token]):
        self.src = src
        self.tokens = tokens
        self.pos = 0

    def peek(self, offset: int = 0) -> Token | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def next(self, expected: str) -> Token:
        tok = self.peek()
        if tok is None:
            raise self.missing(expected)
        self.pos += 1
        return tok

    def accept(self, text: str) -> Token | None:
        tok = self.peek()
        if tok is not None and tok.kind == "punct" and tok.text == text:
            self.pos += 1
            return tok
        return None

    def missing(self, expected: str) -> PolicyError:
        last = self.tokens[-1]
        return self.src.error(f"expected {expected} at the end of the line", line=last.line,
                              column=last.column + len(last.text), source=last.source)

    def unexpected(self, tok: Token, expected: str) -> PolicyError:
        return self.src.error(f"expected {expected}, found {tok.text!r}", tok)

    def expect(self, text: str, expected: str | None = None) -> Token:
        tok = self.next(expected or repr(text))
        if tok.kind != "punct" or tok.text != text:
            raise self.unexpected(tok, expected or repr(text))
        return tok

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)


class Parser:
    def __init__(self):
        self.by_number: dict[int, tuple[str, list[Rule], Location]] = {}
        self.order: list[int] = []
        self.default: tuple[str, Location] | None = None
        self.denylist = False
        self.seen_rule = False
        self.frequencies: dict[int, int] = {}
        self.files: list[str] = []
        self._constants = None

    # -- files and directives --------------------------------------------------

    def parse_file(self, path: str, stack: tuple[str, ...] = ()) -> None:
        real = os.path.realpath(path)
        self.files.append(os.path.abspath(path))
        src = _Source(path, stack + (real,))
        for tokens in src.statements():
            st = _Statement(src, tokens)
            first = tokens[0]
            if first.kind == "directive":
                self._directive(st)
            else:
                self._statement(st)
            if not st.at_end():
                raise st.unexpected(st.peek(), "the end of the line")

    def _directive(self, st: _Statement) -> None:
        tok = st.next("a directive")
        name = tok.text
        if name in ("@include", "@frequency"):
            arg = st.next(f"a path after {name}")
            target = self._resolve_path(st, arg, name)
            if name == "@include":
                if len(st.src.stack) >= MAX_INCLUDE_DEPTH:
                    raise st.src.error(f"@include nested too deep (more than "
                                       f"{MAX_INCLUDE_DEPTH} levels)", tok)
                real = os.path.realpath(target)
                if real in st.src.stack:
                    chain = " -> ".join(st.src.stack[st.src.stack.index(real):] + (real,))
                    raise st.src.error(f"include cycle: {chain}", arg)
                self.parse_file(target, st.src.stack)
            else:
                self._frequency_file(target, st.src.stack)
        elif name == "@default":
            word = st.next("an action after @default")
            if word.text not in POLICY_DEFAULTS:
                raise st.src.error(
                    f"invalid default action {word.text!r}: expected one of "
                    f"{', '.join(POLICY_DEFAULTS)} (a permissive default such as log is "
                    f"chosen by the caller, e.g. privjail -L)", word)
            if self.default is not None:
                raise st.src.error(f"a second @default (the first is at {self.default[1]})", tok)
            self.default = (word.text, Location(word.file, word.line, word.column))
        elif name == "@denylist":
            if self.seen_rule or len(st.src.stack) > 1:
                raise st.src.error("@denylist must come first in the top-level policy, "
                                   "before any rule", tok)
            self.denylist = True
        else:
            raise st.src.error(f"unknown directive {name!r}: expected @include, "
                               f"@frequency, @default or @denylist", tok)

    def _resolve_path(self, st: _Statement, arg: Token, directive: str) -> str:
        p = arg.text
        if not (p.startswith("/") or p.startswith("./") or p.startswith("../")):
            raise st.src.error(f"{directive} path {p!r} must be absolute or start with "
                               f"./ or ../ (relative to this file), e.g. ./{p}", arg)
        base = os.path.dirname(os.path.abspath(st.src.path))
        target = os.path.normpath(os.path.join(base, p))
        if not os.path.isfile(target):
            raise st.src.error(f"cannot {directive} {target}: no such file", arg)
        return target

    def _frequency_file(self, path: str, stack: tuple[str, ...]) -> None:
        self.files.append(os.path.abspath(path))
        src = _Source(path, stack + (os.path.realpath(path),))
        for tokens in src.statements():
            st = _Statement(src, tokens)
            numbers = self._descriptors(st)
            st.expect(":", "':' after the syscall name")
            count = st.next("a count")
            value = _number(count.text) if count.kind == "num" else None
            if value is None or value < 0:
                raise st.unexpected(count, "a non-negative count")
            if not st.at_end():
                raise st.unexpected(st.peek(), "the end of the line")
            for nr, _name in numbers:
                self.frequencies[nr] = self.frequencies.get(nr, 0) + value

    # -- statements -----------------------------------------------------------

    def _statement(self, st: _Statement) -> None:
        self.seen_rule = True
        descriptors = self._descriptors(st)
        colon = st.expect(":", "':' after the syscall name")
        rules = self._filter(st, Location(colon.file, colon.line, colon.column))
        for nr, name in descriptors:
            self._add(st, nr, name, rules)

    def _add(self, st: _Statement, nr: int, name: str, rules: list[Rule]) -> None:
        if nr not in self.by_number:
            self.by_number[nr] = (name, [], rules[0].location)
            self.order.append(nr)
        existing = self.by_number[nr][1]
        if existing and existing[-1].condition is None:
            prev = existing[-1].location
            new = rules[0].location
            raise PolicyError(f"syscall {name!r} already has an unconditional action "
                              f"({existing[-1].action} at {prev}); this rule could never apply",
                              new.file, new.line, new.column)
        existing.extend(rules)

    def _descriptors(self, st: _Statement) -> list[tuple[int, str]]:
        if st.accept("{"):
            out: list[tuple[int, str]] = []
            while True:
                out.extend(self._descriptor(st))
                if st.accept("}"):
                    return out
                st.expect(",", "',' or '}' in the syscall list")
        return self._descriptor(st)

    def _descriptor(self, st: _Statement) -> list[tuple[int, str]]:
        tok = st.next("a syscall name")
        if tok.kind == "num":
            nr = _number(tok.text)
            if nr is None or not 0 <= nr < 0x40000000:
                raise st.src.error(f"invalid syscall number {tok.text!r}", tok)
            name = syscall_names.name(nr) or tok.text
        elif tok.kind == "ident":
            if "@" in tok.text:
                raise st.src.error(f"syscall groups ({tok.text}) are not supported: "
                                   f"list the syscalls", tok)
            name = tok.text
            nr = None
        else:
            raise st.unexpected(tok, "a syscall name")
        wanted = True
        if st.accept("["):
            wanted = self._metadata(st)
        if not wanted:
            return []
        if nr is None:
            nr = syscall_names.number(name)
            if nr is None:
                raise st.src.error(f"unknown syscall {name!r}: {syscall_names.arch()} "
                                   f"has no syscall of that name", tok)
        return [(nr, name)]

    def _metadata(self, st: _Statement) -> bool:
        """[key=v1,v2; key2=...]: False when an arch= list excludes this machine."""
        wanted = True
        while True:
            key = st.next("a metadata key")
            if key.kind != "ident":
                raise st.unexpected(key, "a metadata key such as arch")
            st.expect("=", "'=' after the metadata key")
            values = [st.next("a metadata value").text]
            while st.accept(","):
                values.append(st.next("a metadata value").text)
            if key.text == "arch" and syscall_names.arch() not in values:
                wanted = False
            if st.accept("]"):
                return wanted
            st.expect(";", "';' or ']' in the metadata")

    # -- filters --------------------------------------------------------------

    def _filter(self, st: _Statement, where: Location) -> list[Rule]:
        tok = st.peek()
        if tok is None:
            raise st.missing("an action or an argument expression after ':'")
        if tok.kind == "punct" and tok.text == "{":
            st.next("{")
            rules: list[Rule] = []
            while True:
                item = st.peek()
                if item is None:
                    raise st.missing("a filter in the '{...}' list")
                loc = Location(item.file, item.line, item.column)
                if rules and rules[-1].condition is None:
                    raise st.src.error("a filter after an unconditional action could never "
                                       "apply", item)
                if item.kind == "ident" and item.text.startswith("arg"):
                    cond = self._expression(st)
                    action = self._action(st) if st.accept(";") else ALLOW
                    rules.append(Rule(cond, action, loc))
                else:
                    rules.append(Rule(None, self._action(st), loc))
                if st.accept("}"):
                    return rules
                st.expect(",", "',' or '}' in the filter list")
        loc = Location(tok.file, tok.line, tok.column)
        if tok.kind == "ident" and tok.text.startswith("arg"):
            cond = self._expression(st)
            if st.accept(";"):
                action = self._action(st)
                if self.denylist:
                    return [Rule(cond, action, loc)]
                return [Rule(cond, ALLOW, loc), Rule(None, action, loc)]
            if self.denylist:
                raise st.src.error("a @denylist policy needs an action for each rule "
                                   "(e.g. '; return EPERM')", tok)
            return [Rule(cond, ALLOW, loc)]
        return [Rule(None, self._action(st), loc)]

    def _action(self, st: _Statement) -> Action:
        tok = st.next("an action (1, allow, return ERRNO, kill, kill-process, kill-thread, "
                      "trap, trace, log, user-notify)")
        if tok.kind == "num" and _number(tok.text) == 1 or \
                tok.kind == "ident" and tok.text == "allow":
            if self.denylist:
                raise st.src.error("'allow' means nothing in a @denylist policy: list only "
                                   "what to deny", tok)
            return ALLOW
        if tok.kind == "ident" and tok.text == "return":
            if st.at_end() or (st.peek().kind == "punct" and st.peek().text in (",", "}")):
                return KILL                                     # minijail: bare return kills
            value, first = self._value(st)
            if value > MAX_ERRNO:
                raise st.src.error(f"errno {value} is out of range (0..{MAX_ERRNO})", first)
            return Action("errno", value)
        if tok.kind == "ident" and tok.text in _ACTION_WORDS:
            return Action(tok.text)
        raise st.unexpected(tok, "an action (1, allow, return ERRNO, kill, kill-process, "
                                 "kill-thread, trap, trace, log, user-notify) or an "
                                 "argument expression (argN OP VALUE)")

    def _expression(self, st: _Statement) -> tuple[tuple[Atom, ...], ...]:
        clauses = [self._conjunction(st)]
        while st.accept("||"):
            clauses.append(self._conjunction(st))
        return tuple(clauses)

    def _conjunction(self, st: _Statement) -> tuple[Atom, ...]:
        atoms = [self._atom(st)]
        while st.accept("&&"):
            atoms.append(self._atom(st))
        return tuple(atoms)

    def _atom(self, st: _Statement) -> Atom:
        tok = st.next("an argument (arg0..arg5)")
        m = re.fullmatch(r"arg([0-9]+)", tok.text) if tok.kind == "ident" else None
        if not m:
            raise st.unexpected(tok, "an argument (arg0..arg5)")
        index = int(m.group(1))
        if index >= MAX_ARGS:
            raise st.src.error(f"argument index {index} is out of range: syscalls have "
                               f"arg0..arg{MAX_ARGS - 1}", tok)
        op = st.next("an operator (==, !=, <, <=, >, >=, &, in)")
        if not (op.kind == "punct" and op.text in _COMPARISONS | {"&"} or
                op.kind == "ident" and op.text == "in"):
            raise st.unexpected(op, "an operator (==, !=, <, <=, >, >=, &, in)")
        value, _first = self._value(st)
        return Atom(index, op.text, value)

    def _value(self, st: _Statement) -> tuple[int, Token]:
        first = st.peek()
        value = self._constant(st)
        while st.accept("|"):
            value |= self._constant(st)
        return value, first

    def _constant(self, st: _Statement) -> int:
        negate = st.accept("~") is not None
        if negate and st.peek() is not None and st.peek().text == "~":
            raise st.src.error("double complement '~~'", st.peek())
        if st.accept("("):
            value, _ = self._value(st)
            st.expect(")", "')' to close the parenthesis")
        else:
            tok = st.next("a constant (a number or a name such as O_RDONLY)")
            if tok.kind == "num":
                n = _number(tok.text)
                if n is None:
                    raise st.src.error(f"invalid number {tok.text!r}", tok)
                if n > U64 or n < -(1 << 63):
                    raise st.src.error(f"number {tok.text} does not fit in 64 bits", tok)
                value = n & U64
            elif tok.kind == "ident" and tok.text not in _ACTION_WORDS | {"return", "in"}:
                value = self._lookup(st, tok)
            else:
                raise st.unexpected(tok, "a constant (a number or a name such as O_RDONLY)")
        return (~value & U64) if negate else value

    def _lookup(self, st: _Statement, tok: Token) -> int:
        if self._constants is None:
            try:
                self._constants = _constants.ensure_constants()
            except _constants.ConstantsUnavailable as e:
                raise st.src.error(f"cannot resolve constant {tok.text!r}: {e}", tok) from None
        v = self._constants.get(tok.text)
        if v is None:
            raise st.src.error(f"unknown constant {tok.text!r}: not defined by this "
                               f"machine's kernel or C library headers", tok)
        return v

    # -- result ---------------------------------------------------------------

    def policy(self, path: str) -> Policy:
        syscalls = tuple(SyscallRules(self.by_number[nr][0], nr, tuple(self.by_number[nr][1]),
                                      self.by_number[nr][2]) for nr in self.order)
        return Policy(path=os.path.abspath(path), syscalls=syscalls,
                      default=self.default[0] if self.default else None,
                      denylist=self.denylist,
                      frequencies=tuple(sorted(self.frequencies.items())),
                      files=tuple(self.files))


def parse_policy(path: str | os.PathLike) -> Policy:
    """Parse a policy file (and its includes) into a Policy; PolicyError on any fault."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PolicyError("no such policy file" if not os.path.exists(path)
                          else "not a regular file", path)
    p = Parser()
    p.parse_file(path)
    return p.policy(path)
