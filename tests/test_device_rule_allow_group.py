import grp

import pytest

from broker.devices.rules import ALLOW, IGNORE, build
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


PLUGDEV = grp.getgrnam("plugdev").gr_gid


def test_a_node_of_a_listed_group_is_allowed(tree):
    rule = build({"type": "allow_group", "groups": ["plugdev"]}, "test")
    assert rule.check(device(tree, 10, 250, gid=PLUGDEV)) is ALLOW
    assert rule.check(device(tree, 10, 250, gid=0)) is IGNORE


def test_restricted_to_subsystems(tree):
    rule = build({"type": "allow_group", "groups": ["plugdev"], "subsystems": ["tty"]}, "test")
    assert rule.check(device(tree, 10, 250, gid=PLUGDEV)) is IGNORE
    assert rule.check(device(tree, 166, 0, gid=PLUGDEV)) is ALLOW
