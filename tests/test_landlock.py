"""Landlock: real rulesets enforced on real forked processes.

Each behaviour test builds the ruleset in the parent (as the launcher does),
forks, sets no_new_privs in the child, restricts it, and has the child report
the errno of each operation (0 = allowed) back over a pipe.  The asserted
errnos are the kernel's own: EACCES for a denied access, EXDEV for a
rename/link across directories without REFER.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import prctl
import pytest

from broker.jail import landlock
from broker.jail.landlock import (DEFAULT_PATHS, LandlockError, LandlockPathError,
                                  LandlockRestrictError, LandlockRuleError,
                                  LandlockUnsupported, build_ruleset)
from broker.jail.spec import FsRule

OK, EACCES, EXDEV = 0, errno.EACCES, errno.EXDEV
NOBODY = 65534


# -- helpers -------------------------------------------------------------------

def in_child(fn, *, no_new_privs=True, as_nobody=False) -> dict:
    """Run fn() in a forked child and return the JSON-able dict it returns
    (or {"raised": ..., "errno": ...} if it raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            if as_nobody:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)   # from root: drops every capability
            if no_new_privs:
                prctl.set_no_new_privs(1)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"raised": type(e).__name__, "errno": getattr(e, "errno", None),
                   "message": str(e)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def attempt(f, *args) -> int:
    """errno of f(*args); 0 if it succeeded."""
    try:
        f(*args)
        return OK
    except OSError as e:
        return e.errno


def read(path):
    with open(path) as f:
        return f.read()


def write(path, data="x"):
    with open(path, "w") as f:
        f.write(data)


def append(path):
    with open(path, "a") as f:
        f.write("more")


def execute(path) -> int:
    try:
        return subprocess.run([path], timeout=10).returncode
    except OSError as e:
        return e.errno


def restricted(ruleset, checks: dict) -> dict:
    """In a child: restrict, then run each named check; {name: errno}."""
    def body():
        ruleset.restrict_self()
        return {name: fn() for name, fn in checks.items()}
    with ruleset:
        return in_child(body)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def tree(tmp_path):
    """tmp/{ro,rx,rw,rw2,arw,arw2,out}/f, plus an executable `prog` in rx, rw,
    arw and out."""
    for d in ("ro", "rx", "rw", "rw2", "arw", "arw2", "out"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_text("data")
    for d in ("rx", "rw", "arw", "out"):
        shutil.copy("/usr/bin/true", tmp_path / d / "prog")
    return tmp_path


def rules_for(t) -> list[FsRule]:
    return [FsRule(str(t / "ro"), "ro"), FsRule(str(t / "rx"), "rx"),
            FsRule(str(t / "rw"), "rw"), FsRule(str(t / "rw2"), "rw"),
            FsRule(str(t / "arw"), "advanced-rw"), FsRule(str(t / "arw2"), "advanced-rw")]


# -- probe and tables ---------------------------------------------------------

def test_abi_probe_reports_this_kernel():
    assert landlock.abi_version() == 7
    assert landlock.abi_version() is landlock.abi_version()   # probed once


def test_abi_table_masks_per_version():
    v1 = landlock.rights("fs", 1)
    assert v1 == (1 << 13) - 1
    assert landlock.rights("fs", 2) == v1 | 1 << 13
    assert landlock.rights("fs", 3) == landlock.rights("fs", 4) == v1 | 3 << 13
    assert landlock.rights("fs", 5) == landlock.rights("fs", 7) == 0xFFFF
    assert landlock.rights("net", 3) == 0 and landlock.rights("net", 4) == 0b11
    assert landlock.rights("scoped", 6) == 0b11
    assert landlock.rights("restrict_self", 7) == 0b111
    assert [landlock.ruleset_attr_size(a) for a in range(1, 8)] == [8, 8, 8, 16, 16, 24, 24]
    # minijail's kinds, masked by ABI: rights the ABI lacks drop out.
    assert landlock.right_names("fs", landlock.access_mask("advanced-rw", 1)) == [
        "WRITE_FILE", "READ_FILE", "READ_DIR", "REMOVE_DIR", "REMOVE_FILE", "MAKE_CHAR",
        "MAKE_DIR", "MAKE_REG", "MAKE_SOCK", "MAKE_FIFO", "MAKE_BLOCK", "MAKE_SYM"]
    assert landlock.access_mask("rw", 3) & (1 << 14)          # TRUNCATE from v3
    # File rules keep only the rights that apply to a file.
    assert landlock.right_names("fs", landlock.access_mask("advanced-rw", 7, is_dir=False)) == [
        "WRITE_FILE", "READ_FILE", "TRUNCATE", "IOCTL_DEV"]


# -- enforcement, in real processes --------------------------------------------

def test_read_write_create_remove_follow_the_rules(tree):
    t = tree
    got = restricted(build_ruleset(rules_for(t)), {
        "read ro": lambda: attempt(read, t / "ro/f"),
        "list ro": lambda: attempt(os.listdir, t / "ro"),
        "write ro": lambda: attempt(append, t / "ro/f"),
        "create ro": lambda: attempt(write, t / "ro/new"),
        "unlink ro": lambda: attempt(os.unlink, t / "ro/f"),
        "read out": lambda: attempt(read, t / "out/f"),
        "list out": lambda: attempt(os.listdir, t / "out"),
        "write out": lambda: attempt(append, t / "out/f"),
        "read parent": lambda: attempt(os.listdir, t),
        "write rw": lambda: attempt(append, t / "rw/f"),
        "create rw": lambda: attempt(write, t / "rw/new"),
        "mkdir rw": lambda: attempt(os.mkdir, t / "rw/d"),
        "rmdir rw": lambda: attempt(os.rmdir, t / "rw/d"),
        "unlink rw": lambda: attempt(os.unlink, t / "rw/new"),
        "symlink rw": lambda: attempt(os.symlink, "f", t / "rw/s"),       # rw: no MAKE_SYM
        "mkfifo rw": lambda: attempt(os.mkfifo, t / "rw/p"),              # rw: no MAKE_FIFO
        "symlink arw": lambda: attempt(os.symlink, "f", t / "arw/s"),
        "mkfifo arw": lambda: attempt(os.mkfifo, t / "arw/p"),
        "create rx": lambda: attempt(write, t / "rx/new"),
    })
    assert got == {
        "read ro": OK, "list ro": OK, "write ro": EACCES, "create ro": EACCES,
        "unlink ro": EACCES, "read out": EACCES, "list out": EACCES, "write out": EACCES,
        "read parent": EACCES, "write rw": OK, "create rw": OK, "mkdir rw": OK,
        "rmdir rw": OK, "unlink rw": OK, "symlink rw": EACCES, "mkfifo rw": EACCES,
        "symlink arw": OK, "mkfifo arw": OK, "create rx": EACCES,
    }
    # Outside the jail nothing was touched where it was denied.
    assert (t / "ro/f").read_text() == "data" and not (t / "ro/new").exists()


def test_execute_only_where_rx(tree):
    t = tree
    rules = [*DEFAULT_PATHS, *rules_for(t)]   # the loader and libc come from the defaults
    got = restricted(build_ruleset(rules), {
        "exec rx": lambda: execute(str(t / "rx/prog")),
        "exec rw": lambda: execute(str(t / "rw/prog")),
        "exec arw": lambda: execute(str(t / "arw/prog")),     # advanced-rw has no EXECUTE
        "exec out": lambda: execute(str(t / "out/prog")),
        "exec /usr/bin/true": lambda: execute("/usr/bin/true"),
        "read /etc/passwd": lambda: attempt(read, "/etc/passwd"),
        "read /etc/hostname": lambda: attempt(read, "/etc/hostname"),
    })
    assert got == {"exec rx": 0, "exec rw": EACCES, "exec arw": EACCES, "exec out": EACCES,
                   "exec /usr/bin/true": 0, "read /etc/passwd": OK,
                   "read /etc/hostname": EACCES}


def test_rename_and_link_need_refer_across_directories(tree):
    t = tree
    got = restricted(build_ruleset(rules_for(t)), {
        "rename within rw": lambda: attempt(os.rename, t / "rw/f", t / "rw/g"),
        "rename rw -> rw2": lambda: attempt(os.rename, t / "rw/g", t / "rw2/g"),
        "link rw -> rw2": lambda: attempt(os.link, t / "rw/g", t / "rw2/l"),
        "rename arw -> arw2": lambda: attempt(os.rename, t / "arw/f", t / "arw2/g"),
        "link arw2 -> arw": lambda: attempt(os.link, t / "arw2/g", t / "arw/l"),
        "rename arw2 -> rw": lambda: attempt(os.rename, t / "arw2/g", t / "rw/h"),
        "rename arw -> ro": lambda: attempt(os.rename, t / "arw/l", t / "ro/h"),
        "rename out -> arw": lambda: attempt(os.rename, t / "out/f", t / "arw/h"),
    })
    assert got == {
        "rename within rw": OK,        # same directory: no REFER needed
        "rename rw -> rw2": EXDEV,     # rw lacks REFER
        "link rw -> rw2": EXDEV,
        "rename arw -> arw2": OK,      # advanced-rw has REFER on both sides
        "link arw2 -> arw": OK,
        "rename arw2 -> rw": EXDEV,    # destination lacks REFER
        "rename arw -> ro": EACCES,    # destination lacks MAKE_REG: EACCES wins over EXDEV
        "rename out -> arw": EACCES,   # source lacks REMOVE_FILE
    }
    # The refused renames left their files where they were.
    assert (t / "rw/g").exists() and (t / "arw2/g").exists() and not (t / "rw2/g").exists()


def test_truncate(tree):
    t = tree
    got = restricted(build_ruleset(rules_for(t)), {
        "truncate rw": lambda: attempt(os.truncate, t / "rw/f", 1),
        "O_TRUNC rw": lambda: attempt(write, t / "rw/f"),
        "truncate ro": lambda: attempt(os.truncate, t / "ro/f", 1),
        "truncate out": lambda: attempt(os.truncate, t / "out/f", 1),
        "truncate arw": lambda: attempt(os.truncate, t / "arw/f", 1),
    })
    assert got == {"truncate rw": OK, "O_TRUNC rw": OK, "truncate ro": EACCES,
                   "truncate out": EACCES, "truncate arw": OK}


def test_older_target_abi_is_enforced_and_reported_as_such(tree):
    """Pinning ABI 2: TRUNCATE is not handled (truncate is allowed everywhere),
    which the report says; pinning ABI 1: REFER cannot be granted, so every
    cross-directory rename fails with EXDEV, even with advanced-rw."""
    t = tree
    rs2 = build_ruleset(rules_for(t), target_abi=2)
    assert rs2.enforced["abi"] == 2 and rs2.enforced["kernel_abi"] == 7
    assert rs2.enforced["not_handled_fs"] == ["TRUNCATE", "IOCTL_DEV"]
    got = restricted(rs2, {"truncate ro": lambda: attempt(os.truncate, t / "ro/f", 1),
                           "write ro": lambda: attempt(append, t / "ro/f")})
    assert got == {"truncate ro": OK, "write ro": EACCES}

    rs1 = build_ruleset(rules_for(t), target_abi=1)
    assert "REFER" in rs1.enforced["not_handled_fs"]
    got = restricted(rs1, {"rename arw -> arw2":
                           lambda: attempt(os.rename, t / "arw/f", t / "arw2/g")})
    assert got == {"rename arw -> arw2": EXDEV}


def test_file_rules_keep_only_file_rights(tree):
    t = tree
    rules = [FsRule(str(t / "out/f"), "advanced-rw"), FsRule(str(t / "rw/prog"), "rx")]
    rs = build_ruleset(rules)   # the kernel would give EINVAL for dir-only rights on a file
    assert rs.enforced["rules"][0]["allowed"] == ["WRITE_FILE", "READ_FILE", "TRUNCATE",
                                                  "IOCTL_DEV"]
    got = restricted(rs, {
        "write the file": lambda: attempt(append, t / "out/f"),
        "read sibling": lambda: attempt(read, t / "out/prog"),
        "list its dir": lambda: attempt(os.listdir, t / "out"),
        "create beside it": lambda: attempt(write, t / "out/new"),
    })
    assert got == {"write the file": OK, "read sibling": EACCES, "list its dir": EACCES,
                   "create beside it": EACCES}


def test_restriction_is_inherited_by_children(tree):
    t = tree
    rules = [*DEFAULT_PATHS, FsRule(str(t / "ro"), "ro")]
    got = restricted(build_ruleset(rules), {
        "child cat out": lambda: subprocess.run(
            ["/usr/bin/cat", str(t / "out/f")], capture_output=True).returncode,
        "child cat ro": lambda: subprocess.run(
            ["/usr/bin/cat", str(t / "ro/f")], capture_output=True).returncode,
    })
    assert got == {"child cat out": 1, "child cat ro": 0}


# -- errors -----------------------------------------------------------------------

def test_missing_rule_path_is_an_error_naming_it(tmp_path):
    before = open_fds()
    missing = str(tmp_path / "no" / "such")
    with pytest.raises(LandlockPathError) as e:
        build_ruleset([FsRule(str(tmp_path), "ro"), FsRule(missing, "rx")])
    assert e.value.errno == errno.ENOENT and e.value.filename == missing
    assert missing in str(e.value) and "open(O_PATH)" in str(e.value)
    assert open_fds() == before   # the ruleset fd and the O_PATH fds are closed


def test_missing_default_path_is_skipped_and_reported(tmp_path):
    missing = FsRule(str(tmp_path / "lib128"), "rx")
    with build_ruleset([FsRule(str(tmp_path), "ro"), missing], optional=(missing,)) as rs:
        assert rs.enforced["skipped"] == [missing.path]
        assert [r["path"] for r in rs.enforced["rules"]] == [str(tmp_path)]


def test_bad_rules_are_refused_before_any_syscall():
    with pytest.raises(LandlockRuleError, match="absolute"):
        build_ruleset([FsRule("usr/lib", "ro")])
    with pytest.raises(LandlockRuleError, match="must be one of"):
        build_ruleset([FsRule("/usr/lib", "rwx")])
    with pytest.raises(LandlockError):
        build_ruleset([], target_abi=2, min_abi=3)


def test_no_fd_leak_and_cloexec():
    before = open_fds()
    rs = build_ruleset(DEFAULT_PATHS)
    assert os.get_inheritable(rs.fd) is False
    assert len(open_fds()) == len(before) + 1    # only the ruleset fd stays open
    rs.close()
    rs.close()                                   # idempotent
    assert open_fds() == before
    with pytest.raises(LandlockRestrictError, match="closed"):
        rs.restrict_self()


def test_restrict_self_without_no_new_privs_as_non_root_fails_clearly(tmp_path):
    rs = build_ruleset([FsRule(str(tmp_path), "ro")])
    got = in_child(lambda: rs.restrict_self() or {"restricted": True},
                   no_new_privs=False, as_nobody=True)
    rs.close()
    assert got["raised"] == "LandlockRestrictError" and got["errno"] == errno.EPERM
    assert "landlock_restrict_self" in got["message"] and "no_new_privs" in got["message"]


def test_root_may_restrict_without_no_new_privs(tmp_path):
    # CAP_SYS_ADMIN is the other way in (minijail restricts before dropping caps
    # when no_new_privs is not asked for).
    rs = build_ruleset([FsRule(str(tmp_path), "ro")])
    got = in_child(lambda: rs.restrict_self() or {"read /etc/hostname":
                                                   attempt(read, "/etc/hostname")},
                   no_new_privs=False)
    rs.close()
    assert got == {"read /etc/hostname": EACCES}


def test_error_message_carries_syscall_errno_and_path():
    e = LandlockPathError(errno.ENOENT, "open(O_PATH)", "/x", "Landlock rx rule")
    assert isinstance(e, OSError) and e.errno == errno.ENOENT and e.filename == "/x"
    assert str(e) == ("[Errno 2] open(O_PATH): No such file or directory "
                      "(Landlock rx rule): '/x'")


def test_best_effort_on_a_kernel_without_landlock(monkeypatch, tmp_path):
    # The only simulated kernel in this file: the probe says "no Landlock".
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    rules = [FsRule(str(tmp_path), "ro")]
    with pytest.raises(LandlockUnsupported, match="no Landlock") as e:
        build_ruleset(rules)
    assert e.value.errno == errno.EOPNOTSUPP
    rs = build_ruleset(rules, best_effort=True)
    report = rs.enforced
    assert report["enforced"] is False and report["abi"] == 0 and report["rules"] == []
    assert report["handled_access_fs"] == [] and "not enforced" in report["reason"]
    assert rs.fd == -1
    rs.restrict_self()   # a recorded no-op: there is no ruleset to enforce
    rs.close()
