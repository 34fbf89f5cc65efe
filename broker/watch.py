"""privbroker watch: alert when a process becomes root.

    privbroker watch [--allowlist FILE] [--exec CMD] [--count N] [--timeout S]

Subscribes to the kernel's process events (the proc connector: a netlink
socket of family NETLINK_CONNECTOR joined to multicast group CN_IDX_PROC) and
prints one JSON line per alert: a process whose real or effective uid is 0
after a uid change (setuid/setreuid/setresuid, or exec of a set-uid-root
program; PROC_EVENT_UID carries the new ruid and euid).  Event driven: /proc
is read only at alert time, for the allowlist match (exe path, comm), and a
process that has exited by then is reported with what the events told us.
The allowlist format is the audit's (`broker.audit.Allowlist`).

Who may subscribe (measured on this 6.18 kernel): kernels before 6.6 require
CAP_NET_ADMIN and refuse others (EPERM at bind, or an ack carrying EPERM);
since 6.6 any process may listen and receives every event, uid changes
included.  Either way the watcher must be in the init user and pid
namespaces: from anywhere else the kernel silently ignores the request, so
`Watcher.open` waits for the kernel's ack and fails with a clear error when
none comes.  Run it as root anyway: unprivileged, other users' /proc/PID/exe
is unreadable, so a path entry of the allowlist cannot excuse their processes
(they are reported; comm entries still match).

Struct layouts (linux/netlink.h, linux/connector.h, linux/cn_proc.h):

  nlmsghdr     u32 len, u16 type, u16 flags, u32 seq, u32 pid          16 bytes
  cn_msg       u32 idx, u32 val, u32 seq, u32 ack, u16 len, u16 flags  20 bytes
  proc_event   u32 what, u32 cpu, u64 timestamp_ns, union event_data
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .audit import Allowlist, as_allowlist

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
SO_RCVBUFFORCE = 33

PROC_EVENT_NONE = 0x00000000
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HDR = struct.Struct("=IIQ")
_U32 = struct.Struct("=I")

# what -> (name, layout of event_data, field names)
_LAYOUTS: dict[int, tuple[str, struct.Struct, tuple[str, ...]]] = {
    PROC_EVENT_NONE: ("ack", struct.Struct("=I"), ("err",)),
    PROC_EVENT_FORK: ("fork", struct.Struct("=iiii"),
                      ("parent_pid", "parent_tgid", "child_pid", "child_tgid")),
    PROC_EVENT_EXEC: ("exec", struct.Struct("=ii"), ("pid", "tgid")),
    PROC_EVENT_UID: ("uid", struct.Struct("=iiII"), ("pid", "tgid", "ruid", "euid")),
    PROC_EVENT_GID: ("gid", struct.Struct("=iiII"), ("pid", "tgid", "rgid", "egid")),
    PROC_EVENT_SID: ("sid", struct.Struct("=ii"), ("pid", "tgid")),
    PROC_EVENT_PTRACE: ("ptrace", struct.Struct("=iiii"),
                        ("pid", "tgid", "tracer_pid", "tracer_tgid")),
    PROC_EVENT_COMM: ("comm", struct.Struct("=ii16s"), ("pid", "tgid", "comm")),
    PROC_EVENT_COREDUMP: ("coredump", struct.Struct("=iiii"),
                          ("pid", "tgid", "parent_pid", "parent_tgid")),
    # Since 3.x the exit event also carries the parent; older kernels stop after exit_signal.
    PROC_EVENT_EXIT: ("exit", struct.Struct("=iiIIii"),
                      ("pid", "tgid", "exit_code", "exit_signal", "parent_pid", "parent_tgid")),
    PROC_EVENT_NONZERO_EXIT: ("exit", struct.Struct("=iiIIii"),
                              ("pid", "tgid", "exit_code", "exit_signal", "parent_pid",
                               "parent_tgid")),
}


class WatchError(OSError):
    """Subscribing to process events failed; the message says what to do."""


@dataclass(frozen=True)
class ProcEvent:
    kind: str                 # fork, exec, uid, gid, sid, ptrace, comm, coredump, exit, ack, overrun
    what: int
    cpu: int
    timestamp_ns: int
    data: dict = field(default_factory=dict, hash=False)

    @property
    def tgid(self) -> int | None:
        return self.data.get("tgid", self.data.get("child_tgid"))


# ---------------------------------------------------------------------------
# Message building and parsing (no I/O)
# ---------------------------------------------------------------------------

def control_message(op: int, nonce: int = 0, port: int = 0) -> bytes:
    """nlmsghdr + cn_msg + u32 op: PROC_CN_MCAST_LISTEN or _IGNORE.  The
    kernel's ack carries cn_msg.ack + 1 (its seq is the kernel's own
    per-cpu counter), so a nonce in `ack` identifies the answer."""
    payload = _U32.pack(op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, nonce, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, port) + cn


def parse_datagram(buf: bytes) -> Iterator[ProcEvent]:
    """Every proc_event in one netlink datagram; anything else is skipped."""
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > len(buf):
            return
        body = buf[off + _NLMSGHDR.size: off + length]
        off += (length + 3) & ~3                      # NLMSG_ALIGN
        if mtype == NLMSG_OVERRUN:
            yield ProcEvent("overrun", 0, 0, 0)
            continue
        if mtype != NLMSG_DONE or len(body) < _CN_MSG.size:
            continue
        idx, val, cn_seq, cn_ack, dlen, _f = _CN_MSG.unpack_from(body)
        if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
            continue
        ev = body[_CN_MSG.size:_CN_MSG.size + dlen]
        if len(ev) < _EVENT_HDR.size:
            continue
        what, cpu, ts = _EVENT_HDR.unpack_from(ev)
        layout = _LAYOUTS.get(what)
        if layout is None:
            yield ProcEvent(f"0x{what:x}", what, cpu, ts)
            continue
        name, st, names = layout
        data_bytes = ev[_EVENT_HDR.size:]
        if len(data_bytes) < st.size and name == "exit":       # pre-parent layout
            st, names = struct.Struct("=iiII"), names[:4]
        if len(data_bytes) < st.size:
            continue
        values = dict(zip(names, st.unpack_from(data_bytes)))
        if name == "ack":                 # which request it answers: its ack is ours + 1
            values.update(seq=cn_seq, ack=cn_ack)
        if "comm" in values:
            values["comm"] = values["comm"].split(b"\0", 1)[0].decode("utf-8", "replace")
        yield ProcEvent(name, what, cpu, ts, values)


# ---------------------------------------------------------------------------
# The watcher (the only part that does I/O)
# ---------------------------------------------------------------------------

def _read_proc(pid: int) -> tuple[str | None, str | None]:
    """(exe, comm) of a process now; None for what is gone or unreadable."""
    exe = comm = None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().rstrip("\n")
    except OSError:
        pass
    return exe, comm


def _setuid_root(path: str | None) -> bool:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return False
    return st is not None and st.st_uid == 0 and bool(st.st_mode & 0o4000)


class Watcher:
    """Process events from the kernel, and root alerts filtered by an allowlist.

        with Watcher(["/usr/bin/sudo"]) as w:     # subscribes
            for alert in w.alerts(timeout=10): ...
    """

    # The same change reported by every thread of a process (glibc applies
    # setresuid to all threads) is one alert.
    DEDUP_NS = 1_000_000_000

    def __init__(self, allowlist: "Allowlist | Iterable[str]" = (), *,
                 rcvbuf: int = 8 << 20):
        self.allowlist = as_allowlist(allowlist)
        self.rcvbuf = rcvbuf
        self.lost = 0                              # ENOBUFS: events the kernel dropped
        self._sock: socket.socket | None = None
        self._comms: dict[int, str] = {}           # tgid -> comm from PROC_EVENT_COMM
        self._last: dict[int, tuple[int, int, int]] = {}   # tgid -> (ruid, euid, ts)
        self._pending: deque[ProcEvent] = deque()  # read, not yet handed out (kernel order)

    # -- subscription -----------------------------------------------------
    def open(self, ack_timeout: float = 2.0) -> "Watcher":
        if self._sock is not None:
            return self
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_CONNECTOR)
        except OSError as e:
            raise WatchError(e.errno, f"cannot open a NETLINK_CONNECTOR socket: {e.strerror} "
                             "(kernel without CONFIG_CONNECTOR/CONFIG_PROC_EVENTS?)") from None
        try:
            try:
                sock.bind((0, CN_IDX_PROC))
            except PermissionError:
                raise WatchError(errno.EPERM, "subscribing to process events needs root "
                                 "(CAP_NET_ADMIN in the init user namespace); "
                                 "run privbroker watch as root") from None
            for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):     # FORCE: beyond rmem_max, as root
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, self.rcvbuf)
                    break
                except OSError:
                    continue
            port = sock.getsockname()[0]
            nonce = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
            sock.send(control_message(PROC_CN_MCAST_LISTEN, nonce, port))
            self._sock = sock
            self._await_ack(nonce + 1, ack_timeout)
        except BaseException:
            self._sock = None
            sock.close()
            raise
        return self

    def _await_ack(self, expect: int, timeout: float) -> None:
        """The kernel answers LISTEN with an ack event (multicast, so others'
        acks come too: match ours by its ack field).  It silently ignores a
        request from outside the init user or pid namespace, so no ack
        within `timeout` is an error, not a wait."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline - time.monotonic()):
            for ev in list(self._pending):
                if ev.kind == "ack" and ev.data.get("ack") == expect:
                    self._pending.remove(ev)
                    if ev.data["err"]:
                        err = ev.data["err"]
                        raise WatchError(err, "the kernel refused the process-events "
                                         f"subscription: {os.strerror(err)} (needs "
                                         "CAP_NET_ADMIN on this kernel: run as root)")
                    return
        raise WatchError(errno.ETIMEDOUT, "the kernel did not acknowledge the process-events "
                         "subscription: privbroker watch must run in the init user and pid "
                         "namespaces")

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(control_message(PROC_CN_MCAST_IGNORE))
        except OSError:
            pass
        self._sock.close()
        self._sock = None

    def __enter__(self) -> "Watcher":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self.open()._sock.fileno()

    # -- events -----------------------------------------------------------
    def events(self, timeout: float | None = None) -> Iterator[ProcEvent]:
        """Every process event, in the kernel's order, until `timeout`
        seconds pass (None: forever).  A kernel-side overflow (events lost)
        yields kind "overrun"."""
        self.open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending:
                ev = self._pending.popleft()
                if ev.kind == "ack":
                    continue              # another listener's (acks are multicast)
                self._remember(ev)
                yield ev
            if not self._fill(None if deadline is None else deadline - time.monotonic()):
                return

    def _fill(self, wait: float | None) -> bool:
        """Read one datagram into the pending queue, waiting up to `wait`
        seconds (None: forever, 0: not at all).  False when nothing came."""
        if wait is not None and wait < 0:
            return False
        while True:
            ready, _, _ = select.select([self._sock], [], [], wait)
            if not ready:
                return False
            try:
                buf = self._sock.recv(65536)
            except OSError as e:
                if e.errno == errno.ENOBUFS:       # the receive queue overflowed
                    self.lost += 1
                    self._pending.append(ProcEvent("overrun", 0, 0, 0))
                    return True
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                raise
            self._pending.extend(parse_datagram(buf))
            return True

    def _later_events_for(self, tgid: int, limit: int = 256) -> set[str]:
        """Kinds of the already-queued events that touch `tgid` after the
        one being handled: reads whatever the kernel has queued, without
        waiting (at most `limit` datagrams)."""
        for _ in range(limit):
            if not self._fill(0):
                break
        kinds = set()
        for ev in self._pending:
            if ev.data.get("tgid") != tgid:
                if ev.kind == "fork" and ev.data.get("child_tgid") == tgid:
                    kinds.add("fork")        # the pid was reused
            elif ev.kind == "exec" or (ev.kind == "exit" and ev.data["pid"] == tgid):
                kinds.add(ev.kind)
        return kinds

    def _remember(self, ev: ProcEvent) -> None:
        if ev.kind == "comm":
            self._comms[ev.data["tgid"]] = ev.data["comm"]
        elif ev.kind == "exec":
            self._comms.pop(ev.data["tgid"], None)    # exec renames the process
        elif ev.kind == "exit" and ev.data.get("pid") == ev.data.get("tgid"):
            self._comms.pop(ev.data["tgid"], None)
            self._last.pop(ev.data["tgid"], None)

    # -- alerts -----------------------------------------------------------
    def alert_for(self, ev: ProcEvent) -> dict | None:
        """The alert for one event, or None (not a root change, allowlisted,
        or a repeat from another thread of the same process)."""
        if ev.kind == "overrun":
            return {"event": "overrun", "lost": self.lost,
                    "note": "the kernel dropped process events; some changes may be missed"}
        if ev.kind != "uid":
            return None
        d = ev.data
        ruid, euid, tgid = d["ruid"], d["euid"], d["tgid"]
        if ruid != 0 and euid != 0:
            self._last.pop(tgid, None)
            return None
        prev = self._last.get(tgid)
        self._last[tgid] = (ruid, euid, ev.timestamp_ns)
        if prev and prev[:2] == (ruid, euid) and ev.timestamp_ns - prev[2] < self.DEDUP_NS:
            return None
        later = self._later_events_for(tgid)
        exe, comm = _read_proc(tgid)
        exited = exe is None and comm is None
        if comm is None:
            comm = self._comms.get(tgid)
        # /proc is read now, not at the uid change.  If the pid has been
        # reused (a fork event for it is queued), or the process has exec'd
        # since, what we read may be another program: an allowlisted name
        # must not excuse it.  One exec is fine: exec of a set-uid-root
        # program changes the uid *inside* the exec (its UID event precedes
        # its EXEC event), so the set-uid program now in /proc is the one
        # that caused the change.  An exit alone changes nothing: a zombie
        # keeps its pid, and a gone process reads as None.
        trusted = "fork" not in later and ("exec" not in later or _setuid_root(exe))
        if trusted and self.allowlist.match(exe, comm) is not None:
            return None
        alert = {"event": "uid", "pid": tgid, "tid": d["pid"], "ruid": ruid, "euid": euid,
                 "exe": exe, "comm": comm, "exited": exited,
                 "timestamp_ns": ev.timestamp_ns, "time": time.time()}
        if later:
            alert["changed_since"] = sorted(later)   # exe/comm may postdate the uid change
        return alert

    def alerts(self, timeout: float | None = None) -> Iterator[dict]:
        for ev in self.events(timeout):
            alert = self.alert_for(ev)
            if alert is not None:
                yield alert

    def run(self, on_alert: Callable[[dict], object], stop_after: int | None = None,
            timeout: float | None = None) -> int:
        """Call on_alert for each alert; stop after `stop_after` alerts or
        `timeout` seconds.  Returns the number of alerts."""
        n = 0
        if stop_after is not None and stop_after <= 0:
            return 0
        for alert in self.alerts(timeout):
            on_alert(alert)
            n += 1
            if stop_after is not None and n >= stop_after:
                break
        return n


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

class _Runner:
    """--exec: one child per alert, JSON on its stdin, never through a shell.
    Not waited for (the event queue must keep draining); reaped as we go."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.children: list[subprocess.Popen] = []

    def __call__(self, line: str) -> None:
        self.reap()
        try:
            p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 close_fds=True)
        except OSError as e:
            print(f"privbroker watch: --exec {self.argv[0]}: {e.strerror}", file=sys.stderr)
            return
        try:
            p.stdin.write(line.encode() + b"\n")     # one small line: never fills the pipe
            p.stdin.close()
        except OSError:
            pass
        self.children.append(p)

    def reap(self) -> None:
        self.children = [p for p in self.children if p.poll() is None]

    def wait(self, timeout: float = 10) -> None:
        for p in self.children:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.reap()


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")


def main_watch(argv: list[str]) -> int:
    """0: stopped (count/timeout/interrupt); 1: could not subscribe; 2: usage."""
    ap = _ArgParser(prog="privbroker watch",
                    description="report processes that become root, as JSON lines")
    ap.add_argument("--allowlist", action="append", default=[], metavar="FILE")
    ap.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                    help="run CMD per alert with the JSON on stdin (split like a shell "
                         "would, but never run by one)")
    ap.add_argument("--count", type=int, default=None, help="stop after N alerts")
    ap.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    try:
        args = ap.parse_args(argv)
        lines: list[str] = []
        for path in args.allowlist:
            with open(path, encoding="utf-8") as f:
                lines.extend(f)
        runner = _Runner(shlex.split(args.exec_cmd)) if args.exec_cmd else None
        if runner is not None and not runner.argv:
            raise ValueError("--exec: empty command")
    except SystemExit as e:
        return int(e.code or 0)
    except (ValueError, OSError) as e:
        print(f"privbroker watch: {e}", file=sys.stderr)
        return 2

    def on_alert(alert: dict) -> None:
        line = json.dumps(alert, sort_keys=True)
        print(line, flush=True)
        if runner is not None:
            runner(line)

    if os.geteuid() != 0:
        print("privbroker watch: not root: executables of other users' processes are "
              "unreadable, path allowlist entries cannot match them", file=sys.stderr)
    try:
        with Watcher(Allowlist.parse(lines)) as w:
            w.run(on_alert, stop_after=args.count, timeout=args.timeout)
    except WatchError as e:
        print(f"privbroker watch: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if runner is not None:
            runner.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main_watch(sys.argv[1:]))
