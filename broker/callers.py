"""Who is calling: the kernel credentials of a bus connection.

For every sender the broker asks the bus (GetConnectionCredentials): the uid
and groups decide identity; anything that refers to the caller's process uses
a pidfd, never a bare pid.  Where the bus hands out a ProcessFD (newer
dbus-daemon, dbus-broker) that is the pidfd.  Debian 12's dbus-daemon 1.14
does not, so the broker opens the pidfd itself and then asks the bus again
for the connection's pid: if the connection still exists with that pid after
the pidfd was opened, the pidfd names the caller's process and not a recycled
pid.  Entries are cached per unique name and dropped when the name goes away.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from dbus_fast import Message, MessageType


class CallerGone(Exception):
    """The caller disconnected before it could be identified."""


@dataclass(frozen=True)
class Caller:
    name: str               # unique bus name, e.g. ":1.42"
    uid: int
    gids: frozenset[int]
    pid: int
    pidfd: int              # owned by the Callers cache

    def describe(self) -> str:
        return f"uid={self.uid} pid={self.pid} name={self.name}"


def _dbus_call(member: str, signature: str = "", body=()) -> Message:
    return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus", member=member,
                   signature=signature, body=list(body))


async def _pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


class Callers:
    """`open_pidfd(pid)`: how to get a pidfd for a pid the bus reported.  The
    front lives in a pid namespace of its own, where the bus's pids mean
    nothing, so privbrokerd passes the launcher's (LauncherClient.pidfd);
    a process in the bus's pid namespace can use pidfd_open(2) itself."""

    def __init__(self, bus, open_pidfd=_pidfd_open):
        self.bus = bus
        self.open_pidfd = open_pidfd
        self.cache: dict[str, Caller] = {}
        # One lookup in flight per sender: concurrent first calls share it
        # (each used to open a pidfd of its own, and all but one leaked).
        self._asking: dict[str, asyncio.Future] = {}
        self._gone: set[str] = set()     # forgotten while being asked

    async def identify(self, sender: str) -> Caller:
        caller = self.cache.get(sender)
        if caller is not None:
            return caller
        asking = self._asking.get(sender)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(sender))
            self._asking[sender] = asking
            asking.add_done_callback(lambda f: self._asked(sender, f))
        return await asyncio.shield(asking)

    def _asked(self, sender: str, fut: asyncio.Future) -> None:
        del self._asking[sender]
        if fut.cancelled() or fut.exception() is not None:
            return
        caller = fut.result()
        if sender in self._gone:         # its name went away meanwhile: nothing to keep
            self._gone.discard(sender)
            os.close(caller.pidfd)
        else:
            self.cache[sender] = caller

    async def _ask(self, sender: str) -> Caller:
        reply = await self.bus.call(_dbus_call("GetConnectionCredentials", "s", [sender]))
        if reply.message_type == MessageType.ERROR:
            raise CallerGone(f"{sender}: {reply.error_name}")
        creds = {k: v.value for k, v in reply.body[0].items()}
        uid, pid = creds["UnixUserID"], creds["ProcessID"]
        gids = frozenset(creds.get("UnixGroupIDs", ()))
        if "ProcessFD" in creds and reply.unix_fds:
            pidfd = reply.unix_fds[creds["ProcessFD"]]
            for extra in reply.unix_fds:
                if extra != pidfd:
                    os.close(extra)
        else:
            pidfd = await self._pidfd_checked(sender, pid)
        return Caller(sender, uid, gids, pid, pidfd)

    async def _pidfd_checked(self, sender: str, pid: int) -> int:
        try:
            pidfd = await self.open_pidfd(pid)
        except Exception:
            raise CallerGone(f"{sender}: process {pid} is gone") from None
        again = await self.bus.call(_dbus_call("GetConnectionUnixProcessID", "s", [sender]))
        if again.message_type == MessageType.ERROR or again.body[0] != pid:
            os.close(pidfd)
            raise CallerGone(f"{sender}: connection went away while being identified")
        return pidfd

    def forget(self, name: str) -> None:
        caller = self.cache.pop(name, None)
        if caller is not None:
            os.close(caller.pidfd)
        elif name in self._asking:
            self._gone.add(name)
