import grp

import pytest

from broker.devices.rules import DENY, IGNORE, RuleConfigError, build
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def test_a_tty_node_in_a_listed_group_is_denied(tree):
    tty = grp.getgrnam("tty").gr_gid
    rule = build({"type": "deny_tty_group", "groups": ["tty"]}, "test")
    assert rule.check(device(tree, 4, 64, gid=tty)) is DENY
    assert rule.check(device(tree, 166, 0, gid=grp.getgrnam("dialout").gr_gid)) is IGNORE
    assert rule.check(device(tree, 240, 0, gid=tty)) is IGNORE       # not a tty


def test_groups_by_gid_and_unknown_names():
    assert build({"type": "deny_tty_group", "groups": [5]}, "t").groups == frozenset({5})
    with pytest.raises(RuleConfigError, match="unknown group"):
        build({"type": "deny_tty_group", "groups": ["no-such-group-xyz"]}, "t")
