"""The launcher: a zygote that forks jails for the broker's front.

`start()` forks it before the front connects to the bus.  It is
single-threaded, holds no bus connection and no policy, keeps no fd but its
control socket (and stderr for its log), and does only what a well-formed
request (broker/wire.py) asks: launch this spec with these fds, signal this
jail, mount or unmount this daemon store.  It reports every jail's exit as an
event.  The daemon-store Layout (where templates, run dirs and homes are) is
given at start-up, before any bus connection exists; a request names only a
daemon and a user hash, and is re-validated here against that Layout.

The front talks to it with `LauncherClient` (asyncio): requests are matched
to replies by sequence number, so launches never block the event loop.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket

from . import daemon_store, wire
from .jail import cgroups
from .jail.launch import Jail, LaunchError, launch
from .jail.spec import SpecError, validate

_RECV = wire.MAX_MESSAGE + 1


# ---------------------------------------------------------------------------
# The launcher process
# ---------------------------------------------------------------------------

class _Launcher:
    def __init__(self, sock: socket.socket, layout: daemon_store.Layout | None = None):
        self.sock = sock
        self.layout = layout
        self.jails: dict[str, Jail] = {}
        self.cgroup_parent: str | None = None     # where jail cgroups go (None: our own)
        self.leftover_cgroups: list[cgroups.Cgroup] = []   # retried on every reap

    def serve(self) -> None:
        import selectors
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "request")
        sel.register(wake_r, selectors.EVENT_READ, "child")
        while True:
            for key, _ in sel.select():
                if key.data == "child":
                    while True:
                        try:
                            os.read(wake_r, 512)
                        except BlockingIOError:
                            break
                    self.reap()
                elif not self.handle_one():
                    self.shutdown()
                    return

    def handle_one(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _RECV, wire.MAX_FDS)
        except OSError:
            return False
        if not data:
            return False            # the front is gone
        seq = None
        try:
            msg = wire.decode(data)
            seq = msg.get("seq")
            reply = self.dispatch(msg, fds)
        except wire.WireError as e:
            _log(f"refused a malformed request: {e}")
            reply = {"ok": False, "error": "malformed", "message": str(e)}
        except Exception as e:     # one bad request must never take the launcher down
            _log(f"request failed: {type(e).__name__}: {e}")
            reply = {"ok": False, "error": "failed", "message": f"launcher error: {e}"}
        finally:
            for fd in fds:
                os.close(fd)        # the jail has its own copies by now
        if type(seq) is int:
            reply["seq"] = seq
        self.send(reply)
        return True

    def dispatch(self, msg: dict, fds: list[int]) -> dict:
        op, jail_id = msg.get("op"), msg.get("jail")
        if op == "daemon-store":
            return self.daemon_store(msg, fds)
        if not isinstance(jail_id, str) or not wire.JAIL_ID.match(jail_id):
            raise wire.WireError(f"bad jail id {jail_id!r}")
        if op == "launch":
            return self.launch(jail_id, msg, fds)
        if op == "signal":
            sig = msg.get("signal")
            if type(sig) is not int or not 0 < sig < signal.NSIG:
                raise wire.WireError(f"bad signal {sig!r}")
            jail = self.jails.get(jail_id)
            if jail is None:
                return {"ok": False, "error": "not-found", "message": f"no jail {jail_id}"}
            jail.signal_all(sig)
            return {"ok": True}
        if op == "stats":
            jail = self.jails.get(jail_id)
            if jail is None:
                return {"ok": False, "error": "not-found", "message": f"no jail {jail_id}"}
            stats = jail.stats()
            return {"ok": True, "stats": stats.as_dict() if stats is not None else {}}
        raise wire.WireError(f"unknown op {op!r}")

    def launch(self, jail_id: str, msg: dict, fds: list[int]) -> dict:
        if jail_id in self.jails:
            raise wire.WireError(f"jail id {jail_id} is in use")
        targets = msg.get("fd_targets")
        if (not isinstance(targets, list) or len(targets) != len(fds)
                or not all(type(t) is int and 0 <= t < 1024 for t in targets)
                or len(set(targets)) != len(targets)):
            raise wire.WireError("fd_targets must list one distinct fd number per fd passed")
        spec = wire.spec_from_wire(msg.get("spec"))
        try:
            validate(spec)                  # re-validated here, whoever sent it
            jail = launch(spec, fds=dict(zip(targets, fds)), cgroup_name=f"privbroker-{jail_id}",
                          cgroup_parent=self.cgroup_parent)
        except SpecError as e:
            return {"ok": False, "error": "invalid", "message": str(e)}
        except LaunchError as e:
            return {"ok": False, "error": "unsupported" if e.unsupported else "launch-failed",
                    "message": str(e), "step": e.step}
        self.jails[jail_id] = jail
        return {"ok": True, "pid": jail.pid}

    def daemon_store(self, msg: dict, fds: list[int]) -> dict:
        if fds:
            raise wire.WireError("a daemon-store request carries no fds")
        action, req = wire.daemon_store_from_wire(msg)
        if self.layout is None:
            return {"ok": False, "error": daemon_store.FAILED,
                    "message": "daemon stores are not configured in this launcher"}
        try:
            changed = daemon_store.perform(self.layout, action, req)   # re-validates
        except daemon_store.DaemonStoreError as e:
            return {"ok": False, "error": e.kind, "message": str(e)}
        return {"ok": True, "changed": changed}

    def reap(self) -> None:
        by_pid = {j.pid: (jid, j) for jid, j in self.jails.items()}
        while True:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in by_pid:               # anything else was an orphan: just reaped
                jail_id, jail = by_pid[pid]
                status = jail.reaped(raw)
                del self.jails[jail_id]
                if jail.leftover is not None:
                    _log(f"jail {jail_id}: its cgroup is not empty yet; retrying")
                    self.leftover_cgroups.append(jail.leftover)
                self.send({"event": "exited", "jail": jail_id, "code": status.code,
                           "signal": status.signal, "oom": status.oom})
        self.retry_cgroups()

    def retry_cgroups(self) -> None:
        for cg in list(self.leftover_cgroups):
            try:
                gone = cg.destroy(timeout=0.05)
            except cgroups.CgroupError as e:
                _log(f"cannot remove {cg!r}: {e}")
                gone = True             # not retried forever
            if gone:
                self.leftover_cgroups.remove(cg)

    def send(self, msg: dict) -> None:
        try:
            self.sock.send(wire.encode(msg))
        except OSError:
            pass                            # the front is gone; serve() notices

    def shutdown(self) -> None:
        # The front is gone: no one will be told about these jails, so end them.
        for jail in self.jails.values():
            jail.signal_all(signal.SIGKILL)      # with a cgroup: kill-all
        for jail in self.jails.values():
            jail.wait()
            if jail.leftover is not None:
                self.leftover_cgroups.append(jail.leftover)
        self.retry_cgroups()


def _log(text: str) -> None:
    # fd 2 itself: sys.stderr may wrap an fd that _keep_only closed.
    try:
        os.write(2, f"privbroker-launcher: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def start(layout: daemon_store.Layout | None = None) -> tuple[int, socket.socket]:
    """Fork the launcher; return (its pid, the front's end of the socket).
    `layout`: where daemon stores are (None: daemon-store requests refused)."""
    cgroup_parent = _claim_cgroup()
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            front.close()
            _keep_only(back.fileno())
            launcher = _Launcher(back, layout)
            launcher.cgroup_parent = cgroup_parent
            launcher.serve()
        finally:
            os._exit(0)
    back.close()
    return pid, front


def _claim_cgroup() -> str | None:
    """On cgroup v2, in a delegated cgroup (systemd Delegate=yes): move the
    broker into a leaf of its cgroup (<own>/privbrokerd), so that <own> may
    enable controllers for the jail cgroups made beside that leaf; returns
    <own>.  On v1 or in v2's root cgroup: nothing to do (None)."""
    try:
        return cgroups.enter_leaf("privbrokerd")
    except cgroups.CgroupError as e:
        _log(f"{e}; jail cgroups go under the broker's own cgroup")
        return None


def _keep_only(fd: int) -> None:
    """stdin/stdout to /dev/null, stderr kept for the log, nothing else."""
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 20)


# ---------------------------------------------------------------------------
# The front's side
# ---------------------------------------------------------------------------

class LauncherFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class LauncherClient:
    """asyncio client of the launcher.  `on_exit(jail_id, code, signal, oom)` is
    called for every exit event; `on_lost()` if the launcher goes away."""

    def __init__(self, sock: socket.socket, on_exit, on_lost=None):
        self.sock = sock
        self.sock.setblocking(False)
        self.on_exit, self.on_lost = on_exit, on_lost
        self.seq = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock, self._readable)

    async def request(self, msg: dict, fds: list[int] = ()) -> dict:
        self.seq += 1
        seq = self.seq
        fut = self.loop.create_future()
        self.pending[seq] = fut
        data = wire.encode({**msg, "seq": seq})
        try:
            await self.loop.sock_sendall(self.sock, data) if not fds else \
                socket.send_fds(self.sock, [data], list(fds))
        except OSError as e:
            self.pending.pop(seq, None)
            raise LauncherFailed("lost", f"launcher unreachable: {e}") from None
        reply = await fut
        if not reply.get("ok"):
            raise LauncherFailed(reply.get("error", "failed"), reply.get("message", ""))
        return reply

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        msg = wire.decode(data)
        if msg.get("event") == "exited":
            self.on_exit(msg["jail"], msg["code"], msg["signal"], bool(msg.get("oom")))
        elif msg.get("seq") in self.pending:
            self.pending.pop(msg["seq"]).set_result(msg)

    def _lost(self) -> None:
        self.loop.remove_reader(self.sock)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(LauncherFailed("lost", "the launcher exited"))
        self.pending.clear()
        if self.on_lost:
            self.on_lost()
