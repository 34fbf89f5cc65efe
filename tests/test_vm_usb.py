"""OpenPath's lockdown and detach on real USB devices, in a VM (issue #5).

This machine's kernel has no dummy_hcd, and there is no USB hardware here.
Debian's kernel in the VM (tests/vm/harness.py) has it: the VM runs
tests/test_devices_usb_gadget.py, which makes USB gadgets on dummy_hcd,
lets the host side enumerate them (cdc_acm binds, systemd-udevd records
them), and has privbrokerd hand its fd to an unprivileged caller, which
asks the kernel what that fd may do.  Asserted here: each of those tests
passed in the VM (a skip there is a failure).

About 30 s on an idle machine (TCG); `make test` and `make vm-test` run it.
"""
from __future__ import annotations

import pytest

from vm import pytest_in_vm

TESTS = ["tests/test_devices_usb_gadget.py"]

MUST_PASS = [
    "test_devices_usb_gadget.py::test_the_caller_cannot_open_the_nodes_itself",
    "test_devices_usb_gadget.py::test_lockdown_leaves_the_fd_only_the_unclaimed_interface",
    "test_devices_usb_gadget.py::test_the_same_ioctl_on_an_fd_without_lockdown_is_not_refused",
    "test_devices_usb_gadget.py::test_a_driver_unbound_and_bound_again_is_seen_at_the_next_call",
    "test_devices_usb_gadget.py::test_an_interface_claimed_through_usbfs_is_seen_at_the_next_call",
    "test_devices_usb_gadget.py::test_detach_hands_the_claimed_interfaces_to_the_fd",
    "test_devices_usb_gadget.py::test_a_lockdown_device_cannot_be_leased",
    "test_devices_usb_gadget.py::test_the_root_hub_is_denied_by_the_hub_rules",
]


@pytest.fixture(scope="module")
def vm_run():
    yield from pytest_in_vm.run(TESTS, "usb")


def test_the_vm_ran_the_usb_tests_and_none_failed(vm_run):
    pytest_in_vm.ran_clean(*vm_run)


@pytest.mark.parametrize("node", MUST_PASS)
def test_on_real_usb(vm_run, node):
    _, got = vm_run
    assert got.get(node) == "passed", f"{node}: {got.get(node, 'not run')} in the VM"
