"""Faults (issue #9): the broker's processes killed with SIGKILL in the
middle of launches and of a device lease, the bus daemon restarted, a full
disk under the lease journal, an exhausted pid space.

Each test runs its own broker on its own bus, inside a cgroup of its own
(soak_kit.BrokerCgroup) so that its jail cgroups, and only they, are found
beneath it.  The front is the bus name's owner; the launcher is privbrokerd's
own process (tests/soak_kit.py says how the processes are found).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, processes_with
from dbus_fixture import PrivateBus, start_broker, stop_broker
from soak_kit import BrokerCgroup, bus_owner_pid, cgroup_members, wait_for
from test_broker import deployment  # noqa: F401 - fixture
from test_devices_broker import alice, cli, holder, owner, world  # noqa: F401 - fixtures

BUS_NAME = "org.privbroker.Broker1"




@pytest.fixture
def cg():
    c = BrokerCgroup(f"{os.getpid()}-{time.monotonic_ns()}")
    yield c
    c.remove()


def _launch_many(bus, marker: str, n: int) -> subprocess.Popen:
    """A caller (root) that launches long jails carrying the marker, one
    after another, until it is killed or the broker goes."""
    code = f"""
import asyncio
from client import AsyncBroker
async def main():
    b = await AsyncBroker({bus.address!r}).connect()
    for i in range({n}):
        try:
            await b.launch("minimal", ["/bin/sh", "-c", "sleep 300", {marker!r}], fds={{}})
        except Exception as e:
            print("refused", e, flush=True)
            await asyncio.sleep(0.05)
        else:
            print("launched", flush=True)
    await asyncio.sleep(300)
asyncio.run(main())
"""
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _jails_seen(marker: str) -> int:
    host = os.stat("/proc/self/ns/pid").st_ino
    return len({os.stat(f"/proc/{p}/ns/pid").st_ino for p in processes_with(marker)
                if os.path.exists(f"/proc/{p}") and os.stat(f"/proc/{p}/ns/pid").st_ino != host})


@pytest.mark.parametrize("victim", ["front", "launcher"])
def test_sigkill_in_the_middle_of_launches_leaves_no_jail(deployment, cg, victim, tmp_path):
    marker = f"fault-{victim}-{time.monotonic_ns()}"
    log = tmp_path / "broker.log"
    with PrivateBus() as bus:
        b = start_broker(bus, deployment / "broker.toml", log, wrap=cg.wrap)
        caller = _launch_many(bus, marker, 12)
        try:
            assert wait_for(lambda: _jails_seen(marker) >= 4, 20), open(log).read()[-2000:]
            front = bus_owner_pid(bus)
            os.kill(front if victim == "front" else b.pid, signal.SIGKILL)   # launches coming
            t = time.monotonic()
            assert wait_for(lambda: b.poll() is not None, 10), "privbrokerd outlived it"
            assert wait_for(lambda: not os.path.exists(f"/proc/{front}"), 10), "the front too"
            gone_after = time.monotonic() - t
            assert wait_for(lambda: _jails_seen(marker) == 0, 10), _jails_seen(marker)
            left = [(d, cgroup_members(d)) for d in cg.jail_dirs()]
            print(f"\nfaults: SIGKILL {victim}: privbrokerd exited {b.returncode} after "
                  f"{gone_after:.2f}s; jail cgroups left {len(left)}, processes in them "
                  f"{sum(len(m) for _, m in left)}")
            assert all(m == [] for _, m in left), left
            if victim == "launcher":
                assert b.returncode != 0     # the front: nonzero, for systemd to restart it
            b = start_broker(bus, deployment / "broker.toml", log, wrap=cg.wrap)  # it comes back
            from client import Broker
            with Broker(bus.address) as c:
                assert c.launch("minimal", ["/bin/true"], stdin=None).wait(timeout=20).code == 0
        finally:
            caller.kill()
            caller.wait()
            stop_broker(b)


def test_a_restarted_bus_ends_the_broker_with_a_failure_status(deployment, tmp_path):
    bus = PrivateBus().__enter__()
    try:
        b = start_broker(bus, deployment / "broker.toml", tmp_path / "broker.log")
        bus.proc.kill()                      # the bus daemon dies (systemd would restart it)
        bus.proc.wait()
        t = time.monotonic()
        exited = wait_for(lambda: b.poll() is not None, 10)
        print(f"\nfaults: bus killed: privbrokerd exited {b.returncode} after "
              f"{time.monotonic() - t:.2f}s")
        assert exited
        assert b.returncode != 0
    finally:
        stop_broker(b)
        bus.__exit__(None, None, None)


def test_sigkill_of_the_front_during_a_lease_is_restored_at_restart(world, alice, tmp_path):
    path = str(world / "dev" / "ttyACM0")
    assert wait_for(lambda: owner(path)[0] != alice.uid, 5)
    before = owner(path)
    config, log = world / "broker-state-crash.toml", tmp_path / "broker.log"
    with PrivateBus() as bus:
        b = start_broker(bus, config, log)
        p = holder(bus, alice, path)
        try:
            assert owner(path)[0] == alice.uid
            os.kill(bus_owner_pid(bus), signal.SIGKILL)       # the front: no cleanup at all
            assert wait_for(lambda: b.poll() is not None, 10)
            assert owner(path)[0] == alice.uid                # still leased
            b = start_broker(bus, config, log)                       # replays the journal first
            assert owner(path) == before
        finally:
            p.kill()
            p.wait()
            stop_broker(b)


@pytest.fixture
def full_disk_config(world):
    """The device config with its lease journal on a 64 KiB tmpfs."""
    d = world / "state-full"
    d.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(d)],
                   check=True)
    from test_devices_broker import CONFIG
    config = world / "broker-state-full.toml"
    config.write_text(CONFIG.format(root=world, state="state-full"))
    yield config, d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(d) -> None:
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_journal_disk_refuses_the_lease_and_leaves_the_node(world, alice,
                                                                   full_disk_config, tmp_path):
    config, d = full_disk_config
    path = str(world / "dev" / "ttyACM0")
    assert wait_for(lambda: owner(path)[0] != alice.uid, 5)
    before = owner(path)
    with PrivateBus() as bus:
        b = start_broker(bus, config, tmp_path / "broker.log")
        try:
            _fill(d)
            r = cli(bus, alice, "chown", path, "--", "true")
            print(f"\nfaults: ChownDevice on a full journal disk: rc {r.returncode}: "
                  f"{r.stderr.strip()[-200:]}")
            assert r.returncode == 1
            assert "[org.privbroker.Error.Failed]" in r.stderr
            assert "cannot record the lease; nothing was changed" in r.stderr
            assert owner(path) == before
            # space again: leases work, and the journal still replays after a crash
            (d / "filler").unlink()
            p = holder(bus, alice, path)
            try:
                os.kill(bus_owner_pid(bus), signal.SIGKILL)
                assert wait_for(lambda: b.poll() is not None, 10)
                b = start_broker(bus, config, tmp_path / "broker.log")
                assert owner(path) == before, "the lease taken after the full disk was lost"
            finally:
                p.kill()
                p.wait()
        finally:
            stop_broker(b)


def test_an_exhausted_pid_space_is_a_clear_error_and_the_broker_keeps_serving(
        deployment, cg, tmp_path):
    from client import Broker, BrokerCallError
    with PrivateBus() as bus:
        b = start_broker(bus, deployment / "broker.toml", tmp_path / "broker.log",
                         wrap=cg.wrap)
        try:
            with Broker(bus.address) as c:
                cg.set_pids_max(cg.pids_current())   # not one process more
                with pytest.raises(BrokerCallError) as e:
                    c.launch("minimal", ["/bin/true"], stdin=None)
                print(f"\nfaults: launch with pids.max reached: {e.value.name}: "
                      f"{e.value.message}")
                assert e.value.name in ("org.privbroker.Error.Failed",
                                        "org.privbroker.Error.LimitExceeded")
                assert "Resource temporarily unavailable" in e.value.message \
                    or "pid" in e.value.message.lower()
                assert c.jails() == []                           # still serving
                cg.set_pids_max("max")
                assert c.launch("minimal", ["/bin/true"], stdin=None).wait(timeout=20).code == 0
            assert cg.jail_dirs() == [] or wait_for(lambda: cg.jail_dirs() == [], 5)
        finally:
            cg.set_pids_max("max")
            stop_broker(b)
