"""OpenPath's lockdown and detach on real USB devices (issue #5).

The devices are USB gadgets made by the kernel's own dummy host controller
(dummy_hcd) and gadget framework (configfs, libcomposite), so the host side
sees real USB devices: usbcore enumerates them, cdc_acm binds their serial
interfaces, devtmpfs makes /dev/bus/usb nodes, and systemd-udevd (started
here when none runs) writes their records to /run/udev/data.  The broker
reads the real /sys, /dev and udev database, and hands its fd to a caller
running as an unprivileged uid, which then asks the kernel what that fd may
still do.

Each gadget has a CDC ACM function (two interfaces, claimed by cdc_acm) and
a SourceSink function (one vendor-class interface no driver claims):

  1209:0001  claimed, not detachable -> ALLOW_WITH_LOCKDOWN: the fd may claim
             the unclaimed interface only, and can detach no driver
  1209:0002  detachable              -> ALLOW_WITH_DETACH: cdc_acm is
             disconnected and the interfaces are claimed through the fd

This machine's kernel has no dummy_hcd, so here every test skips; they run
in the VM (tests/test_vm_usb.py), where a skip counts as a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import ThrowawayUser, granted_bus, start_broker, stop_broker

CLIENT = [sys.executable, "-m", "client.cli"]
CONFIGFS = Path("/sys/kernel/config")
GADGETS = CONFIGFS / "usb_gadget"
CDC_ACM, VENDOR = 0x0A, 0xFF       # bInterfaceClass of ACM data and of SourceSink

CONFIG = """
profiles_dir = "{root}/profiles"
[[grant]]
name = "usb-users"
groups = ["privbroker"]
devices = ["open", "chown"]
[devices]
dev_root = "/dev"
sysfs = "/sys"
udev_data = "/run/udev/data"
journal = "{root}/state/leases.journal"
[[devices.rule]]
type = "deny_uninitialized"
[[devices.rule]]
type = "allow_usb_device"
allow = ["1209:0001", "1209:0002"]
[[devices.rule]]
type = "deny_claimed_usb"
detachable = ["1209:0002"]
[[devices.rule]]
type = "deny_usb_hub"
[[devices.rule]]
type = "deny_usb_vendor"
vendors = ["1d6b"]
"""

# Run by the caller (an unprivileged uid) on the fd the broker gave it
# (PRIVBROKER_FD): what the kernel lets that fd do, as JSON.
PROBE = r"""
import errno, fcntl, json, os, struct, sys
from broker.devices import usbdevfs as u
fd = int(os.environ["PRIVBROKER_FD"])
CLAIM, RELEASE = (u._ioc(u._IOC_READ, "U", nr, 4) for nr in (15, 16))   # unsigned int
def call(req, arg):
    try:
        fcntl.ioctl(fd, req, arg)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
out = {"uid": os.getuid(), "descriptor": os.read(fd, 18).hex()}
for op in sys.argv[1:]:
    name, n = op.split(":")
    n = int(n)
    if name == "claim":
        out[op] = call(CLAIM, struct.pack("I", n))
    elif name == "release":
        out[op] = call(RELEASE, struct.pack("I", n))
    elif name == "disconnect_claim":
        out[op] = call(u.USBDEVFS_DISCONNECT_CLAIM, u._DISCONNECT_CLAIM.pack(n, 0, b""))
    elif name == "driver":                  # the interface's driver, as sysfs says
        link = os.environ["IFACE_%d" % n]
        out[op] = os.path.basename(os.readlink(link)) if os.path.exists(link) else None
print(json.dumps(out))
"""


def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def _wait(pred, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


class Gadget:
    """A configfs gadget (ACM + SourceSink) on one dummy UDC, and the USB
    device the host side enumerated for it."""

    def __init__(self, name: str, product: int):
        self.name, self.product = name, product
        self.dir = GADGETS / name
        self.vidpid = f"1209:{product:04x}"

    def start(self, udc: str) -> "Gadget":
        d, name, product = self.dir, self.name, self.product
        d.mkdir()
        (d / "idVendor").write_text("0x1209")
        (d / "idProduct").write_text(f"0x{product:04x}")
        (d / "strings/0x409").mkdir(parents=True)
        (d / "strings/0x409/product").write_text(f"privbroker test {name}")
        (d / "configs/c.1").mkdir(parents=True)
        for function in ("acm.usb0", "SourceSink.1"):
            (d / "functions" / function).mkdir(parents=True)
            (d / "configs/c.1" / function).symlink_to(d / "functions" / function)
        (d / "UDC").write_text(udc)
        self.sys = _wait(self._find, f"the host never saw gadget {self.vidpid}")
        busnum, devnum = (int((self.sys / f).read_text()) for f in ("busnum", "devnum"))
        self.node = f"/dev/bus/usb/{busnum:03d}/{devnum:03d}"
        _wait(lambda: Path(f"/run/udev/data/c189:{(busnum - 1) * 128 + devnum - 1}").exists(),
              f"udev never recorded {self.node}")
        self.ifaces = _wait(self._bound, f"cdc_acm never bound {self.vidpid}'s interfaces")
        return self

    def _find(self) -> Path | None:
        for dev in Path("/sys/bus/usb/devices").iterdir():
            try:
                ids = f"{(dev / 'idVendor').read_text().strip()}:" \
                      f"{(dev / 'idProduct').read_text().strip()}"
            except OSError:
                continue
            if ids == self.vidpid:
                return dev
        return None

    def interfaces(self) -> dict[int, tuple[int, str | None]]:
        """interface number -> (class, bound driver or None)"""
        out = {}
        for iface in self.sys.glob(f"{self.sys.name}:*"):
            number = int((iface / "bInterfaceNumber").read_text(), 16)
            driver = iface / "driver"
            out[number] = (int((iface / "bInterfaceClass").read_text(), 16),
                           os.path.basename(os.readlink(driver)) if driver.exists() else None)
        return out

    def _bound(self):
        ifaces = self.interfaces()
        acm = [n for n, (_, drv) in ifaces.items() if drv == "cdc_acm"]
        return ifaces if len(ifaces) == 3 and len(acm) == 2 else None

    def number(self, klass: int) -> int:
        return next(n for n, (c, _) in self.ifaces.items() if c == klass)

    def remove(self) -> None:
        d = self.dir
        _sh("sh", "-c", f"echo '' > {d}/UDC")
        for function in ("acm.usb0", "SourceSink.1"):
            (d / "configs/c.1" / function).unlink(missing_ok=True)
        for sub in ("configs/c.1/strings/0x409", "configs/c.1", "functions/acm.usb0",
                    "functions/SourceSink.1", "strings/0x409", ""):
            try:
                (d / sub).rmdir()
            except OSError:
                pass


@pytest.fixture(scope="module")
def gadgets():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    loaded = _sh("modprobe", "dummy_hcd", "num=2")
    if loaded.returncode != 0:
        pytest.skip(f"no dummy_hcd on this kernel ({os.uname().release}); "
                    f"runs in the VM (test_vm_usb.py)")
    for module in ("libcomposite", "usb_f_acm", "usb_f_ss_lb", "cdc_acm"):
        r = _sh("modprobe", module)
        assert r.returncode == 0, r.stderr
    if not GADGETS.exists():
        assert _sh("mount", "-t", "configfs", "none", str(CONFIGFS)).returncode == 0
    udevd = None
    if _sh("pgrep", "-x", "systemd-udevd").returncode != 0:
        udevd = subprocess.Popen(["/lib/systemd/systemd-udevd"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        _wait(lambda: Path("/run/udev/control").exists(), "systemd-udevd did not start")
        # records for what was there before it (the root hubs)
        _sh("udevadm", "trigger", "--action=add", "--subsystem-match=usb")
        _sh("udevadm", "settle", "--timeout=30")
    made = []
    try:
        for name, product, udc in (("pb-lockdown", 0x0001, "dummy_udc.0"),
                                   ("pb-detach", 0x0002, "dummy_udc.1")):
            made.append(Gadget(name, product))        # removed even if start() fails
            made[-1].start(udc)
        yield {"lockdown": made[0], "detach": made[1]}
    finally:
        for g in made:
            g.remove()
        if udevd is not None:
            udevd.terminate()
            udevd.wait(timeout=10)


@pytest.fixture(scope="module")
def deployment(gadgets):
    d = Path(tempfile.mkdtemp(prefix="privbroker-usb-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    shutil.copytree(ROOT / "examples" / "profiles", d / "profiles")
    (d / "state").mkdir(mode=0o700)
    (d / "broker.toml").write_text(CONFIG.format(root=d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(deployment):
    with granted_bus() as bus:
        proc = start_broker(bus, deployment / "broker.toml", deployment / "broker.log")
        proc.bus, proc.log = bus, deployment / "broker.log"
        yield proc
        stop_broker(proc)


@pytest.fixture(scope="module")
def caller():
    with ThrowawayUser(groups=["privbroker"], prefix="pbusb") as u:
        yield u


def probe(broker, caller, gadget: Gadget, *ops: str) -> dict:
    """`privbroker open NODE -- python PROBE OPS` as the caller."""
    env = {**broker.bus.env(), **{f"IFACE_{n}": str(gadget.sys / f"{gadget.sys.name}:1.{n}"
                                                    / "driver") for n in gadget.ifaces}}
    r = caller.run([*CLIENT, "--bus-address", broker.bus.address, "open", gadget.node, "--",
                    sys.executable, "-c", PROBE, *ops], env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def decision_lines(broker, method: str) -> list[str]:
    return [line for line in broker.log.read_text().splitlines()
            if "decision" in line and f"method={method}" in line]


def test_the_caller_cannot_open_the_nodes_itself(gadgets, caller):
    for g in gadgets.values():
        r = caller.run([sys.executable, "-c", f"open({g.node!r}, 'r+b')"])
        assert r.returncode != 0 and "PermissionError" in r.stderr, g.node


def test_lockdown_leaves_the_fd_only_the_unclaimed_interface(broker, gadgets, caller):
    g = gadgets["lockdown"]
    acm = [n for n, (_, drv) in g.ifaces.items() if drv == "cdc_acm"]
    free = g.number(VENDOR)
    out = probe(broker, caller, g, f"claim:{free}", f"release:{free}",
                *(f"disconnect_claim:{n}" for n in acm))
    assert out["uid"] == caller.uid
    assert out["descriptor"][8 * 2:12 * 2] == "09120100"     # idVendor 0x1209, idProduct 1 (LE)
    assert out[f"claim:{free}"] == "ok"                        # the mask allows it
    assert out[f"release:{free}"] == "ok"
    for n in acm:                                              # a bound driver: refused
        assert out[f"disconnect_claim:{n}"] == "EACCES", out
    # cdc_acm still holds its interfaces: lockdown detached nothing
    assert {n: drv for n, (_, drv) in g.interfaces().items() if n in acm} == \
        {n: "cdc_acm" for n in acm}
    line = decision_lines(broker, "OpenPath")[-1]
    assert "verdict=allowed" in line and "ALLOW_WITH_LOCKDOWN" in line, line
    assert f"USBDEVFS_DROP_PRIVILEGES mask={1 << free:#x}" in line, line


def test_the_same_ioctl_on_an_fd_without_lockdown_is_not_refused(gadgets):
    """The control for the test above: root's own fd on the same node, with
    no privileges dropped, is not refused USBDEVFS_DISCONNECT_CLAIM for an
    interface that does not exist (EINVAL, not EACCES); so the EACCES above
    is the lockdown's."""
    import errno
    import fcntl
    from broker.devices import usbdevfs
    g = gadgets["lockdown"]
    fd = os.open(g.node, os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, usbdevfs.USBDEVFS_DISCONNECT_CLAIM,
                        usbdevfs._DISCONNECT_CLAIM.pack(7, 0, b""))
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_a_driver_unbound_and_bound_again_is_seen_at_the_next_call(broker, gadgets, caller):
    """The broker remembers a USB device's decision until the kernel
    announces a change (broker/devices/core.py).  Unbinding cdc_acm through
    sysfs is such a change: the next OpenPath finds the interfaces free and
    allows the device without lockdown; binding it again brings lockdown
    back.  Real uevents from the real kernel, no test-made ones."""
    g = gadgets["lockdown"]
    acm = sorted(n for n, (_, drv) in g.ifaces.items() if drv == "cdc_acm")
    free = g.number(VENDOR)
    drivers = Path("/sys/bus/usb/drivers/cdc_acm")
    names = [f"{g.sys.name}:1.{n}" for n in acm]
    probe(broker, caller, g, f"claim:{free}")                 # decided (and remembered)
    probe(broker, caller, g, f"claim:{free}")
    assert "ALLOW_WITH_LOCKDOWN" in decision_lines(broker, "OpenPath")[-1]
    try:
        (drivers / "unbind").write_text(names[0])   # the control interface: ACM lets go of both
        _wait(lambda: all(g.interfaces()[n][1] is None for n in acm), "cdc_acm stayed bound")
        out = probe(broker, caller, g, *(f"claim:{n}" for n in acm))
        line = decision_lines(broker, "OpenPath")[-1]
        assert "ALLOW_WITH_LOCKDOWN" not in line and "DROP_PRIVILEGES" not in line, line
        assert "rule_verdict=ALLOW" in line, line
        assert all(out[f"claim:{n}"] == "ok" for n in acm), out
    finally:
        (drivers / "bind").write_text(names[0])
        _wait(lambda: all(g.interfaces()[n][1] == "cdc_acm" for n in acm),
              "cdc_acm did not bind again")
    out = probe(broker, caller, g, *(f"disconnect_claim:{n}" for n in acm))
    line = decision_lines(broker, "OpenPath")[-1]
    assert "ALLOW_WITH_LOCKDOWN" in line and f"mask={1 << free:#x}" in line, line
    assert all(out[f"disconnect_claim:{n}"] == "EACCES" for n in acm), out


def test_an_interface_claimed_through_usbfs_is_seen_at_the_next_call(broker, gadgets, caller):
    """Another program's usbfs fd claims the free interface; the kernel
    binds driver "usbfs" to it without a uevent (devio.c suppresses it).  A
    decision made while the interface was free must not be reused: with
    every interface held, the device is denied; once that fd is closed, it
    is allowed with lockdown again."""
    import fcntl
    import struct
    from broker.devices import usbdevfs as u
    g = gadgets["lockdown"]
    free = g.number(VENDOR)
    probe(broker, caller, g, f"claim:{free}")
    probe(broker, caller, g, f"claim:{free}")              # remembered, if it could be
    other = os.open(g.node, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(other, u._ioc(u._IOC_READ, "U", 15, 4), struct.pack("I", free))
        assert g.interfaces()[free][1] == "usbfs"
        r = caller.run([*CLIENT, "--bus-address", broker.bus.address, "open", g.node],
                       env=broker.bus.env(), cwd=ROOT, timeout=60)
        assert r.returncode == 1 and "denied by rule 'deny_claimed_usb'" in r.stderr, \
            r.stdout + r.stderr
    finally:
        os.close(other)                                     # its claim goes with it
    _wait(lambda: g.interfaces()[free][1] is None, "the usbfs claim outlived its fd")
    out = probe(broker, caller, g, f"claim:{free}")
    assert out[f"claim:{free}"] == "ok"
    assert f"mask={1 << free:#x}" in decision_lines(broker, "OpenPath")[-1]


def test_detach_hands_the_claimed_interfaces_to_the_fd(broker, gadgets, caller):
    g = gadgets["detach"]
    acm = sorted(n for n, (_, drv) in g.ifaces.items() if drv == "cdc_acm")
    ttys_before = set(os.listdir("/sys/class/tty"))
    # while the caller holds the fd: the interfaces are usbfs's (claimed
    # through it), and the fd can release what it holds
    out = probe(broker, caller, g, *(f"driver:{n}" for n in acm),
                *(f"release:{n}" for n in acm))
    assert out["descriptor"][8 * 2:12 * 2] == "09120200"
    for n in acm:
        assert out[f"driver:{n}"] == "usbfs", out
        assert out[f"release:{n}"] == "ok", out
    # cdc_acm lost the device: its tty went away with the claim
    assert not any(t.startswith("ttyACM") and t not in ttys_before
                   for t in os.listdir("/sys/class/tty"))
    assert all(g.interfaces()[n][1] != "cdc_acm" for n in acm)
    line = decision_lines(broker, "OpenPath")[-1]
    assert "verdict=allowed" in line and "ALLOW_WITH_DETACH" in line, line
    assert f"USBDEVFS_DISCONNECT_CLAIM interfaces={acm}" in line, line


def test_a_lockdown_device_cannot_be_leased(broker, gadgets, caller):
    r = caller.run([*CLIENT, "--bus-address", broker.bus.address, "chown",
                    gadgets["lockdown"].node], env=broker.bus.env(), cwd=ROOT, timeout=30)
    assert r.returncode != 0 and "use OpenPath" in r.stderr, r.stdout + r.stderr
    st = os.stat(gadgets["lockdown"].node)
    assert st.st_uid == 0                                       # nothing was changed


def test_the_root_hub_is_denied_by_the_hub_rules(broker, gadgets, caller):
    """The kernel's root hub: its interface is the hub driver's, it is a hub,
    and its vendor is the kernel's own (1d6b): all three deny rules say so."""
    r = caller.run([*CLIENT, "--bus-address", broker.bus.address, "open", "/dev/bus/usb/001/001"],
                   env=broker.bus.env(), cwd=ROOT, timeout=30)
    assert r.returncode != 0, r.stdout
    assert "denied by rule 'deny_claimed_usb'" in r.stderr, r.stderr      # the first DENY
    line = decision_lines(broker, "OpenPath")[-1]
    assert "verdict=refused" in line, line
    for rule in ("deny_claimed_usb", "deny_usb_hub", "deny_usb_vendor"):
        assert f"{rule}=DENY" in line, line
