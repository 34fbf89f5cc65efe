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
# Exited's exit_status when the OOM killer ended the jail (its memory limit);
# term_signal is then 9.  -1: another signal ended it.
EXIT_STATUS_OOM = -2
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
    oom: bool = False       # the OOM killer ended it: the jail hit its memory limit

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


def _gone() -> BrokerCallError:
    return BrokerCallError("org.freedesktop.DBus.Error.NameHasNoOwner",
                           "the broker left the bus (stopped or crashed); its jails ended with it")


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
        # The first call of a boot starts the broker (D-Bus activation,
        # systemd/org.privbroker.Broker1.service), but GetNameOwner below
        # never activates anything: ask the bus to start it first. A no-op
        # when the name is owned; ServiceUnknown where no activation file is
        # installed (a broker started by hand, the tests' private buses),
        # and then GetNameOwner says whether anyone owns the name.
        try:
            await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                             "org.freedesktop.DBus", "StartServiceByName", "su", [BUS_NAME, 0])
        except BrokerCallError as e:
            if e.name != "org.freedesktop.DBus.Error.ServiceUnknown":
                raise
        # Anyone on the system bus may send signals: only Exited from the
        # connection that owns the broker's name counts.
        (self.broker_name,) = await self._call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
            "GetNameOwner", "s", [BUS_NAME])
        self.bus.add_message_handler(self._on_message)
        await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                         "AddMatch", "s", [f"type='signal',interface='{IFACE}',member='Exited'"])
        # A broker that stops or crashes sends no Exited for the jails it
        # takes with it (KillMode=mixed): without this, wait() would never end
        # (seen under systemd in the VM, tests/test_vm_systemd.py).
        await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                         "AddMatch", "s", ["type='signal',sender='org.freedesktop.DBus',"
                                           "member='NameOwnerChanged',arg0='" + BUS_NAME + "'"])
        return self

    def close(self) -> None:
        if self.bus:
            self.bus.disconnect()

    def _on_message(self, msg: Message):
        from broker import busfix
        busfix.own_fds(msg)      # dbus-fast shares one list between messages (busfix)
        if (msg.message_type == MessageType.SIGNAL and msg.sender == "org.freedesktop.DBus"
                and msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME):
            self._owner_changed(msg.body[1], msg.body[2])
            return None
        if (msg.message_type == MessageType.SIGNAL and msg.interface == IFACE
                and msg.member == "Exited" and msg.sender == self.broker_name):
            jail_id, code, sig = msg.body
            if code == EXIT_STATUS_OOM:
                status = ExitStatus(None, sig or 9, oom=True)
            else:
                status = ExitStatus(None if code == -1 and sig else code, sig or None)
            self._exit_future(jail_id).set_result(status) \
                if not self._exit_future(jail_id).done() else None
        return None

    def _owner_changed(self, old: str, new: str) -> None:
        """The broker's name changed hands.  The broker that left took its
        jails with it (KillMode=mixed; a launcher that dies kills them):
        every wait ends.  Whoever owns the name next (a restart) is the
        broker from now on: its Exited count, so a long-lived client goes on
        with it (calls go to the well-known name anyway)."""
        if old and old == self.broker_name:
            for future in self.exits.values():
                if not future.done():
                    future.set_exception(_gone())
        self.broker_name = new or None

    def _launched(self, jail_id: str, by: str | None) -> None:
        """Wait for this jail's Exited, unless the broker that launched it
        (`by`, the reply's sender) already left: its Exited will never come."""
        future = self._exit_future(jail_id)
        if by != self.broker_name and not future.done():
            future.set_exception(_gone())

    def _exit_future(self, jail_id: str) -> asyncio.Future:
        if jail_id not in self.exits:
            self.exits[jail_id] = asyncio.get_running_loop().create_future()
        return self.exits[jail_id]

    async def _call(self, dest, path, iface, member, signature="", body=(), fds=()):
        return (await self._call_reply(dest, path, iface, member, signature, body, fds)).body

    async def _call_reply(self, dest, path, iface, member, signature="", body=(), fds=()):
        async with self.in_flight:
            reply = await self.bus.call(Message(destination=dest, path=path, interface=iface,
                                                member=member, signature=signature,
                                                body=list(body), unix_fds=list(fds)))
        if reply.message_type == MessageType.ERROR:
            raise BrokerCallError(reply.error_name, reply.body[0] if reply.body else "")
        return reply

    async def call(self, member: str, signature: str = "", body=(), fds=()):
        return await self._call(BUS_NAME, PATH, IFACE, member, signature, body, fds)

    async def launch(self, profile: str, argv: list[str], env: dict | None = None,
                     fds: dict[int, int] | None = None, options: dict | None = None):
        """Start a jail; returns (jail_id, pid).  fds maps the child's fd
        numbers to ours (default: our 0, 1, 2)."""
        fds = {0: 0, 1: 1, 2: 2} if fds is None else fds
        order = sorted(fds)
        reply = await self._call_reply(
            BUS_NAME, PATH, IFACE, "Launch", "sasa{ss}a{uh}a{sv}",
            [profile, list(argv), dict(env or {}), {n: i for i, n in enumerate(order)},
             {k: _variant(v) for k, v in (options or {}).items()}],
            fds=[fds[n] for n in order])
        jail_id, pid = reply.body
        self._launched(jail_id, reply.sender)
        return jail_id, pid

    async def wait(self, jail_id: str) -> ExitStatus:
        return await self._exit_future(jail_id)

    async def signal(self, jail_id: str, sig: int) -> None:
        await self.call("Signal", "si", [jail_id, sig])

    async def list_jails(self) -> list[dict]:
        (jails,) = await self.call("ListJails")
        return [{"jail_id": j, "pid": p, **{k: v.value for k, v in extra.items()}}
                for j, p, extra in jails]

    async def mount_daemon_store(self, daemon: str, user_hash: str) -> None:
        await self.call("MountDaemonStore", "ss", [daemon, user_hash])

    async def unmount_daemon_store(self, daemon: str, user_hash: str) -> None:
        await self.call("UnmountDaemonStore", "ss", [daemon, user_hash])

    # -- devices ---------------------------------------------------------------------
    async def open_path(self, path: str) -> int:
        """An fd on the device node, opened by the broker (rule-checked); ours
        to close."""
        async with self.in_flight:
            reply = await self.bus.call(Message(destination=BUS_NAME, path=PATH, interface=IFACE,
                                                member="OpenPath", signature="s", body=[path]))
        fds = list(reply.unix_fds)
        if reply.message_type == MessageType.ERROR:
            for fd in fds:
                os.close(fd)
            raise BrokerCallError(reply.error_name, reply.body[0] if reply.body else "")
        index = reply.body[0]
        if not 0 <= index < len(fds):
            for fd in fds:
                os.close(fd)
            raise BrokerCallError("org.privbroker.Error.Failed", "the reply carried no fd")
        for i, fd in enumerate(fds):
            if i != index:
                os.close(fd)
        return fds[index]

    async def check_path_access(self, path: str) -> bool:
        (ok,) = await self.call("CheckPathAccess", "s", [path])
        return ok

    async def chown_device(self, path: str) -> str:
        """Lease the node to our uid; the lease ends with release_device() or
        when this connection closes."""
        (lease_id,) = await self.call("ChownDevice", "s", [path])
        return lease_id

    async def release_device(self, lease_id: str) -> None:
        await self.call("ReleaseDevice", "s", [lease_id])

    async def get_property(self, name: str):
        (v,) = await self._call(BUS_NAME, PATH, "org.freedesktop.DBus.Properties", "Get",
                                "ss", [IFACE, name])
        return v.value

    async def properties(self) -> dict:
        """Every property of the interface (Version, Features, and the status
        ones: Uptime, LiveJails, LeasesHeld, MountsHeld, Calls, Refusals)."""
        (props,) = await self._call(BUS_NAME, PATH, "org.freedesktop.DBus.Properties",
                                    "GetAll", "s", [IFACE])
        return {k: _plain(v) for k, v in props.items()}


def _plain(v):
    """A property value without Variants (Features is a{sv})."""
    v = v.value if isinstance(v, Variant) else v
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


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

    def properties(self) -> dict:
        return self._run(self.aio.properties())

    def mount_daemon_store(self, daemon: str, user_hash: str) -> None:
        self._run(self.aio.mount_daemon_store(daemon, user_hash))

    def unmount_daemon_store(self, daemon: str, user_hash: str) -> None:
        self._run(self.aio.unmount_daemon_store(daemon, user_hash))

    def open_path(self, path: str) -> int:
        return self._run(self.aio.open_path(path))

    def check_path_access(self, path: str) -> bool:
        return self._run(self.aio.check_path_access(path))

    def chown_device(self, path: str) -> str:
        return self._run(self.aio.chown_device(path))

    def release_device(self, lease_id: str) -> None:
        self._run(self.aio.release_device(lease_id))

    def close(self) -> None:
        """Idempotent: a second close returns at once (it used to wait
        forever for the stopped loop to run it)."""
        if self.loop.is_closed():
            return
        async def _close():
            self.aio.close()
        self._run(_close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
