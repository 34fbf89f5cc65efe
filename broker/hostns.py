"""The launcher's way back to the host's mount table.

Under systemd the broker runs in a private mount namespace that the unit's
ProtectSystem=, ProtectHome=, PrivateTmp=, ... create
(systemd/privbrokerd.service).  Its mounts are slaves of the host's: what
the host mounts shows up inside, what is mounted inside never reaches the
host.  That read-only, private view is right for the front (the D-Bus
service and every parser of untrusted input), and wrong for the two duties
that act on the host's mount table itself:

  - jails are built from what the host sees: a bind of a user's directory
    that the profile marks writable must be writable, /tmp is the host's;
  - daemon-store mounts must reach daemons that run outside the broker.

Both are the launcher's (DESIGN.md, "Privilege separation"), so privbrokerd
forks the launcher from inside the host's mount namespace, which it enters
for that moment (and for making the daemon-store run dirs shared mount
points) through a namespace file the unit names (privbrokerd
--launcher-mount-namespace /proc/1/ns/mnt), then returns to its own.  Without the option nothing changes: tests, `make run` and
a broker started by hand stay in the namespace they were started in.

Opening another process's /proc/PID/ns/mnt is a ptrace-read access check,
and pid 1 holds capabilities outside the broker's bounding set, so that one
open() needs CAP_SYS_PTRACE.  `drop_ptrace()` then removes it from every
set, bounding set included, in the process that opened the file, before the
launcher is forked and before the front reads a byte from the bus: no jail
and no later code can hold it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import prctl

from .jail import syscalls as sc

NS_GET_NSTYPE = 0xB703      # linux/nsfs.h: _IO(0xb7, 0x3)


class HostNamespaceError(Exception):
    """The namespace file cannot be used; the message names it and why."""


def open_mount_namespace(path: str) -> int:
    """An fd for the mount namespace file `path`, checked to be one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        hint = (" (opening another process's namespace needs CAP_SYS_PTRACE, "
                "which the unit keeps for this)" if e.errno in (1, 13) else "")
        raise HostNamespaceError(f"{path}: {e.strerror}{hint}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != sc.CLONE_NEWNS:
        os.close(fd)
        raise HostNamespaceError(f"{path} is not a mount namespace file")
    return fd


def drop_ptrace() -> None:
    """CAP_SYS_PTRACE out of the bounding, permitted, effective and
    inheritable sets of this process (a no-op where it is not held)."""
    if prctl.capbset.sys_ptrace:
        try:
            prctl.capbset.drop("sys_ptrace")
        except OSError:
            # Without CAP_SETPCAP (not root): nor do we hold CAP_SYS_PTRACE.
            if prctl.cap_permitted.sys_ptrace:
                raise
    for caps in (prctl.cap_effective, prctl.cap_inheritable, prctl.cap_permitted):
        if caps.sys_ptrace:
            caps.drop("sys_ptrace")


@contextlib.contextmanager
def entered(fd: int | None):
    """Run the block in the mount namespace `fd`, then return to our own.

    privbrokerd wraps in it what must act on the host's mount table before
    the bus is touched: the daemon-store run dirs made shared mount points,
    and the fork of the launcher, which so lives in the host's namespace for
    good.  `fd` None: the block runs where we are.  Single-threaded callers
    only: the kernel refuses CLONE_NEWNS to a thread sharing its fs."""
    if fd is None:
        yield
        return
    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.setns(fd, sc.CLONE_NEWNS)
        os.chdir("/")           # setns() set root and cwd to that namespace's root
        try:
            yield
        finally:
            sc.setns(own, sc.CLONE_NEWNS)
            os.chdir("/")
    finally:
        os.close(own)


def enter(fd: int) -> None:
    """Join the mount namespace `fd` for good (the launcher, in privbrokerd's
    main process, once the front is forked).  Single-threaded callers only."""
    sc.setns(fd, sc.CLONE_NEWNS)
    os.chdir("/")
