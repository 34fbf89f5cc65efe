from .base import ALLOW, IGNORE, Device, Rule, Verdict, usb_device, usb_id_listed, usb_ids


class AllowUsbDevice(Rule):
    """Allow a USB device node (/dev/bus/usb/BBB/DDD) whose vendor:product is
    on the allow list (`allow = ["18d1:4ee7", "2341:*"]`)."""
    type = "allow_usb_device"
    summary = "USB devices on the configured allow list"
    params = {"allow": usb_ids}
    allow: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        r = usb_device(dev)
        if r is None:
            return IGNORE
        return ALLOW if usb_id_listed(r, self.allow) else IGNORE
