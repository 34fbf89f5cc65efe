"""What ALLOW_WITH_LOCKDOWN and ALLOW_WITH_DETACH do to a usbfs fd.

  lockdown(fd, allowed)   USBDEVFS_DROP_PRIVILEGES with the mask of the
                          interfaces the fd may claim (the unclaimed ones):
                          afterwards the fd cannot claim others, cannot
                          detach kernel drivers (USBDEVFS_DISCONNECT*), and
                          cannot reset or reconfigure the device.  One-way.
  detach(fd, interfaces)  USBDEVFS_DISCONNECT_CLAIM with
                          ..._EXCEPT_DRIVER "usbfs" for each interface a
                          kernel driver holds: the driver is unbound and the
                          interface claimed for this fd in one step, so no
                          driver can rebind in between.  The claims go when
                          the fd is closed; the kernel drivers come back on
                          the next probe (replug, or a bind through sysfs).
                          As permission_broker's OpenPath, no lifeline.

The ioctl function is a parameter so tests can see the exact requests.
Request numbers are _IOW/_IOR of <linux/usbdevice_fs.h>; a test compiles
against the installed header and compares.
"""
from __future__ import annotations

import fcntl
import struct
from typing import Callable, Iterable

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, typ: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(typ) << 8) | nr


USBDEVFS_DISCONNECT_CLAIM_IF_DRIVER = 0x01
USBDEVFS_DISCONNECT_CLAIM_EXCEPT_DRIVER = 0x02
USBDEVFS_MAXDRIVERNAME = 255
# struct usbdevfs_disconnect_claim { unsigned int interface; unsigned int flags;
#                                    char driver[USBDEVFS_MAXDRIVERNAME + 1]; }
_DISCONNECT_CLAIM = struct.Struct(f"II{USBDEVFS_MAXDRIVERNAME + 1}s")
USBDEVFS_DISCONNECT_CLAIM = _ioc(_IOC_READ, "U", 27, _DISCONNECT_CLAIM.size)
USBDEVFS_DROP_PRIVILEGES = _ioc(_IOC_WRITE, "U", 30, 4)

Ioctl = Callable[[int, int, bytes], object]


def lockdown(fd: int, allowed_interfaces: Iterable[int], ioctl: Ioctl = fcntl.ioctl) -> int:
    mask = 0
    for n in allowed_interfaces:
        if 0 <= n < 32:
            mask |= 1 << n
    ioctl(fd, USBDEVFS_DROP_PRIVILEGES, struct.pack("I", mask))
    return mask


class DetachFailed(Exception):
    """DISCONNECT_CLAIM failed for `interface`, after `detached` were done
    (their drivers are already unbound: the caller must say so)."""

    def __init__(self, interface: int, detached: list[int], cause: OSError):
        super().__init__(f"interface {interface}: {cause}")
        self.interface, self.detached, self.cause = interface, detached, cause


def detach(fd: int, interfaces: Iterable[int], ioctl: Ioctl = fcntl.ioctl) -> list[int]:
    done = []
    for n in interfaces:
        try:
            ioctl(fd, USBDEVFS_DISCONNECT_CLAIM,
                  _DISCONNECT_CLAIM.pack(n, USBDEVFS_DISCONNECT_CLAIM_EXCEPT_DRIVER, b"usbfs"))
        except OSError as e:
            raise DetachFailed(n, done, e) from e
        done.append(n)
    return done
