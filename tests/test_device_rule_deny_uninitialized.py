import pytest

from broker.devices.rules import DENY, IGNORE
from broker.devices.rules.deny_uninitialized import DenyUninitialized
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def test_a_device_without_a_udev_db_entry_is_denied(tree):
    assert DenyUninitialized().check(device(tree, 240, 2)) is DENY


def test_an_initialized_device_is_left_to_other_rules(tree):
    rule = DenyUninitialized()
    assert rule.check(device(tree, 240, 0)) is IGNORE
    assert rule.check(device(tree, 189, 2)) is IGNORE
