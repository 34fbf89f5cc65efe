"""The broker's jail cgroups end to end: ListJails accounting, an OOM kill
reported in Exited, kill-all on Signal and when the caller goes away, and
request options that may only tighten a profile's limits."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker.jail import cgroups
from conftest import JAIL_PYTHON, ROOT, processes_with
from dbus_fixture import granted_bus, sample_policy, start_broker, stop_broker
from test_cgroups import ESCAPE, alive, cgroup_dirs

CLIENT = [sys.executable, "-m", "client.cli"]
BUS_NAME = "org.privbroker.Broker1"

pytestmark = pytest.mark.skipif(cgroups.System.probe().version is None,
                                reason="no cgroup file system")

LIMITED = """% minijail-config-file v0
# one short-lived command, with cgroup limits
p
e
l
uts
n
profile = minimalistic-mountns
c = 0
memory-limit = 48M
pids-limit = 64
cpu-weight = 50
"""

# The host's pid namespace (a mount namespace keeps root out of the
# forbidden intersection): a double fork really leaves the program's tree.
HOSTPID = """% minijail-config-file v0
v
e
n
c = 0
"""


@pytest.fixture(scope="module")
def deployment():
    d = Path(tempfile.mkdtemp(prefix="privbroker-cg-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    (d / "profiles").mkdir()
    (d / "profiles" / "limited.conf").write_text(LIMITED)
    (d / "profiles" / "hostpid.conf").write_text(HOSTPID)
    (d / "profiles" / "badparent.conf").write_text(
        "% minijail-config-file v0\np\nn\nc = 0\ncgroup-parent = /pbt-no-such-parent\n")
    toml = sample_policy(d)
    toml = toml.replace("launches_per_second = 20", "launches_per_second = 1000")
    toml = toml.replace("calls_per_second = 200", "calls_per_second = 100000")
    toml += ('\n[[grant]]\nname = "cgroup-tests"\nusers = ["root"]\n'
             'profiles = ["limited", "badparent"]\n'
             # as nobody: without a pid namespace, root would be refused
             # (the forbidden intersection)
             '\n[[grant]]\nname = "cgroup-hostpid"\nusers = ["root"]\n'
             'profiles = ["hostpid"]\nrun_as = "nobody"\n')
    (d / "broker.toml").write_text(toml)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bus():
    with granted_bus() as b:
        yield b


@pytest.fixture(scope="module")
def broker(bus, deployment):
    proc = start_broker(bus, deployment / "broker.toml", deployment / "broker.log")
    yield proc
    stop_broker(proc)


@pytest.fixture
def b(bus, broker):
    from client import Broker
    with Broker(bus.address) as client:
        yield client


def client(bus, *args, timeout=60):
    return subprocess.run([*CLIENT, "--bus-address", bus.address, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def jail_cgroups(jail_id: str) -> set[str]:
    return cgroup_dirs(f"privbroker-{jail_id}")


def jail_cgroups_after_exit(jail_id: str) -> set[str]:
    """The launcher sends Exited first and then removes the jail's (by then
    empty) cgroup: what is still there a moment after Exited."""
    deadline = time.monotonic() + 2
    while (left := jail_cgroups(jail_id)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


BUSY_THEN_SLEEP = ("import time\nx = bytearray(16 << 20)\nt = time.process_time()\n"
                   "while time.process_time() - t < 0.3: pass\ntime.sleep(60)")


def test_list_jails_shows_memory_pids_and_cpu_time(b, capsys):
    jail = b.launch("limited", [JAIL_PYTHON, "-c", BUSY_THEN_SLEEP], stdin=None)
    try:
        assert jail_cgroups(jail.jail_id)                  # it has its own cgroup
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            (j,) = b.jails()
            # both: on a slow machine (tests/test_vm_cgroup2.py's VM) Python's
            # start alone takes 0.25 s of CPU, before the 16M are touched
            if j.get("cpu_usec", 0) >= 250_000 and j.get("memory_bytes", 0) >= 16 << 20:
                break
            time.sleep(0.1)
        assert j["jail_id"] == jail.jail_id
        assert j["cpu_usec"] >= 250_000
        assert j["memory_bytes"] >= 16 << 20
        assert j["pids"] == 2                               # its init and the program
        assert j["oom_kills"] == 0
        assert (j["memory_limit"], j["pids_limit"], j["cpu_weight"]) == (48 << 20, 64, 50)
        # and the command-line client prints them (ListJails answers each
        # connection with its own jails: print through this one)
        import argparse

        from client.cli import _dispatch
        assert _dispatch(b, argparse.Namespace(cmd="jails")) == 0
        header, *rows = capsys.readouterr().out.splitlines()
        assert header.split()[:6] == ["JAIL", "PID", "PROFILE", "MEMORY", "PIDS", "CPU"]
        (row,) = [line for line in rows if line.startswith(jail.jail_id)]
        fields = row.split()
        assert fields[2] == "limited" and fields[3].endswith("M") and fields[4] == "2"
        assert fields[5].endswith("s") and float(fields[5][:-1]) >= 0.25
    finally:
        jail.signal(9)
        jail.wait(timeout=20)
    assert jail_cgroups_after_exit(jail.jail_id) == set()   # gone with the jail


def test_an_oom_kill_is_what_exited_says(b, bus):
    jail = b.launch("limited", [JAIL_PYTHON, "-c", "x = bytearray(256 << 20)"], stdin=None)
    status = jail.wait(timeout=30)
    assert (status.oom, status.signal, status.code) == (True, 9, None)
    assert status.shell_code == 137
    assert jail_cgroups_after_exit(jail.jail_id) == set()
    # a plain kill -9 is not mistaken for one
    jail = b.launch("limited", ["/bin/sleep", "30"], stdin=None)
    jail.signal(9)
    status = jail.wait(timeout=20)
    assert (status.oom, status.signal) == (False, 9)
    # privbroker run says it in words
    r = client(bus, "run", "limited", "--", JAIL_PYTHON, "-c", "x = bytearray(256 << 20)")
    assert r.returncode == 137
    assert "killed by the OOM killer: it hit its memory limit" in r.stderr


def test_exited_on_the_wire_for_an_oom_kill(bus, broker):
    """The raw signal: Exited(jail_id, -2, 9), the documented convention."""
    import asyncio

    from client.api import EXIT_STATUS_OOM, AsyncBroker

    async def main():
        a = await AsyncBroker(bus.address).connect()
        bodies = []
        a.bus.add_message_handler(lambda m: bodies.append(m.body)
                                  if m.member == "Exited" else None)
        jail_id, _ = await a.launch("limited", [JAIL_PYTHON, "-c", "x = bytearray(256 << 20)"],
                                    fds={})
        await asyncio.wait_for(a.wait(jail_id), 30)
        a.close()
        return jail_id, bodies
    jail_id, bodies = asyncio.run(main())
    assert [jail_id, EXIT_STATUS_OOM, 9] in bodies


def test_signal_9_kills_what_double_forked_away(b):
    marker = f"bk-escape-{time.monotonic_ns()}"
    jail = b.launch("hostpid", [JAIL_PYTHON, "-c", ESCAPE, "60", marker], stdin=None)
    deadline = time.monotonic() + 20
    while len(alive(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(alive(marker)) == 2           # the program and its re-parented grandchild
    jail.signal(9)
    assert jail.wait(timeout=20).signal == 9
    deadline = time.monotonic() + 5
    while alive(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alive(marker) == [] and processes_with(marker) == []
    assert jail_cgroups_after_exit(jail.jail_id) == set()


def test_when_the_program_exits_what_it_left_behind_goes_too(b):
    marker = f"bk-leftover-{time.monotonic_ns()}"
    jail = b.launch("hostpid", [JAIL_PYTHON, "-c", ESCAPE, "0.5", marker], stdin=None)
    assert jail.wait(timeout=20).code == 0
    deadline = time.monotonic() + 5
    while alive(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alive(marker) == []
    assert jail_cgroups_after_exit(jail.jail_id) == set()


def test_a_caller_that_goes_away_takes_its_double_forked_processes(bus, broker):
    from client import Broker
    marker = f"bk-gone-{time.monotonic_ns()}"
    c = Broker(bus.address)
    jail = c.launch("hostpid", [JAIL_PYTHON, "-c", ESCAPE, "60", marker], stdin=None)
    deadline = time.monotonic() + 20
    while len(alive(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(alive(marker)) == 2
    c.close()
    deadline = time.monotonic() + 10
    while (alive(marker) or jail_cgroups(jail.jail_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(marker) == []
    assert jail_cgroups(jail.jail_id) == set()


@pytest.mark.parametrize("options,error", [
    ({"memory_limit": "1G"}, "AccessDenied"),             # above the profile's 48M
    ({"memory_limit": 100 << 20}, "AccessDenied"),
    ({"pids_limit": 1000}, "AccessDenied"),
    ({"cpu_weight": 200}, "AccessDenied"),
    ({"memory_limit": "lots"}, "InvalidArgument"),
    ({"memory_limit": "150%"}, "InvalidArgument"),
    ({"pids_limit": 0}, "InvalidArgument"),
    ({"cpu_quota": "0%"}, "InvalidArgument"),
    ({"pids_limit": True}, "InvalidArgument"),
])
def test_options_may_only_tighten_the_profiles_limits(b, options, error):
    from client import BrokerCallError
    with pytest.raises(BrokerCallError) as e:
        b.launch("limited", ["/bin/true"], stdin=None, options=options)
    assert e.value.name == f"org.privbroker.Error.{error}", e.value
    assert b.jails() == []           # refused in the front: the launcher never saw it


def test_tighter_options_apply(b):
    jail = b.launch("limited", ["/bin/sleep", "30"], stdin=None,
                    options={"memory_limit": "16M", "pids_limit": 8, "cpu_quota": "50%"})
    try:
        (j,) = [j for j in b.jails() if j["jail_id"] == jail.jail_id]
        assert (j["memory_limit"], j["pids_limit"], j["cpu_quota"]) == (16 << 20, 8, 50)
        (mem,) = [d for d in jail_cgroups(jail.jail_id) if "/memory/" in d] or [None]
        if mem:
            assert cgroups._read_int(f"{mem}/memory.limit_in_bytes") == 16 << 20
    finally:
        jail.signal(9)
        jail.wait(timeout=20)


def test_a_cgroup_that_cannot_be_made_is_a_named_error_and_leaves_nothing(b):
    from client import BrokerCallError
    with pytest.raises(BrokerCallError) as e:
        b.launch("badparent", ["/bin/true"], stdin=None)
    assert e.value.name == "org.privbroker.Error.Failed"
    assert "jail setup failed at step 'cgroup'" in e.value.message
    # v1: the jail's directory cannot be made; v2: the parent's controllers
    # cannot be enabled, the parent is named
    assert "/pbt-no-such-parent/privbroker-" in e.value.message or \
        "No such file or directory (/sys/fs/cgroup/pbt-no-such-parent)" in e.value.message
    assert b.jails() == []
    # (a create that fails halfway takes back what it made: test_cgroups.py)
