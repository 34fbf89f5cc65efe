"""Reaching a node beneath the dev root: no symlinks (anywhere in the path),
no "..", only character and block devices; openat2 and the O_PATH walk
(kernels without openat2) refuse the same things."""
from __future__ import annotations

import os
import stat

import pytest

from broker.devices import safe_open
from broker.devices.errors import DeviceError
from udev_tree import make_node


@pytest.fixture
def root(tmp_path):
    dev = tmp_path / "dev"
    make_node(dev, "null", "c", 1, 3, mode=0o666)
    make_node(dev, "bus/usb/001/002", "c", 1, 5)
    make_node(dev, "loop9", "b", 7, 9)
    make_node(dev, "...", "c", 1, 5)          # dots, but not "." or "..": a name
    make_node(dev, ".x/..y", "c", 1, 5)
    (tmp_path / "outside").mkdir()
    make_node(tmp_path / "outside", "secret", "c", 1, 5)
    (dev / "file").write_text("x")
    os.mkfifo(dev / "fifo")
    (dev / "dir").mkdir()
    (dev / "link").symlink_to("null")
    (dev / "abslink").symlink_to(tmp_path / "outside" / "secret")
    (dev / "dirlink").symlink_to("bus")
    (dev / "escape").symlink_to("../outside")
    return dev


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def use_openat2(request):
    return request.param


def refused(root, path, use_openat2) -> DeviceError:
    with pytest.raises(DeviceError) as e:
        safe_open.open_node(str(root), path, use_openat2)
    return e.value


def test_device_nodes_open_as_o_path(root, use_openat2):
    for rel, kind in (("null", stat.S_ISCHR), ("bus/usb/001/002", stat.S_ISCHR),
                      ("loop9", stat.S_ISBLK), ("...", stat.S_ISCHR), (".x/..y", stat.S_ISCHR)):
        node = safe_open.open_node(str(root), f"{root}/{rel}", use_openat2)
        try:
            assert kind(node.st.st_mode)
            assert node.st.st_ino == os.stat(root / rel).st_ino
            assert os.readlink(safe_open.fd_path(node.fd)) == str(root / rel)
            assert node.rel == rel
        finally:
            node.close()


@pytest.mark.parametrize("rel,kind,says", [
    ("link", "AccessDenied", "symlink"),                   # a symlink at the path
    ("abslink", "AccessDenied", "symlink"),                # ... pointing outside
    ("dirlink/usb/001/002", "AccessDenied", "symlink"),    # a symlink in a parent
    ("escape/secret", "AccessDenied", "symlink"),
    ("file", "AccessDenied", "a regular file"),
    ("fifo", "AccessDenied", "a FIFO"),
    ("dir", "AccessDenied", "a directory"),
    ("nope", "NotFound", "no such device node"),
    ("null/x", "NotFound", "no such device node"),
    ("bus/../null", "InvalidArgument", "not canonical"),
    ("./null", "InvalidArgument", "not canonical"),
    ("bus//usb/001/002", "InvalidArgument", "not canonical"),
    ("null/", "InvalidArgument", "not canonical"),
    ("bus/.", "InvalidArgument", "not canonical"),
    ("bus/..", "InvalidArgument", "not canonical"),
    ("bus/./usb/001/002", "InvalidArgument", "not canonical"),
])
def test_refusals_under_the_root(root, use_openat2, rel, kind, says):
    e = refused(root, f"{root}/{rel}", use_openat2)
    assert e.kind == kind and says in str(e)


@pytest.mark.parametrize("path,kind", [
    ("{root}/../outside/secret", "InvalidArgument"),
    ("{tmp}/outside/secret", "AccessDenied"),
    ("{root}x/null", "AccessDenied"),          # a sibling that starts with the root's name
    ("{root}", "AccessDenied"),
    ("/etc/passwd", "AccessDenied"),
    ("null", "InvalidArgument"),               # relative
    ("", "InvalidArgument"),
    ("{root}/nu\0ll", "InvalidArgument"),
    ("{root}/null\ndecision method=Launch", "InvalidArgument"),   # control characters
    ("{root}/nu\x1b[2Jll", "InvalidArgument"),
])
def test_refusals_outside_or_malformed(root, use_openat2, path, kind):
    e = refused(root, path.format(root=root, tmp=root.parent), use_openat2)
    assert e.kind == kind, e


@pytest.mark.parametrize("held_fd_dir", [False, True], ids=["by-path", "held-dir"])
def test_reopen_is_the_same_inode_and_blocking(root, held_fd_dir):
    node = safe_open.open_node(str(root), f"{root}/null")
    fd_dir = safe_open.open_own_fd_dir() if held_fd_dir else -1
    try:
        fd = safe_open.reopen(node.fd, os.O_RDWR, fd_dir)
        try:
            assert os.fstat(fd).st_ino == node.st.st_ino
            assert os.get_blocking(fd)
            assert os.write(fd, b"x") == 1
        finally:
            os.close(fd)
    finally:
        node.close()
        if fd_dir >= 0:
            os.close(fd_dir)


def test_reopen_of_a_driver_that_never_waits_sets_no_flag(root, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[1]) or real_open(*a, **k))
    node = safe_open.open_node(str(root), f"{root}/null")
    try:
        fd = safe_open.reopen(node.fd, os.O_RDWR, may_wait=False)
        os.close(fd)
        fd = safe_open.reopen(node.fd, os.O_RDWR)
        os.close(fd)
    finally:
        node.close()
    assert not opened[-2] & os.O_NONBLOCK and opened[-1] & os.O_NONBLOCK
