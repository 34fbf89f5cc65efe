from .base import ALLOW, IGNORE, Device, Rule, Verdict


class AllowHidraw(Rule):
    """Allow hidraw nodes (unsafe ones are denied by deny_unsafe_hidraw)."""
    type = "allow_hidraw"
    summary = "hidraw devices"

    def check(self, dev: Device) -> Verdict:
        return ALLOW if dev.record.subsystem == "hidraw" else IGNORE
