"""Reaching a device node without trusting the path: beneath the dev root,
no symlinks, no "..", and only character or block devices.

  check_path(root, path)  lexical checks: absolute, canonical, beneath root
  open_node(root, path)   an O_PATH fd on the node, and its fstat
  searchable_by(...)      could a caller have looked the path up itself
  reopen(fd, flags)       a real open of *that* inode via /proc/self/fd/N
                          (open_own_fd_dir: that directory, held)
  fd_path(fd)             "/proc/self/fd/N", for chown/chmod/xattrs through the
                          fd (the kernel follows the magic link to the inode
                          the fd holds; the caller's path is never looked at
                          again)

Resolution is openat2(root_fd, rel, O_PATH|O_NOFOLLOW, RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where the kernel has it (5.6+);
elsewhere a walk of O_PATH|O_NOFOLLOW opens, one component at a time, each
checked with fstat.  Both refuse the same things (the tests run both).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import stat as stat_mod
from dataclasses import dataclass

from ..jail import syscalls
from .errors import DeviceError, denied, invalid

MAX_PATH = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")     # never in a device's name; would forge log lines
RESOLVE = (syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS
           | syscalls.RESOLVE_NO_MAGICLINKS)
O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Node:
    fd: int                   # O_PATH, owned by whoever holds the Node
    st: os.stat_result
    root: str
    rel: str                  # path below root
    # May its driver's open() wait (a tty for carrier, a busy sound device)?
    # reopen() then opens it O_NONBLOCK.  Whoever knows the driver says no.
    open_may_wait: bool = True

    @property
    def kind(self) -> str:
        return "b" if stat_mod.S_ISBLK(self.st.st_mode) else "c"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_path(root: str, path: str) -> str:
    """The part of `path` below `root`, or InvalidArgument/AccessDenied."""
    if not isinstance(path, str) or not path:
        raise invalid("the path is empty")
    if len(path) > MAX_PATH or _CONTROL.search(path):
        raise invalid("the path contains control characters or is too long")
    if not path.startswith("/"):
        raise invalid(f"{path!r} is not an absolute path")
    # an empty, "." or ".." component, anywhere or last
    if ("//" in path or "/./" in path or "/../" in path
            or path.endswith(("/", "/.", "/.."))):
        raise invalid(f"{path!r} is not canonical (empty, '.' or '..' components)")
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix) or len(path) == len(prefix):
        raise denied(f"{path!r} is not a node under the device root {root}")
    return path[len(prefix):]


# check_path is lexical, so an answer can be remembered (a refusal, an
# exception, is not); a device's path is asked for again and again.
_check_path_remembered = functools.lru_cache(maxsize=256)(check_path)


def _kind_name(mode: int) -> str:
    for test, name in ((stat_mod.S_ISREG, "a regular file"), (stat_mod.S_ISDIR, "a directory"),
                       (stat_mod.S_ISFIFO, "a FIFO"), (stat_mod.S_ISSOCK, "a socket"),
                       (stat_mod.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a device node"


def _resolve_error(e: OSError, path: str) -> DeviceError:
    if e.errno == errno.ELOOP:
        return denied(f"{path!r}: a symlink in the path (symlinks are never followed)")
    if e.errno == errno.EXDEV:
        return denied(f"{path!r}: the path leaves the device root")
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return DeviceError("NotFound", f"{path!r}: no such device node")
    if e.errno in (errno.EACCES, errno.EPERM):
        return denied(f"{path!r}: {os.strerror(e.errno)}")
    return DeviceError("Failed", f"{path!r}: {os.strerror(e.errno or 0)}")


def _walk(root_fd: int, rel: str) -> int:
    """O_PATH|O_NOFOLLOW, one component at a time (kernels without openat2)."""
    fd = os.dup(root_fd)
    try:
        parts = rel.split("/")
        for i, part in enumerate(parts):
            nxt = os.open(part, O_PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if stat_mod.S_ISLNK(mode):
                raise OSError(errno.ELOOP, "symlink", part)
            if i < len(parts) - 1 and not stat_mod.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, "not a directory", part)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_root(root: str) -> int:
    """An O_PATH fd on the device root, to resolve beneath."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _beneath(root_fd: int, rel: str, use_openat2: bool) -> int:
    if use_openat2:
        try:
            return syscalls.openat2(root_fd, rel, O_PATH_FLAGS, 0, RESOLVE)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
    return _walk(root_fd, rel)


def open_beneath(root: str, rel: str, use_openat2: bool = True) -> int:
    root_fd = open_root(root)
    try:
        return _beneath(root_fd, rel, use_openat2)
    finally:
        os.close(root_fd)


def open_node(root: str, path: str, use_openat2: bool = True, root_fd: int = -1) -> Node:
    """An O_PATH fd on the character or block device at `path` under `root`
    (resolved beneath `root_fd` when given: an open_root(root) the caller
    holds)."""
    rel = (_check_path_remembered(root, path) if type(path) is str
           else check_path(root, path))
    try:
        fd = (_beneath(root_fd, rel, use_openat2) if root_fd >= 0
              else open_beneath(root, rel, use_openat2))
    except OSError as e:
        raise _resolve_error(e, path) from None
    st = os.fstat(fd)
    if not (stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode)):
        os.close(fd)
        raise denied(f"{path!r} is {_kind_name(st.st_mode)}, not a device node")
    return Node(fd, st, root, rel)


def searchable_by(root_fd: int, rel: str, uid: int, gids) -> bool:
    """Could `uid` (in `gids`) look `rel` up beneath root_fd itself: may it
    search the root and every directory on the way, as far as the path
    goes?  By the owner, group and other x bits; ACLs are not read, so one
    that would let it search counts as no."""
    fd = os.dup(root_fd)
    try:
        for part in rel.split("/"):
            st = os.fstat(fd)
            if not stat_mod.S_ISDIR(st.st_mode):
                return True     # the lookup ends here, in a directory it could search
            if not _may_search(st, uid, gids):
                return False
            try:
                nxt = os.open(part, O_PATH_FLAGS, dir_fd=fd)
            except OSError:
                return True     # not there: its own lookup would fail here too
            os.close(fd)
            fd = nxt
        return True
    finally:
        os.close(fd)


def _may_search(st: os.stat_result, uid: int, gids) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_own_fd_dir() -> int:
    """/proc/self/fd of this process, for reopen(): with it held, a reopen
    looks up one name instead of four.  Meaningful in this process only: a
    forked child must not use an inherited one (it names the parent's fds)."""
    return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def reopen(fd: int, flags: int, fd_dir: int = -1, may_wait: bool = True) -> int:
    """Open the inode an O_PATH fd holds (through its /proc/self/fd link, or
    that link's name in `fd_dir`, an open_own_fd_dir()).  If the driver's
    open may wait (`may_wait`), O_NONBLOCK for the open itself (a serial
    port without CLOCAL would block open() until carrier, stalling the
    broker), cleared afterwards so the caller gets an ordinary fd."""
    flags_now = flags | os.O_CLOEXEC | os.O_NOCTTY | (os.O_NONBLOCK if may_wait else 0)
    new = (os.open(str(fd), flags_now, dir_fd=fd_dir) if fd_dir >= 0
           else os.open(fd_path(fd), flags_now))
    if may_wait and not flags & os.O_NONBLOCK:
        try:
            # F_SETFL changes only the status flags (O_NONBLOCK, O_APPEND, ...):
            # `flags` as given, i.e. O_NONBLOCK cleared, in one call
            fcntl.fcntl(new, fcntl.F_SETFL, flags)
        except OSError:
            os.close(new)
            raise
    return new
