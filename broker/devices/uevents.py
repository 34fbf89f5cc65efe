"""Kernel uevents, used only as "something in sysfs may have changed".

The device core remembers decisions (core.py).  A decision that read a
device's driver bindings or its children (a USB device's interfaces) read
what can change while the device stays plugged in; the kernel announces
every such change with a uevent on NETLINK_KOBJECT_UEVENT (group 1): "add"
and "remove" of an interface, "bind" and "unbind" of a driver (Linux 4.14+),
"change".  The kernel queues the uevent on every listening socket before the
write or ioctl that caused the change returns, so a change that has
happened before a request is in our socket by the time the request drains
it.  Hence the rule the core follows: drain first, and if anything at all
arrived, forget every remembered decision; only then look at sysfs.

What this monitor never does is trust an event's content: any datagram, a
lost-events error (ENOBUFS: the queue overflowed) or a broken socket counts
as "changed".  A forged or stray event can only cost a re-read; a missed one
cannot happen silently.  What the kernel does *not* announce stays out of
this scheme (record.py: `unannounced`): udev's database (udevd rewrites it
after the kernel's event, with no kernel event of its own) and attributes
read with attribute_live() (power state, ...).  Decisions that read those
are never remembered.

The socket is opened on first use, i.e. in the confined front, which may
create AF_NETLINK sockets (broker/front.policy); receiving group 1 needs no
privilege (NL_CFG_F_NONROOT_RECV).
"""
from __future__ import annotations

import errno
import os
import select
import socket

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
RCVBUF = 1 << 20                 # a burst of plugging; overflow is handled anyway
# bind/unbind uevents (a driver's claim on an interface) exist since 4.14;
# before that, a binding changed silently and nothing may be remembered.
MIN_KERNEL = (4, 14)


def _kernel_announces_bindings(release: str | None = None) -> bool:
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_KERNEL


class UeventMonitor:
    """A non-blocking NETLINK_KOBJECT_UEVENT socket; `changed()` drains it."""

    def __init__(self, kernel_release: str | None = None):
        self.sock: socket.socket | None = None
        self.why_not = ""               # when not watching: why (for the status line)
        if not _kernel_announces_bindings(kernel_release):
            self.why_not = "kernel older than 4.14 (no bind/unbind uevents)"
            return
        try:
            sock = socket.socket(socket.AF_NETLINK,
                                 socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 NETLINK_KOBJECT_UEVENT)
        except OSError as e:
            self.why_not = f"cannot open a uevent socket: {e.strerror}"
            return
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            except OSError:
                pass                    # the default size; overflow still counts as a change
            sock.bind((0, KERNEL_GROUP))
        except OSError as e:
            sock.close()
            self.why_not = f"cannot listen for uevents: {e.strerror}"
            return
        self.sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._buf = bytearray(8192)

    @property
    def watching(self) -> bool:
        return self.sock is not None

    def changed(self) -> bool:
        """Did the kernel announce anything (or lose announcements) since the
        last call?  Always True when not watching."""
        if self.sock is None:
            return True
        if not self._poll.poll(0):       # the common case: one syscall, no exception
            return False
        while True:
            try:
                self.sock.recv_into(self._buf)
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue            # events were lost: already counted as a change
                self.close()            # broken: stop remembering what events guard
                self.why_not = f"uevent socket failed: {e.strerror}"
                return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
