"""The raw kernel calls the jail engine needs that Python's stdlib lacks.

Everything that goes through ctypes lives here, so a reader (or a test) sees
every raw syscall in one small module.  Each wrapper raises OSError with the
errno and the path or operation, never returns a C error code.

prctl operations that python-prctl covers (no_new_privs, pdeathsig,
securebits, bounding set, keepcaps, subreaper) are re-exported from it; only
what it lacks (ambient capabilities, exact 64-bit capset) is done here.
"""
from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# x86_64 syscall numbers (a stable ABI); only those glibc 2.36 has no wrapper for.
SYS_pivot_root = 155
SYS_capget = 125
SYS_capset = 126

# clone(2) namespace flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NS_FLAGS = {
    "user": CLONE_NEWUSER, "pid": CLONE_NEWPID, "mount": CLONE_NEWNS,
    "net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
}

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2

# prctl(2) options python-prctl does not cover
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28

_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


# Called with the GIL held (PyDLL): the child must start with the
# interpreter exactly as the parent had it, mid-call, GIL taken.
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.fork.restype = ctypes.c_int
_libc_gil.fork.argtypes = ()


def fork_bare() -> int:
    """libc fork() without the interpreter's at-fork work (os.register_at_fork
    hooks, thread-state cleanup).  Only for a single-threaded caller with
    its signals blocked: launch._fork decides when it is safe."""
    return _check(_libc_gil.fork(), "fork")


MADV_POPULATE_WRITE = 23      # Linux 5.14: fault pages in writable, copying what is shared


def madvise(addr: int, length: int, advice: int) -> None:
    _check(_libc.madvise(addr, length, advice), "madvise")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None,
          flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_pivot_root, _b(new_root), _b(put_old)),
           "pivot_root", new_root)


# -- capabilities -------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# The array type made once here: ctypes builds a new class for `_CapData * 2`
# the first time it is asked, which would be in every jail's child.
_CapData2 = _CapData * 2


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapData2()
    _check(_libc.syscall(SYS_capget, ctypes.byref(hdr), data), "capget")
    join = lambda f: getattr(data[0], f) | (getattr(data[1], f) << 32)  # noqa: E731
    return join("effective"), join("permitted"), join("inheritable")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's three capability sets to exactly these masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapData2()
    for i, shift in enumerate((0, 32)):
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.syscall(SYS_capset, ctypes.byref(hdr), data), "capset")


def cap_ambient_raise(cap: int) -> None:
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0),
           f"prctl(PR_CAP_AMBIENT_RAISE, {cap})")


def cap_ambient_clear_all() -> None:
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
           "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")


def set_securebits(bits: int) -> None:
    # python-prctl's set_securebits takes named flags; we need an exact mask.
    _check(_libc.prctl(PR_SET_SECUREBITS, bits, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")


def last_cap() -> int:
    """The highest capability number this kernel knows (a constant of the
    running kernel: read once, in the launcher, not in every jail)."""
    global _last_cap
    if _last_cap is None:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            _last_cap = int(f.read())
    return _last_cap


_last_cap: int | None = None


# -- keyctl(2) -----------------------------------------------------------------
SYS_keyctl = 250
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEY_SPEC_SESSION_KEYRING = -3


def join_new_session_keyring() -> int:
    """Create an anonymous session keyring and make it ours; its serial."""
    return _check(_libc.syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, None),
                  "keyctl(KEYCTL_JOIN_SESSION_KEYRING)")


def session_keyring_id() -> int:
    """The serial of our session keyring (creating none)."""
    return _check(_libc.syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID,
                                ctypes.c_int(KEY_SPEC_SESSION_KEYRING), 0),
                  "keyctl(KEYCTL_GET_KEYRING_ID)")


# -- fstatfs(2): which file system an fd is on ----------------------------------
# os.statvfs has no f_type.  struct statfs is 120 bytes on x86_64; f_type (a
# long) is its first field.
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)


def fs_type(fd: int) -> int:
    """f_type of the file system `fd` (an O_PATH fd will do) is on."""
    buf = ctypes.create_string_buffer(120)
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return ctypes.c_long.from_buffer(buf).value


# -- openat2(2) ----------------------------------------------------------------
# (linux/openat2.h) how path resolution may go; x86_64 syscall 437, Linux 5.6+.
SYS_openat2 = 437
RESOLVE_NO_XDEV = 0x01        # no crossing of mount points
RESOLVE_NO_MAGICLINKS = 0x02  # no /proc/*/fd-style magic links
RESOLVE_NO_SYMLINKS = 0x04    # no symlinks at all (implies NO_MAGICLINKS)
RESOLVE_BENEATH = 0x08        # never leave dirfd (no absolute paths, no escaping "..")
RESOLVE_IN_ROOT = 0x10        # treat dirfd as "/"
RESOLVE_CACHED = 0x20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_OPEN_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
_open_hows: dict[tuple[int, int, int], object] = {}   # (flags, mode, resolve) -> byref


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(dirfd, path, {flags, mode, resolve}) -> fd.  OSError(ENOSYS)
    on kernels before 5.6; ELOOP for a refused symlink, EXDEV for a path
    that would leave dirfd."""
    # The kernel only reads the struct: one per combination, made once (a
    # caller such as the device core uses a single one on its hot path).
    how = _open_hows.get((flags, mode, resolve))
    if how is None:
        how = _open_hows[(flags, mode, resolve)] = ctypes.byref(_OpenHow(flags, mode, resolve))
    return _check(_libc.syscall(SYS_openat2, ctypes.c_int(dirfd), os.fsencode(path),
                                how, _OPEN_HOW_SIZE), "openat2", path)


# -- the mount API of fds: open_tree(2), move_mount(2), mount_setattr(2) -------
# x86_64 syscalls 428 and 429 (Linux 5.2) and 442 (5.12).  A bind mount made
# with them is cloned detached from an fd, given its flags while nobody can
# see it, and only then attached onto another fd: no path is looked up twice
# and there is no moment when the mount exists without its flags.
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442

AT_EMPTY_PATH = 0x1000        # the fd itself is the object (path "")
AT_RECURSIVE = 0x8000         # open_tree/mount_setattr: the whole subtree
OPEN_TREE_CLONE = 1           # a detached copy (a bind mount not yet attached)
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
UMOUNT_NOFOLLOW = 8           # umount2: never follow a symlink as the last component


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """open_tree(dirfd, path, flags) -> an fd for the mount (with
    OPEN_TREE_CLONE: a detached bind mount, freed when the fd is closed
    unless move_mount attached it)."""
    return _check(_libc.syscall(SYS_open_tree, ctypes.c_int(dirfd), _b(path),
                                ctypes.c_uint(flags)), "open_tree", path)


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str,
               flags: int) -> None:
    """move_mount(2): attach (or move) the mount at from onto to."""
    _check(_libc.syscall(SYS_move_mount, ctypes.c_int(from_dirfd), _b(from_path),
                         ctypes.c_int(to_dirfd), _b(to_path), ctypes.c_uint(flags)),
           "move_mount", to_path or None)


def mount_setattr(dirfd: int, path: str, flags: int, attr_set: int = 0, attr_clr: int = 0,
                  propagation: int = 0) -> None:
    """mount_setattr(2): change a mount's MOUNT_ATTR_* flags and/or its
    propagation (MS_SHARED, MS_SLAVE, MS_PRIVATE, MS_UNBINDABLE; 0: unchanged)."""
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    _check(_libc.syscall(SYS_mount_setattr, ctypes.c_int(dirfd), _b(path),
                         ctypes.c_uint(flags), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr", path or None)


# -- bpf(2): a cgroup device program (cgroup v2's device allow list) -----------
# x86_64 syscall 321.  Only the two commands the device filter needs.
SYS_bpf = 321
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6                 # attach type
BPF_F_ALLOW_MULTI = 2                 # programs below may only add checks, never lift ours


class _BpfProgLoad(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD (the kernel takes a
    shorter attr as if the rest were zero)."""
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16)]


class _BpfProgAttach(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32)]


def bpf_prog_load_cgroup_device(insns: bytes, name: bytes, license: bytes) -> int:
    """Load a BPF_PROG_TYPE_CGROUP_DEVICE program (8-byte instructions);
    its fd.  A program the verifier refuses raises OSError with the
    verifier's log as the message."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _BpfProgLoad(prog_type=BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(insns) // 8,
                        insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                        prog_name=name[:15])

    def load() -> int:
        return _libc.syscall(SYS_bpf, ctypes.c_int(BPF_PROG_LOAD), ctypes.byref(attr),
                             ctypes.c_uint(ctypes.sizeof(attr)))
    ret = load()
    if ret != -1:
        return ret
    # Refused: again with the verifier's log, to say why (a transient
    # failure may load this time, which is as good)
    log = ctypes.create_string_buffer(1 << 16)
    attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    ret = load()
    if ret != -1:
        return ret
    err = ctypes.get_errno()
    verifier = log.value.decode(errors="replace").strip()
    raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}"
                       + (f"; the verifier said: {verifier[-400:]}" if verifier else ""))


def bpf_prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
    """Attach a loaded program to a cgroup (target_fd: its directory)."""
    attr = _BpfProgAttach(target_fd=target_fd, attach_bpf_fd=prog_fd,
                          attach_type=attach_type, attach_flags=flags)
    _check(_libc.syscall(SYS_bpf, ctypes.c_int(BPF_PROG_ATTACH), ctypes.byref(attr),
                         ctypes.c_uint(ctypes.sizeof(attr))), "bpf(BPF_PROG_ATTACH)")
