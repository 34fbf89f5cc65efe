"""HID report descriptors: the usages of the collections that make input
devices, and the pages of input reports' fields, as the kernel reads them.

A hidraw node speaks for a HID device whose report descriptor (sysfs
attribute `report_descriptor` of its `hid` parent) says what it is: each
Collection item carries the (usage page, usage) of one function, e.g.
(0x01, 0x06) Generic Desktop / Keyboard or (0xF1D0, 0x01) FIDO
authenticator.  The kernel's hid-input makes its input devices per
Application collection, at any depth (a report's application is the
innermost Application collection around it), so a keyboard Application
nested in a vendor collection is a keyboard: every top-level collection and
every Application collection is returned.  Physical and Logical collections
inside an application are not: a gamepad's axes sit in a Pointer Physical
collection, and the gamepad is no mouse.

The usage is worked out as drivers/hid/hid-core.c does, because a reading
that differs from the kernel's lets a keyboard pass as something else:

  - Usage items (local) collect in a list until the next main item, which
    clears it; a Collection takes the list's first usage, 0:0 if it is empty.
  - A 1- or 2-byte Usage takes the current Usage Page cut to 16 bits (a
    4-byte page 0x00010001 is Generic Desktop); a 4-byte Usage is
    "extended": its page is its own high 16 bits.
  - Usage Minimum .. Usage Maximum adds the range's usages where the
    Maximum is (extended if that item has 4 bytes).  A range is kept here as
    its first usage only: all a collection can take from it.
  - At the main item the Usage Page then current is put into the list's
    short usages again, from the last one back, stopping at one already on
    that page (HID 1.11, 6.2.2.8: the last declared Usage Page counts).

The same usages, at an Input item, are the fields of an input report: hid-
input turns Keyboard-page usages into key events wherever they are (a
gaming keyboard's n-key-rollover report may sit in a vendor collection), so
the pages of every Input item's usages are returned too.

Where the kernel's reading depends on more than that (Delimiter items, a
Usage Minimum or Maximum without the other, a reversed or oversized range)
the collection's usage is UNKNOWN, which is unsafe: fail closed rather than
copy every corner.  Long items are skipped (the kernel refuses descriptors
with them, so no hidraw node has one).  A malformed descriptor raises
ValueError: callers must treat it as unknown, never as safe.
"""
from __future__ import annotations

from typing import NamedTuple

PAGE_GENERIC_DESKTOP = 0x01
PAGE_KEYBOARD = 0x07
PAGE_DIGITIZER = 0x0D

GD_POINTER, GD_MOUSE, GD_KEYBOARD, GD_KEYPAD = 0x01, 0x02, 0x06, 0x07
# HID Usage Tables, Generic Desktop: System Control .. System Warm Restart,
# and System Dock .. System Display Swap (power, sleep, menus, display).
GD_SYSTEM_CONTROL = range(0x80, 0x90)
GD_SYSTEM_DOCK = range(0xA0, 0xB7)
# Digitizer devices: Digitizer, Pen, Light Pen, Touch Screen, Touch Pad,
# Whiteboard, ..., Free Space Wand, Device Configuration, Capacitive Heat
# Map Digitizer.  All of them move or click a pointer.
DG_DEVICES = range(0x01, 0x10)

MAX_DEPTH = 64
COLLECTION_APPLICATION = 0x01
HID_MAX_USAGES = 12288        # the kernel's limit on usages before one main item


class Usage(NamedTuple):
    page: int
    usage: int

    def __str__(self) -> str:
        if self == UNKNOWN:
            return "unknown"
        return f"{self.page:#06x}:{self.usage:#04x}"


UNKNOWN = Usage(-1, -1)       # a collection whose usage is not worked out here


def _on_page(usage: int, page: int) -> int:
    """A short usage completed with a Usage Page, as the kernel does: only
    the page's low 16 bits are kept."""
    return (page & 0xFFFF) << 16 | usage & 0xFFFF


def _at_main_item(local: list[tuple[int, bool]], page: int) -> list[int]:
    """The list of (usage, extended) once a main item has put the last
    Usage Page into it: walking back from the end, each short usage is
    moved to `page` until one is already on it (the full, uncut page is
    compared, as in the kernel)."""
    out = [u for u, _ext in local]
    for i in range(len(local) - 1, -1, -1):
        usage, extended = local[i]
        if extended:
            continue
        if usage >> 16 == page:
            break
        out[i] = _on_page(usage, page)
    return out


class Descriptor(NamedTuple):
    collections: list[Usage]     # every top-level and every Application collection's
    input_pages: set[int]        # the pages of Input items' usages (UNKNOWN.page: not
                                 # worked out)


def read(desc: bytes) -> Descriptor:
    """The usages of the collections, in descriptor order, and the pages
    of the usages of the input reports' fields."""
    usages: list[Usage] = []
    input_pages: set[int] = set()
    page = 0                          # Usage Page as given (may be 32-bit)
    page_stack: list[int] = []
    # local state, cleared by every main item
    local: list[tuple[int, bool]] = []    # (32-bit usage, extended)
    count = 0                         # usages the kernel's list holds
    minimum: int | None = None        # a Usage Minimum waiting for its Maximum
    doubtful = False                  # read here otherwise than by the kernel
    depth = 0
    i, n = 0, len(desc)
    while i < n:
        prefix = desc[i]
        if prefix == 0xFE:                               # long item: size, tag, data
            if i + 2 >= n:
                raise ValueError(f"truncated long item at byte {i}")
            i += 3 + desc[i + 1]
            continue
        size = (0, 1, 2, 4)[prefix & 3]
        if i + 1 + size > n:
            raise ValueError(f"truncated item at byte {i}")
        value = int.from_bytes(desc[i + 1:i + 1 + size], "little")
        kind, tag = (prefix >> 2) & 3, prefix >> 4
        i += 1 + size
        if kind == 0:                                    # main
            known = not (doubtful or minimum is not None or count > HID_MAX_USAGES)
            now = _at_main_item(local, page) if known else []
            if tag == 0x8:                               # Input
                if known:
                    input_pages.update(u >> 16 for u in now)
                else:
                    input_pages.add(UNKNOWN.page)
            elif tag == 0xA:                             # Collection
                if depth > 0 and value & 0xFF != COLLECTION_APPLICATION:
                    pass                                 # part of an application
                elif not known:
                    usages.append(UNKNOWN)
                else:
                    first = now[0] if now else 0         # the kernel's usage[0]
                    usages.append(Usage(first >> 16, first & 0xFFFF))
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValueError("collections nested too deep")
            elif tag == 0xC:                             # End Collection
                if depth == 0:
                    raise ValueError(f"End Collection without Collection at byte {i - 1}")
                depth -= 1
            local, count, minimum, doubtful = [], 0, None, False
        elif kind == 1:                                  # global
            if tag == 0x0:
                page = value
            elif tag == 0xA:                             # Push
                page_stack.append(page)
            elif tag == 0xB:                             # Pop
                if not page_stack:
                    raise ValueError("Pop without Push")
                page = page_stack.pop()
        elif kind == 2:                                  # local
            extended = size == 4
            if tag == 0x0:                               # Usage
                local.append((value if extended else _on_page(value, page), extended))
                count += 1
            elif tag == 0x1:                             # Usage Minimum
                if minimum is not None:
                    doubtful = True
                minimum = value
            elif tag == 0x2:                             # Usage Maximum
                if minimum is None or value < minimum:   # the kernel counts from 0,
                    doubtful = True                      # or clamps a wrapped count
                else:
                    local.append((minimum if extended else _on_page(minimum, page),
                                  extended))
                    count += value - minimum + 1
                minimum = None
            elif tag == 0xA:                             # Delimiter: alternative
                doubtful = True                          # usages the kernel ignores
    return Descriptor(usages, input_pages)


def is_keyboard(u: Usage) -> bool:
    return u.page == PAGE_KEYBOARD or (u.page == PAGE_GENERIC_DESKTOP
                                       and u.usage in (GD_KEYBOARD, GD_KEYPAD))


def is_pointer(u: Usage) -> bool:
    """Mice, and what digitizes a position: touch pads, touch screens, pens."""
    return (u.page == PAGE_GENERIC_DESKTOP and u.usage in (GD_POINTER, GD_MOUSE)
            or u.page == PAGE_DIGITIZER and u.usage in DG_DEVICES)


def is_system_control(u: Usage) -> bool:
    return u.page == PAGE_GENERIC_DESKTOP and (u.usage in GD_SYSTEM_CONTROL
                                               or u.usage in GD_SYSTEM_DOCK)


def unsafe_input(pages: set[int]) -> str | None:
    """Why fields of these pages in an input report make a device unsafe."""
    if UNKNOWN.page in pages:
        return "input usage unknown"
    if PAGE_KEYBOARD in pages:
        return "keyboard keys in an input report"
    return None


def unsafe_reason(u: Usage) -> str | None:
    if u == UNKNOWN:
        return "usage unknown"
    if is_keyboard(u):
        return "keyboard"
    if is_pointer(u):
        return "pointer"
    if is_system_control(u):
        return "system control"
    return None
