from .base import ALLOW, IGNORE, Device, Rule, Verdict, groups, names


class AllowGroup(Rule):
    """Allow nodes whose group is listed (`groups = ["plugdev"]`), optionally
    only in some subsystems (`subsystems = ["tty"]`): udev's own rules put
    the node in that group to say its users may have it."""
    type = "allow_group"
    summary = "devices whose node group is on the configured list"
    params = {"groups": groups, "subsystems": names}
    groups: frozenset = frozenset()
    subsystems: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        if self.subsystems and dev.record.subsystem not in self.subsystems:
            return IGNORE
        return ALLOW if dev.gid in self.groups else IGNORE
