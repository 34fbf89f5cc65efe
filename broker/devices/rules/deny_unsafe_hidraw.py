from .. import hid
from .base import DENY, IGNORE, Device, Rule, Verdict, usb_id_listed, usb_ids


class DenyUnsafeHidraw(Rule):
    """Deny hidraw nodes of keyboards, pointers (mice, touchpads, touch
    screens, pens) and system controls (power, sleep, dock, display), judged
    by the usage of every top-level and every Application collection, at
    any depth, in the HID report descriptor as the kernel reads it (hid.py),
    and of anything with Keyboard-page fields in an input report: raw access
    to them reads keystrokes or injects input.  A usage not worked out the
    kernel's way counts as unsafe.  USB devices on `exempt` (VID:PID)
    are not judged.  A descriptor that is missing or does not parse is
    treated as unsafe (DENY): this rule guards, it does not guess."""
    type = "deny_unsafe_hidraw"
    summary = "hidraw devices that are keyboards, pointers or system controls"
    params = {"exempt": usb_ids}
    exempt: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        r = dev.record
        if r.subsystem != "hidraw":
            return IGNORE
        if self.exempt:
            usb = r.find_parent("usb", "usb_device")
            if usb is not None and usb_id_listed(usb, self.exempt):
                return IGNORE
        hid_dev = r.find_parent("hid")
        if hid_dev is None:
            return DENY
        # Read again for every decision made afresh: a driver rebind changes
        # the descriptor while the hid device (and its record) stays.  The
        # verdict is kept with the bytes it was made from, for the next hidraw
        # decision about the same descriptor.
        desc = hid_dev.attribute_fresh("report_descriptor")
        memo = hid_dev.memo.get("hid_unsafe")
        if memo is None or memo[0] != desc:
            memo = hid_dev.memo["hid_unsafe"] = (desc, self._unsafe(desc))
        return DENY if memo[1] else IGNORE

    @staticmethod
    def _unsafe(desc: bytes | None) -> bool:
        if not desc:
            return True
        try:
            d = hid.read(desc)
        except ValueError:
            return True
        return any(hid.unsafe_reason(u) for u in d.collections) or bool(
            hid.unsafe_input(d.input_pages))
