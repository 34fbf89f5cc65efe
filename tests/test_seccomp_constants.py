"""The constants table: read from this machine's headers, cached, kept fresh."""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import signal
import socket
import termios

import pytest

from broker.jail.seccomp import PolicyError, compile_policy, constants, parse_policy
from broker.jail.seccomp import syscall_names
from test_seccomp_support import seccomp_cache, write_policy

__all__ = ["seccomp_cache"]


def test_values_agree_with_pythons_own_bindings():
    c = constants.ensure_constants()
    expected = {
        "AF_UNIX": socket.AF_UNIX, "AF_INET6": socket.AF_INET6, "SOCK_STREAM": socket.SOCK_STREAM,
        "SOL_SOCKET": socket.SOL_SOCKET, "O_RDONLY": os.O_RDONLY, "O_CLOEXEC": os.O_CLOEXEC,
        "O_NONBLOCK": os.O_NONBLOCK, "TCGETS": termios.TCGETS, "FIONREAD": termios.FIONREAD,
        "TIOCGWINSZ": termios.TIOCGWINSZ, "SIGSYS": signal.SIGSYS, "EPERM": errno.EPERM,
        "ENOSYS": errno.ENOSYS, "PROT_EXEC": mmap.PROT_EXEC, "MAP_PRIVATE": mmap.MAP_PRIVATE,
        "F_SETFD": fcntl.F_SETFD, "LOCK_EX": fcntl.LOCK_EX, "CLONE_NEWUSER": 0x10000000,
        "PR_SET_NAME": 15, "PR_SET_NO_NEW_PRIVS": 38,
    }
    assert {k: c.get(k) for k in expected} == expected
    # ioctl numbers computed by the C compiler (they need sizeof a struct)
    assert c.get("LOOP_GET_STATUS64") == 0x4C05
    assert c.get("BLKGETSIZE64") == 0x80081272
    assert c.get("FS_IOC_FSGETXATTR") == 0x801C581F
    assert c.get("AT_FDCWD") == (1 << 64) - 100          # negative: 64-bit two's complement
    assert len(c) > 5000


def test_table_is_cached_and_not_regenerated(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(cache))
    monkeypatch.setattr(constants, "_memo", {})
    first = constants.ensure_constants()
    meta = json.loads((cache / f"constants-{os.uname().machine}.meta.json").read_text())
    assert meta["digest"] == first.digest and len(meta["deps"]) > 20
    assert any(d[0].endswith("/linux/loop.h") for d in meta["deps"])
    assert constants.table_digest() == first.digest

    calls = []
    monkeypatch.setattr(constants, "_memo", {})
    monkeypatch.setattr(constants, "generate", lambda: calls.append(1) or ({"X": 1}, []))
    again = constants.ensure_constants()
    assert not calls and again.values == first.values     # read from the cache

    # a header that changed (here: its recorded size no longer matches) -> regenerated
    meta["deps"][0][1] += 1
    (cache / f"constants-{os.uname().machine}.meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(constants, "_memo", {})
    assert constants.ensure_constants().values == {"X": 1} and calls == [1]


def test_an_unsafe_cached_table_is_not_believed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(cache))
    monkeypatch.setattr(constants, "_memo", {})
    real = constants.ensure_constants()
    table = next(cache.glob("constants-*-*.json"))
    forged = dict(real.values, PROT_EXEC=0)
    table.write_text(json.dumps(forged))
    os.chmod(table, 0o666)
    monkeypatch.setattr(constants, "_memo", {})
    assert constants.ensure_constants().get("PROT_EXEC") == 4


def test_world_writable_cache_dir_is_not_used(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(d))
    from broker.jail.seccomp import cache
    assert cache.cache_dir() is None


def test_without_a_compiler_numbers_still_work_and_names_say_why(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("PRIVBROKER_CACHE_DIR", str(cache))
    monkeypatch.setattr(constants, "_memo", {})

    def no_compiler():
        raise constants.ConstantsUnavailable("no C compiler found (install gcc, ...)")
    monkeypatch.setattr(constants, "_compiler", no_compiler)
    numbers = write_policy(tmp_path, "mmap: arg2 in ~4 || arg2 in ~2\nread: 1\n",
                           name="n.policy", harness=False)
    compile_policy(numbers)
    named = write_policy(tmp_path, "mmap: arg2 in ~PROT_EXEC\n", name="c.policy",
                         harness=False)
    with pytest.raises(PolicyError) as e:
        parse_policy(named)
    assert e.value.line == 1 and e.value.column == 16
    assert "cannot resolve constant 'PROT_EXEC': no C compiler" in str(e.value)
    assert constants.table_digest() == "unavailable"


def test_newer_than_headers_supplement_follows_the_running_kernel(monkeypatch):
    c = constants.Constants({"PROT_EXEC": 4}, "d")
    monkeypatch.setattr(constants, "_kernel_version", lambda: (6, 12))
    assert c.get("MADV_GUARD_INSTALL") is None
    monkeypatch.setattr(constants, "_kernel_version", lambda: (6, 13))
    assert c.get("MADV_GUARD_INSTALL") == 102
    headers_win = constants.Constants({"MADV_GUARD_INSTALL": 7}, "d")
    assert headers_win.get("MADV_GUARD_INSTALL") == 7


def test_syscall_supplement_agrees_with_libseccomp_where_both_know():
    import pyseccomp
    arch = pyseccomp.system_arch()
    for name, nr in syscall_names.NEWER_THAN_LIBSECCOMP["x86_64"].items():
        try:
            known = pyseccomp.resolve_syscall(arch, name)
        except Exception:       # noqa: BLE001
            continue
        if known >= 0:
            assert known == nr, name
    assert syscall_names.number("mseal") == 462
    assert syscall_names.number("socketcall") is None       # i386 only
    assert syscall_names.name(462) == "mseal"
