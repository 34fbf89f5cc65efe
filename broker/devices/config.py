"""The [devices] section of broker.toml.

    [devices]
    dev_root = "/dev"                      # OpenPath/ChownDevice paths must be beneath it
    sysfs = "/sys"                         # where device records are read from
    udev_data = "/run/udev/data"           # udev's database
    journal = "/var/lib/privbroker/device-leases.journal"
    lease_timeout_s = 0                    # 0: a lease lasts until released or disconnect
    max_leases_per_caller = 8              # per caller uid

    [[devices.rule]]                       # the chain, in order
    type = "deny_uninitialized"
    [[devices.rule]]
    type = "allow_usb_device"
    allow = ["18d1:4ee7"]
    lease_mode = 0o600                     # any rule: mode of a leased node it allows
    readonly_fallback = false              # any rule: OpenPath may fall back to O_RDONLY

Without a [devices] section there are no rules, and every device is denied.
Unknown keys are errors, here and in every rule table.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import rules as rules_mod
from .rules import Rule, RuleConfigError

KEYS = {"dev_root", "sysfs", "udev_data", "journal", "lease_timeout_s",
        "max_leases_per_caller", "rule"}


@dataclass(frozen=True)
class DevicesConfig:
    dev_root: str = "/dev"
    sysfs: str = "/sys"
    udev_data: str = "/run/udev/data"
    journal: str = "/var/lib/privbroker/device-leases.journal"
    lease_timeout_s: float = 0.0
    max_leases_per_caller: int = 8
    rules: tuple[Rule, ...] = ()


def parse(d: dict, where: str = "[devices]") -> DevicesConfig:
    if not isinstance(d, dict):
        raise RuleConfigError(f"{where}: expected a table")
    extra = set(d) - KEYS
    if extra:
        raise RuleConfigError(f"{where}: unknown keys {', '.join(sorted(extra))}")
    base = DevicesConfig()
    paths = {}
    for key in ("dev_root", "sysfs", "udev_data", "journal"):
        v = d.get(key, getattr(base, key))
        if not isinstance(v, str) or not v.startswith("/") or "\0" in v:
            raise RuleConfigError(f"{where}: {key} must be an absolute path")
        paths[key] = v.rstrip("/") or "/"
    if paths["dev_root"] == "/":
        raise RuleConfigError(f"{where}: dev_root cannot be / (every file would be beneath it)")
    timeout = d.get("lease_timeout_s", 0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise RuleConfigError(f"{where}: lease_timeout_s must be a number >= 0")
    most = d.get("max_leases_per_caller", base.max_leases_per_caller)
    if not isinstance(most, int) or isinstance(most, bool) or most < 0:
        raise RuleConfigError(f"{where}: max_leases_per_caller must be an integer >= 0")
    tables = d.get("rule", [])
    if not isinstance(tables, list):
        raise RuleConfigError(f"{where}: rule must be an array of tables ([[devices.rule]])")
    chain = tuple(rules_mod.build(t, f"{where} rule #{i + 1}") for i, t in enumerate(tables))
    names = [r.name for r in chain]
    if len(set(names)) != len(names):
        raise RuleConfigError(f"{where}: rule names must be unique (give repeated types "
                              f"a name)")
    return DevicesConfig(rules=chain, lease_timeout_s=float(timeout),
                         max_leases_per_caller=most, **paths)
