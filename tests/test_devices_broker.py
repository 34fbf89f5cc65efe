"""Device access end to end: privbrokerd on a private system-style bus with
the shipped bus policy, device nodes mknod'ed in a temporary dev root, udev
records from tests/devices/*.umockdev (tests/udev_tree.py), and callers that
are real processes of real unprivileged uids using the `privbroker` CLI."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import PrivateBus, ThrowawayUser, popen_as, granted_bus, start_broker
from udev_tree import make_node, sample

CLIENT = [sys.executable, "-m", "client.cli"]
BUS_NAME = "org.privbroker.Broker1"
OBJ = "/org/privbroker/Broker1"

CONFIG = """
profiles_dir = "{root}/profiles"
[limits]
calls_per_second = 100000     # the race loops (test_deputy_races.py) call back to back
[[grant]]
name = "device-users"
users = ["root"]
groups = ["privbroker"]
devices = ["open", "chown"]
[devices]
dev_root = "{root}/dev"
sysfs = "{root}/sys"
udev_data = "{root}/run/udev/data"
journal = "{root}/{state}/leases.journal"
[[devices.rule]]
type = "deny_uninitialized"
[[devices.rule]]
type = "allow_usb_device"
allow = ["1209:*"]
[[devices.rule]]
type = "deny_claimed_usb"
[[devices.rule]]
type = "deny_usb_hub"
[[devices.rule]]
type = "allow_hidraw"
[[devices.rule]]
type = "deny_unsafe_hidraw"
[[devices.rule]]
type = "allow_tty"
[[devices.rule]]
type = "deny_tty_group"
groups = ["tty"]
[[devices.rule]]
type = "allow_group"
groups = ["plugdev"]
subsystems = ["misc"]
"""

# dev-root name: (sysname in the recordings, major, minor, mode, group)
#   hidraw0 is a clone of /dev/zero and 001/003 of /dev/null: opened for real;
#   the other numbers have no driver here and are never opened, only leased.
NODES = {
    "hidraw0": ("hidraw0", 1, 5, 0o600, "root"),           # FIDO key: allowed
    "hidraw1": ("hidraw1", 250, 11, 0o600, "root"),        # keyboard: denied
    "hidraw2": ("hidraw2", 250, 12, 0o600, "root"),        # not initialized: denied
    "bus/usb/001/003": ("1-2", 1, 3, 0o664, "root"),       # allow-listed gadget
    "bus/usb/001/002": ("1-1", 250, 21, 0o664, "root"),    # a hub: denied
    "ttyACM0": ("ttyACM0", 166, 0, 0o660, "dialout"),      # leased in the tests
    "ttyS0": ("ttyS0", 4, 64, 0o620, "tty"),               # group tty: denied
    "pbgadget": ("pbgadget", 1, 7, 0o640, "plugdev"),      # /dev/full; plugdev may only read
}


def _gid(name):
    import grp
    return grp.getgrnam(name).gr_gid


@pytest.fixture(scope="module")
def world():
    d = Path(tempfile.mkdtemp(prefix="privbroker-devices-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    shutil.copytree(ROOT / "examples" / "profiles", d / "profiles")
    sample(d, devnums={sysname: (major, minor) for sysname, major, minor, _, _ in
                       NODES.values()})
    for name, (_, major, minor, mode, group) in NODES.items():
        make_node(d / "dev", name, "c", major, minor, mode=mode, gid=_gid(group))
    # what must be refused, whatever the rules say
    (d / "dev" / "link").symlink_to("hidraw0")
    (d / "dev" / "usblink").symlink_to("bus")
    (d / "dev" / "file").write_text("not a device\n")
    os.mkfifo(d / "dev" / "fifo")
    make_node(d / "outside", "secret", "c", 1, 5, mode=0o600)
    (d / "dev" / "escape").symlink_to("../outside")
    for state in ("state", "state-crash", "state-timeout"):
        (d / state).mkdir(mode=0o700)
        config = CONFIG.format(root=d, state=state)
        if state == "state-timeout":
            config = config.replace("leases.journal\"\n",
                                    "leases.journal\"\nlease_timeout_s = 0.5\n")
        (d / f"broker-{state}.toml").write_text(config)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bus():
    with granted_bus() as b:
        yield b


@pytest.fixture(scope="module")
def broker(bus, world):
    proc = start_broker(bus, world / "broker-state.toml", world / "broker.log")
    proc.bus = bus
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def alice():
    with ThrowawayUser(groups=["privbroker"], prefix="pbdeva") as u:
        yield u


@pytest.fixture(scope="module")
def bob():
    with ThrowawayUser(groups=["privbroker"], prefix="pbdevb") as u:
        yield u


def bus_of(broker):
    return broker.bus


def cli(bus, user, *args, timeout=30):
    return user.run([*CLIENT, "--bus-address", bus.address, *args], env=bus.env(), cwd=ROOT,
                    timeout=timeout)


def holder(bus, user, path) -> subprocess.Popen:
    """`privbroker chown PATH` as user, holding the lease until signalled."""
    p = popen_as(user.uid, user.gid, user.groups,
                 [*CLIENT, "--bus-address", bus.address, "chown", path],
                 env=bus.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline()
    assert "lease" in line, p.stderr.read() if p.poll() is not None else line
    p.lease_id = line.split("lease ")[1].split(";")[0]
    return p


def owner(p) -> tuple[int, int, int]:
    st = os.stat(p)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def wait_for(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- OpenPath ------------------------------------------------------------------------

def test_an_allowed_device_fd_works_for_an_unprivileged_caller(bus, broker, world, alice):
    path = str(world / "dev" / "hidraw0")
    direct = alice.run([sys.executable, "-c", f"open({path!r}, 'rb')"])
    assert direct.returncode != 0 and "PermissionError" in direct.stderr   # 0600 root
    r = cli(bus, alice, "open", path, "--", sys.executable, "-c",
            "import os; fd = int(os.environ['PRIVBROKER_FD']);"
            "print(os.read(fd, 4), os.write(fd, b'hello'), os.getuid())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["b'\\x00\\x00\\x00\\x00'", "5", str(alice.uid)]
    assert owner(path) == (0, 0, 0o600)                   # OpenPath never chowns
    r = cli(bus, alice, "open", str(world / "dev" / "bus/usb/001/003"))
    assert r.returncode == 0 and "opened read-write" in r.stdout, r.stderr


def test_a_node_its_group_may_only_read_is_handed_out_read_only(bus, broker, world, alice):
    # allow_group: plugdev may read this 0640 node, so a caller gets that
    # much (alice is not in plugdev), though the front could open it O_RDWR
    path = str(world / "dev" / "pbgadget")
    r = cli(bus, alice, "open", path)
    assert r.returncode == 0 and "opened read-only" in r.stdout, (r.stdout, r.stderr)
    r = cli(bus, alice, "open", path, "--", sys.executable, "-c",
            "import os; fd = int(os.environ['PRIVBROKER_FD']); print(repr(os.read(fd, 1)));"
            "os.write(fd, b'x')")
    assert r.stdout.split() == [repr(b"\0")] and "Bad file descriptor" in r.stderr, r.stderr
    r = cli(bus, alice, "chown", path, "--", "true")
    assert r.returncode == 1 and "[org.privbroker.Error.AccessDenied]" in r.stderr
    assert "allowed read only" in r.stderr, r.stderr
    assert owner(path) == (0, _gid("plugdev"), 0o640)


@pytest.mark.parametrize("node,rule", [("hidraw1", "deny_unsafe_hidraw"),
                                       ("hidraw2", "deny_uninitialized"),
                                       ("ttyS0", "deny_tty_group"),
                                       ("bus/usb/001/002", "deny_claimed_usb")])
def test_a_denied_device_is_access_denied_naming_the_rule(bus, broker, world, alice, node,
                                                         rule):
    r = cli(bus, alice, "open", str(world / "dev" / node))
    assert r.returncode == 1
    assert "[org.privbroker.Error.AccessDenied]" in r.stderr
    assert f"denied by rule '{rule}'" in r.stderr
    r = cli(bus, alice, "check", str(world / "dev" / node))
    assert r.returncode == 1 and "denied" in r.stdout


REFUSED = [
    ("{dev}/link", "AccessDenied", "symlink"),                 # a symlink at the path
    ("{dev}/usblink/usb/001/003", "AccessDenied", "symlink"),  # a symlink in a parent
    ("{dev}/escape/secret", "AccessDenied", "symlink"),
    ("{dev}/bus/../hidraw0", "InvalidArgument", "not canonical"),
    ("{dev}/file", "AccessDenied", "a regular file"),
    ("{dev}/fifo", "AccessDenied", "a FIFO"),
    ("{root}/outside/secret", "AccessDenied", "not a node under the device root"),
    ("/dev/null", "AccessDenied", "not a node under the device root"),
]


@pytest.mark.parametrize("path,kind,says", REFUSED)
@pytest.mark.parametrize("op", ["open", "chown"])
def test_paths_that_are_refused_leave_the_target_untouched(bus, broker, world, alice, op,
                                                          path, kind, says):
    targets = [world / "dev" / "hidraw0", world / "dev" / "bus/usb/001/003",
               world / "outside" / "secret", world / "dev" / "file", world / "dev" / "fifo",
               Path("/dev/null")]
    before = [owner(t) for t in targets]
    r = cli(bus, alice, op, path.format(dev=world / "dev", root=world), "--", "true")
    assert r.returncode == 1
    assert f"[org.privbroker.Error.{kind}]" in r.stderr and says in r.stderr, r.stderr
    assert [owner(t) for t in targets] == before


# -- ChownDevice leases ------------------------------------------------------------------

def test_a_lease_changes_the_owner_and_release_restores_it(bus, broker, world, alice):
    path = str(world / "dev" / "ttyACM0")
    before = owner(path)
    r = cli(bus, alice, "chown", path, "--", sys.executable, "-c",
            f"import os; st = os.stat({path!r}); print(st.st_uid, oct(st.st_mode & 0o777));"
            f"open({path!r}, 'rb', buffering=0)")
    # the caller owns it for the lease (mode 0600); opening 166:0 itself fails
    # here only because no cdc_acm device exists: ENXIO, not EACCES
    assert r.stdout.split()[:2] == [str(alice.uid), "0o600"], r.stderr
    assert "PermissionError" not in r.stderr
    assert owner(path) == before                              # released: restored


def test_a_killed_caller_loses_its_lease(bus, broker, world, alice):
    path = str(world / "dev" / "ttyACM0")
    before = owner(path)
    p = holder(bus, alice, path)
    try:
        assert owner(path) == (alice.uid, before[1], 0o600)
        p.kill()                                              # no chance to release
        p.wait()
        assert wait_for(lambda: owner(path) == before), owner(path)
    finally:
        if p.poll() is None:
            p.kill()


def test_two_callers_one_node_the_second_is_busy(bus, broker, world, alice, bob):
    path = str(world / "dev" / "ttyACM0")
    before = owner(path)
    p = holder(bus, alice, path)
    try:
        r = cli(bus, bob, "chown", path, "--", "true")
        assert r.returncode == 1
        assert "[org.privbroker.Error.Busy]" in r.stderr
        assert alice.name not in r.stderr and str(alice.uid) not in r.stderr
        assert owner(path)[0] == alice.uid
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
    assert owner(path) == before
    r = cli(bus, bob, "chown", path, "--", "true")            # free again
    assert r.returncode == 0, r.stderr


def test_a_second_broker_on_the_same_journal_refuses_to_start(bus, broker, world, alice):
    # Before the lock, a second privbrokerd on the same config replayed the
    # live journal (restoring alice's node under her lease) and rewrote it,
    # leaving the running broker appending to a deleted file; it only then
    # found the bus name taken.
    path = str(world / "dev" / "ttyACM0")
    journal = world / "state" / "leases.journal"
    before = owner(path)
    p = holder(bus, alice, path)
    try:
        recorded = journal.read_bytes()
        r = subprocess.run([sys.executable, "-m", "broker", "--bus-address", bus.address,
                            "--config", str(world / "broker-state.toml"), "--log-target",
                            "stderr"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "another privbrokerd is using the journal" in r.stderr, \
            r.stderr
        assert owner(path) == (alice.uid, before[1], 0o600)   # the live lease untouched
        assert journal.read_bytes() == recorded
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
    assert owner(path) == before


def test_release_of_someone_elses_lease_is_not_found(bus, broker, world, alice):
    from client import Broker, BrokerCallError
    path = str(world / "dev" / "ttyACM0")
    p = holder(bus, alice, path)
    try:
        # decision lines are written just after the reply: wait for it
        deadline = time.monotonic() + 5
        while f"lease={p.lease_id}" not in (world / "broker.log").read_text():
            assert time.monotonic() < deadline, "the ChownDevice decision was not logged"
            time.sleep(0.02)
        with Broker(bus.address) as b:                        # root, another connection
            with pytest.raises(BrokerCallError) as e:
                b.release_device(p.lease_id)
        assert e.value.name == "org.privbroker.Error.NotFound"
        assert owner(path)[0] == alice.uid
    finally:
        p.kill()
        p.wait()


def test_a_broker_killed_during_a_lease_restores_it_when_restarted(world, alice):
    path = str(world / "dev" / "ttyACM0")
    # an earlier test's lease ends when its holder's bus name goes away,
    # asynchronously: start from the node's restored owner
    deadline = time.monotonic() + 5
    while owner(path)[0] == alice.uid:
        assert time.monotonic() < deadline, "an earlier lease was never restored"
        time.sleep(0.02)
    before = owner(path)
    config, log = world / "broker-state-crash.toml", world / "broker-crash.log"
    with PrivateBus() as bus2:
        b = start_broker(bus2, config, log)
        p = holder(bus2, alice, path)
        try:
            assert owner(path)[0] == alice.uid
            # SIGKILL to both processes, the front first: no cleanup at all
            # (the front would restore leases if it saw the launcher go)
            [front] = Path(f"/proc/{b.pid}/task/{b.pid}/children").read_text().split()
            os.kill(int(front), signal.SIGKILL)
            b.kill()
            b.wait()
            time.sleep(0.3)
            assert owner(path)[0] == alice.uid                # still leased
            b = start_broker(bus2, config, log)               # replays the journal first
            assert owner(path) == before
            assert "left by a previous run): restored" in log.read_text()
            # and leases again: the replay, as root, rewrote the front's journal
            p.kill()
            p.wait()
            p = holder(bus2, alice, path)
            assert owner(path)[0] == alice.uid
        finally:
            p.kill()
            p.wait()
            b.terminate()
            b.wait(timeout=10)
    assert owner(path) == before


def test_chown_with_a_command_stops_it_before_it_gives_the_node_back(bus, broker, world,
                                                                     alice):
    # SIGTERM to `privbroker chown PATH -- CMD` (timeout(1), systemd, kill)
    # goes to CMD, and the lease is released once CMD is done: the device is
    # not given back while the command that has it runs on
    path = str(world / "dev" / "ttyACM0")
    before = owner(path)
    p = popen_as(alice.uid, alice.gid, alice.groups,
                 [*CLIENT, "--bus-address", bus.address, "chown", path, "--", sys.executable,
                  "-c", "import os, signal, time;"
                        "signal.signal(signal.SIGTERM, lambda *a: os._exit(9));"
                        "print(os.getpid(), flush=True); time.sleep(60)"],
                 env=bus.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        command = int(p.stdout.readline())
        assert owner(path)[0] == alice.uid
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 9, p.stderr.read()     # the command's own status
        assert not os.path.exists(f"/proc/{command}")
        assert owner(path) == before
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r = cli(bus, alice, "chown", path, "--", "sh", "-c", "kill -9 $$")
    assert r.returncode == 128 + signal.SIGKILL, r.stderr     # as `open` and `run` say it


def test_a_lease_that_ended_first_keeps_the_commands_status(world, alice):
    # lease_timeout_s = 0.5: the lease ends while the command runs, and the
    # CLI's release finds nothing; that is not the command's failure
    path = str(world / "dev" / "ttyACM0")
    assert wait_for(lambda: owner(path)[0] != alice.uid), "an earlier lease was not restored"
    before = owner(path)
    with PrivateBus() as bus2:
        b = start_broker(bus2, world / "broker-state-timeout.toml", world / "broker-timeout.log")
        try:
            r = cli(bus2, alice, "chown", path, "--", "sh", "-c", "sleep 1.5; exit 7")
            assert r.returncode == 7, r.stderr
            assert "had already ended" in r.stderr, r.stderr
            assert owner(path) == before
        finally:
            b.terminate()
            b.wait(timeout=10)


def test_busctl_check_path_access(bus, broker, world):
    r = subprocess.run(["busctl", f"--address={bus.address}", "call", BUS_NAME, OBJ, BUS_NAME,
                        "CheckPathAccess", "s", str(world / "dev" / "hidraw0")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "b true", r.stderr


def test_every_decision_is_one_log_line_naming_the_rule(world, broker, alice):
    """One `decision` line per request (broker/logs.py), with the deciding
    rule, what the rules answered and what was done; lease ends on their own
    lines; nothing a caller sends can forge a line."""
    path = world / "dev" / "hidraw0"
    forged = f"{path}\ndecision method=Launch verdict=allowed"
    cli(bus_of(broker), alice, "open", str(path))
    cli(bus_of(broker), alice, "open", forged)
    lines = (world / "broker.log").read_text().splitlines()
    opens = [x for x in lines if "decision method=OpenPath" in x and f"uid={alice.uid}" in x]
    assert any("verdict=allowed" in x and "rule=allow_hidraw rule_verdict=ALLOW" in x
               and 'done="opened O_RDWR"' in x for x in opens), opens
    assert any("verdict=refused error=AccessDenied" in x and "rule=deny_unsafe_hidraw" in x
               and "deny_unsafe_hidraw=DENY" in x for x in opens), opens
    assert any("verdict=refused error=InvalidArgument" in x and "hidraw0\\ndecision" in x
               for x in opens), opens
    assert not any(x.startswith("decision method=Launch") for x in lines)
    assert sum("decision method=ChownDevice" in x for x in lines) >= 4
    assert any("device lease" in x and "the caller disconnected; restored" in x for x in lines)
    assert not any(" device OpenPath" in x for x in lines)          # no second line


# Sends ChownDevice and leaves at once, or after a moment: many times.
CHURN = r"""
import asyncio, random, sys
from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

async def main(address, n, paths):
    rnd = random.Random(7)
    for _ in range(n):
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        bus.send(Message(destination="org.privbroker.Broker1", path="/org/privbroker/Broker1",
                         interface="org.privbroker.Broker1", member="ChownDevice",
                         signature="s", body=[rnd.choice(paths)]))
        await asyncio.sleep(rnd.choice([0, 0, 0.0005, 0.001, 0.002, 0.004]))
        bus.disconnect()
        await bus.wait_for_disconnect()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
"""


def test_callers_that_leave_mid_call_keep_no_lease_and_are_named_in_the_log(world, alice):
    # A caller gone while its ChownDevice is served: its lease must end (the
    # NameHasOwner check in service.chown_device), and every decision line
    # must still say who asked (the name is forgotten when it goes)
    paths = [str(world / "dev" / "ttyACM0"), str(world / "dev" / "hidraw0")]
    assert wait_for(lambda: owner(paths[0])[0] != alice.uid), "an earlier lease was not restored"
    before = {p: owner(p) for p in paths}
    log = world / "broker-churn.log"
    with PrivateBus() as bus2:
        b = start_broker(bus2, world / "broker-state-crash.toml", log)
        try:
            r = alice.run([sys.executable, "-c", CHURN, bus2.address, "200", *paths],
                          env=bus2.env(), cwd=ROOT, timeout=300)
            assert r.returncode == 0, r.stderr
            assert wait_for(lambda: {p: owner(p) for p in paths} == before), \
                {p: owner(p) for p in paths}
            from client import Broker
            with Broker(bus2.address) as c:
                assert wait_for(lambda: c.properties()["LeasesHeld"] == 0)
        finally:
            b.terminate()
            b.wait(timeout=10)
    lines = [x for x in log.read_text().splitlines() if "decision method=ChownDevice" in x]
    assert len(lines) >= 100, len(lines)       # some calls never reached the broker
    # a caller gone before the bus could say who it was cannot be named;
    # one that was identified (and got as far as a lease) must be
    identified = [x for x in lines if "verdict=allowed" in x or " lease=" in x]
    assert identified and all(f"uid={alice.uid}" in x for x in identified), \
        [x for x in identified if f"uid={alice.uid}" not in x][:3]
