import pytest

from broker.devices.rules import ALLOW, IGNORE, build
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def test_hidraw_nodes_are_allowed_and_nothing_else(tree):
    rule = build({"type": "allow_hidraw"}, "test")
    assert rule.check(device(tree, 240, 0)) is ALLOW
    assert rule.check(device(tree, 240, 1)) is ALLOW       # deny_unsafe_hidraw's job
    assert rule.check(device(tree, 189, 2)) is IGNORE
    assert rule.check(device(tree, 166, 0)) is IGNORE
