import os
import shutil
import stat

import pytest

from broker.devices.record import UdevReader
from broker.devices.rules import DENY, IGNORE, Device, build
from udev_tree import DEVICES, UdevTree, device, kernel_uevent, sample

FIDO = "06D0F10901A1010920150026FF007508954081020921150026FF00750895409102C0"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def rule(**params):
    return build({"type": "deny_unsafe_hidraw", **params}, "test")


def test_a_keyboard_is_denied_a_security_key_is_not(tree):
    assert rule().check(device(tree, 240, 1)) is DENY
    assert rule().check(device(tree, 240, 0)) is IGNORE


def test_an_exempt_usb_device_is_not_judged(tree):
    assert rule(exempt=["1209:a1b1"]).check(device(tree, 240, 1)) is IGNORE


def test_only_hidraw_nodes(tree):
    assert rule().check(device(tree, 189, 4)) is IGNORE


def _with_descriptor(tmp_path, hexdesc):
    text = (DEVICES / "hidraw.umockdev").read_text()
    t = UdevTree(tmp_path)
    t.load(text.replace(f"H: report_descriptor={FIDO}", f"H: report_descriptor={hexdesc}"
                        if hexdesc else "A: country=00\\n"))
    return device(t, 240, 0)


@pytest.mark.parametrize("desc,verdict", [
    ("", DENY),                                      # no descriptor: unknown, not safe
    ("05010902A101", DENY),                          # mouse (collection left open is fine)
    ("05012600", DENY),                              # truncated item
    ("050109 80A101C0".replace(" ", ""), DENY),      # system control
    ("0601FF0901A101C0", IGNORE),                    # vendor page
    ("050D0905A101C005010902A101C0", DENY),          # touch pad, then a mouse collection
    # a gamepad: its axes in a Pointer Physical collection do not make it a mouse
    ("05010905A101" "0901A100093009311581257F750895028102C0" "C0", IGNORE),
    # keyboard keys in the input report of a vendor or a consumer collection
    ("0600FF0901A101" "05071900296515002501750195668102" "C0", DENY),
    ("050C0901A101" "05071900296515002565750895068100" "C0", DENY),
    # ... but only in an input report (an Output field sends nothing)
    ("0600FF0901A101" "05071900296515002501750195669102" "C0", IGNORE),
])
def test_descriptors(tmp_path, desc, verdict):
    assert rule().check(_with_descriptor(tmp_path, desc)) is verdict


# Real descriptors in the forms the kernel (drivers/hid/hid-core.c) reads
# differently from a naive parser.  BOOT_KEYBOARD is a real boot keyboard;
# each variant is still a keyboard to the kernel (it makes an input device).
BOOT_KEYBOARD = ("05010906A101050719E029E71500250175019508810295017508810195057501050819012905"
                 "910295017503910195067508150025650507190029658100C0")
KB_BODY = BOOT_KEYBOARD[len("05010906A101"):]      # what follows Collection (Application)
# Touch pad (as Windows precision touchpads describe one): a finger, contact count.
TOUCHPAD = ("050D0905A1018501" "0922A102" "0942150025017501950181020947810295068103"
            "0951257F750895018102" "05010930093126FF0F751095028102C0"
            "050D09542505750895018102C0")


@pytest.mark.parametrize("desc", [
    pytest.param("0701000100" "0906A101" + KB_BODY, id="usage-page-32-bit"),
    pytest.param("05010906" "050C0901A101" + KB_BODY, id="second-usage-other-page"),
    pytest.param("05011906" "2906A101" + KB_BODY, id="usage-min-max"),
    pytest.param("0600FF0901A101" + BOOT_KEYBOARD + "C0", id="nested-in-vendor"),
    pytest.param(TOUCHPAD, id="touch-pad"),
    pytest.param("050D0904A101C0", id="touch-screen"),
    pytest.param("050D0902A101C0", id="pen"),
    pytest.param("05011906A101" + KB_BODY, id="usage-min-alone"),     # not worked out:
    pytest.param("0600FFA9010901A900A101C0", id="delimiter"),         # unsafe
])
def test_keyboards_pointers_and_the_undeterminable_in_every_form_are_denied(tmp_path, desc):
    assert rule().check(_with_descriptor(tmp_path, desc)) is DENY


def _rebind(sysfs, devnum: str, hexdesc: str) -> None:
    """What a driver rebind (report_fixup, a HID-BPF program) does: the hid
    device stays (same directory), its report descriptor changes, and the
    hidraw child is removed and created again (a new directory)."""
    hidraw = os.path.realpath(sysfs / "dev/char" / devnum)
    with open(f"{os.path.realpath(f'{hidraw}/device')}/report_descriptor", "wb") as f:
        f.write(bytes.fromhex(hexdesc))
    os.rename(hidraw, hidraw + ".old")
    shutil.copytree(hidraw + ".old", hidraw, symlinks=True)
    shutil.rmtree(hidraw + ".old")


def test_a_changed_descriptor_is_judged_again(tmp_path):
    # One reader across both decisions, as in the broker: the hid parent's
    # record (same directory) is reused, the hidraw record is new.
    tree = sample(tmp_path)
    reader = UdevReader(str(tree.sys), str(tree.udev_data))

    def check():
        st = os.stat_result((stat.S_IFCHR | 0o660,) + (0,) * 9)
        return rule().check(Device("/dev/hidraw0", st, reader.for_devnum("c", 240, 0)))

    assert check() is IGNORE                              # the FIDO key
    _rebind(tree.sys, "240:0", BOOT_KEYBOARD)
    assert check() is DENY
    _rebind(tree.sys, "240:0", FIDO)
    assert check() is IGNORE


@pytest.mark.parametrize("uevents_watched", [True, False], ids=["uevents", "no-uevents"])
def test_the_core_judges_a_changed_descriptor_again(tmp_path, monkeypatch, uevents_watched):
    # End to end: the kernel announces the rebind (remove and add of the
    # hidraw child); without uevents the new hidraw directory is a new key.
    from broker.devices import uevents
    from broker.devices.errors import DeviceError
    from test_device_core import Caller, core, make
    if not uevents_watched:
        monkeypatch.setattr(uevents, "MIN_KERNEL", (999, 0))
    path = make(tmp_path, "hidraw0")                      # the FIDO key, as 1:5
    c = core(tmp_path)
    os.close(c.open_path(Caller(), path)[0])
    assert c.uevents.watching is uevents_watched
    _rebind(tmp_path / "sys", "1:5", BOOT_KEYBOARD)
    if uevents_watched:
        kernel_uevent()
    with pytest.raises(DeviceError, match="deny_unsafe_hidraw"):
        c.open_path(Caller(), path)
