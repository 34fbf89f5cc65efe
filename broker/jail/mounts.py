"""Filesystem setup inside the jail's new mount namespace.

Runs in the jail's first process (pid 1 of its pid namespace when there is
one), after the namespaces exist and before anything drops privilege.  The
order, and why:

 1. propagation   - first, so nothing we mount below leaks back to the host
                    (and host mounts keep arriving when the mode is slave);
 2. new root      - bind the pivot_root directory onto itself: pivot_root(2)
                    needs a mount point, and every later mount goes beneath it;
 3. mounts        - -b/-k in the order given, so a later one may cover an
                    earlier one; read-only remounts right after each bind;
 4. /dev          - after the mounts, so a `-b /` does not cover it;
 5. /tmp          - same reason;
 6. pivot/chroot  - once the new tree is complete; the old root is detached;
 7. /proc         - after the root change and inside the jail's pid
                    namespace, so it shows the jail's pids only.

A missing mount destination is created only on a tmpfs this jail mounted
itself: creating it anywhere else would write into a host filesystem.
"""
from __future__ import annotations

import os
import stat

from . import syscalls as sc
from .spec import Bind, JailSpec, Mount

_PROPAGATION_FLAGS = {
    "slave": sc.MS_SLAVE, "shared": sc.MS_SHARED,
    "private": sc.MS_PRIVATE, "unbindable": sc.MS_UNBINDABLE,
}

# statvfs flag -> mount flag, for the flags the kernel locks on a bind mount
# (a read-only remount must repeat them or fail with EPERM in a user ns).
_LOCKED_FLAGS = (
    (os.ST_NOSUID, sc.MS_NOSUID), (os.ST_NODEV, sc.MS_NODEV),
    (os.ST_NOEXEC, sc.MS_NOEXEC), (os.ST_NOATIME, sc.MS_NOATIME),
    (os.ST_NODIRATIME, sc.MS_NODIRATIME), (os.ST_RELATIME, sc.MS_RELATIME),
)

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("ptmx", "pts/ptmx"))


class MountError(OSError):
    """A mount step failed; str() names the step and the path."""


class _Tree:
    """The new tree being built: its root on the host, and the tmpfs mounts
    we made (the only places where creating a missing destination is safe)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        self.own_tmpfs: list[str] = []

    def host_path(self, inside: str) -> str:
        return os.path.normpath(self.root + "/" + inside.lstrip("/"))

    def on_own_tmpfs(self, host_path: str) -> bool:
        return any(host_path == t or host_path.startswith(t + "/") for t in self.own_tmpfs)


def setup_filesystem(spec: JailSpec) -> None:
    set_propagation(spec.propagation)
    new_root = spec.pivot_root or spec.chroot
    tree = _Tree(new_root or "/")
    if spec.pivot_root:
        _bind_root_onto_itself(spec.pivot_root)
    # With a minimal /dev (-d), what goes into /dev (minimalistic-mountns's
    # -b /dev/log, a -b /dev/NODE) goes onto it, after it is built: before,
    # the tmpfs would cover it, or (the journal's /dev/log under systemd,
    # found in the VM, tests/test_vm_systemd.py) its destination is missing.
    later = [m for m in spec.mounts if spec.mount_dev and _in_dev(m.dest)]
    for m in spec.mounts:
        if m not in later:
            mount_one(tree, m)
    if spec.mount_dev:
        build_dev(tree)
        for m in later:
            mount_one(tree, m)
    if spec.tmpfs_tmp_size is not None:
        mount_tmp(tree, spec.tmpfs_tmp_size)
    if spec.pivot_root:
        enter_pivot_root(spec.pivot_root)
    elif spec.chroot:
        os.chroot(spec.chroot)
        os.chdir("/")
    if spec.has("pid") or spec.remount_proc_ro:
        mount_proc(read_only=spec.remount_proc_ro)


def _in_dev(dest: str) -> bool:
    path = os.path.normpath("/" + dest.lstrip("/"))   # normpath keeps a leading "//"
    return path.startswith("/dev/")


def mount_one(tree: _Tree, m: Bind | Mount) -> None:
    if isinstance(m, Bind):
        bind(tree, m)
    else:
        fs_mount(tree, m)


def set_propagation(mode: str) -> None:
    if mode == "unchanged":
        return
    sc.mount(None, "/", None, sc.MS_REC | _PROPAGATION_FLAGS[mode])


def _bind_root_onto_itself(root: str) -> None:
    if not os.path.isdir(root):
        raise MountError(2, f"pivot_root directory {root} does not exist", root)
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)


def _ensure_destination(tree: _Tree, dest: str, like_dir: bool) -> None:
    if os.path.lexists(dest):
        return
    if not tree.on_own_tmpfs(os.path.dirname(dest)) and not tree.on_own_tmpfs(dest):
        raise MountError(2, f"mount destination {dest} does not exist (it is only created "
                            "on a tmpfs the jail mounts itself)", dest)
    if like_dir:
        os.makedirs(dest, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def bind(tree: _Tree, m: Bind) -> None:
    try:
        st = os.stat(m.src)
    except OSError as e:
        raise MountError(e.errno, f"bind source {m.src}: {e.strerror}", m.src) from None
    dest = tree.host_path(m.dest)
    _ensure_destination(tree, dest, like_dir=stat.S_ISDIR(st.st_mode))
    flags = sc.MS_BIND | (sc.MS_REC if m.recursive else 0)
    sc.mount(m.src, dest, None, flags)
    if not m.writable:
        remount_read_only(dest)


def remount_read_only(path: str) -> None:
    f = os.statvfs(path).f_flag
    locked = 0
    for st_flag, ms_flag in _LOCKED_FLAGS:
        if f & st_flag:
            locked |= ms_flag
    sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | locked)


def fs_mount(tree: _Tree, m: Mount) -> None:
    dest = tree.host_path(m.dest)
    _ensure_destination(tree, dest, like_dir=True)
    if m.flags & sc.MS_BIND:
        sc.mount(m.src, dest, None, m.flags & ~sc.MS_RDONLY)
        if m.flags & sc.MS_RDONLY:
            remount_read_only(dest)
    else:
        sc.mount(m.src, dest, m.fstype, m.flags, m.data or None)
    if m.fstype == "tmpfs":
        tree.own_tmpfs.append(dest)


def build_dev(tree: _Tree) -> None:
    """A minimal /dev: a tmpfs holding a few harmless device nodes, a
    private devpts instance, and the usual symlinks."""
    dev = tree.host_path("/dev")
    _ensure_destination(tree, dev, like_dir=True)
    # Hold the host nodes first: without a new root, the tmpfs below covers
    # the very /dev they live in.
    nodes = {}
    for name in DEV_NODES:
        try:
            nodes[name] = os.open("/dev/" + name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue   # e.g. no /dev/tty in a daemon's environment
    try:
        sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755,size=64k")
        tree.own_tmpfs.append(dev)
        for name, fd in nodes.items():
            _copy_node(fd, os.path.join(dev, name))
    finally:
        for fd in nodes.values():
            os.close(fd)
    for name, to in DEV_LINKS:
        os.symlink(to, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    sc.mount("devpts", os.path.join(dev, "pts"), "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)


def _copy_node(host_fd: int, target: str) -> None:
    """The host node at `host_fd`, at `target` on the jail's /dev tmpfs: a
    node of our own with the same device number, owner and mode where we
    may make one (no user namespace; one mount fewer in the jail's table),
    else a bind of the host node (in a user namespace mknod is EPERM).
    Both open the same device under the same checks: it is the number that
    names the device.  A host node that is no character device is refused
    rather than copied or bound."""
    st = os.fstat(host_fd)
    if not stat.S_ISCHR(st.st_mode):
        raise MountError(22, f"/dev/{os.path.basename(target)} on the host is not a "
                             "character device", target)
    try:
        os.mknod(target, stat.S_IFCHR | 0o600, st.st_rdev)
    except PermissionError:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        sc.mount(f"/proc/self/fd/{host_fd}", target, None, sc.MS_BIND)
        return
    # the mode last, so that it is exactly the host's whatever our umask
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))


def mount_tmp(tree: _Tree, size: int) -> None:
    tmp = tree.host_path("/tmp")
    _ensure_destination(tree, tmp, like_dir=True)
    data = "mode=1777" + (f",size={size}" if size else "")
    sc.mount("tmpfs", tmp, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, data)
    tree.own_tmpfs.append(tmp)


def enter_pivot_root(root: str) -> None:
    # pivot_root(".", ".") stacks the old root on top of the new one; detaching
    # it then leaves only the new tree, with no directory needed for put_old.
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def mount_proc(read_only: bool) -> None:
    flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | (sc.MS_RDONLY if read_only else 0)
    if not os.path.isdir("/proc"):
        raise MountError(2, "/proc does not exist in the jail's root", "/proc")
    sc.mount("proc", "/proc", "proc", flags)
