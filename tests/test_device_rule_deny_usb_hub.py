import pytest

from broker.devices.rules import DENY, IGNORE, build
from udev_tree import UdevTree, device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


RULE = build({"type": "deny_usb_hub"}, "test")


def test_hubs_are_denied(tree):
    assert RULE.check(device(tree, 189, 0)) is DENY       # root hub
    assert RULE.check(device(tree, 189, 1)) is DENY       # external hub


def test_other_devices_are_not_this_rules_business(tree):
    for minor in (2, 3, 4, 5):
        assert RULE.check(device(tree, 189, minor)) is IGNORE
    assert RULE.check(device(tree, 240, 0)) is IGNORE


def test_a_hub_interface_on_a_class_0_device_is_denied(tmp_path):
    t = UdevTree(tmp_path)
    t.load("""P: /devices/usb9/9-1
E: DEVTYPE=usb_device
E: MAJOR=189
E: MINOR=901
E: SUBSYSTEM=usb
A: bDeviceClass=00\\n

P: /devices/usb9/9-1/9-1:1.0
E: DEVTYPE=usb_interface
E: SUBSYSTEM=usb
A: bInterfaceClass=09\\n
""")
    assert RULE.check(device(t, 189, 901)) is DENY
