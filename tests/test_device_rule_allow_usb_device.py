import pytest

from broker.devices.rules import ALLOW, IGNORE, RuleConfigError, build
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def rule(*ids):
    return build({"type": "allow_usb_device", "allow": list(ids)}, "test")


def test_a_listed_device_is_allowed(tree):
    assert rule("1209:a1a1").check(device(tree, 189, 2)) is ALLOW


def test_an_unlisted_device_is_not(tree):
    assert rule("1209:a1a1").check(device(tree, 189, 5)) is IGNORE
    assert rule("1209:a1a1").check(device(tree, 189, 3)) is IGNORE


def test_a_vendor_wildcard(tree):
    r = rule("1209:*")
    assert [r.check(device(tree, 189, n)) for n in (2, 3, 4, 5)] == [ALLOW, ALLOW, ALLOW, IGNORE]


def test_only_usb_device_nodes_count(tree):
    # hidraw0 sits below a 1209:a1b0 USB device, but the node is a hidraw node
    assert rule("1209:a1b0").check(device(tree, 240, 0)) is IGNORE


@pytest.mark.parametrize("bad", ["1209", "1209:a1a", "xyz1:0001", "1209:*1", 1209])
def test_malformed_ids_are_config_errors(bad):
    with pytest.raises(RuleConfigError, match="VID:PID"):
        rule(bad)
