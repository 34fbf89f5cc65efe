"""HID report descriptors: the collection usages the hidraw rule judges, read
as the kernel (drivers/hid/hid-core.c) reads them."""
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
    assert hid.read(FIDO).collections == [Usage(0xF1D0, 0x01)]
    assert hid.read(BOOT_KEYBOARD).collections == [Usage(0x01, 0x06)]
    # a mouse's Pointer collection is a Physical one inside its application
    assert hid.read(MOUSE).collections == [Usage(0x01, 0x02)]


def test_several_top_level_collections_and_a_32_bit_usage():
    desc = bytes.fromhex("05010906A101C0" "0B01000C00A101C0")   # keyboard; usage 0x000C:0x0001
    assert hid.read(desc).collections == [Usage(1, 6), Usage(0x0C, 0x01)]


def test_push_pop_and_long_items_are_followed():
    desc = bytes.fromhex("050CA4050DB40901A101C0" "FE0201AABB" "05010902A101C0")
    assert hid.read(desc).collections == [Usage(0x0C, 1), Usage(1, 2)]


@pytest.mark.parametrize("hexdesc,usage", [
    # a 4-byte Usage Page: a short Usage takes only its low 16 bits
    ("0701000100" "0906A101C0", Usage(1, 6)),
    # a 4-byte (extended) Usage has its own page, whatever the Usage Page
    ("050C" "0B06000100" "A101C0", Usage(1, 6)),
    ("0501" "0B06000000" "A101C0", Usage(0, 6)),
    # the Usage Page in force at the Collection goes into the usages again...
    ("050D0906" "0501A101C0", Usage(1, 6)),
    # ...unless one of them is on it already: then the first keeps its page
    ("05010906" "050C0901A101C0", Usage(1, 6)),
    # Usage Minimum..Maximum: the range's first usage (extended if the
    # Maximum has 4 bytes); a Usage before the range comes first
    ("05011906" "2906A101C0", Usage(1, 6)),
    ("05011906" "2907A101C0", Usage(1, 6)),
    ("050C" "1B06000100" "2B07000100" "A101C0", Usage(1, 6)),
    ("050C0901" "19062907A101C0", Usage(0x0C, 1)),
    ("A101C0", Usage(0, 0)),                         # no usage at all
    # what comes before another main item is gone at the Collection
    ("05011906" "8100" "0906A101C0", Usage(1, 6)),
])
def test_a_collection_usage_is_the_kernels(hexdesc, usage):
    assert hid.read(bytes.fromhex(hexdesc)).collections == [usage]


def test_application_collections_at_every_depth_count():
    # a keyboard application inside a vendor one (through a Physical
    # collection): hid-input makes a keyboard of it
    nested = bytes.fromhex("0600FF0901A101" "0501A1000906A101C0C0" "C0")
    assert hid.read(nested).collections == [Usage(0xFF00, 1), Usage(1, 6)]
    # a gamepad's axes in a Pointer Physical collection, and a Logical one:
    # parts of the gamepad application, which is no mouse
    gamepad = bytes.fromhex("05010905A101" "0901A100093009311581257F750895028102C0"
                            "0901A102C0" "C0")
    assert hid.read(gamepad).collections == [Usage(1, 5)]
    assert not any(hid.unsafe_reason(u) for u in hid.read(gamepad).collections)


@pytest.mark.parametrize("hexdesc", [
    "05011906A101C0",                # Usage Minimum, no Maximum (the kernel: no usage)
    "05012906A101C0",                # Usage Maximum, no Minimum (the kernel: from 0)
    "050119082906A101C0",            # reversed range (the kernel: clamps, from 8)
    "050119002AFF7FA101C0",          # more usages than the kernel takes (0..0x7FFF)
    "0600FFA9010901A900A101C0",      # Delimiter (the kernel keeps the first set)
])
def test_what_is_not_worked_out_is_unknown_and_unsafe(hexdesc):
    assert hid.read(bytes.fromhex(hexdesc)).collections == [hid.UNKNOWN]
    assert hid.unsafe_reason(hid.UNKNOWN) == "usage unknown"


@pytest.mark.parametrize("hexdesc", ["0501260", "C0", "B4", "FE05", "A100" * 70])
def test_malformed_descriptors_raise(hexdesc):
    with pytest.raises(ValueError):
        hid.read(bytes.fromhex(hexdesc + ("0" if len(hexdesc) % 2 else "")))


@pytest.mark.parametrize("usage,reason", [
    (Usage(0x07, 0x00), "keyboard"), (Usage(0x01, 0x06), "keyboard"),
    (Usage(0x01, 0x07), "keyboard"), (Usage(0x01, 0x01), "pointer"),
    (Usage(0x01, 0x02), "pointer"), (Usage(0x01, 0x80), "system control"),
    (Usage(0x01, 0x8F), "system control"), (Usage(0x01, 0xA0), "system control"),
    (Usage(0x01, 0xB6), "system control"), (Usage(0x01, 0x04), None),     # joystick
    (Usage(0x01, 0x05), None), (Usage(0x0C, 0x01), None), (Usage(0xF1D0, 0x01), None),
    (Usage(0x01, 0x90), None),
    (Usage(0x0D, 0x01), "pointer"), (Usage(0x0D, 0x02), "pointer"),     # digitizer, pen
    (Usage(0x0D, 0x04), "pointer"), (Usage(0x0D, 0x05), "pointer"),     # touch screen, pad
    (Usage(0x0D, 0x0D), "pointer"), (Usage(0x0D, 0x0F), "pointer"),
    (Usage(0x0D, 0x00), None), (Usage(0x0D, 0x22), None),               # finger (in a pad)
])
def test_what_is_unsafe(usage, reason):
    assert hid.unsafe_reason(usage) == reason


# An n-key-rollover report in a vendor collection: a bitmap of the Keyboard
# page's keys 0x00-0x65 (as some gaming keyboards send theirs).
NKRO_IN_VENDOR = "0600FF0901A101" "05071900296515002501750195668102" "C0"


@pytest.mark.parametrize("hexdesc,pages", [
    (NKRO_IN_VENDOR, {0x07}),
    # the same usages as Output fields (never key events)
    ("0600FF0901A101" "05071900296515002501750195669102" "C0", set()),
    # the Usage Page in force at the Input item takes the range over, as at
    # a Collection: vendor fields, not keys
    ("0600FF0901A101" "05071900296506 00FF 150025017501956681 02" "C0", {0xFF00}),
    # padding (no usage) adds no page; a Delimiter makes the fields unknown
    ("0600FF0901A101" "750195088101" "C0", set()),
    ("0600FF0901A101" "A9010907A900150025017501950181 02" "C0", {hid.UNKNOWN.page}),
])
def test_the_pages_of_input_fields(hexdesc, pages):
    assert hid.read(bytes.fromhex(hexdesc.replace(" ", ""))).input_pages == pages


def test_keys_in_an_input_report_are_unsafe():
    assert hid.unsafe_input({0x07}) == "keyboard keys in an input report"
    assert hid.unsafe_input({hid.UNKNOWN.page}) == "input usage unknown"
    assert hid.unsafe_input({0x01, 0x09, 0xFF00, 0xF1D0}) is None
    assert hid.read(FIDO).input_pages == {0xF1D0}
