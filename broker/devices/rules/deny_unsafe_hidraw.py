from .. import hid
from .base import DENY, IGNORE, Device, Rule, Verdict, usb_id_listed, usb_ids


class DenyUnsafeHidraw(Rule):
    """Deny hidraw nodes of keyboards, pointers (mice, touchpads) and system
    controls (power, sleep, dock, display), judged by the usage of each
    top-level collection in the HID report descriptor: raw access to them
    reads keystrokes or injects input.  USB devices on `exempt` (VID:PID)
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
        unsafe = hid_dev.memo.get("hid_unsafe")        # the descriptor is fixed
        if unsafe is None:
            unsafe = hid_dev.memo["hid_unsafe"] = self._unsafe(
                hid_dev.attribute("report_descriptor"))
        return DENY if unsafe else IGNORE

    @staticmethod
    def _unsafe(desc: bytes | None) -> bool:
        if not desc:
            return True
        try:
            usages = hid.toplevel_usages(desc)
        except ValueError:
            return True
        return any(hid.unsafe_reason(u) for u in usages)
