"""The policy language: what each form means, and what each mistake says."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from broker.jail.seccomp import PolicyError, parse_policy
from broker.jail.seccomp.policy import ALLOW, KILL, Action, Atom
from test_seccomp_support import seccomp_cache

__all__ = ["seccomp_cache"]
U64 = (1 << 64) - 1


def parse(tmp_path: Path, text: str, name: str = "p.policy"):
    p = tmp_path / name
    p.write_text(text)
    return parse_policy(p)


def rules(policy, name):
    return [(r.condition, r.action) for s in policy.syscalls if s.name == name for r in s.rules]


def error(tmp_path: Path, text: str, name: str = "p.policy") -> PolicyError:
    with pytest.raises(PolicyError) as e:
        parse(tmp_path, text, name)
    return e.value


# -- meaning ------------------------------------------------------------------

def test_unconditional_actions(tmp_path):
    p = parse(tmp_path, "read: 1\nwrite: allow\nopen: return EPERM\nclose: return 5\n"
                        "kill: kill\ngetpid: kill-process\ngettid: kill-thread\nuname: trap\n"
                        "getuid: trace\ngetgid: log\ngetppid: user-notify\n")
    got = {s.name: s.unconditional for s in p.syscalls}
    assert got == {"read": ALLOW, "write": ALLOW, "open": Action("errno", errno.EPERM),
                   "close": Action("errno", 5), "kill": KILL,
                   "getpid": Action("kill-process"), "gettid": Action("kill-thread"),
                   "uname": Action("trap"), "getuid": Action("trace"),
                   "getgid": Action("log"), "getppid": Action("user-notify")}
    assert [s.number for s in p.syscalls][:2] == [0, 1]


def test_dnf_with_all_operators(tmp_path):
    p = parse(tmp_path, "ioctl: arg0 == 1 && arg1 != 2 || arg2 < 3 && arg3 <= 4 && "
                        "arg4 > 5 || arg5 >= 6 || arg1 & 0x10 || arg1 in 0x3\n")
    [(cond, action)] = rules(p, "ioctl")
    assert action == ALLOW
    assert cond == ((Atom(0, "==", 1), Atom(1, "!=", 2)),
                    (Atom(2, "<", 3), Atom(3, "<=", 4), Atom(4, ">", 5)),
                    (Atom(5, ">=", 6),), (Atom(1, "&", 0x10),), (Atom(1, "in", 3),))


def test_values_numbers_constants_or_complement_parentheses(tmp_path):
    p = parse(tmp_path, "read: arg0 == 010\n"                  # octal
                        "write: arg0 == 0x1F\n"
                        "open: arg0 == -1\n"                   # 64-bit two's complement
                        "close: arg0 == PROT_READ|PROT_WRITE\n"
                        "mmap: arg0 in ~PROT_EXEC\n"
                        "mprotect: arg0 == ~(PROT_READ|PROT_WRITE)\n"
                        "socket: arg0 == AF_UNIX | 0x100\n")
    vals = {s.name: s.rules[0].condition[0][0].value for s in p.syscalls}
    assert vals == {"read": 8, "write": 31, "open": U64, "close": 3, "mmap": U64 & ~4,
                    "mprotect": U64 & ~3, "socket": 0x101}


def test_constants_come_from_the_headers(tmp_path):
    p = parse(tmp_path, "ioctl: arg1 == FIONREAD || arg1 == LOOP_GET_STATUS64 || "
                        "arg1 == TCGETS\nclone: arg0 & CLONE_NEWUSER\n"
                        "prctl: arg0 == PR_SET_NAME\nopenat: arg2 in O_RDONLY|O_CLOEXEC\n")
    values = [a.value for s in p.syscalls for r in s.rules for c in r.condition for a in c]
    assert values == [0x541B, 0x4C05, 0x5401, 0x10000000, 15, 0o2000000]


def test_return_suffix_allows_when_true_else_acts(tmp_path):
    # minijail0 and its manual: "if the first argument to read is 0, allow the
    # syscall; else, block it and return EBADF"
    p = parse(tmp_path, "read: arg0 == 0; return EBADF\n")
    assert rules(p, "read") == [(((Atom(0, "==", 0),),), ALLOW),
                                (None, Action("errno", errno.EBADF))]


def test_filter_lists_are_tried_in_order(tmp_path):
    p = parse(tmp_path, "write: {arg0 == 1, arg0 == 2; return EBADF, arg0 == 3; log, kill}\n")
    assert rules(p, "write") == [(((Atom(0, "==", 1),),), ALLOW),
                                 (((Atom(0, "==", 2),),), Action("errno", errno.EBADF)),
                                 (((Atom(0, "==", 3),),), Action("log")),
                                 (None, KILL)]


def test_syscall_lists_arch_metadata_and_numbers(tmp_path):
    p = parse(tmp_path, "{read, write}: 1\nopen[arch=x86_64]: 1\nclose[arch=aarch64]: 1\n"
                        "39: return 1\n")
    assert [s.name for s in p.syscalls] == ["read", "write", "open", "getpid"]


def test_continuations_comments_blank_lines(tmp_path):
    p = parse(tmp_path, "# a comment\n\n   \nioctl: arg1 == 1 || \\\n   arg1 == 2  # two\n"
                        "read: 1 # trailing comment\n")
    assert [a.value for c in rules(p, "ioctl")[0][0] for a in c] == [1, 2]
    assert [s.name for s in p.syscalls] == ["ioctl", "read"]


def test_new_syscalls_resolve(tmp_path):
    p = parse(tmp_path, "mseal: 1\nfutex_waitv: 1\nfile_setattr: 1\n")
    assert [s.number for s in p.syscalls] == [462, 449, 469]


def test_repeated_syscall_rules_are_tried_in_order(tmp_path):
    p = parse(tmp_path, "read: arg0 == 0\nread: arg0 == 1\n")
    assert [c for c, _ in rules(p, "read")] == [((Atom(0, "==", 0),),), ((Atom(0, "==", 1),),)]


def test_include_relative_to_the_including_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "common.policy").write_text("read: 1\n@include ./more/x.policy\n")
    (sub / "more").mkdir()
    (sub / "more" / "x.policy").write_text("write: 1\n")
    (tmp_path / "dir").mkdir()
    p = parse(tmp_path, "@include ../sub/common.policy\nclose: 1\n", name="dir/main.policy")
    assert [s.name for s in p.syscalls] == ["read", "write", "close"]
    assert len(p.files) == 3


def test_frequency_default_denylist_directives(tmp_path):
    (tmp_path / "hot.frequency").write_text("# counts\nread: 100\nwrite: 7\nread: 1\n")
    p = parse(tmp_path, "@frequency ./hot.frequency\n@default kill-thread\nread: 1\nwrite: 1\n")
    assert p.default == "kill-thread"
    assert dict(p.frequencies) == {0: 101, 1: 7}
    d = parse(tmp_path, "@denylist\nptrace: return EPERM\nioctl: arg1 == 0x5412; return 1\n",
              name="d.policy")
    assert d.denylist
    assert rules(d, "ioctl") == [(((Atom(1, "==", 0x5412),),), Action("errno", 1))]


# -- errors: each names file, line and column ------------------------------------

def where(e: PolicyError):
    return Path(e.file).name, e.line, e.column


def test_unknown_syscall(tmp_path):
    e = error(tmp_path, "read: 1\n  fnord: 1\n")
    assert where(e) == ("p.policy", 2, 3)
    assert "unknown syscall 'fnord'" in e.reason
    assert str(e).startswith(f"{tmp_path}/p.policy:2:3: unknown syscall 'fnord'")
    assert "\n      fnord: 1\n      ^" in str(e)


def test_syscall_of_another_architecture(tmp_path):
    e = error(tmp_path, "socketcall: 1\n")
    assert where(e) == ("p.policy", 1, 1) and "x86_64 has no syscall" in e.reason


def test_unknown_constant(tmp_path):
    e = error(tmp_path, "read: 1\nioctl: arg1 == TCGETS || arg1 == NOT_A_CONSTANT\n")
    assert where(e) == ("p.policy", 2, 34)
    assert "unknown constant 'NOT_A_CONSTANT'" in e.reason


def test_include_cycle(tmp_path):
    (tmp_path / "a.policy").write_text("read: 1\n@include ./b.policy\n")
    (tmp_path / "b.policy").write_text("\n\n@include ./a.policy\n")
    e = error(tmp_path, "@include ./a.policy\n", name="main.policy")
    assert where(e) == ("b.policy", 3, 10)
    assert "include cycle" in e.reason and "a.policy -> " in e.reason


def test_include_itself(tmp_path):
    e = error(tmp_path, "@include ./p.policy\n")
    assert where(e) == ("p.policy", 1, 10) and "include cycle" in e.reason


def test_missing_include_and_implicit_relative_path(tmp_path):
    e = error(tmp_path, "@include ./nope.policy\n")
    assert where(e) == ("p.policy", 1, 10) and "no such file" in e.reason
    e = error(tmp_path, "@include nope.policy\n")
    assert "must be absolute or start with ./" in e.reason


def test_unknown_directive(tmp_path):
    e = error(tmp_path, "read: 1\n@inclde ./x.policy\n")
    assert where(e) == ("p.policy", 2, 1)
    assert "unknown directive '@inclde'" in e.reason and "@include" in e.reason


@pytest.mark.parametrize("text,line,col,words", [
    ("read 1\n", 1, 6, "expected ':'"),
    ("read:\n", 1, 6, "expected an action"),
    ("read: 2\n", 1, 7, "expected an action"),
    ("read: arg0 === 1\n", 1, 14, "expected a constant"),
    ("read: arg0 =~ 1\n", 1, 12, "expected an operator"),
    ("read: arg6 == 1\n", 1, 7, "out of range"),
    ("read: arg0 == (1 | 2\n", 1, 21, "')'"),
    ("read: arg0 == 1 ||\n", 1, 19, "expected an argument"),
    ("read: arg0 == 1 extra\n", 1, 17, "expected the end of the line"),
    ("read: arg0 == 1 $\n", 1, 17, "unexpected character"),
    ("read: arg0 == 09\n", 1, 15, "invalid number"),
    ("read: arg0 == 0x10000000000000000\n", 1, 15, "does not fit in 64 bits"),
    ("read: return 5000\n", 1, 14, "out of range"),
    ("read: arg0 == ~~1\n", 1, 16, "double complement"),
    ("{read, write: 1\n", 1, 13, "expected ',' or '}'"),
    ("read: 1\nread: 1\n", 2, 7, "already has an unconditional action"),
    ("read: arg0 == 1; return 1\nread: 1\n", 2, 7, "could never apply"),
    ("read: {kill, arg0 == 1}\n", 1, 14, "could never apply"),
    ("file@fs: 1\n", 1, 1, "syscall groups"),
    ("@default log\n", 1, 10, "invalid default action"),
    ("read: 1\n@denylist\n", 2, 1, "must come first"),
])
def test_syntax_slips(tmp_path, text, line, col, words):
    e = error(tmp_path, text)
    assert where(e) == ("p.policy", line, col), (str(e), e.reason)
    assert words in e.reason, e.reason
    assert str(e).startswith(f"{tmp_path}/p.policy:{line}:{col}: ")


def test_denylist_needs_actions(tmp_path):
    e = error(tmp_path, "@denylist\nioctl: arg1 == 1\n")
    assert where(e)[1] == 2 and "needs an action" in e.reason
    e = error(tmp_path, "@denylist\nread: 1\n")
    assert "means nothing in a @denylist" in e.reason


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError) as e:
        parse_policy(tmp_path / "absent.policy")
    assert "no such policy file" in str(e.value)


def test_not_utf8(tmp_path):
    p = tmp_path / "p.policy"
    p.write_bytes(b"read: 1 # \xff\n")
    with pytest.raises(PolicyError) as e:
        parse_policy(p)
    assert "not UTF-8" in str(e.value)
