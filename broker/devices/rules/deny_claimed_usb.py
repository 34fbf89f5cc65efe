from .base import (DENY, DETACH, FREE, IGNORE, LOCKDOWN, Device, Rule, Verdict, byte_values,
                   usb_device, usb_id_listed, usb_ids, usb_interface_holder)


class DenyClaimedUsb(Rule):
    """A USB device some of whose interfaces a kernel driver has claimed.

    An interface another program holds through usbfs counts as claimed: it
    is not this caller's to take (lockdown leaves it out of the mask, detach
    leaves it alone).  None claimed: IGNORE.  Otherwise, when the device is on `detachable`
    (VID:PID) or every claimed interface's class is in
    `detachable_classes` (e.g. 8, mass storage): ALLOW_WITH_DETACH (the
    broker detaches those drivers before handing out the fd).  Otherwise,
    when some interface is unclaimed: ALLOW_WITH_LOCKDOWN (the fd may claim
    only the unclaimed interfaces and may not detach drivers, reset or
    reconfigure).  Otherwise DENY.  A child of the device that is not a
    usb_interface (in subsystem usb) is unexpected: DENY (fail safe),
    as for a hub's downstream devices."""
    type = "deny_claimed_usb"
    summary = "USB devices whose interfaces are claimed by kernel drivers"
    params = {"detachable": usb_ids, "detachable_classes": byte_values}
    detachable: frozenset = frozenset()
    detachable_classes: frozenset = frozenset()

    def check(self, dev: Device) -> Verdict:
        r = usb_device(dev)
        if r is None:
            return IGNORE
        claimed, unclaimed = [], []
        for child in r.children():
            if child.subsystem != "usb":        # endpoints (ep_00), power/, ...
                continue
            if child.devtype != "usb_interface":
                return DENY
            (unclaimed if usb_interface_holder(child) == FREE else claimed).append(child)
        if not claimed:
            return IGNORE
        if usb_id_listed(r, self.detachable) or all(
                c.attribute_hex("bInterfaceClass") in self.detachable_classes
                for c in claimed):
            return DETACH
        return LOCKDOWN if unclaimed else DENY
