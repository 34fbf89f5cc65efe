"""The raw calls daemon-store mounts rely on (broker/jail/syscalls.py):
openat2's RESOLVE_* flags, and open_tree / mount_setattr / move_mount.
Whatever mounts runs in a worker's private mount namespace (ns_worker.py)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import ns_worker
from broker.jail import syscalls as sc
from ns_worker import NamespaceWorker, mounts_under

AT_FDCWD = -100


@pytest.fixture
def tmp():
    d = Path(tempfile.mkdtemp(prefix="privbroker-sc-", dir="/var/tmp"))
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "file").write_text("")
    os.symlink(d / "dir", d / "link")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ns():
    with NamespaceWorker() as w:
        yield w


def openat2(dirfd, path, flags=os.O_PATH | os.O_DIRECTORY, resolve=0):
    fd = sc.openat2(dirfd, path, flags | os.O_CLOEXEC, 0, resolve)
    os.close(fd)


def test_openat2_opens_and_resolve_flags_refuse(tmp):
    base = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
    try:
        openat2(base, "dir/sub", resolve=sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS)
        openat2(base, "link")                                       # no flags: followed
        for path in ("link", "link/sub"):                           # trailing, intermediate
            with pytest.raises(OSError) as e:
                openat2(base, path, resolve=sc.RESOLVE_NO_SYMLINKS)
            assert e.value.errno == errno.ELOOP
        for path in ("..", "dir/../..", str(tmp / "dir")):          # leaving, absolute
            with pytest.raises(OSError) as e:
                openat2(base, path, resolve=sc.RESOLVE_BENEATH)
            assert e.value.errno == errno.EXDEV
        with pytest.raises(NotADirectoryError):
            openat2(base, "file", resolve=sc.RESOLVE_BENEATH)
        with pytest.raises(FileNotFoundError):
            openat2(base, "missing")
    finally:
        os.close(base)


def test_openat2_with_o_path_and_o_nofollow_returns_the_symlink_itself(tmp):
    """The trap daemon_store avoids by never passing O_NOFOLLOW with O_PATH:
    RESOLVE_NO_SYMLINKS then does not refuse a trailing symlink, it opens it."""
    base = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = sc.openat2(base, "link", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                        sc.RESOLVE_NO_SYMLINKS)
        assert os.readlink(f"/proc/self/fd/{fd}") == str(tmp / "link")
        os.close(fd)
    finally:
        os.close(base)


def test_openat2_no_xdev_refuses_to_cross_a_mount(ns, tmp):
    ns.call(sc.mount, "tmpfs", str(tmp / "dir"), "tmpfs", 0, "mode=0755")
    try:
        fd = ns.call(sc.openat2, AT_FDCWD, str(tmp), os.O_PATH, 0, sc.RESOLVE_NO_XDEV)
        ns.call(os.close, fd)
        with pytest.raises(OSError) as e:
            ns.call(sc.openat2, AT_FDCWD, str(tmp / "dir"), os.O_PATH, 0, sc.RESOLVE_NO_XDEV)
        assert e.value.errno == errno.EXDEV
    finally:
        ns.call(ns_worker.detach_all_under, tmp)


def test_a_bind_built_detached_then_attached_through_fds(ns, tmp):
    src = ns.call(os.open, str(tmp / "dir"), os.O_RDONLY | os.O_DIRECTORY)
    dst = ns.call(os.open, str(tmp / "file"), os.O_PATH)
    (tmp / "target").mkdir()
    target = ns.call(os.open, str(tmp / "target"), os.O_PATH | os.O_DIRECTORY)
    try:
        tree = ns.call(sc.open_tree, src, "", sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC |
                       sc.AT_EMPTY_PATH)
        ns.call(sc.mount_setattr, tree, "", sc.AT_EMPTY_PATH,
                attr_set=sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC)
        assert ns.mounts_under(tmp) == []                 # detached: nobody sees it yet
        with pytest.raises(OSError):                      # a directory onto a file
            ns.call(sc.move_mount, tree, "", dst, "",
                    sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
        ns.call(sc.move_mount, tree, "", target, "",
                sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
        ns.call(os.close, tree)
        assert ns.mounts_under(tmp) == [
            f"{tmp}/target {tmp}/dir rw,nosuid,nodev,noexec,relatime private"]
        top = ns.call(os.open, str(tmp / "target"), os.O_PATH | os.O_DIRECTORY)
        ns.call(sc.mount_setattr, top, "", sc.AT_EMPTY_PATH, propagation=sc.MS_SHARED)
        ns.call(os.close, top)
        assert ns.mounts_under(tmp) == [
            f"{tmp}/target {tmp}/dir rw,nosuid,nodev,noexec,relatime shared"]
        assert mounts_under(tmp) == []                    # never on the host
    finally:
        for fd in (src, dst, target):
            ns.call(os.close, fd)
        ns.call(ns_worker.detach_all_under, tmp)


def test_a_detached_tree_closed_unattached_leaves_nothing(ns, tmp):
    src = ns.call(os.open, str(tmp / "dir"), os.O_PATH | os.O_DIRECTORY)
    tree = ns.call(sc.open_tree, src, "", sc.OPEN_TREE_CLONE | sc.AT_EMPTY_PATH)
    ns.call(os.close, tree)
    ns.call(os.close, src)
    assert ns.mounts_under(tmp) == []


def test_errors_are_oserrors_with_errno_and_call():
    with pytest.raises(OSError) as e:
        sc.open_tree(9999, "", sc.AT_EMPTY_PATH)
    assert e.value.errno == errno.EBADF and "open_tree" in str(e.value)
    with pytest.raises(OSError) as e:
        sc.move_mount(9999, "", 9999, "", sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
    assert e.value.errno == errno.EBADF and "move_mount" in str(e.value)
    with pytest.raises(OSError) as e:
        sc.mount_setattr(9999, "", sc.AT_EMPTY_PATH, attr_set=sc.MOUNT_ATTR_NOEXEC)
    assert e.value.errno == errno.EBADF and "mount_setattr" in str(e.value)


def test_fs_type_names_the_file_system_an_fd_is_on(tmp):
    """fstatfs' f_type (device lease replay asks whether /dev outlives a boot)."""
    for path, magic in (("/proc", 0x9FA0), ("/dev/shm", sc.TMPFS_MAGIC)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)       # an O_PATH fd will do
        try:
            assert sc.fs_type(fd) == magic, path
        finally:
            os.close(fd)
    fd = os.open(tmp, os.O_PATH | os.O_CLOEXEC)
    try:
        assert sc.fs_type(fd) not in (sc.TMPFS_MAGIC, sc.RAMFS_MAGIC, 0x9FA0)   # /var/tmp
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        sc.fs_type(fd)                                     # closed
    assert e.value.errno == errno.EBADF
