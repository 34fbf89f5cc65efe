"""A device's udev record, read the way libudev reads it.

For a device number (from fstat of the node the broker opened, never from a
name the caller gave) the record is

  <sysfs>/dev/{char,block}/MAJ:MIN  -> the device's directory under
                                       <sysfs>/devices (a symlink the kernel
                                       makes)
  <dir>/uevent                      the kernel's properties (SUBSYSTEM,
                                       DEVTYPE, DRIVER, PRODUCT, ...)
  <dir>/subsystem, <dir>/driver     symlinks whose last component names the
                                       subsystem and the bound driver
  <dir>/<attr>                      sysfs attributes (idVendor, ...)
  <udev_data>/{c,b}MAJ:MIN          udev's database entry: E: properties,
                                       G: tags, I: when it was initialized;
  <udev_data>/+SUBSYSTEM:SYSNAME       the same for devices without a node
  the nearest ancestor directory with a uevent file is the parent.

The two roots are configuration ([devices] sysfs, udev_data), so tests and
deployments point them at a tree of their choice; libudev (and so pyudev)
hard-wires /sys and /run/udev and can only be redirected by LD_PRELOAD
(umockdev), which a root daemon should not run under.  A device counts as
initialized when udev has written its database entry, as in sd-device.

What is read once and what every time.  A device *instance* is its sysfs
directory, identified by (st_dev, st_ino): a device that goes away and comes
back is a new directory (kernfs numbers are not reused), so a new instance.
What cannot change during an instance is kept with it (UdevReader's cache):
its subsystem, devtype, parent, and the attributes rules read (ids, classes,
descriptors), each once it was found (not there yet may be not made yet).
A hid device's report_descriptor is the exception: a driver rebind
(report_fixup, a HID-BPF program) changes it in the same directory,
announced by a uevent and a new hidraw child; rules read it with
attribute_fresh().  What can change is read again for every decision: which
device the MAJ:MIN link names, the directory's identity, bound drivers (the
driver link, uevent), children (interfaces come and go with the
configuration), and udev's database.  A rule that needs a mutable attribute
uses attribute_live().

The reader notes (`live`) when a decision read anything of the second kind
beyond the instance's identity; a decision that did not is a function of
(device instance, node group, initialized) and may be reused (core.py).
Of the second kind, the kernel announces changes of drivers, children and
the uevent file with a uevent (uevents.py); it does not announce udev's
database (written by udevd after the kernel's event), attributes read
with attribute_live(), nor a USB interface being claimed or released
through usbfs: reading that an interface is free, or held by usbfs, is
noted in `rechecks`, and a decision made on it is reused only while the
same reads give the same answers.  Reading those also sets `unannounced`: such a
decision is never reused.
"""
from __future__ import annotations

import os
import stat as stat_mod
from collections import OrderedDict

# The driver name of an interface claimed through usbfs (an open
# /dev/bus/usb node), not by a kernel driver.
USBFS_DRIVER = "usbfs"
MAX_ATTR = 64 * 1024          # a sysfs attribute is at most a page; descriptors 4 KiB
MAX_PARENTS = 64
CACHE_SIZE = 512


def _read(path: str, limit: int = MAX_ATTR) -> bytes | None:
    """A file's bytes, never following a symlink, never blocking (a FIFO
    reads as empty), None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_uevent(data: bytes | None) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            props[key] = value
    return props


class UdevDb:
    """One entry of udev's database (/run/udev/data/<id>)."""

    __slots__ = ("properties", "tags", "current_tags", "devlinks", "usec_initialized")

    def __init__(self, data: bytes):
        self.properties: dict[str, str] = {}
        self.tags: list[str] = []
        self.current_tags: list[str] = []
        self.devlinks: list[str] = []
        self.usec_initialized: int | None = None
        for line in data.decode("utf-8", "replace").splitlines():
            kind, _, value = line.partition(":")
            if kind == "E":
                key, sep, val = value.partition("=")
                if sep:
                    self.properties[key] = val
            elif kind == "G":
                self.tags.append(value)
            elif kind == "Q":
                self.current_tags.append(value)
            elif kind == "S":
                self.devlinks.append(value)
            elif kind == "I":
                try:
                    self.usec_initialized = int(value)
                except ValueError:
                    pass


_UNSET = object()


class DeviceRecord:
    """A device in sysfs plus its udev database entry (read lazily)."""

    def __init__(self, reader: "UdevReader", syspath: str, ident: tuple[int, int]):
        self.reader = reader
        self.syspath = syspath                      # real path under reader.sysfs
        self.devpath = syspath[len(reader.sysfs):]   # "/devices/..."
        self.sysname = os.path.basename(syspath)
        self.ident = ident                          # (st_dev, st_ino) of the directory
        # for the instance's life
        self._attrs: dict[str, bytes] = {}
        self._subsystem = _UNSET
        self._devtype = _UNSET
        self._parent_path = _UNSET
        self._devnum = None
        # facts rules derive from attributes (parsed descriptors), kept for the
        # instance's life: one derived from attribute_fresh() keeps the bytes it
        # was derived from and is used only while they are the same
        self.memo: dict = {}
        self.refresh()

    def refresh(self) -> None:
        """Forget what may have changed since the last decision."""
        self._uevent: dict[str, str] | None = None
        self._driver = _UNSET
        self._db = _UNSET
        self._initialized: bool | None = None
        self._children: list[DeviceRecord] | None = None

    def __repr__(self) -> str:
        return f"DeviceRecord({self.devpath!r})"

    # -- kernel side -------------------------------------------------------------
    def _kernel(self) -> dict[str, str]:
        if self._uevent is None:
            self._uevent = _parse_uevent(_read(f"{self.syspath}/uevent"))
        return self._uevent

    @property
    def uevent(self) -> dict[str, str]:
        """The kernel's properties now (DRIVER, for one, can change)."""
        self.reader.live = True
        return self._kernel()

    def _link(self, name: str) -> str | None:
        try:
            return os.path.basename(os.readlink(f"{self.syspath}/{name}"))
        except OSError:
            return None

    # What is kept for the instance's life is kept only once it was found:
    # the kernel makes a device's directory and uevent file first, and its
    # attributes and subsystem link after (device_add), announcing it only
    # then.  A request that comes in between must not leave "no subsystem"
    # or "no such attribute" behind for the rest of the instance's life.
    @property
    def subsystem(self) -> str | None:
        if self._subsystem is _UNSET:
            found = self._link("subsystem") or self._kernel().get("SUBSYSTEM")
            if found is None:
                return None
            self._subsystem = found
        return self._subsystem

    @property
    def devtype(self) -> str | None:
        if self._devtype is _UNSET:
            found = self._kernel().get("DEVTYPE")
            if found is None:
                return None
            self._devtype = found
        return self._devtype

    @property
    def driver(self) -> str | None:
        self.reader.live = True
        if self._driver is _UNSET:
            self._driver = self._link("driver")      # as sd-device: the link only
        if self._driver in (None, USBFS_DRIVER) and self.devtype == "usb_interface":
            # Any program with a usbfs fd may claim a free interface, or
            # release its claim, at any time, and the kernel suppresses the
            # uevents of those binds (drivers/usb/core/devio.c, claimintf and
            # releaseintf): a decision that read this is reused only after
            # the same read gives the same answer (reader.rechecks, core.py).
            self.reader.rechecks.append((self, self._driver))
        return self._driver

    def driver_now(self) -> str | None:
        """The bound driver as the link says at this moment (for rechecks)."""
        return self._link("driver")

    @property
    def devnum(self) -> tuple[str, int, int] | None:
        """("c" or "b", major, minor), or None for a device without a node."""
        if self._devnum is None:
            u = self._kernel()
            if "MAJOR" in u and "MINOR" in u:
                kind = "b" if self.subsystem == "block" else "c"
                try:
                    self._devnum = (kind, int(u["MAJOR"]), int(u["MINOR"]))
                except ValueError:
                    pass
        return self._devnum

    @staticmethod
    def _check_name(name: str) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not an attribute name: {name!r}")

    def attribute(self, name: str) -> bytes | None:
        """A sysfs attribute that is fixed for the device's life (ids, classes,
        descriptors): read once per instance.  None if absent; never follows a
        symlink and never leaves the device's directory."""
        value = self._attrs.get(name)
        if value is None:
            self._check_name(name)
            value = _read(f"{self.syspath}/{name}")
            if value is not None:       # absent now may be not made yet (above)
                self._attrs[name] = value
        return value

    def attribute_fresh(self, name: str) -> bytes | None:
        """An attribute that can change within this instance, but only with a
        kernel uevent and a new instance of the child being decided about
        (report_descriptor: a rebind re-creates the hidraw node's directory).
        Read now and not kept, so every decision made afresh sees the current
        value; the decision itself may still be remembered (no `live` mark),
        as core.py forgets it on the uevent and the new child is a new key."""
        self._check_name(name)
        return _read(f"{self.syspath}/{name}")

    def attribute_live(self, name: str) -> bytes | None:
        """An attribute that may change (authorized, power/...): read now."""
        self.reader.live = self.reader.unannounced = True
        self._check_name(name)
        return _read(f"{self.syspath}/{name}")

    def attribute_str(self, name: str) -> str | None:
        raw = self.attribute(name)
        return None if raw is None else raw.decode("utf-8", "replace").strip()

    def attribute_hex(self, name: str) -> int | None:
        """An attribute holding a hex number (idVendor, bInterfaceClass, ...)."""
        s = self.attribute_str(name)
        try:
            return None if s is None else int(s, 16)
        except ValueError:
            return None

    # -- udev side ---------------------------------------------------------------
    def db_id(self) -> str:
        if self.devnum is not None:
            kind, major, minor = self.devnum
            return f"{kind}{major}:{minor}"
        return f"+{self.subsystem}:{self.sysname}"

    @property
    def db(self) -> UdevDb | None:
        self.reader.live = self.reader.unannounced = True
        if self._db is _UNSET:
            data = _read(f"{self.reader.udev_data}/{self.db_id()}", 1 << 20)
            self._db = None if data is None else UdevDb(data)
            self._initialized = self._db is not None
        return self._db

    @property
    def is_initialized(self) -> bool:
        """udev has written the device's database entry (a stat, no read)."""
        if self._initialized is None:
            try:
                self._initialized = stat_mod.S_ISREG(
                    os.stat(f"{self.reader.udev_data}/{self.db_id()}",
                            follow_symlinks=False).st_mode)
            except OSError:
                self._initialized = False
        return self._initialized

    @property
    def properties(self) -> dict[str, str]:
        """Kernel properties overlaid with udev's, as libudev reports them."""
        props = dict(self.uevent)
        for key, value in (("SUBSYSTEM", self.subsystem), ("DRIVER", self.driver)):
            if value and key not in props:
                props[key] = value
        db = self.db
        if db is not None:
            props.update(db.properties)
            # what sd-device synthesizes from the database's S:, G:, Q: lines
            if db.devlinks:
                props["DEVLINKS"] = " ".join(f"/dev/{link}" for link in db.devlinks)
            if db.tags:
                props["TAGS"] = ":" + ":".join(db.tags) + ":"
            if db.current_tags:
                props["CURRENT_TAGS"] = ":" + ":".join(db.current_tags) + ":"
        return props

    @property
    def tags(self) -> list[str]:
        return list(self.db.tags) if self.db is not None else []

    # -- tree ----------------------------------------------------------------------
    @property
    def parent(self) -> "DeviceRecord | None":
        if self._parent_path is _UNSET:
            self._parent_path = None
            top = f"{self.reader.sysfs}/devices/"
            d = os.path.dirname(self.syspath)
            while d.startswith(top):
                if os.path.isfile(f"{d}/uevent"):
                    self._parent_path = d
                    break
                d = os.path.dirname(d)
        return None if self._parent_path is None else self.reader.at(self._parent_path)

    def parents(self):
        p, n = self.parent, 0
        while p is not None and n < MAX_PARENTS:
            yield p
            p, n = p.parent, n + 1

    def find_parent(self, subsystem: str, devtype: str | None = None) -> "DeviceRecord | None":
        for p in self.parents():
            if p.subsystem == subsystem and (devtype is None or p.devtype == devtype):
                return p
        return None

    def children(self) -> list["DeviceRecord"]:
        """Direct child devices (subdirectories that are devices), read now."""
        self.reader.live = True
        if self._children is None:
            kids = []
            try:
                with os.scandir(self.syspath) as entries:
                    paths = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                paths = []
            for path in sorted(paths):
                if os.path.isfile(f"{path}/uevent"):
                    kid = self.reader.at(path)
                    if kid is not None:
                        kids.append(kid)
            self._children = kids
        return self._children


class UdevReader:
    """Finds device records under a sysfs root and a udev database directory."""

    def __init__(self, sysfs: str = "/sys", udev_data: str = "/run/udev/data",
                 cache_size: int = CACHE_SIZE):
        self.sysfs = os.path.realpath(sysfs)
        self.udev_data = udev_data
        self.cache_size = cache_size
        self._cache: OrderedDict[str, DeviceRecord] = OrderedDict()
        self.live = False       # set by any read of what may change within an instance
        self.unannounced = False  # ... of what changes without a kernel uevent
        # (record, driver seen): reads of a USB interface's driver that no
        # uevent would tell us about, to be repeated before a reuse
        self.rechecks: list[tuple[DeviceRecord, str | None]] = []

    def at(self, syspath: str) -> DeviceRecord | None:
        """The record of the device directory at syspath, as it is now."""
        try:
            st = os.stat(syspath, follow_symlinks=False)
        except OSError:
            return None
        if not stat_mod.S_ISDIR(st.st_mode):
            return None
        ident = (st.st_dev, st.st_ino)
        rec = self._cache.get(syspath)
        if rec is not None and rec.ident == ident:
            self._cache.move_to_end(syspath)
            rec.refresh()
            return rec
        rec = DeviceRecord(self, syspath, ident)
        self._cache[syspath] = rec
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return rec

    def for_devnum(self, kind: str, major: int, minor: int) -> DeviceRecord | None:
        """The record of char ("c") or block ("b") device MAJ:MIN, or None."""
        link = f"{self.sysfs}/dev/{'char' if kind == 'c' else 'block'}/{major}:{minor}"
        try:
            target = os.readlink(link)
        except OSError:
            return None
        syspath = os.path.normpath(os.path.join(os.path.dirname(link), target))
        if not syspath.startswith(f"{self.sysfs}/devices/"):
            return None                 # a link that leaves sysfs names no device
        rec = self.at(syspath)
        if rec is not None:
            rec._devnum = (kind, major, minor)
        return rec

    def for_stat(self, st: os.stat_result) -> DeviceRecord | None:
        if stat_mod.S_ISCHR(st.st_mode):
            kind = "c"
        elif stat_mod.S_ISBLK(st.st_mode):
            kind = "b"
        else:
            return None
        return self.for_devnum(kind, os.major(st.st_rdev), os.minor(st.st_rdev))
