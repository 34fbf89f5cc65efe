from .base import DENY, IGNORE, Device, Rule, Verdict, groups


class DenyTtyGroup(Rule):
    """Deny tty nodes whose group is listed (`groups = ["tty"]`): consoles,
    virtual terminals and pseudo-terminals belong to group tty, and their
    owners are users' sessions, not the broker's callers."""
    type = "deny_tty_group"
    summary = "tty devices of a system group"
    params = {"groups": groups}
    groups: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        if dev.record.subsystem != "tty":
            return IGNORE
        return DENY if dev.gid in self.groups else IGNORE
