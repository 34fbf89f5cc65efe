"""Device records for tests: umockdev recordings turned into a sysfs tree and
a udev database that the broker reads ([devices] sysfs, udev_data).

    tree = UdevTree(root)                       # root/sys, root/run/udev/data
    tree.load(DEVICES / "usb.umockdev")         # recordings (umockdev-record format)
    tree.load(..., uninitialized={"hidraw2"})   # no udev db entry for these
    tree.load(..., devnums={"hidraw0": (1, 5)}) # give a device another number
    make_node(dev_root, "hidraw0", "c", 1, 5, mode=0o600, gid=0)

Why not umockdev's own preload: libudev (and so pyudev) reads /sys and
/run/udev and can only be redirected with LD_PRELOAD=libumockdev-preload,
i.e. by running the root daemon under a library that rewrites its file
system calls; the broker's own openat2 (a raw syscall) would bypass it
anyway, and umockdev 0.17 writes no udev database, so every device looks
uninitialized and tagless.  So the broker reads sysfs and the database
itself, from configurable roots, and this fixture writes exactly the files
those readers read, from the same recordings umockdev uses.  What is udev's
and what is the kernel's in a recording's E: lines: ID_*, TAGS, CURRENT_TAGS,
DEVLINKS and dotted keys go to the database, the rest to uevent.
test_device_record.py checks the result against libudev (pyudev), both on
this machine's real /sys and under umockdev-run with the same recordings.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = Path(__file__).resolve().parent / "devices"
BUS_SUBSYSTEMS = {"usb", "hid", "pci", "platform", "usb-serial", "scsi", "serio", "i2c"}
USEC = 1_700_000_000_000_000


@dataclass
class Recorded:
    devpath: str
    node: str | None = None
    props: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


def _unescape(v: str) -> bytes:
    out, i = bytearray(), 0
    while i < len(v):
        if v[i] == "\\" and i + 1 < len(v):
            out += {"n": b"\n", "\\": b"\\", "t": b"\t"}.get(v[i + 1], v[i:i + 2].encode())
            i += 2
        else:
            out += v[i].encode()
            i += 1
    return bytes(out)


def parse(text: str) -> list[Recorded]:
    devices: list[Recorded] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        dev = None
        for line in block.splitlines():
            kind, _, rest = line.partition(": ")
            if kind == "P":
                dev = Recorded(rest)
                devices.append(dev)
            elif dev is None:
                raise ValueError(f"recording: {line!r} before any P: line")
            elif kind == "N":
                dev.node = rest.split("=", 1)[0]
            elif kind == "E":
                k, _, v = rest.partition("=")
                dev.props[k] = v
            elif kind == "A":
                k, _, v = rest.partition("=")
                dev.attrs[k] = _unescape(v)
            elif kind == "H":
                k, _, v = rest.partition("=")
                dev.attrs[k] = bytes.fromhex(v)
            elif kind == "L":
                k, _, v = rest.partition("=")
                dev.links[k] = v
    return devices


def _is_udev_key(k: str) -> bool:
    return k.startswith(("ID_", ".")) or k in ("TAGS", "CURRENT_TAGS", "DEVLINKS")


class UdevTree:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.sys = self.root / "sys"
        self.udev_data = self.root / "run" / "udev" / "data"
        for d in (self.sys / "devices", self.sys / "dev" / "char", self.sys / "dev" / "block",
                  self.udev_data):
            d.mkdir(parents=True, exist_ok=True)

    def load(self, recording: Path | str, uninitialized=(), devnums=None) -> list[Recorded]:
        text = Path(recording).read_text() if isinstance(recording, Path) or (
            "\n" not in str(recording) and os.path.exists(str(recording))) else str(recording)
        devs = parse(text)
        for dev in devs:
            self.add(dev, initialized=os.path.basename(dev.devpath) not in uninitialized,
                     devnum=(devnums or {}).get(os.path.basename(dev.devpath)))
        return devs

    def add(self, dev: Recorded, initialized: bool = True,
            devnum: tuple[int, int] | None = None) -> Path:
        d = self.sys / dev.devpath.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        kernel = {k: v for k, v in dev.props.items() if not _is_udev_key(k)}
        udev = {k: v for k, v in dev.props.items() if _is_udev_key(k)}
        if devnum is None and "MAJOR" in kernel:
            devnum = (int(kernel["MAJOR"]), int(kernel["MINOR"]))
        if devnum is not None:
            kernel["MAJOR"], kernel["MINOR"] = str(devnum[0]), str(devnum[1])
        if "DEVNAME" in kernel:
            kernel["DEVNAME"] = kernel["DEVNAME"].removeprefix("/dev/")
        (d / "uevent").write_text("".join(f"{k}={v}\n" for k, v in kernel.items()))
        for name, value in dev.attrs.items():
            if name == "dev" and devnum is not None:
                value = f"{devnum[0]}:{devnum[1]}\n".encode()
            p = d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(value)
        for name, target in dev.links.items():
            p = d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.is_symlink():
                p.unlink()
            p.symlink_to(target)
        subsystem = kernel.get("SUBSYSTEM")
        if subsystem and not (d / "subsystem").is_symlink():
            where = "bus" if subsystem in BUS_SUBSYSTEMS else "class"
            (self.sys / where / subsystem).mkdir(parents=True, exist_ok=True)
            (d / "subsystem").symlink_to(os.path.relpath(self.sys / where / subsystem, d))
        kind = "b" if subsystem == "block" else "c"
        if devnum is not None:
            link = self.sys / "dev" / ("block" if kind == "b" else "char") / \
                f"{devnum[0]}:{devnum[1]}"
            if link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(d, link.parent))
            db_id = f"{kind}{devnum[0]}:{devnum[1]}"
        else:
            db_id = f"+{subsystem}:{os.path.basename(dev.devpath)}"
        db = self.udev_data / db_id
        if initialized:
            lines = [f"I:{USEC}"]
            lines += [f"S:{link.removeprefix('/dev/')}" for link in
                      udev.pop("DEVLINKS", "").split() if link]
            lines += [f"G:{t}" for t in udev.pop("TAGS", "").split(":") if t]
            lines += [f"Q:{t}" for t in udev.pop("CURRENT_TAGS", "").split(":") if t]
            lines += [f"E:{k}={v}" for k, v in udev.items()]
            db.write_text("\n".join(lines) + "\n")
        elif db.exists():
            db.unlink()
        return d


def make_node(dev_root: Path | str, rel: str, kind: str, major: int, minor: int,
              mode: int = 0o600, uid: int = 0, gid: int = 0) -> Path:
    """mknod dev_root/rel (parents 0755), then chown/chmod as given."""
    import stat
    p = Path(dev_root) / rel
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.mknod(p, (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | mode,
             os.makedev(major, minor))
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    return p


# -- the sample machine the device tests share ------------------------------------------
#  189:0 usb1 root hub (1d6b:0002, class 9)     189:1 1-1 hub (1209:a1a4, class 9)
#  189:2 1-2 vendor gadget (1209:a1a1), one unclaimed interface
#  189:3 1-3 flash drive (1209:a1a2), its only interface claimed by usb-storage
#  189:4 1-4 composite (1209:a1a3): usbhid on 1.0, 1.1 unclaimed
#  189:5 1-5 unlisted gadget (dead:beef), unclaimed
#  240:0 hidraw0 FIDO key   240:1 hidraw1 keyboard   240:2 hidraw2 FIDO key, not initialized
#  166:0 ttyACM0 (cdc_acm)  4:64 ttyS0 (serial8250)  10:250 pbgadget (misc)
SAMPLE = ("usb", "hidraw", "tty", "misc")


def sample(root: Path | str, devnums=None) -> UdevTree:
    tree = UdevTree(root)
    for name in SAMPLE:
        tree.load(DEVICES / f"{name}.umockdev", uninitialized={"hidraw2"}, devnums=devnums)
    return tree


def device(tree: UdevTree, major: int, minor: int, gid: int = 0, kind: str = "c",
           path: str = "/dev/x", perm: int = 0o660):
    """The Device a rule sees for node MAJ:MIN of group gid."""
    import stat
    from broker.devices.record import UdevReader
    from broker.devices.rules import Device
    reader = UdevReader(str(tree.sys), str(tree.udev_data))
    record = reader.for_devnum(kind, major, minor)
    assert record is not None, f"no record for {major}:{minor}"
    mode = (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | perm
    st = os.stat_result((mode, 1, 1, 1, 0, gid, 0, 0, 0, 0))
    # st_rdev is not in the 10-tuple; rules never use it
    return Device(path, st, record)


def kernel_uevent(device: str = "/sys/devices/virtual/mem/null") -> None:
    """Have the kernel send a real uevent ("change", as `udevadm trigger
    --action=change` makes it), for a test that changed the tree the way a
    driver binding would: the kernel announces every such change, and the
    broker's uevent monitor (broker/devices/uevents.py) takes any uevent as
    "sysfs may have changed".  /dev/null's device is on every system and a
    change event for it changes nothing."""
    with open(f"{device}/uevent", "w") as f:
        f.write("change")
