import pytest

from broker.devices.rules import ALLOW, IGNORE, build
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def test_tty_nodes_are_allowed_and_nothing_else(tree):
    rule = build({"type": "allow_tty"}, "test")
    assert rule.check(device(tree, 166, 0)) is ALLOW
    assert rule.check(device(tree, 4, 64, gid=5)) is ALLOW    # deny_tty_group's job
    assert rule.check(device(tree, 240, 0)) is IGNORE
    assert rule.check(device(tree, 10, 250)) is IGNORE
