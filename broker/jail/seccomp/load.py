"""Install a compiled seccomp program in the calling process.

This runs in the forked child as the last step before exec, so everything it
needs is imported and set up here, at module import; the call itself
imports nothing and allocates two small ctypes objects (or none, with
prepare_filter() in the parent and PreparedFilter.load() in the child).

The kernel requires no_new_privs (prctl PR_SET_NO_NEW_PRIVS) or
CAP_SYS_ADMIN; EACCES says which is missing.
"""
from __future__ import annotations

import ctypes
import os

SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277}.get(os.uname().machine)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4
BPF_MAXINSNS = 4096
_INSN = 8

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p)
_get_errno = ctypes.get_errno
_strerror = os.strerror


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class PreparedFilter:
    """A program ready to load: the buffer and the sock_fprog pointing at it."""
    __slots__ = ("_buf", "_prog", "_ptr", "flags")

    def __init__(self, bpf: bytes, tsync: bool = True, log: bool = False):
        n, rem = divmod(len(bpf), _INSN)
        if rem or not 0 < n <= BPF_MAXINSNS:
            raise ValueError(f"a seccomp program is 1..{BPF_MAXINSNS} instructions of "
                             f"{_INSN} bytes; got {len(bpf)} bytes")
        self._buf = ctypes.create_string_buffer(bytes(bpf), len(bpf))
        self._prog = _SockFprog(n, ctypes.addressof(self._buf))
        self._ptr = ctypes.addressof(self._prog)
        self.flags = (SECCOMP_FILTER_FLAG_TSYNC if tsync else 0) | \
            (SECCOMP_FILTER_FLAG_LOG if log else 0)

    def __reduce__(self):
        """Pickled as its program and flags: a seed process gets its jail's
        filter from L that way (launch.py)."""
        return (_prepared_again, (self._buf.raw, self.flags))

    def load(self) -> None:
        """seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog); OSError on failure."""
        if SYS_SECCOMP is None:
            raise OSError(38, "seccomp: unsupported architecture")
        r = _syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, self.flags, self._ptr)
        if r == 0:
            return
        if r > 0:      # TSYNC: this thread id could not be synchronized
            raise OSError(0, f"seccomp: thread {r} has a diverging filter (TSYNC failed)")
        err = _get_errno()
        if err == 13:  # EACCES
            raise OSError(err, "seccomp: installing a filter needs no_new_privs "
                               "(prctl PR_SET_NO_NEW_PRIVS) or CAP_SYS_ADMIN")
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {_strerror(err)}")


def _prepared_again(bpf: bytes, flags: int) -> PreparedFilter:
    f = PreparedFilter(bpf)
    f.flags = flags
    return f


def prepare_filter(bpf: bytes, tsync: bool = True, log: bool = False) -> PreparedFilter:
    """Validate and set up a program in the parent; load it later with .load()."""
    return PreparedFilter(bpf, tsync, log)


def load_filter(bpf: bytes, tsync: bool = True, log: bool = False) -> None:
    """Install `bpf` (a raw sock_filter array) for the calling process.

    tsync: apply to every thread of the process (SECCOMP_FILTER_FLAG_TSYNC).
    log: also log every action but allow (SECCOMP_FILTER_FLAG_LOG)."""
    PreparedFilter(bpf, tsync, log).load()


def load_filter_file(path: str, tsync: bool = True) -> None:
    """Install a compiled program read from a file (minijail's --seccomp-bpf-binary)."""
    with open(path, "rb") as f:
        data = f.read()
    load_filter(data, tsync)
