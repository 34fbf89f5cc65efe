"""The client side of org.privbroker.Broker1."""
from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BUS_NAME = "org.privbroker.Broker1"
PATH = "/org/privbroker/Broker1"
IFACE = "org.privbroker.Broker1"
MAX_IN_FLIGHT = 64     # stays well under the system bus's 128 pending replies


class BrokerCallError(Exception):
    """The broker (or the bus) refused a call; `name` is the D-Bus error name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{message} ({name})")
        self.name, self.message = name, message


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None

    @property
    def shell_code(self) -> int:
        return 128 + self.signal if self.signal else self.code


def _variant(v) -> Variant:
    if isinstance(v, Variant):
        return v
    if isinstance(v, bool):
        return Variant("b", v)
    if isinstance(v, int):
        return Variant("u" if v >= 0 else "i", v)
    if isinstance(v, str):
        return Variant("s", v)
    if isinstance(v, dict):     # rlimits: {"RLIMIT_NOFILE": (soft, hard)}
        return Variant("a{s(tt)}", {k: list(x) for k, x in v.items()})
    raise TypeError(f"cannot send option value {v!r}")


class AsyncBroker:
    def __init__(self, bus_address: str | None = None):
        self.bus_address = bus_address
        self.bus: MessageBus | None = None
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.exits: dict[str, asyncio.Future] = {}
        self.broker_name: str | None = None

    async def connect(self) -> "AsyncBroker":
        from broker import busfix
        busfix.install()
        self.bus = MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM,
                              negotiate_unix_fd=True)
        await self.bus.connect()
        # Anyone on the system bus may send signals: only Exited from the
        # connection that owns the broker's name counts.
        (self.broker_name,) = await self._call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
            "GetNameOwner", "s", [BUS_NAME])
        self.bus.add_message_handler(self._on_message)
        await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                         "AddMatch", "s", [f"type='signal',interface='{IFACE}',member='Exited'"])
        return self

    def close(self) -> None:
        if self.bus:
            self.bus.disconnect()

    def _on_message(self, msg: Message):
        if (msg.message_type == MessageType.SIGNAL and msg.interface == IFACE
                and msg.member == "Exited" and msg.sender == self.broker_name):
            jail_id, code, sig = msg.body
            status = ExitStatus(None if code == -1 and sig else code, sig or None)
            self._exit_future(jail_id).set_result(status) \
                if not self._exit_future(jail_id).done() else None
        return None

    def _exit_future(self, jail_id: str) -> asyncio.Future:
        if jail_id not in self.exits:
            self.exits[jail_id] = asyncio.get_running_loop().create_future()
        return self.exits[jail_id]

    async def _call(self, dest, path, iface, member, signature="", body=(), fds=()):
        async with self.in_flight:
            reply = await self.bus.call(Message(destination=dest, path=path, interface=iface,
                                                member=member, signature=signature,
                                                body=list(body), unix_fds=list(fds)))
        if reply.message_type == MessageType.ERROR:
            raise BrokerCallError(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body

    async def call(self, member: str, signature: str = "", body=(), fds=()):
        return await self._call(BUS_NAME, PATH, IFACE, member, signature, body, fds)

    async def launch(self, profile: str, argv: list[str], env: dict | None = None,
                     fds: dict[int, int] | None = None, options: dict | None = None):
        """Start a jail; returns (jail_id, pid).  fds maps the child's fd
        numbers to ours (default: our 0, 1, 2)."""
        fds = {0: 0, 1: 1, 2: 2} if fds is None else fds
        order = sorted(fds)
        jail_id, pid = await self.call(
            "Launch", "sasa{ss}a{uh}a{sv}",
            [profile, list(argv), dict(env or {}), {n: i for i, n in enumerate(order)},
             {k: _variant(v) for k, v in (options or {}).items()}],
            fds=[fds[n] for n in order])
        self._exit_future(jail_id)
        return jail_id, pid

    async def wait(self, jail_id: str) -> ExitStatus:
        return await self._exit_future(jail_id)

    async def signal(self, jail_id: str, sig: int) -> None:
        await self.call("Signal", "si", [jail_id, sig])

    async def list_jails(self) -> list[dict]:
        (jails,) = await self.call("ListJails")
        return [{"jail_id": j, "pid": p, **{k: v.value for k, v in extra.items()}}
                for j, p, extra in jails]

    async def get_property(self, name: str):
        (v,) = await self._call(BUS_NAME, PATH, "org.freedesktop.DBus.Properties", "Get",
                                "ss", [IFACE, name])
        return v.value


class JailHandle:
    def __init__(self, broker: "Broker", jail_id: str, pid: int):
        self.broker, self.jail_id, self.pid = broker, jail_id, pid

    def wait(self, timeout: float | None = None) -> ExitStatus:
        return self.broker._run(self.broker.aio.wait(self.jail_id), timeout)

    def signal(self, sig: int) -> None:
        self.broker._run(self.broker.aio.signal(self.jail_id, sig))


class Broker:
    """Blocking wrapper: an event loop in a background thread runs AsyncBroker."""

    def __init__(self, bus_address: str | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.aio = AsyncBroker(bus_address)
        self._run(self.aio.connect())

    def _run(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def launch(self, profile: str, argv: list[str], env: dict | None = None, stdin=0,
               stdout=1, stderr=2, options: dict | None = None) -> JailHandle:
        fds = {n: f if isinstance(f, int) else f.fileno()
               for n, f in ((0, stdin), (1, stdout), (2, stderr)) if f is not None}
        jail_id, pid = self._run(self.aio.launch(profile, argv, env, fds, options))
        return JailHandle(self, jail_id, pid)

    def jails(self) -> list[dict]:
        return self._run(self.aio.list_jails())

    def close(self) -> None:
        async def _close():
            self.aio.close()
        self._run(_close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
