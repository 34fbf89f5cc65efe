"""Make dbus-fast's asyncio writer survive a full socket.

dbus-fast 5.2.0 (like dbus-next 0.2.3, python-dbus-next #153) treats EAGAIN
from send() as fatal and drops the whole connection: a burst of calls that
fills the socket buffer would knock the broker off the bus.  `install()`
replaces the writer's callback with one that, on EAGAIN, keeps the unsent
bytes (and their fds) and waits for the socket to become writable.  Nothing
queued is ever dropped: replies and Exited signals all go out, in order.
"""
from __future__ import annotations

import array
import socket

from dbus_fast.aio import message_bus as _aio


def _write_callback(self, remove_writer: bool = True) -> None:
    sock = self.sock
    try:
        while True:
            if self.buf is None:
                if not self.messages:
                    if remove_writer:
                        self.loop.remove_writer(self.fd)
                    return
                buf, unix_fds, fut = self.messages.popleft()
                self.unix_fds, self.buf, self.offset, self.fut = unix_fds, memoryview(buf), 0, fut
            try:
                if self.unix_fds and self.negotiate_unix_fd:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                    self.offset += sock.sendmsg([self.buf[self.offset:]], anc)
                    self.unix_fds = None        # the fds went with the first byte
                else:
                    self.offset += sock.send(self.buf[self.offset:])
            except BlockingIOError:
                # Socket full: wait until it drains; keep everything queued.
                self.loop.add_writer(self.fd, self.write_callback)
                return
            if self.offset < len(self.buf):
                self.loop.add_writer(self.fd, self.write_callback)
                return
            self.buf = None
            _aio._future_set_result(self.fut, None)
    except Exception as e:
        if self.bus._user_disconnect:
            _aio._future_set_result(self.fut, None)
        else:
            _aio._future_set_exception(self.fut, e)
        self.bus._finalize(e)


def own_fds(msg) -> None:
    """Give `msg` a list of fds of its own (see the module doc)."""
    msg.unix_fds = list(msg.unix_fds)


def install() -> None:
    """Idempotent; call before connecting."""
    _aio._MessageWriter.write_callback = _write_callback
