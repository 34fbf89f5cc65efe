"""[devices] in broker.toml: paths, limits, the rule chain; unknown keys are errors."""
import tomllib

import pytest

from broker import policy
from broker.devices import config
from broker.devices.rules import RULE_TYPES, RuleConfigError
from conftest import ROOT


def parse(text: str):
    return policy.parse(tomllib.loads('profiles_dir = "p"\n' + text))


def test_defaults_without_a_section():
    d = parse("").devices
    assert (d.dev_root, d.sysfs, d.udev_data) == ("/dev", "/sys", "/run/udev/data")
    assert d.rules == ()                 # no rules: every device is denied
    assert d.journal == "/var/lib/privbroker/device-leases.journal"


def test_a_chain_in_order_with_parameters():
    d = parse("""
[devices]
dev_root = "/srv/dev/"
lease_timeout_s = 30
max_leases_per_caller = 2
[[devices.rule]]
type = "deny_uninitialized"
[[devices.rule]]
type = "allow_usb_device"
allow = ["18d1:4ee7"]
lease_mode = 0o660
readonly_fallback = true
[[devices.rule]]
type = "allow_usb_device"
name = "arduino"
allow = ["2341:*"]
""").devices
    assert d.dev_root == "/srv/dev" and d.lease_timeout_s == 30 and d.max_leases_per_caller == 2
    assert [r.name for r in d.rules] == ["deny_uninitialized", "allow_usb_device", "arduino"]
    assert d.rules[1].allow == frozenset({(0x18D1, 0x4EE7)})
    assert d.rules[1].lease_mode == 0o660 and d.rules[1].readonly_fallback
    assert d.rules[2].allow == frozenset({(0x2341, None)})


@pytest.mark.parametrize("text,match", [
    ('[devices]\nfrob = 1\n', "unknown keys frob"),
    ('[devices]\n[[devices.rule]]\ntype = "allow_tty"\nallow = ["x"]\n', "unknown keys allow"),
    ('[devices]\n[[devices.rule]]\ntype = "no_such_rule"\n', "type must be one of"),
    ('[devices]\ndev_root = "dev"\n', "absolute path"),
    ('[devices]\ndev_root = "/"\n', "cannot be /"),
    ('[devices]\nlease_timeout_s = -1\n', "lease_timeout_s"),
    ('[devices]\n[[devices.rule]]\ntype = "allow_tty"\nlease_mode = 0o4600\n', "lease_mode"),
    ('[devices]\n[[devices.rule]]\ntype = "allow_tty"\n[[devices.rule]]\ntype = "allow_tty"\n',
     "unique"),
    ('[[grant]]\nname = "g"\nusers = ["root"]\ndevices = ["frob"]\n', "devices must be"),
])
def test_errors_are_policy_errors_naming_the_key(text, match):
    with pytest.raises(policy.PolicyError, match=match):
        parse(text)


def test_the_example_deployment_parses_with_permission_brokers_chain():
    from dbus_fixture import ensure_group, remove_group
    _, created = ensure_group("privbroker")        # the example's grant names it
    try:
        pol = policy.load(str(ROOT / "examples" / "broker.toml"))
    finally:
        if created:
            remove_group("privbroker")
    types = [r.type for r in pol.devices.rules]
    assert types[0] == "deny_uninitialized"
    assert set(types) == set(RULE_TYPES)          # every rule is shown in the example
    g = pol.device_grant(0, frozenset(), "open")
    assert "chown" in g.devices


def test_device_grants():
    pol = parse('[[grant]]\nname = "g"\nusers = [1234]\ndevices = ["open"]\n')
    assert pol.device_grant(1234, frozenset(), "open").name == "g"
    with pytest.raises(policy.AccessDenied, match="device operation 'chown'"):
        pol.device_grant(1234, frozenset(), "chown")
    with pytest.raises(policy.AccessDenied):
        pol.device_grant(999, frozenset(), "open")


def test_config_module_alone():
    with pytest.raises(RuleConfigError):
        config.parse({"rule": {"type": "allow_tty"}})
