"""The device rules.  Each rule is one small class in its own module (and
one test file, tests/test_device_rule_<type>.py); RULE_TYPES is every rule a
config file may name.  Adding a rule: write the class, list it here."""
from __future__ import annotations

from .allow_group import AllowGroup
from .allow_hidraw import AllowHidraw
from .allow_tty import AllowTty
from .allow_usb_device import AllowUsbDevice
from .base import (ALLOW, DENY, DETACH, IGNORE, LOCKDOWN, Device, Rule, RuleConfigError,
                   Verdict)
from .deny_claimed_usb import DenyClaimedUsb
from .deny_tty_group import DenyTtyGroup
from .deny_uninitialized import DenyUninitialized
from .deny_unsafe_hidraw import DenyUnsafeHidraw
from .deny_usb_hub import DenyUsbHub
from .deny_usb_vendor import DenyUsbVendor

RULE_TYPES: dict[str, type[Rule]] = {cls.type: cls for cls in (
    DenyUninitialized, AllowUsbDevice, DenyClaimedUsb, DenyUsbHub, DenyUsbVendor,
    AllowHidraw, DenyUnsafeHidraw, AllowTty, DenyTtyGroup, AllowGroup)}

COMMON_KEYS = {"type", "name", "lease_mode", "readonly_fallback"}


def build(table: dict, where: str) -> Rule:
    """One [[devices.rule]] table -> a Rule.  Unknown keys are errors."""
    if not isinstance(table, dict):
        raise RuleConfigError(f"{where}: expected a table")
    kind = table.get("type")
    cls = RULE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RuleConfigError(f"{where}: type must be one of {', '.join(sorted(RULE_TYPES))}"
                              f" (got {kind!r})")
    extra = set(table) - COMMON_KEYS - set(cls.params)
    if extra:
        raise RuleConfigError(f"{where} ({kind}): unknown keys {', '.join(sorted(extra))}")
    name = table.get("name", kind)
    if not isinstance(name, str) or not name:
        raise RuleConfigError(f"{where}: name must be a non-empty string")
    mode = table.get("lease_mode", 0o600)
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        raise RuleConfigError(f"{where} ({name}): lease_mode must be a permission mode "
                              f"0o000..0o777 (no setuid, setgid or sticky bit)")
    ro = table.get("readonly_fallback", False)
    if not isinstance(ro, bool):
        raise RuleConfigError(f"{where} ({name}): readonly_fallback must be true or false")
    params = {k: cls.params[k](table[k], f"{where} ({name}) {k}")
              for k in cls.params if k in table}
    return cls(name=name, lease_mode=mode, readonly_fallback=ro, **params)


__all__ = ["ALLOW", "DENY", "DETACH", "IGNORE", "LOCKDOWN", "RULE_TYPES", "Device", "Rule",
           "RuleConfigError", "Verdict", "build"]
