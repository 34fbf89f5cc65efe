"""HID report descriptors: the usages of the top-level collections.

A hidraw node speaks for a HID device whose report descriptor (sysfs
attribute `report_descriptor` of its `hid` parent) says what it is: each
top-level Collection item carries the (usage page, usage) of one function,
e.g. (0x01, 0x06) Generic Desktop / Keyboard or (0xF1D0, 0x01) FIDO
authenticator.  Only what is needed for that is parsed: short items,
Usage Page (global, with Push/Pop), Usage (local, cleared after every main
item), Collection / End Collection; long items are skipped.  A malformed
descriptor raises ValueError: callers must treat it as unknown, never as safe.
"""
from __future__ import annotations

from typing import NamedTuple

PAGE_GENERIC_DESKTOP = 0x01
PAGE_KEYBOARD = 0x07

GD_POINTER, GD_MOUSE, GD_KEYBOARD, GD_KEYPAD = 0x01, 0x02, 0x06, 0x07
# HID Usage Tables, Generic Desktop: System Control .. System Warm Restart,
# and System Dock .. System Display Swap (power, sleep, menus, display).
GD_SYSTEM_CONTROL = range(0x80, 0x90)
GD_SYSTEM_DOCK = range(0xA0, 0xB7)

MAX_DEPTH = 64


class Usage(NamedTuple):
    page: int
    usage: int

    def __str__(self) -> str:
        return f"{self.page:#06x}:{self.usage:#04x}"


def toplevel_usages(desc: bytes) -> list[Usage]:
    usages: list[Usage] = []
    page = 0
    page_stack: list[int] = []
    local: list[int] = []            # usages since the last main item (raw, maybe 32-bit)
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
            if tag == 0xA:                               # Collection
                if depth == 0:
                    raw = local[0] if local else 0
                    usages.append(Usage(raw >> 16, raw & 0xFFFF) if raw > 0xFFFF
                                  else Usage(page, raw))
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValueError("collections nested too deep")
            elif tag == 0xC:                             # End Collection
                if depth == 0:
                    raise ValueError(f"End Collection without Collection at byte {i - 1}")
                depth -= 1
            local = []
        elif kind == 1:                                  # global
            if tag == 0x0:
                page = value
            elif tag == 0xA:                             # Push
                page_stack.append(page)
            elif tag == 0xB:                             # Pop
                if not page_stack:
                    raise ValueError("Pop without Push")
                page = page_stack.pop()
        elif kind == 2 and tag == 0x0:                   # local Usage
            local.append(value if size == 4 else value & 0xFFFF)
    return usages


def is_keyboard(u: Usage) -> bool:
    return u.page == PAGE_KEYBOARD or (u.page == PAGE_GENERIC_DESKTOP
                                       and u.usage in (GD_KEYBOARD, GD_KEYPAD))


def is_pointer(u: Usage) -> bool:
    return u.page == PAGE_GENERIC_DESKTOP and u.usage in (GD_POINTER, GD_MOUSE)


def is_system_control(u: Usage) -> bool:
    return u.page == PAGE_GENERIC_DESKTOP and (u.usage in GD_SYSTEM_CONTROL
                                               or u.usage in GD_SYSTEM_DOCK)


def unsafe_reason(u: Usage) -> str | None:
    if is_keyboard(u):
        return "keyboard"
    if is_pointer(u):
        return "pointer"
    if is_system_control(u):
        return "system control"
    return None
