"""The D-Bus object: unpack -> call the core -> pack; errors mapped.

No policy lives here.  The method table below is the whole surface: each
entry names the member, the signature it accepts, and the handler.  A call
with another signature is refused before anything else happens, and every
unix fd that arrives with a message is closed once the call is done (the
launcher has its own copies by then).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from dbus_fast import Message, MessageType, Variant

from . import busfix, logs
from .callers import CallerGone, Callers
from .daemon_store import DaemonStoreError
from .devices.errors import DeviceError
from .dispatch import FairDispatch
from .jails import BrokerError, JailCore
from .policy import AccessDenied
from .status import Status

BUS_NAME = "org.privbroker.Broker1"
PATH = "/org/privbroker/Broker1"
IFACE = "org.privbroker.Broker1"
ERROR_PREFIX = "org.privbroker.Error."
VERSION = "0.1.0"


def _introspection_path() -> Path:
    """The interface XML: beside the package in a checkout; where `make
    install` / the Debian package put it (<prefix>/share/dbus-1/interfaces,
    the venv being <prefix>/lib/privbroker/venv) when installed."""
    name = f"{BUS_NAME}.xml"
    candidates = [Path(__file__).resolve().parent.parent / "dbus-policy" / name]
    prefix = Path(sys.prefix)
    if len(prefix.parents) >= 3:
        candidates.append(prefix.parents[2] / "share" / "dbus-1" / "interfaces" / name)
    candidates.append(Path("/usr/share/dbus-1/interfaces") / name)
    return next((p for p in candidates if p.exists()), candidates[0])


INTROSPECTION = _introspection_path()


def _in_arg_names() -> dict[str, list[str]]:
    """member -> names of its in-arguments, from the XML (for log lines)."""
    try:
        root = ET.parse(INTROSPECTION).getroot()
    except (OSError, ET.ParseError):
        return {}
    return {m.get("name"): [a.get("name") for a in m.findall("arg")
                            if a.get("direction", "in") == "in"]
            for m in root.iter("method")}

log = logging.getLogger("privbrokerd")

# Methods that only read the caller's own state: their allowed calls are
# logged at debug (a refusal of them still at info).
_QUIET_WHEN_ALLOWED = frozenset({"ListJails"})

# Exited's exit_status when the kernel's OOM killer ended the jail because it
# hit its cgroup memory limit (term_signal is then SIGKILL, 9).  -1 stays "a
# signal ended it"; 0..255 are exit codes.
EXIT_STATUS_OOM = -2

# ListJails details from the jail's cgroup, and their D-Bus types.
_ACCOUNTING = {"memory_bytes": "t", "pids": "u", "cpu_usec": "t", "oom_kills": "u",
               "memory_limit": "t", "pids_limit": "u", "cpu_weight": "u", "cpu_quota": "u"}


def _accounting(limits: dict, stats: dict) -> dict[str, Variant]:
    values = {**limits, **stats}
    return {k: Variant(t, values[k]) for k, t in _ACCOUNTING.items()
            if type(values.get(k)) is int and values[k] >= 0}


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class BrokerService:
    def __init__(self, bus, core: JailCore, features: dict, stores=None, devices=None,
                 calls_per_second: float = 200.0):
        self.bus = bus
        self.core = core
        self.stores = stores            # daemon_store.DaemonStoreFront
        self.devices = devices          # devices.core.DeviceCore
        self._outcomes: dict[int, dict] = {}   # id(msg) -> the device core's log fields
        # id(msg) -> who sent it, as identified for the call: its decision
        # line names the caller even when the name is gone by then (the
        # cache forgets a name at NameOwnerChanged)
        self._identified: dict[int, object] = {}
        self.callers = Callers(bus)
        self.features = features
        self.status = Status()          # status properties; cores register counts
        self.arg_names = _in_arg_names()
        self.tasks: set[asyncio.Task] = set()
        # Calls are served in turns between callers (broker/dispatch.py).
        self.dispatch = FairDispatch(self._start, self._refuse_backlog, rate=calls_per_second)
        self.introspection_xml = INTROSPECTION.read_text()
        # member -> (signature accepted, handler)
        self.methods = {
            (IFACE, "Launch"): ("sasa{ss}a{uh}a{sv}", self.launch),
            (IFACE, "Signal"): ("si", self.signal),
            (IFACE, "ListJails"): ("", self.list_jails),
            (IFACE, "MountDaemonStore"): ("ss", self.mount_daemon_store),
            (IFACE, "UnmountDaemonStore"): ("ss", self.unmount_daemon_store),
            (IFACE, "OpenPath"): ("s", self.open_path),
            (IFACE, "CheckPathAccess"): ("s", self.check_path_access),
            (IFACE, "ChownDevice"): ("s", self.chown_device),
            (IFACE, "ReleaseDevice"): ("s", self.release_device),
            ("org.freedesktop.DBus.Properties", "Get"): ("ss", self.prop_get),
            ("org.freedesktop.DBus.Properties", "GetAll"): ("s", self.prop_get_all),
            ("org.freedesktop.DBus.Introspectable", "Introspect"): ("", self.introspect),
        }

    # -- dispatch ---------------------------------------------------------------
    def handle(self, msg: Message):
        busfix.own_fds(msg)      # before anything keeps msg: dbus-fast shares the list
        if msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            return None          # replies to the front's own calls: their callers' fds
        if msg.message_type != MessageType.METHOD_CALL or msg.path != PATH:
            # Not ours to serve (dbus-fast answers calls to other paths), but
            # fds sent with it are ours to close: anyone may send them, and
            # kept they would pile up until the front ran out.
            self._close_fds(msg)
            if msg.message_type == MessageType.SIGNAL:
                self._bus_signal(msg)
            return None
        entry = self.methods.get((msg.interface, msg.member))
        if msg.interface == IFACE:
            self.status.called(msg.member)
        if entry is None:
            self._close_fds(msg)
            self._decided(msg, "refused", kind="UnknownMethod", reason="no such method")
            return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                     f"no method {msg.interface}.{msg.member}")
        signature, handler = entry
        if msg.signature != signature:
            self._close_fds(msg)
            self._decided(msg, "refused", kind="InvalidArgument",
                          reason=f"signature ({msg.signature}), not ({signature})")
            return Message.new_error(msg, ERROR_PREFIX + "InvalidArgument",
                                     f"{msg.member} takes ({signature}), got ({msg.signature})")
        # One turn per uid once the sender is known, per connection before.
        known = self.callers.cache.get(msg.sender)
        self.dispatch.submit(known.uid if known else msg.sender, msg.sender or "", (msg, handler))
        return True

    def _start(self, call) -> asyncio.Task:
        task = asyncio.ensure_future(self._serve(*call))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _refuse_backlog(self, call) -> None:
        msg, _handler = call
        self._close_fds(msg)
        reason = f"more than {self.dispatch.queue_limit} calls waiting"
        self.bus.send(Message.new_error(msg, ERROR_PREFIX + "LimitExceeded", reason))
        self._decided(msg, "refused", kind="LimitExceeded", reason=reason)

    async def _serve(self, msg: Message, handler) -> None:
        # The decision line is written once the reply is on its way: the
        # caller does not wait for the log (nor does it miss a line: the line
        # goes out before the loop takes the next message).
        decided: tuple = ()
        try:
            reply = await handler(msg)
        except (BrokerError, AccessDenied, DaemonStoreError, DeviceError) as e:
            kind = getattr(e, "kind", "AccessDenied")
            decided = ("refused", dict(kind=kind, reason=str(e), extra=getattr(e, "info", None)))
            reply = Message.new_error(msg, ERROR_PREFIX + kind, str(e))
        except CallerGone as e:
            # what was done before the caller was found gone (a lease taken,
            # then ended at once) is in the line too
            decided = ("gone", dict(reason=str(e), extra=self._outcomes.get(id(msg))))
            reply = None
        except Exception as e:       # a bug must not take the broker down
            log.exception("failed %s.%s", msg.interface, msg.member)
            decided = ("failed", dict(kind="Failed", reason=f"internal error: {e}"))
            reply = Message.new_error(msg, ERROR_PREFIX + "Failed", f"internal error: {e}")
        else:
            if reply is not None and reply.message_type == MessageType.ERROR:
                decided = ("refused", dict(kind=reply.error_name.rsplit(".", 1)[-1],
                                           reason=reply.body[0] if reply.body else None))
            else:
                decided = ("allowed", dict(reply=reply,
                                           extra=self._outcomes.pop(id(msg), None)))
        finally:
            self._close_fds(msg)
            self._outcomes.pop(id(msg), None)
            caller = self._identified.pop(id(msg), None)
        if reply is not None:
            sent = self.bus.send(reply)
            if reply.unix_fds:
                # our copies of fds handed out (OpenPath): close them once the
                # reply, and the fds with it, has left: at once when the
                # writer sent it right away (the usual case), else when the
                # queued reply is sent
                fds = list(reply.unix_fds)
                if sent.done():
                    _close_all(fds)
                else:
                    sent.add_done_callback(lambda _f: _close_all(fds))
        self._decided(msg, decided[0], caller=caller, **decided[1])

    async def _identify(self, msg: Message):
        caller = await self.callers.identify(msg.sender)
        self._identified[id(msg)] = caller
        return caller

    def _decided(self, msg: Message, verdict: str, kind: str | None = None,
                 reason: str | None = None, reply: Message | None = None,
                 extra: dict | None = None, caller=None) -> None:
        """One log line per decision on the interface's methods (property
        reads and introspection only at debug), and the refusal counters."""
        if kind and verdict == "refused":
            self.status.refused(kind)
        # Refusals and everything that changes state at info; a caller
        # reading its own state, properties and introspection at debug.
        quiet = msg.interface != IFACE or msg.member in _QUIET_WHEN_ALLOWED
        level = logging.DEBUG if verdict == "allowed" and quiet else logging.INFO
        if not log.isEnabledFor(level):
            return
        result = None
        if msg.member == "Launch" and reply is not None and reply.body:
            result = {"jail": reply.body[0], "jail_pid": reply.body[1]}
        if extra:                     # what the device core decided and did
            result = {**(result or {}), **extra}
        logs.decision(level, msg.member or "?", verdict,
                      caller=caller or self.callers.cache.get(msg.sender), sender=msg.sender,
                      args=logs.summarize(msg.member, msg.body,
                                          self.arg_names.get(msg.member, [])),
                      kind=kind, result=result, reason=reason)

    @staticmethod
    def _close_fds(msg: Message) -> None:
        for fd in msg.unix_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        msg.unix_fds = []

    # -- methods ------------------------------------------------------------------
    async def launch(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        profile, argv, env, fd_map, options = msg.body
        fds = {}
        for child_fd, index in fd_map.items():
            if not 0 <= index < len(msg.unix_fds):
                raise BrokerError("InvalidArgument", f"fd {child_fd} refers to no passed fd")
            fds[child_fd] = msg.unix_fds[index]
        opts = {k: v.value for k, v in options.items()}
        jail = await self.core.launch(caller, profile, argv, env, fds, opts)
        return Message.new_method_return(msg, "su", [jail.jail_id, jail.pid])

    async def signal(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        jail_id, sig = msg.body
        await self.core.signal(caller, jail_id, sig)
        return Message.new_method_return(msg)

    async def list_jails(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        jails = self.core.list(caller)
        stats = await asyncio.gather(*(self.core.stats(j) for j in jails))
        body = [[j.jail_id, j.pid, {"profile": Variant("s", j.profile),
                                    "argv": Variant("as", list(j.argv)),
                                    "started": Variant("d", j.started),
                                    **_accounting(j.limits, st)}]
                for j, st in zip(jails, stats)]
        return Message.new_method_return(msg, "a(sua{sv})", [body])

    async def mount_daemon_store(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        daemon, user_hash = msg.body
        changed = await self.stores.mount(caller, daemon, user_hash)
        log.info("daemon store %s of %s: %s for %s", daemon, user_hash,
                 "mounted " + "+".join(changed) if changed else "already mounted",
                 caller.describe())
        return Message.new_method_return(msg)

    async def unmount_daemon_store(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        daemon, user_hash = msg.body
        changed = await self.stores.unmount(caller, daemon, user_hash)
        log.info("daemon store %s of %s: %s for %s", daemon, user_hash,
                 "unmounted " + "+".join(changed) if changed else "was not mounted",
                 caller.describe())
        return Message.new_method_return(msg)

    # -- devices (broker/devices: the rules decide, the core logs) ------------------
    async def open_path(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        fd, self._outcomes[id(msg)] = self.devices.open_path(caller, msg.body[0])
        return Message.new_method_return(msg, "h", [0], unix_fds=[fd])

    async def check_path_access(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        ok, self._outcomes[id(msg)] = self.devices.check_path_access(caller, msg.body[0])
        return Message.new_method_return(msg, "b", [ok])

    async def chown_device(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        lease_id, self._outcomes[id(msg)] = self.devices.chown_device(caller, msg.body[0])
        # A caller that vanished while it was being identified had its
        # NameOwnerChanged handled before the lease existed: ask the bus now
        # (it answers in order, after any such signal) and end the lease.
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
            body=[msg.sender]))
        if reply.message_type == MessageType.ERROR or not reply.body[0]:
            self.devices.caller_gone(msg.sender)
            raise CallerGone(f"{msg.sender} left before its lease could be handed over")
        return Message.new_method_return(msg, "s", [lease_id])

    async def release_device(self, msg: Message) -> Message:
        caller = await self._identify(msg)
        self._outcomes[id(msg)] = self.devices.release_device(caller, msg.body[0])
        return Message.new_method_return(msg)

    def _properties(self) -> dict[str, Variant]:
        live: dict[int, int] = {}
        for jail in self.core.live.values():
            live[jail.uid] = live.get(jail.uid, 0) + 1
        return {"Version": Variant("s", VERSION), "Features": Variant("a{sv}", self.features),
                **self.status.properties(live)}

    async def prop_get(self, msg: Message) -> Message:
        iface, name = msg.body
        props = self._properties()
        if iface != IFACE or name not in props:
            return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty",
                                     f"no property {iface}.{name}")
        return Message.new_method_return(msg, "v", [props[name]])

    async def prop_get_all(self, msg: Message) -> Message:
        props = self._properties() if msg.body[0] == IFACE else {}
        return Message.new_method_return(msg, "a{sv}", [props])

    async def introspect(self, msg: Message) -> Message:
        return Message.new_method_return(msg, "s", [self.introspection_xml])

    # -- events -------------------------------------------------------------------
    def _bus_signal(self, msg: Message) -> None:
        if (msg.sender == "org.freedesktop.DBus" and msg.member == "NameOwnerChanged"
                and msg.body[0].startswith(":") and msg.body[2] == ""):
            name = msg.body[0]
            unserved = self.dispatch.drop(name)
            for call_msg, _handler in unserved:
                self._close_fds(call_msg)
            if unserved:
                log.info("%s left with %d calls not yet served; dropped", name, len(unserved))
            self.callers.forget(name)
            self.core.caller_gone(name)
            if self.devices is not None:
                self.devices.caller_gone(name)      # its leases end, nodes restored

    def send_exited(self, owner: str, jail_id: str, code, sig, oom: bool = False) -> None:
        """Exited(jail_id, exit_status, term_signal), to the launching caller only.
        exit_status is -1 when a signal ended the jail, EXIT_STATUS_OOM (-2,
        with term_signal 9) when the OOM killer did because of its memory limit."""
        if oom:
            log.info("jail %s was killed by the OOM killer (memory limit)", jail_id)
        status = EXIT_STATUS_OOM if oom else (-1 if code is None else code)
        self.bus.send(Message(message_type=MessageType.SIGNAL, path=PATH, interface=IFACE,
                              member="Exited", destination=owner, signature="sii",
                              body=[jail_id, status, 0 if sig is None else sig]))
