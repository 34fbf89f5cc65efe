from .base import DENY, IGNORE, Device, Rule, Verdict, usb_device, usb_id, usb_vendors


class DenyUsbVendor(Rule):
    """Deny USB devices of the listed vendors (`vendors = ["1d6b"]`: the
    Linux Foundation's ids, i.e. root hubs and gadgets of the kernel itself)."""
    type = "deny_usb_vendor"
    summary = "USB devices of a denied vendor"
    params = {"vendors": usb_vendors}
    vendors: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        r = usb_device(dev)
        if r is None:
            return IGNORE
        return DENY if usb_id(r)[0] in self.vendors else IGNORE
