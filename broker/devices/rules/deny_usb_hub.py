from .base import DENY, IGNORE, Device, Rule, Verdict, usb_device, usb_interfaces

USB_CLASS_HUB = 0x09


class DenyUsbHub(Rule):
    """Deny USB hubs: device class 9, or any interface of class 9.  Whoever
    holds a hub's usbfs node can power ports off and reset what is behind
    them."""
    type = "deny_usb_hub"
    summary = "USB hubs"

    def check(self, dev: Device) -> Verdict:
        r = usb_device(dev)
        if r is None:
            return IGNORE
        if r.attribute_hex("bDeviceClass") == USB_CLASS_HUB:
            return DENY
        if any(i.attribute_hex("bInterfaceClass") == USB_CLASS_HUB for i in usb_interfaces(r)):
            return DENY
        return IGNORE
