import pytest

from broker.devices.rules import DENY, IGNORE, RuleConfigError, build
from udev_tree import device, sample


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("udev"))


def test_a_listed_vendor_is_denied(tree):
    rule = build({"type": "deny_usb_vendor", "vendors": ["1d6b"]}, "test")
    assert rule.check(device(tree, 189, 0)) is DENY
    assert rule.check(device(tree, 189, 2)) is IGNORE
    assert rule.check(device(tree, 240, 0)) is IGNORE


def test_vendors_are_four_hex_digits():
    with pytest.raises(RuleConfigError, match="4 hex digits"):
        build({"type": "deny_usb_vendor", "vendors": ["0x1d6b"]}, "test")


@pytest.mark.parametrize("vendor", [0x1d6b, 1234])
def test_a_toml_integer_is_refused_not_misread(vendor):
    # 0x1d6b in TOML is the integer 7531; reading its decimal digits as hex
    # would deny vendor 0x7531 and let 0x1d6b through, with no error
    with pytest.raises(RuleConfigError, match="4 hex digits"):
        build({"type": "deny_usb_vendor", "vendors": [vendor]}, "test")
