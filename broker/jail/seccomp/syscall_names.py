"""Syscall names -> numbers for the running architecture.

libseccomp (through pyseccomp) knows the names.  Its table stops at the
kernel it was released for (2.5.4 here: nothing after futex_requeue, 456),
while the running kernel may be newer; real policies list mseal (462).  So a
small supplement gives the x86_64 numbers (a stable ABI) of syscalls newer
than libseccomp, consulted only when libseccomp does not know a name.

libseccomp answers a negative "pseudo-syscall" number for a name that exists
only on other architectures (socketcall, mmap2 on x86_64): that is "no such
syscall here", never a number to filter on.
"""
from __future__ import annotations

import os

# x86_64 syscall numbers newer than (some builds of) libseccomp 2.5.x, from
# the kernel's arch/x86/entry/syscalls/syscall_64.tbl.  Up to what the
# running kernel (6.18) implements.
NEWER_THAN_LIBSECCOMP = {
    "x86_64": {
        "futex_waitv": 449, "set_mempolicy_home_node": 450, "cachestat": 451,
        "fchmodat2": 452, "map_shadow_stack": 453, "futex_wake": 454,
        "futex_wait": 455, "futex_requeue": 456, "statmount": 457,
        "listmount": 458, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460,
        "lsm_list_modules": 461, "mseal": 462, "setxattrat": 463,
        "getxattrat": 464, "listxattrat": 465, "removexattrat": 466,
        "open_tree_attr": 467, "file_getattr": 468, "file_setattr": 469,
    },
}
TABLE_VERSION = 1

# AUDIT_ARCH_* of the architectures this module can compile for, and whether
# their seccomp_data is little-endian.
AUDIT_ARCH = {
    "x86_64": (0xC000003E, True),
    "aarch64": (0xC00000B7, True),
    "riscv64": (0xC00000F3, True),
}

_cache: dict[str, int | None] = {}
_reverse: dict[int, str | None] = {}


def arch() -> str:
    return os.uname().machine


def audit_arch() -> tuple[int, bool]:
    """(AUDIT_ARCH value, little-endian) for the running architecture."""
    try:
        return AUDIT_ARCH[arch()]
    except KeyError:
        raise RuntimeError(f"seccomp policies are not supported on {arch()}") from None


def _libseccomp():
    import pyseccomp      # lazily: a cached filter never needs it
    return pyseccomp


def number(name: str) -> int | None:
    """The syscall's number on this architecture, or None if it has none."""
    if name in _cache:
        return _cache[name]
    nr = None
    try:
        sc = _libseccomp()
        r = sc.resolve_syscall(sc.system_arch(), name)
        if isinstance(r, int) and r >= 0:
            nr = r
    except (OSError, RuntimeError, ValueError):
        nr = None
    if nr is None:
        nr = NEWER_THAN_LIBSECCOMP.get(arch(), {}).get(name)
    _cache[name] = nr
    return nr


def name(nr: int) -> str | None:
    """The syscall name for a number on this architecture, or None."""
    if nr in _reverse:
        return _reverse[nr]
    found = None
    try:
        sc = _libseccomp()
        r = sc.resolve_syscall(sc.system_arch(), nr)
        found = r.decode() if isinstance(r, bytes) else r
    except (OSError, RuntimeError, ValueError):
        pass
    if found is None:
        for n, v in NEWER_THAN_LIBSECCOMP.get(arch(), {}).items():
            if v == nr:
                found = n
    _reverse[nr] = found
    return found


def version() -> str:
    """What the name table depends on: libseccomp's version and the supplement."""
    try:
        import ctypes
        sc = _libseccomp()
        lib = sc._libseccomp                     # the loaded libseccomp.so

        class _V(ctypes.Structure):
            _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint),
                        ("micro", ctypes.c_uint)]
        lib.seccomp_version.restype = ctypes.POINTER(_V)
        v = lib.seccomp_version().contents
        lib_version = f"{v.major}.{v.minor}.{v.micro}"
    except Exception:           # noqa: BLE001 - any failure just means "unknown"
        lib_version = "unknown"
    return f"libseccomp-{lib_version}+sup{TABLE_VERSION}-{arch()}"
