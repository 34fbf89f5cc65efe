"""privbrokerd end to end: a private system-style bus with the project's own
policy, the broker on it, and callers that are real processes of real uids."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import JAIL_PYTHON, PROBE, ROOT, processes_with
from dbus_fixture import (NOBODY_UID, NOGROUP_GID, ThrowawayUser, granted_bus, sample_policy,
                          start_broker, stop_broker)

VENV_BIN = Path(sys.executable).parent
CLIENT = [sys.executable, "-m", "client.cli"]
BUS_NAME = "org.privbroker.Broker1"
OBJ = "/org/privbroker/Broker1"


@pytest.fixture(scope="module")
def deployment():
    """The sample deployment, plus a profile nobody is granted."""
    d = Path(tempfile.mkdtemp(prefix="privbroker-deploy-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    shutil.copytree(ROOT / "examples" / "profiles", d / "profiles")
    # The sample policy, with a launch rate the leak test does not trip over,
    # and a grant naming a profile whose file is missing.
    toml = sample_policy(d)
    toml = toml.replace("launches_per_second = 20", "launches_per_second = 1000")
    toml = toml.replace("calls_per_second = 200", "calls_per_second = 100000")
    toml += ('\n[[grant]]\nname = "root-extra"\nusers = ["root"]\n'
             'profiles = ["vanished", "exposed"]\n')
    (d / "broker.toml").write_text(toml)
    (d / "profiles" / "ungranted.conf").write_text("% minijail-config-file v0\np\nn\n")
    # Granted, but for root it would be root in the init namespaces, unfiltered.
    (d / "profiles" / "exposed.conf").write_text("% minijail-config-file v0\nn\ne\n")
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


def busctl(bus, *args, uid=None):
    argv = ["busctl", f"--address={bus.address}", *args]
    if uid is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    from dbus_fixture import run_as
    return run_as(uid, uid if uid != NOBODY_UID else NOGROUP_GID, [], argv, env=bus.env())


def client(bus, *args, user=None, timeout=30):
    argv = [*CLIENT, "--bus-address", bus.address, *args]
    if user is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return user.run(argv, env=bus.env(), cwd=ROOT, timeout=timeout)


# -- who may launch -------------------------------------------------------------

def test_member_of_privbroker_launches_as_itself(bus, broker):
    with ThrowawayUser(groups=["privbroker"]) as u:
        r = client(bus, "run", "minimal", "--", JAIL_PYTHON, PROBE, "--exit", "4", user=u)
    assert r.returncode == 4, r.stderr
    report = json.loads(r.stdout.splitlines()[0])
    assert report["uid"] == u.uid and report["gid"] == u.gid
    assert report["groups"] == []                      # supplementary groups dropped
    assert report["no_new_privs"] == 1
    assert report["visible_pids"] == [1, 2]
    assert report["net_ifaces"] == ["lo"]
    assert report["caps"]["eff"] == report["caps"]["prm"] == 0
    # never the broker's session keyring (the broker inherited ours)
    from broker.jail.syscalls import session_keyring_id
    assert isinstance(report["session_keyring"], int)
    assert report["session_keyring"] != session_keyring_id()


def test_other_users_are_stopped_by_the_bus(bus, broker):
    r = client(bus, "run", "minimal", "--", "/bin/true",
               user=_Nobody())
    assert r.returncode == 1
    assert "org.freedesktop.DBus.Error.AccessDenied" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_profile_without_a_grant_is_refused_by_the_broker(bus, broker):
    r = client(bus, "run", "ungranted", "--", "/bin/true")
    assert r.returncode == 1
    assert "org.privbroker.Error.AccessDenied" in r.stderr
    assert "no grant lets uid 0 launch profile 'ungranted'" in r.stderr


def test_a_profile_in_the_forbidden_intersection_is_a_policy_violation(bus, broker):
    before = set(processes_with("/bin/true"))
    r = client(bus, "run", "exposed", "--", "/bin/true")
    assert r.returncode == 1
    assert "org.privbroker.Error.PolicyViolation" in r.stderr
    assert "forbidden intersection" in r.stderr and "add at least one of" in r.stderr
    assert "a seccomp policy (-S)" in r.stderr          # names what is missing
    assert set(processes_with("/bin/true")) <= before


class _Nobody:
    uid, gid = NOBODY_UID, NOGROUP_GID

    def run(self, argv, env, **kw):
        from dbus_fixture import run_as
        return run_as(self.uid, self.gid, [], argv, env, **kw)


# -- through our own client library ------------------------------------------------

@pytest.fixture
def aio_broker(bus, broker):
    from client import Broker
    b = Broker(bus.address)
    yield b
    b.close()


def test_output_through_the_callers_own_pipes(aio_broker):
    r, w = os.pipe()
    jail = aio_broker.launch("minimal", ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"],
                             stdin=None, stdout=w, stderr=w)
    os.close(w)
    status = jail.wait(timeout=20)
    with os.fdopen(r) as f:
        assert sorted(f.read().split()) == ["err", "out"]
    assert (status.code, status.signal) == (7, None)


def test_signal_and_exited_report_the_signal(aio_broker):
    jail = aio_broker.launch("minimal", ["/bin/sleep", "30"], stdin=None)
    aio_broker.launch  # noqa: B018 - (keeps the broker busy with a second connection below)
    jail.signal(15)
    status = jail.wait(timeout=20)
    assert status.signal == 15 or status.code == 128 + 15


def test_callers_cannot_see_or_signal_each_others_jails(bus, broker):
    from client import Broker, BrokerCallError
    with Broker(bus.address) as a, Broker(bus.address) as b:
        jail = a.launch("minimal", ["/bin/sleep", "30"], stdin=None)
        assert [j["jail_id"] for j in a.jails()] == [jail.jail_id]
        assert b.jails() == []
        with pytest.raises(BrokerCallError) as e:
            b._run(b.aio.signal(jail.jail_id, 9))
        assert e.value.name == "org.privbroker.Error.NotFound"
        jail.signal(9)
        jail.wait(timeout=20)


def test_a_caller_that_disconnects_loses_its_jails(bus, broker):
    from client import Broker
    marker = f"dwc-{time.monotonic_ns()}"
    b = Broker(bus.address)
    b.launch("minimal", ["/bin/sh", "-c", "sleep 30", marker], stdin=None)
    assert processes_with(marker)
    b.close()
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


@pytest.mark.parametrize("kwargs,error", [
    # an ungranted name is refused the same whether or not it exists: no oracle
    (dict(profile="no-such-profile", argv=["/bin/true"]), "AccessDenied"),
    (dict(profile="vanished", argv=["/bin/true"]), "NotFound"),
    (dict(profile="minimal", argv=[]), "InvalidArgument"),
    (dict(profile="minimal", argv=["/bin/true"], env={"A=B": "x"}), "InvalidArgument"),
    (dict(profile="minimal", argv=["/bin/true"], env={"LD_PRELOAD": "/tmp/x.so"}),
     "AccessDenied"),
    (dict(profile="minimal", argv=["/bin/true"], fds={5000: 1}), "InvalidArgument"),
    (dict(profile="minimal", argv=["/bin/true"], options={"frob": True}), "InvalidArgument"),
    (dict(profile="minimal", argv=["/bin/true"], options={"cwd": "relative"}),
     "InvalidArgument"),
    (dict(profile="minimal", argv=["x" * 70000]), "InvalidArgument"),
    (dict(profile="../etc/passwd", argv=["/bin/true"]), "AccessDenied"),
])
def test_malformed_launches_get_named_errors(aio_broker, kwargs, error):
    from client import BrokerCallError
    before = set(processes_with("/bin/true"))
    with pytest.raises(BrokerCallError) as e:
        aio_broker._run(aio_broker.aio.launch(**kwargs))
    assert e.value.name == f"org.privbroker.Error.{error}", e.value
    assert set(processes_with("/bin/true")) <= before


# -- with busctl: not only our own client ------------------------------------------------

def test_busctl_list_and_launch(bus, broker):
    r = busctl(bus, "call", BUS_NAME, OBJ, BUS_NAME, "ListJails")
    assert r.returncode == 0 and r.stdout.strip() == "a(sua{sv}) 0"
    r = busctl(bus, "call", BUS_NAME, OBJ, BUS_NAME, "Launch", "sasa{ss}a{uh}a{sv}",
               "minimal", "1", "/bin/true", "0", "0", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("su ")


def test_busctl_wrong_signature_is_invalid_argument(bus, broker):
    r = busctl(bus, "call", BUS_NAME, OBJ, BUS_NAME, "Signal", "s", "x")
    assert r.returncode != 0
    assert "takes (si), got (s)" in r.stderr


def test_nobody_may_introspect_and_read_properties(bus, broker):
    r = busctl(bus, "get-property", BUS_NAME, OBJ, BUS_NAME, "Version", uid=NOBODY_UID)
    assert r.returncode == 0 and r.stdout.strip() == 's "0.1.0"'
    r = busctl(bus, "introspect", BUS_NAME, OBJ, uid=NOBODY_UID)
    assert r.returncode == 0 and ".Launch" in r.stdout


def test_introspection_xml_matches_the_service(bus, broker):
    """The XML in dbus-policy/ is the contract: every method it names is served
    with that signature, and the service serves nothing else on its interface."""
    from broker.service import BrokerService
    root = ET.parse(ROOT / "dbus-policy" / f"{BUS_NAME}.xml").getroot()
    iface = next(i for i in root.iter("interface") if i.get("name") == BUS_NAME)
    xml_methods = {m.get("name"): "".join(a.get("type") for a in m.iter("arg")
                                          if a.get("direction", "in") == "in")
                   for m in iface.iter("method")}
    served = {member: sig for (i, member), (sig, _) in
              BrokerService(None, None, {}).methods.items() if i == BUS_NAME}
    assert xml_methods == served
    props = {p.get("name"): p.get("type") for p in iface.iter("property")}
    r = busctl(bus, "--json=short", "call", BUS_NAME, OBJ, "org.freedesktop.DBus.Properties",
               "GetAll", "s", BUS_NAME)
    assert r.returncode == 0, r.stderr
    got = {k: v["type"] for k, v in json.loads(r.stdout)["data"][0].items()}
    assert props == got         # the status properties too (broker/status.py)
    r = busctl(bus, "introspect", "--xml-interface", BUS_NAME, OBJ)
    live = ET.fromstring(r.stdout)
    assert {m.get("name") for m in live.iter("method")} >= set(xml_methods)


# -- no leaks ----------------------------------------------------------------------

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append((int(entry), fields[0]))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_no_leaked_fds_zombies_or_children_after_many_launches(bus, broker, aio_broker):
    # privbrokerd's main process is the launcher; its children the front and,
    # once a launch has shown what to expect, one seed for the next launch
    # (jail/launch.py; it names itself pb-seed while it waits)
    launcher_pid = broker.pid
    def seeds():
        return [c for c in _children(launcher_pid) if _comm(c[0]) == "pb-seed"]
    def others():
        return [c for c in _children(launcher_pid) if _comm(c[0]) != "pb-seed"]
    [(front_pid, _)] = others()
    def settled():
        # Exited may come while the jail's init is still exiting (everything
        # else of the jail is gone by then): the launcher closes that jail's
        # pidfd and status pipe when it reaps it, a moment later; and it
        # makes the next seed once it has been idle a moment.
        deadline = time.monotonic() + 5
        while (len(others()) != 1 or len(seeds()) != 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)        # the reap and the close are one step apart
        return _fds(front_pid), _fds(launcher_pid)

    aio_broker.launch("minimal", ["/bin/true"], stdin=None).wait(timeout=20)  # warm up
    before = settled()
    for _ in range(60):
        aio_broker.launch("minimal", ["/bin/true"], stdin=None).wait(timeout=20)
    assert settled() == before
    assert _children(front_pid) == []                 # the front starts nothing
    # no zombies, no stragglers: the front, and one seed asleep waiting for its order
    assert others() == [(front_pid, "S")]
    assert [state for _, state in seeds()] == ["S"]


def test_the_next_launch_of_the_same_shape_starts_from_the_seed(bus, broker, aio_broker):
    """After a launch the launcher makes, once idle, a seed for the next one
    of that shape (jail/launch.py): that launch's jail is the seed itself
    (its pid), and a seed is made again for the one after."""
    launcher_pid = broker.pid

    def seed_pids():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [pid for pid, _ in _children(launcher_pid) if _comm(pid) == "pb-seed"]
            if found:
                return found
            time.sleep(0.01)
        return []

    aio_broker.launch("minimal", ["/bin/true"], stdin=None).wait(timeout=20)
    [seed] = seed_pids()
    # (it lives a moment: the launcher reads its init's pages after the reply)
    jail = aio_broker.launch("minimal", ["/bin/sleep", "0.2"], stdin=None)
    assert jail.pid == seed, (jail.pid, seed)
    assert jail.wait(timeout=20).code == 0
    [next_seed] = seed_pids()
    assert next_seed != seed
    # The launcher has learnt from a seeded launch (that one, or one before
    # it) which pages it wrote, and this seed copied them ahead while it
    # waited (jail/warm.py): its own launch takes few page faults from its
    # order to its program's start (300-340 without here; 25-40 with, and
    # once in about 20 runs of this module 108).
    # Not a fixed wait alone: on a loaded machine the copy-ahead outlasted
    # 0.2 s once (271 faults then).  Done when the seed's fault count stops moving.
    time.sleep(0.2)
    before, deadline = _minflt(next_seed), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _minflt(next_seed)
        if now == before:
            break
        before = now
    jail = aio_broker.launch("minimal", ["/bin/sleep", "1"], stdin=None)
    assert jail.pid == next_seed, (jail.pid, next_seed)
    deadline = time.monotonic() + 10
    while not _children(next_seed) and time.monotonic() < deadline:
        time.sleep(0.001)
    faults = _minflt(next_seed) - before
    assert jail.wait(timeout=20).code == 0
    assert faults < 160, (faults, before)


def _minflt(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_live_jail_limit_per_caller(bus, broker, aio_broker):
    from client import BrokerCallError
    jails = [aio_broker.launch("minimal", ["/bin/sleep", "30"], stdin=None) for _ in range(16)]
    try:
        with pytest.raises(BrokerCallError) as e:
            aio_broker.launch("minimal", ["/bin/true"], stdin=None)
        assert e.value.name == "org.privbroker.Error.LimitExceeded"
        assert "16 live jails" in e.value.message
    finally:
        for j in jails:
            j.signal(9)
        for j in jails:
            j.wait(timeout=20)


def test_a_forged_exited_signal_is_ignored(bus, broker, aio_broker):
    """Any connection may send signals on the system bus; the client only
    believes Exited from the broker's own connection."""
    jail = aio_broker.launch("minimal", ["/bin/sleep", "30"], stdin=None)
    forge = subprocess.run(
        ["busctl", f"--address={bus.address}", "emit", OBJ, BUS_NAME, "Exited", "sii",
         jail.jail_id, "0", "0"], capture_output=True, text=True)
    assert forge.returncode == 0, forge.stderr
    with pytest.raises(TimeoutError):
        jail.wait(timeout=0.5)
    jail.signal(9)
    assert jail.wait(timeout=20).signal == 9


def test_closing_a_client_twice_returns(bus, broker):
    """The blocking client's close() is idempotent (a second call used to
    wait forever on the stopped loop)."""
    import threading
    from client import Broker
    b = Broker(bus.address)
    assert b.jails() == []
    b.close()
    done = threading.Event()
    t = threading.Thread(target=lambda: (b.close(), done.set()), daemon=True)
    t.start()
    assert done.wait(5), "the second close() hung"
    with b:            # a with-block after an explicit close: closes once more, fine
        pass


def test_fds_sent_with_messages_the_broker_does_not_serve_are_closed(bus, broker):
    """A call to another object path, or a signal, carrying fds: dbus-fast
    answers or ignores it, and the front closes the fds (they used to stay
    open, one per message: a way to exhaust the front's fds)."""
    import asyncio
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus
    from soak_kit import bus_owner_pid, fd_count
    front = bus_owner_pid(bus)

    async def main():
        b = await MessageBus(bus_address=bus.address, bus_type=BusType.SYSTEM,
                             negotiate_unix_fd=True).connect()
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            replies = []
            for i in range(40):
                replies.append(await b.call(Message(
                    destination=BUS_NAME, path="/elsewhere", interface="org.example.X",
                    member="Take", signature="h", body=[0], unix_fds=[fd])))
                b.send(Message(message_type=MessageType.SIGNAL, destination=BUS_NAME,
                               path="/elsewhere", interface="org.example.X", member="Here",
                               signature="h", body=[0], unix_fds=[fd]))
            await b.call(Message(destination=BUS_NAME, path=OBJ, member="Ping",
                                 interface="org.freedesktop.DBus.Peer"))   # all delivered
            return replies
        finally:
            os.close(fd)
            b.disconnect()
    before = fd_count(front)
    replies = asyncio.run(main())
    assert all(r.message_type == MessageType.ERROR for r in replies)
    time.sleep(0.2)
    assert fd_count(front) <= before + 1, (before, fd_count(front))
