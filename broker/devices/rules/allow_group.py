from .base import ALLOW, IGNORE, Device, Rule, Verdict, groups, names


class AllowGroup(Rule):
    """Allow nodes whose group is listed (`groups = ["plugdev"]`), optionally
    only in some subsystems (`subsystems = ["tty"]`): udev's own rules put
    the node in that group to say its users may have it.

    What they may have is what the node's group bits say: a 0640 node is
    allowed read only (OpenPath opens it O_RDONLY, a lease gets no write
    bits), and a node whose group bits give neither read nor write is not
    this rule's to allow."""
    type = "allow_group"
    summary = "devices whose node group is on the configured list"
    params = {"groups": groups, "subsystems": names}
    groups: frozenset = frozenset()
    subsystems: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        if self.subsystems and dev.record.subsystem not in self.subsystems:
            return IGNORE
        if dev.gid not in self.groups or not self.access(dev):
            return IGNORE
        return ALLOW

    def access(self, dev: Device) -> int:
        return (dev.st.st_mode >> 3) & 0o6
