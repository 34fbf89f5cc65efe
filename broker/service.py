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
from pathlib import Path

from dbus_fast import Message, MessageType, Variant

from .callers import CallerGone, Callers
from .jails import BrokerError, JailCore
from .policy import AccessDenied

BUS_NAME = "org.privbroker.Broker1"
PATH = "/org/privbroker/Broker1"
IFACE = "org.privbroker.Broker1"
ERROR_PREFIX = "org.privbroker.Error."
VERSION = "0.1.0"
INTROSPECTION = Path(__file__).resolve().parent.parent / "dbus-policy" / f"{BUS_NAME}.xml"

log = logging.getLogger("privbrokerd")


class BrokerService:
    def __init__(self, bus, core: JailCore, features: dict):
        self.bus = bus
        self.core = core
        self.callers = Callers(bus)
        self.features = features
        self.tasks: set[asyncio.Task] = set()
        # member -> (signature accepted, handler)
        self.methods = {
            (IFACE, "Launch"): ("sasa{ss}a{uh}a{sv}", self.launch),
            (IFACE, "Signal"): ("si", self.signal),
            (IFACE, "ListJails"): ("", self.list_jails),
            ("org.freedesktop.DBus.Properties", "Get"): ("ss", self.prop_get),
            ("org.freedesktop.DBus.Properties", "GetAll"): ("s", self.prop_get_all),
            ("org.freedesktop.DBus.Introspectable", "Introspect"): ("", self.introspect),
        }

    # -- dispatch ---------------------------------------------------------------
    def handle(self, msg: Message):
        if msg.message_type == MessageType.SIGNAL:
            self._bus_signal(msg)
            return None
        if msg.message_type != MessageType.METHOD_CALL or msg.path != PATH:
            return None
        entry = self.methods.get((msg.interface, msg.member))
        if entry is None:
            self._close_fds(msg)
            return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                     f"no method {msg.interface}.{msg.member}")
        signature, handler = entry
        if msg.signature != signature:
            self._close_fds(msg)
            return Message.new_error(msg, ERROR_PREFIX + "InvalidArgument",
                                     f"{msg.member} takes ({signature}), got ({msg.signature})")
        task = asyncio.ensure_future(self._serve(msg, handler))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _serve(self, msg: Message, handler) -> None:
        try:
            reply = await handler(msg)
        except (BrokerError, AccessDenied) as e:
            kind = getattr(e, "kind", "AccessDenied")
            log.info("refused %s.%s from %s: %s: %s", msg.interface, msg.member,
                     msg.sender, kind, e)
            reply = Message.new_error(msg, ERROR_PREFIX + kind, str(e))
        except CallerGone as e:
            log.info("caller gone: %s", e)
            reply = None
        except Exception as e:       # a bug must not take the broker down
            log.exception("failed %s.%s", msg.interface, msg.member)
            reply = Message.new_error(msg, ERROR_PREFIX + "Failed", f"internal error: {e}")
        finally:
            self._close_fds(msg)
        if reply is not None:
            self.bus.send(reply)

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
        caller = await self.callers.identify(msg.sender)
        profile, argv, env, fd_map, options = msg.body
        fds = {}
        for child_fd, index in fd_map.items():
            if not 0 <= index < len(msg.unix_fds):
                raise BrokerError("InvalidArgument", f"fd {child_fd} refers to no passed fd")
            fds[child_fd] = msg.unix_fds[index]
        opts = {k: v.value for k, v in options.items()}
        jail = await self.core.launch(caller, profile, argv, env, fds, opts)
        log.info("launched jail %s (profile %s, pid %d) for %s", jail.jail_id, profile,
                 jail.pid, caller.describe())
        return Message.new_method_return(msg, "su", [jail.jail_id, jail.pid])

    async def signal(self, msg: Message) -> Message:
        caller = await self.callers.identify(msg.sender)
        jail_id, sig = msg.body
        await self.core.signal(caller, jail_id, sig)
        return Message.new_method_return(msg)

    async def list_jails(self, msg: Message) -> Message:
        caller = await self.callers.identify(msg.sender)
        body = [[j.jail_id, j.pid, {"profile": Variant("s", j.profile),
                                    "argv": Variant("as", list(j.argv)),
                                    "started": Variant("d", j.started)}]
                for j in self.core.list(caller)]
        return Message.new_method_return(msg, "a(sua{sv})", [body])

    def _properties(self) -> dict[str, Variant]:
        return {"Version": Variant("s", VERSION), "Features": Variant("a{sv}", self.features)}

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
        return Message.new_method_return(msg, "s", [INTROSPECTION.read_text()])

    # -- events -------------------------------------------------------------------
    def _bus_signal(self, msg: Message) -> None:
        if (msg.sender == "org.freedesktop.DBus" and msg.member == "NameOwnerChanged"
                and msg.body[0].startswith(":") and msg.body[2] == ""):
            name = msg.body[0]
            self.callers.forget(name)
            self.core.caller_gone(name)

    def send_exited(self, owner: str, jail_id: str, code, sig) -> None:
        """Exited(jail_id, exit_status, term_signal), to the launching caller only."""
        self.bus.send(Message(message_type=MessageType.SIGNAL, path=PATH, interface=IFACE,
                              member="Exited", destination=owner, signature="sii",
                              body=[jail_id, -1 if code is None else code,
                                    0 if sig is None else sig]))
