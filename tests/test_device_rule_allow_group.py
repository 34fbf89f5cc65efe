import grp

import pytest

from broker.devices.rules import ALLOW, IGNORE, build
from broker.devices.rules.base import READ, READ_WRITE, WRITE
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


@pytest.mark.parametrize("perm,access", [(0o660, READ_WRITE), (0o640, READ), (0o620, WRITE),
                                         (0o666, READ_WRITE), (0o670, READ_WRITE)])
def test_it_grants_what_the_group_bits_give(tree, perm, access):
    # the node's group may do this much, so the rule allows this much and
    # no more (the front opens past mode bits: only the rule can hold it)
    rule = build({"type": "allow_group", "groups": ["plugdev"]}, "test")
    dev = device(tree, 10, 250, gid=PLUGDEV, perm=perm)
    assert rule.check(dev) is ALLOW and rule.access(dev) == access


@pytest.mark.parametrize("perm", [0o600, 0o606, 0o610])
def test_a_node_its_group_may_not_use_is_not_allowed(tree, perm):
    # "other" bits are not the group's: 0606 says nothing for plugdev
    rule = build({"type": "allow_group", "groups": ["plugdev"]}, "test")
    assert rule.check(device(tree, 10, 250, gid=PLUGDEV, perm=perm)) is IGNORE


def test_with_an_acl_the_group_entry_counts_within_the_mask(tree):
    import dataclasses
    import struct

    def acl(group_obj):
        entries = [(0x01, 6, 0xFFFFFFFF), (0x04, group_obj, 0xFFFFFFFF),
                   (0x10, 6, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)

    rule = build({"type": "allow_group", "groups": ["plugdev"]}, "test")
    dev = device(tree, 10, 250, gid=PLUGDEV, perm=0o660)       # 0660: the mask is rw
    for group_obj, want in ((4, READ), (6, READ_WRITE), (2, WRITE)):
        with_acl = dataclasses.replace(dev, node_acl=lambda g=group_obj: acl(g))
        assert rule.check(with_acl) is ALLOW and rule.access(with_acl) == want
    # no access in the group's entry, or an ACL that cannot be read: no
    # access granted (the chain then denies, test_device_chain.py)
    for bad in (acl(0), b"", b"\x02\0\0\0\x04\0"):
        assert rule.access(dataclasses.replace(dev, node_acl=lambda b=bad: b)) == 0
