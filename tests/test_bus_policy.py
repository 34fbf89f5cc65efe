"""The D-Bus infrastructure files, exercised with real processes as real uids.

A private system-style dbus-daemon (tests/dbus_fixture.py) loads this
checkout's dbus-policy/org.privbroker.Broker1.conf. A *stand-in* service,
STAND_IN_BROKER below, owns org.privbroker.Broker1 as root so that the bus
policy has something to guard. The stand-in is test scaffolding for the bus
policy only; it is not privbrokerd and says nothing about the product.

Clients are busctl, gdbus and small dbus-fast programs, each run as the uid
under test (root, nobody, or throwaway users created here and removed after).

What dbus-daemon 1.14 takes as a caller's groups (measured below, see
test_groups_are_the_connecting_process_groups): the kernel credentials of the
connecting process at connect() time - its gid (SO_PEERCRED) and
supplementary groups (SO_PEERGROUPS) - not /etc/group. Membership in
/etc/group matters only because login, PAM and systemd give a user's
processes those groups; a process that dropped the group is refused, and a
process given the group by setgroups() is let through.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dbus_fixture import (BUS_NAME, INTERFACE, NOBODY_UID, NOGROUP_GID, OBJECT_PATH, POLICY_DIR,
                          SYSTEMD_DIR, PrivateBus, ThrowawayUser, ensure_group,
                          extract_dropin_example, popen_as, remove_group, run_as)

POLICY_CONF = POLICY_DIR / "org.privbroker.Broker1.conf"
INTROSPECTION_XML = POLICY_DIR / "org.privbroker.Broker1.xml"
UNIT = SYSTEMD_DIR / "privbrokerd.service"
ACTIVATION = SYSTEMD_DIR / "org.privbroker.Broker1.service"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
PY = sys.executable
TIMEOUT = 20

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None,
                                reason="dbus-daemon is not installed (apt-get install dbus)")

# ---------------------------------------------------------------------------
# Test scaffolding: the stand-in service and the client program.
# ---------------------------------------------------------------------------

# NOT THE PRODUCT. A minimal owner of org.privbroker.Broker1 so the bus policy
# can be exercised: ListJails() -> [], the properties Version and Features,
# and on command a unicast Exited signal. It records every method call that
# reaches it, so a test can show that a refused call never got past the bus.
# Commands on stdin, one JSON object per line; answers on stdout, likewise.
STAND_IN_BROKER = r'''
import asyncio, json, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method, dbus_property, PropertyAccess

NAME, PATH, IFACE = "org.privbroker.Broker1", "/org/privbroker/Broker1", "org.privbroker.Broker1"

class StandInBroker(ServiceInterface):
    """Test scaffolding for the bus-policy tests; not privbrokerd."""
    def __init__(self):
        super().__init__(IFACE)

    @method()
    def ListJails(self) -> "a(sua{sv})":
        return []

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return "0.0-stand-in"

    @dbus_property(access=PropertyAccess.READ)
    def Features(self) -> "a{sv}":
        return {"stand_in": Variant("b", True)}

def say(obj):
    print(json.dumps(obj), flush=True)

async def main(address):
    bus = await MessageBus(bus_address=address).connect()
    seen = []
    def record(msg):
        if msg.message_type == MessageType.METHOD_CALL:
            seen.append([msg.sender, msg.interface, msg.member])
        return None                       # not handled: dispatch goes on
    bus.add_message_handler(record)
    bus.export(PATH, StandInBroker())
    reply = await bus.request_name(NAME)
    say({"unique_name": bus.unique_name, "request_name": int(reply.value)})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        if cmd["cmd"] == "exited":
            await bus.send(Message(message_type=MessageType.SIGNAL, destination=cmd["dest"],
                                   path=PATH, interface=IFACE, member="Exited",
                                   signature="sii", body=cmd["args"]))
            say({"sent": True})
        elif cmd["cmd"] == "seen":
            say({"seen": seen})
        elif cmd["cmd"] == "quit":
            return

asyncio.run(main(sys.argv[1]))
'''

# A dbus-fast client, run as the uid under test. argv: ADDRESS REQUEST-JSON.
# Prints one JSON line per result: {"ok": true, "body": ...} or
# {"error": NAME, "message": TEXT}; for "listen", first {"unique_name": ...}.
CLIENT = r'''
import asyncio, json, sys, time
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

NAME, PATH, IFACE = "org.privbroker.Broker1", "/org/privbroker/Broker1", "org.privbroker.Broker1"
DBUS = dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus")

def plain(v):
    if isinstance(v, Variant):
        return {"v": [v.signature, plain(v.value)]}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return v

def unplain(v):
    if isinstance(v, dict) and list(v) == ["v"]:
        return Variant(v["v"][0], unplain(v["v"][1]))
    if isinstance(v, list):
        return [unplain(x) for x in v]
    return v

def say(obj):
    print(json.dumps(obj), flush=True)

def result(reply):
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": reply.body[0] if reply.body else ""}
    return {"ok": True, "body": plain(reply.body)}

async def call(bus, **kw):
    try:
        return result(await bus.call(Message(**kw)))
    except DBusError as e:
        return {"error": e.type, "message": e.text}

async def main(address, req):
    bus = await MessageBus(bus_address=address).connect()
    op = req.get("op", "call")
    if op == "call":
        dest = req.get("dest", NAME)
        if dest == "@owner":              # the owner's unique name, e.g. ":1.3"
            r = await call(bus, member="GetNameOwner", signature="s", body=[NAME], **DBUS)
            dest = r["body"][0]
        say(await call(bus, destination=dest, path=req.get("path", PATH),
                       interface=req.get("interface", IFACE), member=req["member"],
                       signature=req.get("signature", ""),
                       body=[unplain(b) for b in req.get("body", [])]))
    elif op == "own":
        # flags 4 = DBUS_NAME_FLAG_DO_NOT_QUEUE
        say(await call(bus, member="RequestName", signature="su", body=[req["name"], 4], **DBUS))
    elif op == "listen":
        got = []
        def handler(msg):
            if msg.message_type == MessageType.SIGNAL and msg.interface == IFACE:
                got.append({"sender": msg.sender, "destination": msg.destination,
                            "member": msg.member, "body": plain(msg.body)})
            return None
        bus.add_message_handler(handler)
        if req.get("match"):
            r = await call(bus, member="AddMatch", signature="s", body=[req["match"]], **DBUS)
            assert "ok" in r, r
        say({"unique_name": bus.unique_name})
        deadline = time.monotonic() + req.get("timeout", 10)
        want = req.get("want", 1)
        while time.monotonic() < deadline and len(got) < want:
            await asyncio.sleep(0.05)
        say({"signals": got})
    bus.disconnect()

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
'''


def _read_json_line(stream, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer within the timeout")
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            line = stream.readline()
            if not line:
                raise EOFError("the process closed its output")
            if line.startswith("{"):
                return json.loads(line)


class StandIn:
    """Runs STAND_IN_BROKER as root against a PrivateBus."""

    def __init__(self, bus: PrivateBus):
        self.proc = subprocess.Popen([PY, "-c", STAND_IN_BROKER, bus.address],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        try:
            hello = _read_json_line(self.proc.stdout)
        except (TimeoutError, EOFError):
            if self.proc.poll() is None:
                self.proc.kill()
            _, err = self.proc.communicate()
            raise RuntimeError(f"stand-in did not start: {err}\nbus log: {bus.log()}")
        self.unique_name = hello["unique_name"]
        self.request_name_reply = hello["request_name"]

    def command(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return _read_json_line(self.proc.stdout)

    def seen(self) -> list[list]:
        return self.command(cmd="seen")["seen"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def client(bus: PrivateBus, uid: int, gid: int, groups, **request) -> dict:
    """Run the dbus-fast CLIENT once as uid/gid/groups; its JSON answer."""
    p = run_as(uid, gid, groups, [PY, "-c", CLIENT, bus.address, json.dumps(request)],
               bus.env(), timeout=TIMEOUT)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and lines, f"client failed: rc={p.returncode} {p.stderr}"
    return json.loads(lines[-1])


def busctl(bus: PrivateBus, uid: int, gid: int, groups, *args: str):
    return run_as(uid, gid, groups, ["busctl", f"--address={bus.address}", *args], bus.env())


def as_nobody(bus, **request):
    return client(bus, NOBODY_UID, NOGROUP_GID, [], **request)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def privbroker_gid():
    gid, created = ensure_group("privbroker")
    yield gid
    if created:
        remove_group("privbroker")


@pytest.fixture(scope="module")
def member(privbroker_gid):
    """A throwaway user whose database groups include privbroker."""
    with ThrowawayUser(groups=["privbroker"]) as u:
        yield u


@pytest.fixture(scope="module")
def outsider():
    """A throwaway user in no group but its own."""
    with ThrowawayUser() as u:
        yield u


@pytest.fixture(scope="module")
def bus(member, outsider):
    with PrivateBus() as b:
        yield b


@pytest.fixture(scope="module")
def stand_in(bus):
    s = StandIn(bus)
    yield s
    s.stop()


@pytest.fixture(scope="module", autouse=True)
def _clients_can_import_dbus_fast():
    """The client runs as other uids with this interpreter: it must be able
    to read it and its site-packages (a venv under a 0700 home could not)."""
    p = run_as(NOBODY_UID, NOGROUP_GID, [], [PY, "-c", "import dbus_fast"], {"PATH": "/usr/bin:/bin"})
    if p.returncode != 0:
        pytest.skip(f"{PY} cannot import dbus_fast as nobody (is the venv world-readable?): "
                    f"{p.stderr.strip()[-300:]}")


# ---------------------------------------------------------------------------
# The files themselves
# ---------------------------------------------------------------------------

def test_policy_file_is_well_formed_busconfig():
    text = POLICY_CONF.read_text()
    assert '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"' in text
    root = ET.fromstring(text)
    assert root.tag == "busconfig"
    policies = root.findall("policy")
    owners = [(p.attrib, r.attrib) for p in policies for r in p if "own" in r.attrib]
    assert owners == [({"user": "privbroker"}, {"own": BUS_NAME}),
                      ({"user": "root"}, {"own": BUS_NAME})], \
        "only the front's user (broker/front.py) and root may own the name"
    # Every rule naming the broker's interface is scoped to the broker as
    # destination (an unscoped deny would also block the Exited signal), or
    # is the broker's own signal.
    for p in policies:
        for rule in p:
            a = rule.attrib
            if a.get("send_interface") == INTERFACE and a.get("send_type") != "signal":
                assert a.get("send_destination") == BUS_NAME, a


def test_introspection_xml_is_the_v1_subset():
    from dbus_fast.introspection import Node
    text = INTROSPECTION_XML.read_text()
    ET.fromstring(text)                                  # well-formed
    node = Node.parse(text)
    [iface] = [i for i in node.interfaces if i.name == INTERFACE]
    methods = {m.name: ([(a.name, a.signature) for a in m.in_args],
                        [(a.name, a.signature) for a in m.out_args]) for m in iface.methods}
    assert methods == {
        "Launch": ([("profile", "s"), ("argv", "as"), ("env", "a{ss}"), ("fds", "a{uh}"),
                    ("options", "a{sv}")], [("jail_id", "s"), ("pid", "u")]),
        "Signal": ([("jail_id", "s"), ("signal", "i")], []),
        "ListJails": ([], [("jails", "a(sua{sv})")]),
        "MountDaemonStore": ([("daemon", "s"), ("user_hash", "s")], []),
        "UnmountDaemonStore": ([("daemon", "s"), ("user_hash", "s")], []),
        "OpenPath": ([("path", "s")], [("fd", "h")]),
        "CheckPathAccess": ([("path", "s")], [("allowed", "b")]),
        "ChownDevice": ([("path", "s")], [("lease_id", "s")]),
        "ReleaseDevice": ([("lease_id", "s")], []),
    }
    signals = {s.name: [(a.name, a.signature) for a in s.args] for s in iface.signals}
    assert signals == {"Exited": [("jail_id", "s"), ("exit_status", "i"), ("term_signal", "i")]}
    props = {p.name: (p.signature, p.access.value) for p in iface.properties}
    assert props == {"Version": ("s", "read"), "Features": ("a{sv}", "read"),
                     # status (broker/status.py): read-only too
                     "Uptime": ("t", "read"), "LiveJails": ("a{uu}", "read"),
                     "LeasesHeld": ("u", "read"), "MountsHeld": ("u", "read"),
                     "Calls": ("a{st}", "read"), "Refusals": ("a{st}", "read")}


def test_dbus_daemon_loads_the_policy_without_complaint(bus):
    assert bus.proc.poll() is None
    assert POLICY_CONF.name not in bus.log(), bus.log()


# ---------------------------------------------------------------------------
# Owning the name
# ---------------------------------------------------------------------------

def test_root_can_own_the_name(stand_in):
    assert stand_in.request_name_reply == 1          # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER


def test_root_can_own_the_name_on_a_fresh_bus():
    with PrivateBus() as b:
        assert client(b, 0, 0, [], op="own", name=BUS_NAME) == {"ok": True, "body": [1]}


def test_nobody_cannot_own_the_name(bus):
    r = as_nobody(bus, op="own", name=BUS_NAME)
    assert r["error"] == ACCESS_DENIED, r
    assert "not allowed to own the service" in r["message"]


def test_privbroker_member_cannot_own_the_name(bus, member):
    r = client(bus, member.uid, member.gid, member.groups, op="own", name=BUS_NAME)
    assert r["error"] == ACCESS_DENIED, r


# ---------------------------------------------------------------------------
# What everybody may do: introspect, ping, read properties
# ---------------------------------------------------------------------------

def test_nobody_can_introspect(bus, stand_in):
    p = busctl(bus, NOBODY_UID, NOGROUP_GID, [], "introspect", BUS_NAME, OBJECT_PATH)
    assert p.returncode == 0, p.stderr
    assert ".ListJails" in p.stdout and ".Version" in p.stdout
    r = as_nobody(bus, interface="org.freedesktop.DBus.Introspectable", member="Introspect")
    assert "ok" in r and 'name="org.privbroker.Broker1"' in r["body"][0]


def test_nobody_can_read_properties(bus, stand_in):
    p = busctl(bus, NOBODY_UID, NOGROUP_GID, [], "get-property", BUS_NAME, OBJECT_PATH,
               INTERFACE, "Version")
    assert (p.returncode, p.stdout.strip()) == (0, 's "0.0-stand-in"'), p.stderr
    r = as_nobody(bus, interface="org.freedesktop.DBus.Properties", member="GetAll",
                  signature="s", body=[INTERFACE])
    assert r["ok"] and set(r["body"][0]) == {"Version", "Features"}, r


def test_nobody_can_ping(bus, stand_in):
    r = as_nobody(bus, interface="org.freedesktop.DBus.Peer", member="Ping")
    assert r == {"ok": True, "body": []}


def test_nobody_cannot_set_a_property(bus, stand_in):
    before = len(stand_in.seen())
    r = as_nobody(bus, interface="org.freedesktop.DBus.Properties", member="Set",
                  signature="ssv", body=[INTERFACE, "Version", {"v": ["s", "x"]}])
    assert r["error"] == ACCESS_DENIED, r
    assert len(stand_in.seen()) == before, "the refused call reached the service"


# ---------------------------------------------------------------------------
# Method calls on the broker's interface
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dest", [BUS_NAME, "@owner"], ids=["well-known-name", "unique-name"])
def test_nobody_method_call_is_denied_by_the_bus(bus, stand_in, dest):
    before = stand_in.seen()
    r = as_nobody(bus, dest=dest, member="ListJails")
    assert r["error"] == ACCESS_DENIED, r
    assert "Rejected send message" in r["message"]       # the bus's words, not the service's
    assert stand_in.seen() == before, "the refused call reached the service"


def test_nobody_is_denied_through_busctl_and_gdbus(bus, stand_in):
    p = busctl(bus, NOBODY_UID, NOGROUP_GID, [], "call", BUS_NAME, OBJECT_PATH, INTERFACE,
               "ListJails")
    assert p.returncode != 0 and "Access denied" in p.stderr, (p.stdout, p.stderr)
    p = run_as(NOBODY_UID, NOGROUP_GID, [],
               ["gdbus", "call", "--address", bus.address, "--dest", BUS_NAME,
                "--object-path", OBJECT_PATH, "--method", f"{INTERFACE}.ListJails"], bus.env())
    assert p.returncode != 0 and ACCESS_DENIED in p.stderr, (p.stdout, p.stderr)


def test_outsider_method_call_is_denied(bus, stand_in, outsider):
    r = client(bus, outsider.uid, outsider.gid, outsider.groups, member="ListJails")
    assert r["error"] == ACCESS_DENIED, r


def test_privbroker_member_can_call(bus, stand_in, member):
    r = client(bus, member.uid, member.gid, member.groups, member="ListJails")
    assert r == {"ok": True, "body": [[]]}
    p = busctl(bus, member.uid, member.gid, member.groups, "call", BUS_NAME, OBJECT_PATH,
               INTERFACE, "ListJails")
    assert (p.returncode, p.stdout.strip()) == (0, "a(sua{sv}) 0"), p.stderr
    assert any(m[1:] == [INTERFACE, "ListJails"] for m in stand_in.seen())


def test_root_can_call(bus, stand_in):
    assert client(bus, 0, 0, [], member="ListJails") == {"ok": True, "body": [[]]}


def test_a_call_without_interface_is_denied_even_to_members(bus, stand_in, member):
    """The interface field is optional in D-Bus; the policy's allow rules
    name the interface, so such a call never matches them."""
    r = client(bus, member.uid, member.gid, member.groups, member="ListJails", interface=None)
    assert r["error"] == ACCESS_DENIED, r


def test_groups_are_the_connecting_process_groups(bus, stand_in, member, outsider,
                                                  privbroker_gid):
    """dbus-daemon 1.14 uses the kernel's credentials of the connecting
    process (gid from SO_PEERCRED, supplementary groups from SO_PEERGROUPS),
    not the user database."""
    def lj(uid, gid, groups):
        return client(bus, uid, gid, groups, member="ListJails")
    # In /etc/group, but the process dropped the group: refused.
    assert lj(member.uid, member.gid, [])["error"] == ACCESS_DENIED
    # Not in /etc/group, but the process holds the group: let through.
    assert "ok" in lj(outsider.uid, outsider.gid, [privbroker_gid])
    assert "ok" in lj(NOBODY_UID, NOGROUP_GID, [privbroker_gid])
    # The primary gid counts as well.
    assert "ok" in lj(outsider.uid, privbroker_gid, [])


# ---------------------------------------------------------------------------
# Signals from the broker
# ---------------------------------------------------------------------------

def test_unicast_exited_reaches_the_caller_only(bus, stand_in, member):
    env = bus.env()
    # The caller adds no match rule: a unicast signal is delivered anyway.
    caller = popen_as(member.uid, member.gid, member.groups,
                      [PY, "-c", CLIENT, bus.address,
                       json.dumps({"op": "listen", "timeout": TIMEOUT})],
                      env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # A bystander that subscribes to every signal of the interface.
    bystander = popen_as(NOBODY_UID, NOGROUP_GID, [],
                         [PY, "-c", CLIENT, bus.address,
                          json.dumps({"op": "listen", "timeout": 3,
                                      "match": f"type='signal',interface='{INTERFACE}'"})],
                         env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        caller_name = _read_json_line(caller.stdout)["unique_name"]
        _read_json_line(bystander.stdout)                # its match rule is in place
        assert stand_in.command(cmd="exited", dest=caller_name, args=["jail-1", 3, 0]) == {"sent": True}
        got = _read_json_line(caller.stdout)["signals"]
        assert got == [{"sender": stand_in.unique_name, "destination": caller_name,
                        "member": "Exited", "body": ["jail-1", 3, 0]}]
        assert _read_json_line(bystander.stdout)["signals"] == []
    finally:
        for p in (caller, bystander):
            if p.poll() is None:
                p.kill()
            p.communicate()
    refused_signals = [line for line in bus.log().splitlines()
                       if "Rejected" in line and 'type="signal"' in line]
    assert refused_signals == []


# ---------------------------------------------------------------------------
# Deployment: the documented drop-in, the activation file, the unit
# ---------------------------------------------------------------------------

def test_documented_dropin_grants_another_group():
    example = extract_dropin_example(POLICY_CONF.read_text())
    group = f"pbgrant{os.getpid()}"
    dropin = example.replace('group="video"', f'group="{group}"')
    assert dropin != example, "the example no longer grants a group"
    subprocess.run(["groupadd", group], check=True)
    try:
        with ThrowawayUser(groups=[group]) as granted, ThrowawayUser() as other, \
                PrivateBus(extra_policy={"org.privbroker.Broker1-local.conf": dropin}) as b:
            s = StandIn(b)
            try:
                assert client(b, granted.uid, granted.gid, granted.groups,
                              member="ListJails") == {"ok": True, "body": [[]]}
                r = client(b, other.uid, other.gid, other.groups, member="ListJails")
                assert r["error"] == ACCESS_DENIED, r
                r = client(b, granted.uid, granted.gid, granted.groups, op="own", name=BUS_NAME)
                assert r["error"] == ACCESS_DENIED, "the drop-in must not grant ownership"
            finally:
                s.stop()
    finally:
        remove_group(group)


def _unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit-style file."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_activation_file_names_the_unit_and_the_bus_loads_it():
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read(ACTIVATION)
    s = cp["D-BUS Service"]
    assert (s["Name"], s["User"], s["SystemdService"]) == (BUS_NAME, "root", UNIT.name)
    unit = dict(((k, v) for sec, k, v in _unit_entries(UNIT) if sec == "Service"))
    assert unit["Type"] == "dbus" and unit["BusName"] == BUS_NAME
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(ACTIVATION, Path(d) / ACTIVATION.name)
        with PrivateBus(service_dir=d) as b:
            p = busctl(b, NOBODY_UID, NOGROUP_GID, [], "call", "org.freedesktop.DBus",
                       "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListActivatableNames")
            assert p.returncode == 0, p.stderr
            assert f'"{BUS_NAME}"' in p.stdout, (p.stdout, b.log())


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (it ships with systemd)")
    # /usr/bin/privbrokerd is not installed here: verify a copy whose
    # ExecStart= points at a binary that exists; everything else is unchanged.
    text = UNIT.read_text()
    copy, n = re.subn(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", text)
    assert n == 1
    (tmp_path / UNIT.name).write_text(copy)
    p = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT.name)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr.strip() == "", \
        (p.returncode, p.stdout, p.stderr)


# Each of these puts the unit in its own mount namespace, whose mounts are
# MS_SLAVE of the host's. That confines the front only if the launcher is
# forked in the host's namespace (--launcher-mount-namespace, see the unit's
# header); otherwise daemon-store mounts would never reach the host and every
# jail would see the broker's view.
MOUNT_NAMESPACE_OPTIONS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths", "ReadOnlyPaths",
    "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "MountFlags",
    "RootDirectory", "RootImage",
}
# Inherited by every jail through seccomp, the cgroup or a namespace, or
# (PrivateDevices, RootDirectory, RootImage) change the front's /dev or / that
# device access and the launcher's fork rely on.
BREAK_JAILS = {"ProtectHostname", "MemoryDenyWriteExecute", "PrivateNetwork", "PrivateIPC",
               "PrivateUsers", "IPAddressDeny", "DeviceAllow", "DevicePolicy", "ProtectClock",
               "PrivateDevices", "RootDirectory", "RootImage"}


def test_unit_keeps_the_decisions_its_comments_explain():
    entries = _unit_entries(UNIT)
    service = [(k, v) for sec, k, v in entries if sec == "Service"]
    keys = {k for k, _ in service}
    assert not keys & BREAK_JAILS, keys & BREAK_JAILS
    d = dict(service)
    if keys & MOUNT_NAMESPACE_OPTIONS:
        assert "--launcher-mount-namespace=/proc/1/ns/mnt" in d["ExecStart"].split(), \
            "a mount namespace for the unit needs the launcher forked in the host's"
    assert set(d["CapabilityBoundingSet"].split()) == {
        "CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_SYS_CHROOT",
        "CAP_KILL", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_SYS_RESOURCE"}
    assert d["NoNewPrivileges"] == "yes"
    # Jails need the network unless their profile takes it away.
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(d["RestrictAddressFamilies"].split())
    # Every namespace type the jail engine creates stays allowed.
    from broker.jail.spec import NAMESPACES
    systemd_name = {"mount": "mnt"}
    allowed = set(d["RestrictNamespaces"].split())
    assert {systemd_name.get(n, n) for n in NAMESPACES} <= allowed
