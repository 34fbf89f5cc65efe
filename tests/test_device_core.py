"""The device core without D-Bus: policy, path, record, rules, action, and
what the request's log line says.  Nodes are clones of /dev/zero (1:5) and /dev/null
(1:3) so opens really happen; the udev records say what each one is."""
from __future__ import annotations

import errno
import gc
import grp
import logging
import os
import struct
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import pytest

from broker import policy
from broker.devices import usbdevfs
from broker.devices.core import DeviceCore
from broker.devices.errors import DeviceError
from udev_tree import kernel_uevent, make_node, sample

PLUGDEV = grp.getgrnam("plugdev").gr_gid


@dataclass(frozen=True)
class Caller:
    uid: int = 4321
    gids: frozenset = frozenset()
    name: str = ":1.7"
    pid: int = 1

    def describe(self):
        return f"uid={self.uid} pid={self.pid} name={self.name}"


CONFIG = """
profiles_dir = "p"
[[grant]]
name = "devs"
users = [4321, 4322]
devices = ["open", "chown"]
[[grant]]
name = "openers"
users = [5000]
devices = ["open"]
[devices]
dev_root = "{root}/dev"
sysfs = "{root}/sys"
udev_data = "{root}/run/udev/data"
journal = "{root}/state/leases.journal"
[[devices.rule]]
type = "deny_uninitialized"
[[devices.rule]]
type = "allow_usb_device"
allow = ["1209:*"]
[[devices.rule]]
type = "deny_claimed_usb"
detachable_classes = [8]
[[devices.rule]]
type = "deny_usb_hub"
[[devices.rule]]
type = "allow_hidraw"
lease_mode = 0o640
[[devices.rule]]
type = "deny_unsafe_hidraw"
[[devices.rule]]
type = "allow_group"
groups = ["plugdev"]
readonly_fallback = true
"""

# node name -> (sysname in the recordings, udev number), all cloned from zero/null
NODES = {"bus/usb/001/003": ("1-2", 2), "bus/usb/001/004": ("1-3", 3),
         "bus/usb/001/005": ("1-4", 4), "bus/usb/001/002": ("1-1", 1),
         "hidraw0": ("hidraw0", 10), "hidraw1": ("hidraw1", 11), "hidraw2": ("hidraw2", 12),
         "pbgadget": ("pbgadget", 13)}


def make(tmp_path, which: str, gid: int = 0, mode: int = 0o660) -> str:
    """A tree where `which` is char 1:5 (zero) or 1:3 for pbgadget, and a
    node for it; returns its path."""
    sysname, n = NODES[which]
    nums = {s: (250, m) for s, m in NODES.values()}
    nums[sysname] = (1, 3) if which == "pbgadget" else (1, 5)
    sample(tmp_path, devnums=nums)
    major, minor = nums[sysname]
    make_node(tmp_path / "dev", which, "c", major, minor, mode=mode, gid=gid)
    return f"{tmp_path}/dev/{which}"


def core(tmp_path, ioctl=None) -> DeviceCore:
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    pol = policy.parse(tomllib.loads(CONFIG.format(root=tmp_path)))
    return DeviceCore(pol.devices, pol, ioctl=ioctl)


def test_the_core_imports_no_dbus():
    code = ("import sys, broker.devices.core, broker.devices.leases, broker.devices.config;"
            "bad = [m for m in sys.modules if 'dbus' in m]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_allowed_device_is_opened_read_write(tmp_path):
    path = make(tmp_path, "hidraw0")
    c = core(tmp_path)
    fd, info = c.open_path(Caller(), path)
    try:
        assert os.read(fd, 4) == b"\0\0\0\0" and os.write(fd, b"x") == 1
    finally:
        os.close(fd)
    assert info == {"rule": "allow_hidraw", "rule_verdict": "ALLOW",
                    "rules": "allow_hidraw=ALLOW", "done": "opened O_RDWR"}
    assert os.stat(path).st_uid == 0                     # OpenPath never chowns


def test_a_denied_device_names_the_rule(tmp_path):
    path = make(tmp_path, "hidraw1")
    with pytest.raises(DeviceError) as e:
        core(tmp_path).open_path(Caller(), path)
    assert e.value.kind == "AccessDenied"
    assert "denied by rule 'deny_unsafe_hidraw'" in str(e.value)
    assert e.value.info == {"rule": "deny_unsafe_hidraw", "rule_verdict": "DENY",
                            "rules": "allow_hidraw=ALLOW deny_unsafe_hidraw=DENY"}


@pytest.mark.parametrize("which,rule", [("hidraw2", "deny_uninitialized"),
                                        # the first DENY in chain order is named
                                        ("bus/usb/001/002", "deny_claimed_usb")])
def test_other_denials(tmp_path, which, rule):
    c = core(tmp_path)
    path = make(tmp_path, which)
    assert c.check_path_access(Caller(), path)[0] is False
    with pytest.raises(DeviceError, match=f"rule '{rule}'"):
        c.open_path(Caller(), path)


def test_default_deny_and_no_record(tmp_path):
    c = core(tmp_path)
    path = make(tmp_path, "pbgadget", gid=0)              # not plugdev: no rule allows
    with pytest.raises(DeviceError, match="no rule allows this device"):
        c.open_path(Caller(), path)
    make_node(tmp_path / "dev", "unknown", "c", 1, 7)      # no sysfs entry for 1:7
    with pytest.raises(DeviceError, match="no udev record"):
        c.open_path(Caller(), f"{tmp_path}/dev/unknown")
    # CheckPathAccess answers no, and its log line says why
    ok, info = c.check_path_access(Caller(), f"{tmp_path}/dev/unknown")
    assert not ok and "no udev record" in info["why"], info
    ok, info = c.check_path_access(Caller(), path)        # a rule decided: no "why"
    assert not ok and "why" not in info and info["rule"] == "default-deny", info


def test_read_only_fallback_only_where_the_rule_allows(tmp_path, monkeypatch):
    from broker.devices import safe_open
    real = safe_open.reopen

    def no_write(fd, flags, *rest):
        if flags & os.O_ACCMODE == os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real(fd, flags, *rest)

    monkeypatch.setattr(safe_open, "reopen", no_write)
    path = make(tmp_path, "pbgadget", gid=PLUGDEV)         # allow_group: fallback allowed
    fd, info = core(tmp_path).open_path(Caller(), path)
    assert "opened O_RDONLY" in info["done"]
    assert os.get_inheritable(fd) is False
    import fcntl
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    os.close(fd)
    path = make(tmp_path / "h", "hidraw0")                 # allow_hidraw: no fallback
    with pytest.raises(DeviceError) as e:
        core(tmp_path / "h").open_path(Caller(), path)
    assert e.value.kind == "Failed"


def test_a_group_allowed_read_only_gets_a_read_only_fd_and_no_lease(tmp_path):
    # allow_group on a 0640 plugdev node: plugdev may read, not write.  The
    # front would open it O_RDWR (CAP_DAC_OVERRIDE); the rule holds it to
    # what the group has, and a lease (the caller would own the node, and
    # an owner may chmod) is refused.
    import fcntl
    path = make(tmp_path, "pbgadget", gid=PLUGDEV, mode=0o640)      # 1:3, /dev/null
    c = core(tmp_path)
    fd, info = c.open_path(Caller(), path)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert os.read(fd, 4) == b""
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert info["access"] == "read only" and info["done"].startswith("opened O_RDONLY"), info
    with pytest.raises(DeviceError) as e:
        c.chown_device(Caller(), path)
    assert e.value.kind == "AccessDenied" and "read only" in str(e.value)
    assert "use OpenPath" in str(e.value)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, PLUGDEV, 0o640)
    assert c.leases.by_id == {} and not os.path.exists(c.config.journal)


def test_a_group_allowed_write_only_gets_a_write_only_fd(tmp_path):
    import fcntl
    path = make(tmp_path, "pbgadget", gid=PLUGDEV, mode=0o620)
    fd, info = core(tmp_path).open_path(Caller(), path)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        assert os.write(fd, b"x") == 1
        with pytest.raises(OSError) as e:
            os.read(fd, 1)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert info["access"] == "write only", info


def _acl(group_obj: int, mask: int, user: int = 1000) -> bytes:
    """system.posix_acl_access bytes: u::rw-, u:<user>:rw-, g::<group_obj>,
    m::<mask>, o::---."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 6, user), (0x04, group_obj, 0xFFFFFFFF),
               (0x10, mask, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_group_allowed_read_only_by_its_acl_entry_gets_read_only(tmp_path):
    # logind's uaccess gives the seat's user rw through an ACL: the mode's
    # group bits become the ACL's mask (0660 here), while plugdev's own
    # entry still says r--.  Decided afresh each time: setfacl changes the
    # group entry with no change of mode and no uevent.
    import fcntl
    path = make(tmp_path, "pbgadget", gid=PLUGDEV, mode=0o640)
    os.setxattr(path, "system.posix_acl_access", _acl(group_obj=4, mask=6))
    assert os.stat(path).st_mode & 0o777 == 0o660            # the mask shows as group bits
    c = core(tmp_path)
    fd, info = c.open_path(Caller(), path)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY, info
    finally:
        os.close(fd)
    assert info["access"] == "read only"
    os.setxattr(path, "system.posix_acl_access", _acl(group_obj=6, mask=6))   # g::rw-
    assert os.stat(path).st_mode & 0o777 == 0o660            # the mode did not change
    fd, info = c.open_path(Caller(), path)
    os.close(fd)
    assert info["done"] == "opened O_RDWR" and "access" not in info, info
    os.setxattr(path, "system.posix_acl_access", _acl(group_obj=6, mask=4))   # m::r--
    fd, info = c.open_path(Caller(), path)
    os.close(fd)
    assert info["access"] == "read only", info


def test_a_node_its_group_may_not_use_is_not_the_group_rules(tmp_path):
    path = make(tmp_path, "pbgadget", gid=PLUGDEV, mode=0o604)
    with pytest.raises(DeviceError, match="no rule allows this device"):
        core(tmp_path).open_path(Caller(), path)


class Ioctls:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    fail_from = 0           # fail every call from this one on (1: the first)

    def __call__(self, fd, request, arg):
        self.calls.append((request, bytes(arg)))
        if self.fail or 0 < self.fail_from <= len(self.calls):
            raise OSError(25, "Inappropriate ioctl for device")


def _fds():
    # Earlier tests' cores hold fds (uevent socket, dev root) until they are
    # collected: collected first, so none closes between two counts.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_lockdown_allows_only_the_free_interfaces(tmp_path):
    path = make(tmp_path, "bus/usb/001/005")               # usbhid on 0, 1 free
    io = Ioctls()
    fd, info = core(tmp_path, ioctl=io).open_path(Caller(), path)
    os.close(fd)
    assert info["rule_verdict"] == "ALLOW_WITH_LOCKDOWN" and "mask=0x2" in info["done"]
    assert io.calls == [(usbdevfs.USBDEVFS_DROP_PRIVILEGES, (0b10).to_bytes(4, "little"))]


def test_detach_claims_the_driver_held_interfaces(tmp_path):
    path = make(tmp_path, "bus/usb/001/004")               # usb-storage on 0, class 8
    io = Ioctls()
    os.close(core(tmp_path, ioctl=io).open_path(Caller(), path)[0])
    [(request, arg)] = io.calls
    assert request == usbdevfs.USBDEVFS_DISCONNECT_CLAIM
    n, flags, driver = usbdevfs._DISCONNECT_CLAIM.unpack(arg)
    assert (n, flags, driver.rstrip(b"\0")) == (
        0, usbdevfs.USBDEVFS_DISCONNECT_CLAIM_EXCEPT_DRIVER, b"usbfs")


def test_a_failed_lockdown_hands_out_nothing(tmp_path):
    path = make(tmp_path, "bus/usb/001/005")
    c = core(tmp_path, ioctl=Ioctls(fail=True))
    # the core's own fds (uevent socket, dev root, /proc/self/fd) exist
    c.check_path_access(Caller(), path)
    c._own_fd_dir()
    before = _fds()
    with pytest.raises(DeviceError) as e:
        c.open_path(Caller(), path)
    assert e.value.kind == "Failed" and "not handed out" in str(e.value)
    assert _fds() == before


def test_a_detach_that_fails_midway_says_which_drivers_it_took(tmp_path):
    # Both of 1-4's interfaces made mass storage held by usb-storage: detach
    # takes 0, then the kernel refuses 1.  The fd is not handed out, and
    # interface 0's driver does not come back by itself: the answer says so.
    path = make(tmp_path, "bus/usb/001/005")
    dev = os.path.realpath(tmp_path / "sys/dev/char/1:5")
    for n in (0, 1):
        with open(f"{dev}/1-4:1.{n}/bInterfaceClass", "w") as f:
            f.write("08\n")
    os.symlink("../../../../../../bus/usb/drivers/usb-storage", f"{dev}/1-4:1.1/driver")
    io = Ioctls()
    io.fail_from = 2
    c = core(tmp_path, ioctl=io)
    c.check_path_access(Caller(), path)
    c._own_fd_dir()
    before = _fds()
    with pytest.raises(DeviceError) as e:
        c.open_path(Caller(), path)
    assert e.value.kind == "Failed" and "interface 1" in str(e.value), e.value
    assert "interfaces [0] stay without their kernel driver" in str(e.value)
    assert e.value.info["rule_verdict"] == "ALLOW_WITH_DETACH"
    assert len(io.calls) == 2 and _fds() == before


def test_lockdown_and_detach_devices_cannot_be_leased(tmp_path):
    path = make(tmp_path, "bus/usb/001/005")
    c = core(tmp_path)
    assert c.check_path_access(Caller(), path)[0] is True
    with pytest.raises(DeviceError, match="use OpenPath") as e:
        c.chown_device(Caller(), path)
    assert e.value.kind == "AccessDenied" and os.stat(path).st_uid == 0


def test_grants(tmp_path):
    path = make(tmp_path, "hidraw0")
    c = core(tmp_path)
    with pytest.raises(DeviceError, match="no grant lets uid 999"):
        c.check_path_access(Caller(uid=999), path)
    with pytest.raises(DeviceError, match="device operation 'chown'"):
        c.chown_device(Caller(uid=5000), path)
    assert c.check_path_access(Caller(uid=5000), path)[0] is True
    os.close(c.open_path(Caller(uid=5000), path)[0])


def test_a_lease_through_the_core(tmp_path, caplog):
    path = make(tmp_path, "hidraw0")
    c = core(tmp_path)
    c.check_path_access(Caller(), path)      # the core's own fds (uevent socket) exist
    before = _fds()
    lease, info = c.chown_device(Caller(), path)
    assert info["lease"] == lease and info["done"] == "uid 0->4321 mode 0660->0640, journaled first"
    st = os.stat(path)
    assert (st.st_uid, st.st_mode & 0o777) == (4321, 0o640)   # the rule's lease_mode
    with pytest.raises(DeviceError) as e:
        c.chown_device(Caller(uid=4322, name=":1.8"), path)
    assert e.value.kind == "Busy" and e.value.info["rule"] == "allow_hidraw"
    with caplog.at_level(logging.INFO, "privbrokerd"):
        assert c.release_device(Caller(), lease) == {"node": path, "done": "restored"}
    st = os.stat(path)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o660)
    assert _fds() == before
    [line] = [r.getMessage() for r in caplog.records]       # lease ends are logged here
    assert line.startswith(f"device lease {lease} on {path!r} (uid 4321): released; "
                           f"restored uid=0 gid=0 mode=0660")


def test_check_path_access_answers_false_for_refused_paths(tmp_path):
    path = make(tmp_path, "hidraw0")
    os.symlink("hidraw0", tmp_path / "dev" / "link")
    c = core(tmp_path)
    assert c.check_path_access(Caller(), f"{tmp_path}/dev/link") == (
        False, {"answer": False, "why": f"AccessDenied: '{tmp_path}/dev/link' is a symlink, "
                                       f"not a device node"})
    assert c.check_path_access(Caller(), f"{tmp_path}/dev/none")[0] is False
    with pytest.raises(DeviceError) as e:
        c.check_path_access(Caller(), "relative")
    assert e.value.kind == "InvalidArgument"
    assert c.check_path_access(Caller(), path)[0] is True


def _count_decisions(monkeypatch) -> list[str]:
    """The paths the rule chain is asked about from now on (one entry per
    decision made, none for a remembered one)."""
    from broker.devices import chain
    calls = []
    real = chain.decide
    monkeypatch.setattr(chain, "decide", lambda rules, dev: calls.append(dev.path) or
                        real(rules, dev))
    return calls


@pytest.mark.parametrize("uevents_watched", [True, False], ids=["uevents", "no-uevents"])
def test_decisions_are_remembered_only_while_nothing_they_read_can_change(
        tmp_path, monkeypatch, uevents_watched):
    # With uevents watched, what only a device's coming and going changes is
    # looked at again after the kernel's event (here: one the test makes,
    # as the kernel would for the real change); without, at every request.
    from broker.devices import uevents
    if not uevents_watched:
        monkeypatch.setattr(uevents, "MIN_KERNEL", (999, 0))
    announce = kernel_uevent if uevents_watched else (lambda: None)
    calls = _count_decisions(monkeypatch)
    hid = make(tmp_path, "hidraw0")
    c = core(tmp_path)
    for _ in range(3):
        assert c.check_path_access(Caller(), hid)[0]
    assert len(calls) == 1                                 # remembered
    assert c.uevents.watching is uevents_watched
    os.chown(hid, 0, PLUGDEV)                              # the node's group: a new key
    assert c.check_path_access(Caller(), hid)[0] and len(calls) == 2
    # udev's database entry goes away (as on the device's removal):
    # "initialized" is part of the key
    from udev_tree import UdevTree
    db = UdevTree(tmp_path).udev_data / "c1:5"
    os.rename(db, f"{db}.gone")
    announce()
    assert not c.check_path_access(Caller(), hid)[0] and len(calls) == 3
    os.rename(f"{db}.gone", db)
    # the device goes and comes back (a new sysfs directory): decided afresh
    sysdir = os.path.realpath(tmp_path / "sys/dev/char/1:5")
    os.rename(sysdir, sysdir + ".old")
    import shutil
    shutil.copytree(sysdir + ".old", sysdir, symlinks=True)
    announce()
    assert c.check_path_access(Caller(), hid)[0] and len(calls) == 4
    for _ in range(2):
        assert c.check_path_access(Caller(), hid)[0]
    assert len(calls) == 4                                 # and remembered again
    # With uevents, the node's device is not even looked up until one
    # arrives: a MAJ:MIN link that vanished unannounced (no kernel does
    # that) is seen only without uevents, or after the next event.
    link = tmp_path / "sys/dev/char/1:5"
    os.unlink(link)
    assert c.check_path_access(Caller(), hid)[0] is uevents_watched
    announce()
    ok, info = c.check_path_access(Caller(), hid)
    assert not ok and info["rule"] == "default-deny" and info["rules"] == "-", info
    assert "no udev record" in info["why"], info            # the line says why
    with pytest.raises(DeviceError, match="has no udev record"):
        c.open_path(Caller(), hid)


def test_an_uninitialized_device_is_looked_at_every_time(tmp_path, monkeypatch):
    # udevd writes the database after the kernel's event, announcing nothing:
    # a device not yet initialized is checked again at the next request
    from udev_tree import UdevTree
    hid = make(tmp_path, "hidraw0")
    db = UdevTree(tmp_path).udev_data / "c1:5"
    os.rename(db, f"{db}.later")
    c = core(tmp_path)
    ok, info = c.check_path_access(Caller(), hid)
    assert not ok and "deny_uninitialized=DENY" in info["rules"]
    assert c.uevents.watching
    os.rename(f"{db}.later", db)                           # no event
    assert c.check_path_access(Caller(), hid)[0]


def test_usb_decisions_are_remembered_until_the_kernel_announces_a_change(tmp_path,
                                                                          monkeypatch):
    calls = _count_decisions(monkeypatch)
    usb = make(tmp_path, "bus/usb/001/004")               # usb-storage holds its only interface
    c = core(tmp_path)
    assert c.check_path_access(Caller(), usb)[0]           # detach: allowed
    assert c.uevents.watching, c.uevents.why_not
    for _ in range(3):
        assert c.check_path_access(Caller(), usb)[0]
    assert len(calls) == 1                                 # remembered: nothing happened
    # the kernel driver lets go, and the kernel says so (as it does for
    # every kernel driver's bind and unbind): the next decision reads the
    # interfaces again
    iface = os.path.realpath(tmp_path / "sys/dev/char/1:5") + "/1-3:1.0"
    os.unlink(f"{iface}/driver")
    kernel_uevent()
    fd, info = c.open_path(Caller(), usb)
    os.close(fd)
    assert info["rule_verdict"] == "ALLOW" and len(calls) == 2
    # bound again: seen at the very next call too
    os.symlink("../../../../../../bus/usb/drivers/usb-storage", f"{iface}/driver")
    kernel_uevent()
    assert c.check_path_access(Caller(), usb)[0] and len(calls) == 3
    assert c.check_path_access(Caller(), usb)[0] and len(calls) == 3   # and remembered


def _claim_through_usbfs(tmp_path, sysname: str) -> None:
    """What the kernel shows when a program's usbfs fd claims an interface:
    driver "usbfs" bound, and no uevent (devio.c suppresses it)."""
    iface = os.path.realpath(tmp_path / "sys/dev/char/1:5") + f"/{sysname}"
    os.makedirs(tmp_path / "sys/bus/usb/drivers/usbfs", exist_ok=True)
    os.symlink("../../../../../../bus/usb/drivers/usbfs", f"{iface}/driver")


def test_a_decision_that_saw_a_free_interface_is_rechecked_before_reuse(tmp_path,
                                                                        monkeypatch):
    # Another program may claim a free interface through usbfs at any time,
    # unannounced: a decision that read one is reused only while that
    # interface's driver link still says what it said.
    calls = _count_decisions(monkeypatch)
    usb = make(tmp_path, "bus/usb/001/005")               # usbhid on 1.0, 1.1 free
    c = core(tmp_path)
    assert c.check_path_access(Caller(), usb)[0] and c.uevents.watching
    assert c.check_path_access(Caller(), usb)[0]
    assert len(calls) == 1                                 # remembered, rechecked
    _claim_through_usbfs(tmp_path, "1-4:1.1")             # no uevent
    with pytest.raises(DeviceError, match="deny_claimed_usb"):   # nothing free is left
        c.open_path(Caller(), usb)
    assert len(calls) == 2
    with pytest.raises(DeviceError, match="deny_claimed_usb"):
        c.open_path(Caller(), usb)
    assert len(calls) == 2                                 # the DENY is remembered too
    iface = os.path.realpath(tmp_path / "sys/dev/char/1:5") + "/1-4:1.1"
    os.unlink(f"{iface}/driver")                           # released, no uevent either
    assert c.check_path_access(Caller(), usb)[0] and len(calls) == 3


def test_lockdown_leaves_another_programs_usbfs_claim_out_of_the_mask(tmp_path):
    # Both interfaces free of kernel drivers, and another program's usbfs fd
    # holds interface 0.  The rule counts it as claimed (lockdown), and the
    # mask must not let the caller's fd claim it when that program lets go.
    path = make(tmp_path, "bus/usb/001/005")
    iface = os.path.realpath(tmp_path / "sys/dev/char/1:5")
    os.unlink(f"{iface}/1-4:1.0/driver")                   # usbhid gone: both free
    _claim_through_usbfs(tmp_path, "1-4:1.0")               # ... and 0 taken through usbfs
    io = Ioctls()
    fd, info = core(tmp_path, ioctl=io).open_path(Caller(), path)
    os.close(fd)
    assert info["rule_verdict"] == "ALLOW_WITH_LOCKDOWN" and "mask=0x2" in info["done"], info
    assert io.calls == [(usbdevfs.USBDEVFS_DROP_PRIVILEGES, (0b10).to_bytes(4, "little"))]


def test_without_uevents_usb_decisions_are_made_every_time(tmp_path, monkeypatch):
    from broker.devices import uevents
    monkeypatch.setattr(uevents, "MIN_KERNEL", (999, 0))   # as on a kernel before 4.14
    usb = make(tmp_path, "bus/usb/001/005")
    c = core(tmp_path)
    assert c.check_path_access(Caller(), usb)[0]
    assert not c.uevents.watching and "4.14" in c.uevents.why_not
    iface = os.path.realpath(tmp_path / "sys/dev/char/1:5") + "/1-4:1.1"
    os.symlink("../../../../../../bus/usb/drivers/cdc_acm", f"{iface}/driver")
    with pytest.raises(DeviceError, match="deny_claimed_usb"):     # no event needed
        c.open_path(Caller(), usb)


@pytest.mark.parametrize("uevents_watched", [True, False], ids=["uevents", "no-uevents"])
def test_a_device_replaced_at_the_same_node_is_decided_afresh(tmp_path, monkeypatch,
                                                               uevents_watched):
    # hidraw0 (allowed) goes away and a hub comes at the same number: a new
    # sysfs directory behind the same /sys/dev/char link.  The kernel
    # announces both (remove, add); without uevents, the link is looked at
    # for every request.
    from broker.devices import uevents
    if not uevents_watched:
        monkeypatch.setattr(uevents, "MIN_KERNEL", (999, 0))
    hid = make(tmp_path, "hidraw0")
    c = core(tmp_path)
    assert c.check_path_access(Caller(), hid)[0]
    link = tmp_path / "sys/dev/char/1:5"
    hub = os.path.realpath(tmp_path / "sys/dev/char/250:1")     # usb 1-1, a hub
    os.unlink(link)
    os.symlink(os.path.relpath(hub, link.parent), link)
    if uevents_watched:
        kernel_uevent()
    ok, info = c.check_path_access(Caller(), hid)
    assert not ok and "deny_usb_hub=DENY" in info["rules"]


def test_a_forked_child_drops_the_parents_fd_directory(tmp_path):
    # the core's held /proc/self/fd names the fds of the process that opened
    # it: a child must not reopen "its" fds through the parent's table
    hid = make(tmp_path, "hidraw0")
    c = core(tmp_path)
    os.close(c.open_path(Caller(), hid)[0])
    assert c._fd_dir >= 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"dropped" if c._fd_dir == -1 else b"kept")
        finally:
            os._exit(0)
    os.close(w)
    said = os.read(r, 16)
    os.close(r)
    os.waitpid(pid, 0)
    assert said == b"dropped"
    assert c._fd_dir >= 0                                  # the parent keeps its own


def test_only_drivers_whose_open_may_wait_are_opened_nonblocking(tmp_path, monkeypatch):
    # hidraw and usbfs look at no open flag but the access mode; anything
    # else (here a plugdev node: could be a tty) is opened O_NONBLOCK, which
    # is cleared afterwards, and that is remembered with the decision
    from broker.devices import safe_open
    real, seen = safe_open.reopen, []

    def spy(fd, flags, fd_dir=-1, may_wait=True):
        seen.append(may_wait)
        return real(fd, flags, fd_dir, may_wait)

    monkeypatch.setattr(safe_open, "reopen", spy)
    for which, gid, may_wait in (("hidraw0", 0, False), ("bus/usb/001/003", 0, False),
                                 ("pbgadget", PLUGDEV, True)):
        path = make(tmp_path / which.replace("/", "_"), which, gid=gid)
        c = core(tmp_path / which.replace("/", "_"))
        for _ in range(2):                                 # decided, then remembered
            fd, _info = c.open_path(Caller(), path)
            assert os.get_blocking(fd)
            os.close(fd)
        assert seen == [may_wait, may_wait], (which, seen)
        seen.clear()


def test_a_caller_learns_nothing_about_a_directory_it_cannot_search(tmp_path):
    """The front looks paths up with CAP_DAC_OVERRIDE; a caller must not
    learn from its refusals what another user's private directory holds."""
    c = core(tmp_path)
    make(tmp_path, "hidraw1")                             # a keyboard: denied by a rule
    private = tmp_path / "dev" / "shm" / "someone"
    private.mkdir(parents=True)
    os.chmod(private.parent, 0o1777)
    (private / "secret-name").write_text("")
    os.mkfifo(private / "a-fifo")
    os.link(tmp_path / "dev" / "hidraw1", private / "kbd")
    (private / "sub").mkdir()
    os.chmod(private, 0o700)
    os.chown(private, 4322, 4322)
    paths = [f"{private}/{name}" for name in ("secret-name", "a-fifo", "kbd", "nothing",
                                              "sub/deeper", "secret-name/x")]

    def refusal(who, path):
        with pytest.raises(DeviceError) as e:
            c.open_path(who, path)
        return e.value

    for path in paths:
        e = refusal(Caller(uid=4321), path)               # not its directory
        assert (e.kind, str(e)) == ("NotFound", f"{path!r}: no such device node"), path
        assert e.info["hidden"]                           # the log line keeps the truth
    # its owner, who may search it, hears what the refusal was about
    assert "is a regular file" in str(refusal(Caller(uid=4322), paths[0]))
    assert "is a FIFO" in str(refusal(Caller(uid=4322), paths[1]))
    assert "deny_unsafe_hidraw" in str(refusal(Caller(uid=4322), paths[2]))
    assert "hidden" not in refusal(Caller(uid=4322), paths[3]).info
    # and so does anyone, where the directories on the way are searchable
    os.chmod(private, 0o711)
    assert "is a FIFO" in str(refusal(Caller(uid=4321), paths[1]))
