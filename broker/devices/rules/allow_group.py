from .base import ALLOW, IGNORE, Device, Rule, Verdict, acl_group_obj, groups, names


class AllowGroup(Rule):
    """Allow nodes whose group is listed (`groups = ["plugdev"]`), optionally
    only in some subsystems (`subsystems = ["tty"]`): udev's own rules put
    the node in that group to say its users may have it.

    What they may have is what the node's group may do: a 0640 node is
    allowed read only (OpenPath opens it O_RDONLY; no lease), and a node
    whose group may neither read nor write is not this rule's to allow.
    With an ACL (logind's uaccess adds one for the seat's user) the mode's
    group bits are the ACL's mask, and the group may do what its own entry
    says within that mask."""
    type = "allow_group"
    summary = "devices whose node group is on the configured list"
    params = {"groups": groups, "subsystems": names}
    groups: frozenset = frozenset()
    subsystems: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        if self.subsystems and dev.record.subsystem not in self.subsystems:
            return IGNORE
        if dev.gid not in self.groups or not _mode_group_bits(dev):
            return IGNORE
        return ALLOW

    def access(self, dev: Device) -> int:
        # The ACL is read only here: the chain asks for access only while
        # no other allowing rule has granted read-write (an ACL read makes
        # the decision one that is made afresh every time, core.py).
        bits = _mode_group_bits(dev)
        acl = dev.node_acl()
        if acl is not None:
            bits &= acl_group_obj(acl)
        return bits


def _mode_group_bits(dev: Device) -> int:
    """r and w of the mode's group triple (with an ACL: its mask)."""
    return (dev.st.st_mode >> 3) & 0o6
