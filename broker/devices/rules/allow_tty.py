from .base import ALLOW, IGNORE, Device, Rule, Verdict


class AllowTty(Rule):
    """Allow tty nodes (serial adapters, ACM modems, ...); those of system
    groups are denied by deny_tty_group."""
    type = "allow_tty"
    summary = "tty devices"

    def check(self, dev: Device) -> Verdict:
        return ALLOW if dev.record.subsystem == "tty" else IGNORE
