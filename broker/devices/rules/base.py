"""What every rule shares: the verdicts, the device a rule looks at, the base
class, and the parsers for rule parameters from the broker's config.

A rule is a small class: `type` (its name in the config), `summary` (what
it is about, quoted in refusals), `params` (its config keys and their
parsers) and `check(device) -> Verdict`, a plain function of the device's
udev record and its node's stat.  Rules do no I/O except reading the
record (which reads sysfs and udev's database lazily).
"""
from __future__ import annotations

import enum
import grp
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ..record import USBFS_DRIVER, DeviceRecord


class Verdict(enum.Enum):
    ALLOW = "ALLOW"
    ALLOW_WITH_LOCKDOWN = "ALLOW_WITH_LOCKDOWN"    # open, then USBDEVFS_DROP_PRIVILEGES
    ALLOW_WITH_DETACH = "ALLOW_WITH_DETACH"        # detach kernel drivers, then open
    DENY = "DENY"
    IGNORE = "IGNORE"


ALLOW, LOCKDOWN, DETACH, DENY, IGNORE = (Verdict.ALLOW, Verdict.ALLOW_WITH_LOCKDOWN,
                                         Verdict.ALLOW_WITH_DETACH, Verdict.DENY,
                                         Verdict.IGNORE)

# What an allowing rule lets the caller do with the node, as the r and w
# bits of a permission triple.  Most rules allow a device whatever its
# node's mode says (the point of the broker: a 0600 root node, an fd for the
# caller), so they grant both.  A rule whose reason to allow is what the
# node's own permissions give (allow_group: its group's mode bits or ACL
# entry) grants only that: the front opens with CAP_DAC_OVERRIDE, so
# nothing else would stop it handing out more.
READ, WRITE = 0o4, 0o2
READ_WRITE = READ | WRITE


def _no_acl() -> bytes | None:
    return None


@dataclass(frozen=True)
class Device:
    """What a rule sees: the path as asked, the node's stat (from the fd the
    broker opened) and the udev record of the device number in that stat;
    and, asked for only by a rule that needs it, the node's access ACL
    (node_acl: its system.posix_acl_access bytes, None if it has none)."""
    path: str
    st: os.stat_result
    record: DeviceRecord
    node_acl: Callable[[], bytes | None] = _no_acl

    @property
    def gid(self) -> int:
        return self.st.st_gid


# -- POSIX ACLs (the xattr's layout: <linux/posix_acl_xattr.h>) ---------------------
ACL_XATTR_VERSION = 2
ACL_GROUP_OBJ = 0x04
_ACL_HEADER, _ACL_ENTRY = struct.Struct("<I"), struct.Struct("<HHI")   # tag, perm, id


def acl_group_obj(acl: bytes) -> int:
    """The owning group's entry (rwx as 0o7) of an access ACL; 0 if the
    bytes are not a well-formed ACL (no access from what cannot be read)."""
    body = acl[_ACL_HEADER.size:]
    if (len(acl) < _ACL_HEADER.size or _ACL_HEADER.unpack_from(acl)[0] != ACL_XATTR_VERSION
            or len(body) % _ACL_ENTRY.size):
        return 0
    for tag, perm, _id in _ACL_ENTRY.iter_unpack(body):
        if tag == ACL_GROUP_OBJ:
            return perm & 0o7
    return 0


class RuleConfigError(ValueError):
    pass


class Rule:
    type: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[dict[str, Callable[[Any, str], Any]]] = {}

    def __init__(self, name: str | None = None, lease_mode: int = 0o600,
                 readonly_fallback: bool = False, **params):
        self.name = name or self.type
        self.lease_mode = lease_mode
        self.readonly_fallback = readonly_fallback
        for key, value in params.items():
            setattr(self, key, value)

    def check(self, dev: Device) -> Verdict:
        raise NotImplementedError

    def access(self, dev: Device) -> int:
        """READ and/or WRITE: what this rule's ALLOW lets the caller do
        (asked only when check() allowed)."""
        return READ_WRITE

    def describe(self) -> str:
        return f"{self.name!r} ({self.summary})" if self.summary else repr(self.name)

    def __repr__(self) -> str:
        return f"<rule {self.name} ({self.type})>"


# -- parameter parsers: (value from TOML, where) -> value -------------------------

_HEX4 = re.compile(r"^[0-9a-fA-F]{4}$")


def usb_ids(v, where: str) -> frozenset[tuple[int, int | None]]:
    """["18d1:4ee7", "2341:*"] -> {(0x18d1, 0x4ee7), (0x2341, None)}"""
    out = set()
    for item in _list(v, where):
        vid, sep, pid = str(item).partition(":")
        if not sep or not _HEX4.match(vid) or not (pid == "*" or _HEX4.match(pid)):
            raise RuleConfigError(f"{where}: {item!r} is not VID:PID (4 hex digits each, "
                                  f"PID may be *)")
        out.add((int(vid, 16), None if pid == "*" else int(pid, 16)))
    return frozenset(out)


def usb_vendors(v, where: str) -> frozenset[int]:
    """["1d6b"] -> {0x1d6b}.  Strings only: a TOML integer would be read
    wrong either way (0x1d6b is 7531, whose digits are another vendor)."""
    out = set()
    for item in _list(v, where):
        if not isinstance(item, str) or not _HEX4.match(item):
            raise RuleConfigError(f"{where}: vendor {item!r} is not 4 hex digits")
        out.add(int(item, 16))
    return frozenset(out)


def groups(v, where: str) -> frozenset[int]:
    """Group names or gids -> gids (an unknown name is an error, as in [[grant]])."""
    out = set()
    for item in _list(v, where):
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.add(item)
            continue
        try:
            out.add(grp.getgrnam(str(item)).gr_gid)
        except KeyError:
            raise RuleConfigError(f"{where}: unknown group {item!r}") from None
    return frozenset(out)


def byte_values(v, where: str) -> frozenset[int]:
    out = set()
    for item in _list(v, where):
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= 0xFF:
            raise RuleConfigError(f"{where}: {item!r} is not a class number 0..255")
        out.add(item)
    return frozenset(out)


def names(v, where: str) -> frozenset[str]:
    out = set()
    for item in _list(v, where):
        if not isinstance(item, str) or not item:
            raise RuleConfigError(f"{where}: {item!r} is not a name")
        out.add(item)
    return frozenset(out)


def _list(v, where: str) -> list:
    if not isinstance(v, list):
        raise RuleConfigError(f"{where}: expected a list, got {v!r}")
    return v


# -- helpers the USB rules share ----------------------------------------------------

def usb_device(dev: Device) -> DeviceRecord | None:
    """The record when the node is a USB device node (usbfs), else None."""
    r = dev.record
    return r if r.subsystem == "usb" and r.devtype == "usb_device" else None


def usb_id(r: DeviceRecord) -> tuple[int | None, int | None]:
    return r.attribute_hex("idVendor"), r.attribute_hex("idProduct")


def usb_id_listed(r: DeviceRecord, ids: frozenset[tuple[int, int | None]]) -> bool:
    vid, pid = usb_id(r)
    return vid is not None and ((vid, pid) in ids or (vid, None) in ids)


def usb_interfaces(r: DeviceRecord) -> list[DeviceRecord]:
    return [c for c in r.children() if c.devtype == "usb_interface"]


# Who holds a USB interface: the one place that tells (the claimed-driver
# rule and the lockdown/detach that follows its verdict must agree).
FREE, HELD_BY_USBFS, HELD_BY_KERNEL = "free", "usbfs", "kernel"


def usb_interface_holder(iface: DeviceRecord) -> str:
    """FREE, HELD_BY_USBFS (another program's usbfs fd claimed it) or
    HELD_BY_KERNEL (a kernel driver is bound)."""
    driver = iface.driver
    if driver is None:
        return FREE
    return HELD_BY_USBFS if driver == USBFS_DRIVER else HELD_BY_KERNEL
