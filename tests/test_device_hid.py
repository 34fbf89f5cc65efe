"""HID report descriptors: the top-level usages the hidraw rule judges."""
import pytest

from broker.devices import hid
from broker.devices.hid import Usage

FIDO = bytes.fromhex("06D0F10901A1010920150026FF007508954081020921150026FF00750895409102C0")
BOOT_KEYBOARD = bytes.fromhex(
    "05010906A101050719E029E71500250175019508810295017508810195057501050819012905"
    "910295017503910195067508150025650507190029658100C0")
MOUSE = bytes.fromhex("05010902A1010901A100050919012903150025019503750181029501750581"
                      "01050109300931150081257F750895028106C0C0")


def test_real_descriptors():
    assert hid.toplevel_usages(FIDO) == [Usage(0xF1D0, 0x01)]
    assert hid.toplevel_usages(BOOT_KEYBOARD) == [Usage(0x01, 0x06)]
    # the inner Pointer collection of a mouse is not top level
    assert hid.toplevel_usages(MOUSE) == [Usage(0x01, 0x02)]


def test_several_top_level_collections_and_a_32_bit_usage():
    desc = bytes.fromhex("05010906A101C0" "0B01000C00A101C0")   # keyboard; usage 0x000C:0x0001
    assert hid.toplevel_usages(desc) == [Usage(1, 6), Usage(0x0C, 0x01)]


def test_push_pop_and_long_items_are_followed():
    desc = bytes.fromhex("050CA4050DB40901A101C0" "FE0201AABB" "05010902A101C0")
    assert hid.toplevel_usages(desc) == [Usage(0x0C, 1), Usage(1, 2)]


@pytest.mark.parametrize("hexdesc", ["0501260", "C0", "B4", "FE05", "A100" * 70])
def test_malformed_descriptors_raise(hexdesc):
    with pytest.raises(ValueError):
        hid.toplevel_usages(bytes.fromhex(hexdesc + ("0" if len(hexdesc) % 2 else "")))


@pytest.mark.parametrize("usage,reason", [
    (Usage(0x07, 0x00), "keyboard"), (Usage(0x01, 0x06), "keyboard"),
    (Usage(0x01, 0x07), "keyboard"), (Usage(0x01, 0x01), "pointer"),
    (Usage(0x01, 0x02), "pointer"), (Usage(0x01, 0x80), "system control"),
    (Usage(0x01, 0x8F), "system control"), (Usage(0x01, 0xA0), "system control"),
    (Usage(0x01, 0xB6), "system control"), (Usage(0x01, 0x04), None),     # joystick
    (Usage(0x01, 0x05), None), (Usage(0x0C, 0x01), None), (Usage(0xF1D0, 0x01), None),
    (Usage(0x01, 0x90), None),
])
def test_what_is_unsafe(usage, reason):
    assert hid.unsafe_reason(usage) == reason
