import pytest

from broker.devices.rules import DENY, IGNORE, build
from udev_tree import DEVICES, UdevTree, device, sample


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
    fido = "06D0F10901A1010920150026FF007508954081020921150026FF00750895409102C0"
    t = UdevTree(tmp_path)
    t.load(text.replace(f"H: report_descriptor={fido}", f"H: report_descriptor={hexdesc}"
                        if hexdesc else "A: country=00\\n"))
    return device(t, 240, 0)


@pytest.mark.parametrize("desc,verdict", [
    ("", DENY),                                      # no descriptor: unknown, not safe
    ("05010902A101", DENY),                          # mouse (collection left open is fine)
    ("05012600", DENY),                              # truncated item
    ("050109 80A101C0".replace(" ", ""), DENY),      # system control
    ("0601FF0901A101C0", IGNORE),                    # vendor page
    ("050D0905A101C005010902A101C0", DENY),          # touch pad, then a mouse collection
])
def test_descriptors(tmp_path, desc, verdict):
    assert rule().check(_with_descriptor(tmp_path, desc)) is verdict
