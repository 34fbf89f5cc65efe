"""Who is calling: the kernel credentials of a bus connection.

For every sender the broker asks the bus (GetConnectionCredentials): the uid
and groups decide identity; anything that refers to the caller's process uses
a pidfd, never a bare pid.  Where the bus hands out a ProcessFD (newer
dbus-daemon, dbus-broker) that is the pidfd.  Debian 12's dbus-daemon 1.14
does not: it gives the pid of the process that opened the connection, as it
was then.  So the broker opens a pidfd for that pid and checks two things:
the bus still has the connection with that pid (asked again after the open),
and the process the pidfd names runs as the connection's uid.  A process
that opened a connection, handed it to a child and exited may have its pid
recycled by another user's process before the broker asks
(tests/test_deputy_launch.py): then no process of the caller's can be
named, the pidfd is dropped and the caller has none (pid 0); its identity,
the bus's uid, is unaffected.  A recycling by a process of the same uid
cannot be told apart; it is the same principal.  Entries are cached per
unique name and dropped when the name goes away.
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
    pid: int                # 0: the connection's opener is gone (see above)
    pidfd: int              # owned by the Callers cache; -1 with pid 0

    def describe(self) -> str:
        return f"uid={self.uid} pid={self.pid or 'gone'} name={self.name}"


def _dbus_call(member: str, signature: str = "", body=()) -> Message:
    return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus", member=member,
                   signature=signature, body=list(body))


async def _pidfd_open(pid: int) -> tuple[int, int]:
    from .launcher import pidfd_uid
    fd = os.pidfd_open(pid)
    try:
        return fd, pidfd_uid(pid, fd)
    except BaseException:
        os.close(fd)
        raise


class Callers:
    """`open_pidfd(pid)`: how to get a pidfd for a pid the bus reported, and
    the uid its process runs as.  The
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
        # Whatever the answer, the mark is done with: a failed lookup kept
        # it, and any client could grow the set by connecting and leaving.
        gone = sender in self._gone
        self._gone.discard(sender)
        if fut.cancelled() or fut.exception() is not None:
            return
        caller = fut.result()
        if gone:                         # its name went away meanwhile: nothing to keep
            if caller.pidfd >= 0:
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
            pidfd = await self._pidfd_checked(sender, pid, uid)
            if pidfd < 0:
                pid = 0
        return Caller(sender, uid, gids, pid, pidfd)

    async def _pidfd_checked(self, sender: str, pid: int, uid: int) -> int:
        """The pidfd of the connection's opener, or -1 if its pid now names
        another user's process (the opener exited; see the module doc)."""
        try:
            pidfd, pid_uid = await self.open_pidfd(pid)
        except Exception:
            raise CallerGone(f"{sender}: process {pid} is gone") from None
        again = await self.bus.call(_dbus_call("GetConnectionUnixProcessID", "s", [sender]))
        if again.message_type == MessageType.ERROR or again.body[0] != pid:
            os.close(pidfd)
            raise CallerGone(f"{sender}: connection went away while being identified")
        if pid_uid != uid:
            os.close(pidfd)
            return -1
        return pidfd

    def forget(self, name: str) -> None:
        caller = self.cache.pop(name, None)
        if caller is not None and caller.pidfd >= 0:
            os.close(caller.pidfd)
        elif name in self._asking:
            self._gone.add(name)
