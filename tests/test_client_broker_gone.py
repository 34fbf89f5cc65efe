"""The client when the broker goes away under it: a stopped or crashed
broker sends no Exited for the jails it takes with it, so the client's wait
must end on the bus's word that the name lost its owner (found under systemd
in the VM, tests/test_vm_systemd.py: `privbroker run` hung after
`systemctl stop`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import granted_bus, sample_deployment, start_broker


@pytest.fixture
def bus():
    with granted_bus() as b:
        yield b


@pytest.fixture
def deployment():
    """The sample deployment in a directory the front's user can reach."""
    d = Path(tempfile.mkdtemp(prefix="privbroker-gone-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield sample_deployment(d)
    shutil.rmtree(d, ignore_errors=True)


def jailed_sleep(seconds: str) -> list[int]:
    """Pids of `/bin/sleep SECONDS` (not of the client, whose arguments say it too)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"/bin/sleep", seconds.encode()]:
                    found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
def test_waiting_for_a_jail_ends_when_the_broker_leaves_the_bus(bus, sig, tmp_path,
                                                               deployment):
    broker = start_broker(bus, deployment, tmp_path / "broker.log")
    seconds = f"1000.{time.monotonic_ns() % 10**9}"      # names this jail's sleep
    client = subprocess.Popen([sys.executable, "-m", "client.cli", "--bus-address", bus.address,
                               "run", "minimal", "--", "/bin/sleep", seconds], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not jailed_sleep(seconds) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jailed_sleep(seconds), client.stderr.read() if client.poll() is not None else ""
        broker.send_signal(sig)
        broker.wait(timeout=20)
        if sig == signal.SIGKILL:        # what systemd's KillMode=mixed does after a crash
            for pid in jailed_sleep(seconds):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass                 # it went with its jail meanwhile
        out, err = client.communicate(timeout=20)
    finally:
        for p in (client, broker):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert client.returncode == 1, (out, err)
    assert "the broker left the bus" in err and "NameHasNoOwner" in err, err


def test_a_client_goes_on_with_the_broker_that_replaced_the_one_it_met(bus, tmp_path,
                                                                       deployment):
    """A long-lived client (a session manager) outlives a broker restart: its
    calls reach the new broker by name, and the new broker's Exited (from
    another unique name) ends its waits too."""
    import asyncio

    from client import AsyncBroker
    from dbus_fixture import stop_broker
    config, log = deployment, tmp_path / "broker.log"
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    brokers = [start_broker(bus, config, log)]

    async def run_true(b) -> int:
        jail_id, _ = await b.launch("minimal", ["/bin/true"], fds={0: null, 1: null, 2: null})
        return (await asyncio.wait_for(b.wait(jail_id), 15)).code

    async def scenario():
        b = await AsyncBroker(bus.address).connect()
        try:
            assert await run_true(b) == 0
            stop_broker(brokers[0])
            brokers.append(start_broker(bus, config, log))
            assert await run_true(b) == 0
        finally:
            b.close()
    try:
        asyncio.run(scenario())
    finally:
        for p in brokers:
            stop_broker(p)
        os.close(null)


def test_which_broker_a_waits_answer_comes_from():
    """The client's bookkeeping, message by message: Exited counts from the
    name's current owner; an owner change ends the waits of the one that
    left, also when the name passes straight to a new owner; a Launch
    answered by a broker that has already left (its reply read after the
    bus said so) is not waited for forever."""
    import asyncio

    from dbus_fast import Message, MessageType

    from client import AsyncBroker
    from client.api import BUS_NAME, IFACE, BrokerCallError

    def owner_changed(old, new):
        return Message(message_type=MessageType.SIGNAL, path="/org/freedesktop/DBus",
                       interface="org.freedesktop.DBus", member="NameOwnerChanged",
                       signature="sss", body=[BUS_NAME, old, new], sender="org.freedesktop.DBus")

    def exited(sender, jail_id, code=0):
        return Message(message_type=MessageType.SIGNAL, path="/org/privbroker/Broker1",
                       interface=IFACE, member="Exited", signature="sii",
                       body=[jail_id, code, 0], sender=sender)

    async def scenario():
        b = AsyncBroker("unix:path=/nonexistent")
        b.broker_name = ":1.5"
        b._launched("a", ":1.5")
        b._launched("b", ":1.5")
        b._on_message(exited(":1.9", "a"))            # not the broker: ignored
        assert not b.exits["a"].done()
        b._on_message(exited(":1.5", "a", 3))
        assert (await b.wait("a")).code == 3
        b._on_message(owner_changed(":1.5", ":1.7"))   # replaced at once
        with pytest.raises(BrokerCallError, match="left the bus"):
            await b.wait("b")
        b._launched("c", ":1.7")
        b._on_message(exited(":1.7", "c", 0))
        assert (await b.wait("c")).code == 0
        b._launched("d", ":1.5")                        # answered by the one that left
        with pytest.raises(BrokerCallError, match="left the bus"):
            await b.wait("d")
        b._on_message(owner_changed(":1.7", ""))       # stopped, nobody yet
        assert b.broker_name is None
        b._on_message(owner_changed("", ":1.8"))
        assert b.broker_name == ":1.8"
    asyncio.run(scenario())
