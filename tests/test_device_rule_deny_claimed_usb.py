import pytest

from broker.devices.rules import DENY, DETACH, IGNORE, LOCKDOWN, build
from udev_tree import UdevTree, device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def rule(**params):
    return build({"type": "deny_claimed_usb", **params}, "test")


def test_no_claimed_interface_is_not_this_rules_business(tree):
    assert rule().check(device(tree, 189, 2)) is IGNORE
    assert rule().check(device(tree, 240, 0)) is IGNORE       # not a USB device node


def test_all_interfaces_claimed_and_not_detachable_is_denied(tree):
    assert rule().check(device(tree, 189, 3)) is DENY


def test_some_interfaces_free_is_allowed_locked_down(tree):
    assert rule().check(device(tree, 189, 4)) is LOCKDOWN


def test_detachable_by_id_or_by_interface_class(tree):
    assert rule(detachable=["1209:a1a2"]).check(device(tree, 189, 3)) is DETACH
    assert rule(detachable_classes=[8]).check(device(tree, 189, 3)) is DETACH
    assert rule(detachable=["1209:a1a3"]).check(device(tree, 189, 4)) is DETACH
    # class 8 does not make the usbhid interface of 1-4 detachable
    assert rule(detachable_classes=[8]).check(device(tree, 189, 4)) is LOCKDOWN


def test_an_unexpected_usb_child_is_denied_and_other_children_ignored(tmp_path):
    t = UdevTree(tmp_path)
    t.load("""P: /devices/usb9/9-1
E: DEVTYPE=usb_device
E: MAJOR=189
E: MINOR=900
E: SUBSYSTEM=usb
A: idVendor=1209\\n
A: idProduct=0001\\n

P: /devices/usb9/9-1/9-1:1.0
E: DEVTYPE=usb_interface
E: DRIVER=usbhid
E: SUBSYSTEM=usb
A: bInterfaceNumber=00\\n
L: driver=../../../../bus/usb/drivers/usbhid

P: /devices/usb9/9-1/ep_00
E: DEVTYPE=usb_endpoint
""")
    assert rule().check(device(t, 189, 900)) is DENY      # claimed, nothing free
    t.load("""P: /devices/usb9/9-1/9-1:1.1
E: DEVTYPE=usb_interface
E: SUBSYSTEM=usb
A: bInterfaceNumber=01\\n
""")
    assert rule().check(device(t, 189, 900)) is LOCKDOWN  # ep_00 (no subsystem) ignored
    t.load("""P: /devices/usb9/9-1/9-1.2
E: DEVTYPE=usb_device
E: SUBSYSTEM=usb
""")
    assert rule().check(device(t, 189, 900)) is DENY      # a device below it: a hub
