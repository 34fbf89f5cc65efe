from .base import DENY, IGNORE, Device, Rule, Verdict


class DenyUninitialized(Rule):
    """Deny a device udev has not finished with: until its database entry
    exists, udev's rules (groups, modes, tags, ACLs) have not been applied and
    its properties are the kernel's alone."""
    type = "deny_uninitialized"
    summary = "udev has not finished initialising the device"

    def check(self, dev: Device) -> Verdict:
        return IGNORE if dev.record.is_initialized else DENY
