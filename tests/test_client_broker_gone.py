"""The client when the broker goes away under it: a stopped or crashed
broker sends no Exited for the jails it takes with it, so the client's wait
must end on the bus's word that the name lost its owner (found under systemd
in the VM, tests/test_vm_systemd.py: `privbroker run` hung after
`systemctl stop`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from dbus_fixture import granted_bus, start_broker


@pytest.fixture
def bus():
    with granted_bus() as b:
        yield b


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
def test_waiting_for_a_jail_ends_when_the_broker_leaves_the_bus(bus, sig, tmp_path):
    broker = start_broker(bus, ROOT / "examples" / "broker.toml", tmp_path / "broker.log")
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
                os.kill(pid, signal.SIGKILL)
        out, err = client.communicate(timeout=20)
    finally:
        for p in (client, broker):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert client.returncode == 1, (out, err)
    assert "the broker left the bus" in err and "NameHasNoOwner" in err, err
