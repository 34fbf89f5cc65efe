"""privbrokerd.service under a real systemd (pid 1), in a VM (issue #12).

This machine's pid 1 is not systemd, so the unit can be verified and scored
here but not run. tests/vm/harness.py boots a qemu VM on this machine's own
root file system (read-only, under a tmpfs overlay) with systemd as pid 1 on
cgroup v2; tests/vm/systemd_scenario.py, a oneshot unit there, installs the
package built by `make deb` with dpkg and operates the service: D-Bus
activation, the launcher/front split, a jailed launch, stop, a crash and its
restart, `systemd-analyze security` of the running unit, the journal, dpkg -r.
Each check it made is asserted here, by name.

About 55 s on an idle machine (TCG; minutes when the machine is busy);
`make test` and `make vm-test` run it (it needs `make vm-deps`: qemu, a
Debian kernel, busybox).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

SCENARIO = ROOT / "tests" / "vm" / "systemd_scenario.py"
TARGET = """[Unit]
Description=privbroker VM test: sysinit, basic (dbus.socket) and the scenario, nothing else
Requires=basic.target privbroker-vmtest.service
After=basic.target
AllowIsolate=yes
"""
SERVICE = f"""[Unit]
Description=privbroker VM scenario (tests/vm/systemd_scenario.py)
After=basic.target dbus.socket
Wants=dbus.socket
# however it ends, the VM powers off and the host reads /vmjob
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 -I {SCENARIO}
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
"""
KERNEL_ARGS = ("systemd.unit=privbroker-vmtest.target systemd.unified_cgroup_hierarchy=1 "
               "fstab=no systemd.show_status=1")

# Every check the scenario makes: one missing is a failure too.
EXPECTED = [
    "pid 1 is systemd",
    "cgroup v2 alone on /sys/fs/cgroup",
    "no privbroker package before the install",
    "dpkg -i installs the package",
    "installing starts nothing",
    "the service user exists",
    "systemd-analyze verify of the installed unit",
    "first call activates privbrokerd.service through the bus",
    "the unit is active and running",
    "MainPID is the launcher: privbrokerd, uid 0",
    "Delegate=yes: the unit's cgroup has memory, pids and cpu",
    "the launcher moved into the leaf <unit cgroup>/privbrokerd (Delegate=yes)",
    "the front, user privbroker, owns org.privbroker.Broker1 on the system bus",
    "a jailed launch as a member of group privbroker runs as the caller",
    "the jail ran in its own cgroup beside the launcher's leaf",
    "a caller outside the grant is refused",
    "a profile outside the caller's grant is refused by the broker",
    "a jail over its memory limit is OOM-killed and the caller is told",
    "privjail's minimalistic-mountns binds the journal's /dev/log onto its /dev",
    "busctl reads the broker's properties on the system bus",
    "a seed made after a seeded launch copies ahead what that launch wrote",
    "a long jail runs in its cgroup",
    "systemctl stop succeeds",
    "stop leaves no jail process",
    "stop leaves no cgroup (unit's and jails')",
    "the caller's client ends too",
    "the journal has the stop's result",
    "systemctl start",
    "a long jail runs before the crash",
    "SIGKILL of MainPID: Restart=on-failure brings it back, name owned again",
    "the crash took its jails (KillMode=mixed)",
    "launches work after the restart",
    "systemd-analyze security (online) scores the running unit",
    "journalctl -u privbrokerd has decision lines",
    "dpkg -r removes it, the broker stopped first",
]


@pytest.fixture(scope="module")
def run():
    from vm.harness import vm_or_skip
    vm = vm_or_skip()
    jobdir = Path(tempfile.mkdtemp(prefix="privbroker-vm-systemd-"))
    build = jobdir / "deb"
    r = subprocess.run(["make", "-C", str(ROOT), "deb", f"DEB_BUILD={build}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    (deb,) = build.glob("privbroker_*.deb")
    shutil.copy(deb, jobdir / "privbroker.deb")
    shutil.rmtree(build)
    job = {"mode": "systemd", "deb": "/vmjob/privbroker.deb",
           "units": {"privbroker-vmtest.target": TARGET, "privbroker-vmtest.service": SERVICE}}
    res = vm.run_job(job, timeout=1500, kernel_args=KERNEL_ARGS, jobdir=jobdir)
    yield res
    if all(c["ok"] for c in checks_of(res)) and res.file("done"):
        shutil.rmtree(jobdir, ignore_errors=True)       # kept for a look when anything failed


def checks_of(res) -> list[dict]:
    return [json.loads(line) for line in (res.file("checks.jsonl") or "").splitlines()]


def test_the_vm_booted_systemd_and_ran_the_whole_scenario(run):
    assert run.qemu_rc == 0 and run.file("done"), \
        f"no end of scenario after {run.seconds:.0f} s; console:\n{run.console[-4000:]}"
    figures = json.loads(run.file("figures.json"))
    print(f"\nvm systemd: {run.seconds:.0f} s in all; figures {figures}")


@pytest.mark.parametrize("name", EXPECTED)
def test_under_systemd(run, name):
    found = [c for c in checks_of(run) if c["name"] == name]
    assert found, f"the scenario never checked {name!r} (see {run.dir}/console.log)"
    assert all(c["ok"] for c in found), found


def test_no_check_failed_that_this_file_does_not_name(run):
    assert [c for c in checks_of(run) if not c["ok"] and c["name"] not in EXPECTED] == []
