"""Jail cgroups on cgroup v2 with its controllers, in a VM (issue #8).

This machine mounts the v1 controllers and a v2 hierarchy with none, so the
v2 half of broker/jail/cgroups.py can only refuse here. tests/vm/harness.py
boots a qemu VM on this machine's own root file system (read-only, under a
tmpfs overlay) whose pid 1 mounts cgroup2 alone on /sys/fs/cgroup and
enables memory, pids and cpu for the root's children (as systemd does), and
runs tests/test_cgroups.py and tests/test_broker_cgroups.py there: privjail
and privbrokerd (with its own dbus-daemon) for real, on v2 (and
tests/test_warm.py: seeds on v2, on Debian's kernel). Asserted here:
each test that matters for v2 passed in the VM (a skip there is a failure),
and nothing failed.

About 50 s on an idle machine (TCG); `make test` and `make vm-test` run it
(it needs `make vm-deps`: qemu, a Debian kernel, busybox).
"""
from __future__ import annotations

import pytest

from vm import pytest_in_vm

TESTS = ["tests/test_cgroups.py", "tests/test_broker_cgroups.py", "tests/test_warm.py"]

# What must have passed on v2 in the VM, by pytest node id.
MUST_PASS = [
    # memory limit: the OOM killer ends the jail, and privjail / Exited say so
    "test_cgroups.py::test_over_the_memory_limit_the_oom_killer_ends_the_jail[init-in-pid-ns]",
    "test_cgroups.py::test_over_the_memory_limit_the_oom_killer_ends_the_jail[program-is-top]",
    "test_cgroups.py::test_under_the_memory_limit_nothing_happens",
    "test_cgroups.py::test_memory_limit_and_oom_count_on_v2",
    "test_broker_cgroups.py::test_an_oom_kill_is_what_exited_says",
    "test_broker_cgroups.py::test_exited_on_the_wire_for_an_oom_kill",
    # pids limit against a fork bomb
    "test_cgroups.py::test_a_fork_bomb_stops_at_the_pids_limit_and_the_host_stays_responsive",
    # cpu.weight and cpu.max written, and enforced
    "test_cgroups.py::test_cpu_weight_and_quota_on_v2",
    # kill-all (cgroup.kill) leaves nothing; the cgroup goes
    "test_cgroups.py::test_kill_all_takes_what_double_forked_out_of_the_program",
    "test_cgroups.py::test_kill_all_leaves_nothing_and_the_cgroup_goes[v2]",
    "test_cgroups.py::test_members_of_a_cgroup_below_the_jails_are_found_and_killed[v2]",
    "test_cgroups.py::test_a_cgroup_whose_processes_are_gone_is_removed_at_once[v2]",
    "test_cgroups.py::test_signal_members_never_leaves_the_cgroup[v2]",
    "test_broker_cgroups.py::test_signal_9_kills_what_double_forked_away",
    "test_broker_cgroups.py::test_when_the_program_exits_what_it_left_behind_goes_too",
    "test_broker_cgroups.py::test_a_caller_that_goes_away_takes_its_double_forked_processes",
    # device allow list: an eBPF device program on v2, the same meaning as v1's
    "test_cgroups.py::test_devices_outside_the_allow_list_cannot_be_opened_even_by_root[host-dev]",
    "test_cgroups.py::test_devices_outside_the_allow_list_cannot_be_opened_even_by_root"
    "[pid-and-mount-ns]",
    "test_cgroups.py::test_a_v2_device_program_refuses_what_no_rule_allows",
    "test_cgroups.py::test_v2_refuses_missing_controllers_before_making_anything",
    # accounting, placement, bad input
    "test_cgroups.py::test_accounting_reads_cpu_memory_and_pids[v2]",
    "test_broker_cgroups.py::test_list_jails_shows_memory_pids_and_cpu_time",
    "test_broker_cgroups.py::test_tighter_options_apply",
    "test_cgroups.py::test_cgroup_parent_puts_the_jail_there",
    "test_cgroups.py::test_bad_flags_leave_no_cgroup_behind",
    "test_broker_cgroups.py::test_a_cgroup_that_cannot_be_made_is_a_named_error_and_leaves_nothing",
    "test_cgroups.py::test_enter_leaf_moves_a_daemon_below_its_delegated_cgroup",
    # seeds on v2, and what they copy ahead, on Debian's kernel (jail/warm.py):
    # the launcher reads a jail init's pagemap without CAP_SYS_PTRACE there too
    "test_warm.py::test_the_launcher_reads_a_jail_inits_pages_without_cap_sys_ptrace",
    "test_warm.py::test_copying_ahead_takes_the_faults_out_of_the_writes",
    "test_warm.py::test_a_seed_warmed_by_a_seeded_launch_faults_far_less_in_its_own",
]


@pytest.fixture(scope="module")
def vm_run():
    yield from pytest_in_vm.run(TESTS, "cgroup2")


def test_the_vm_ran_the_cgroup_tests_and_none_failed(vm_run):
    pytest_in_vm.ran_clean(*vm_run)


@pytest.mark.parametrize("node", MUST_PASS)
def test_on_cgroup_v2(vm_run, node):
    _, got = vm_run
    assert got.get(node) == "passed", f"{node}: {got.get(node, 'not run')} in the VM"
