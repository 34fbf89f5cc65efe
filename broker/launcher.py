"""The launcher: a zygote that forks jails for the broker's front.

`start()` forks it before the front connects to the bus.  It is
single-threaded, holds no bus connection and no policy, keeps no fd but its
control socket (and stderr for its log), and does only what a well-formed
request (broker/wire.py) asks: launch this spec with these fds, signal this
jail, mount or unmount this daemon store.  It reports every jail's exit as an
event.  The daemon-store Layout (where templates, run dirs and homes are) is
given at start-up, before any bus connection exists; a request names only a
daemon and a user hash, and is re-validated here against that Layout.

A launch is checked twice over before anything is forked: the spec must be
valid (jail/spec.py validate) and inside the launch envelope
(broker/envelope.py): what the policy file and the named profile could ever
produce, read by the launcher itself.  A compromised front gets no further.

privbrokerd runs the launcher in its own main process (`run`), as the parent
of the front; `start()` forks one as a child instead (tests, benchmarks).
Either way it ends when the front's end of the socket closes, killing the
jails no one will hear about, and the front ends when the launcher's does.

The front talks to it with `LauncherClient` (asyncio): requests are matched
to replies by sequence number, so launches never block the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import os
import select
import selectors
import signal
import socket
import time

from . import daemon_store, wire
from .envelope import Envelope, OutsideEnvelope
from .jail import cgroups, warm
from .jail.launch import Jail, LaunchError, Seed, launch, launch_seeded, make_seed, seed_shape
from .jail.spec import JailSpec, SpecError, validate

_RECV = wire.MAX_MESSAGE + 1
SEED_IDLE_S = 0.0002       # idle this long (no event) before a seed is made
SEED_AFTER_S = 0.05        # ... and no jail launched less than this ago still runs
JAIL_CGROUP_PREFIX = "privbroker-"          # + the jail id
SEED_CGROUP_PREFIX = "privbroker-seed-"
WARM_RELEARN_EVERY = 64    # seeded launches before the pages a launch writes are learnt again
WARM_MIN_PAGES = 32        # fewer: the jail's init ended before it was read; learn next time
# Seeded launches read per learning, the largest plan kept: a read can come
# before the init has written all it will (seen: a plan of ~100 pages where
# the launch wrote ~770, kept for the next 64 launches, which then copied
# little ahead).
WARM_SAMPLES = 3


# ---------------------------------------------------------------------------
# The launcher process
# ---------------------------------------------------------------------------

class _Launcher:
    def __init__(self, sock: socket.socket, envelope: Envelope,
                 layout: daemon_store.Layout | None = None, front_pid: int | None = None):
        self.sock = sock
        self.envelope = envelope
        self.layout = layout
        self.front_pid = front_pid      # privbrokerd: the front is our child
        self.front_status: int | None = None     # its wait status, once reaped
        self.jails: dict[str, Jail] = {}
        self.cgroup_parent: str | None = None     # where jail cgroups go (None: our own)
        self.leftover_cgroups: list[cgroups.Cgroup] = []   # retried on every reap
        self.sel = None                 # serve()'s selector
        self.watched: dict[str, int] = {}   # jail id -> its status pipe, in the selector
        # A seed (jail/launch.py) made while idle for the shape of the last
        # launch: the next launch of that shape skips the fork, the net
        # namespace and (cgroup v1) the cgroup's making and the move into it.
        self.seed: Seed | None = None
        self.seed_spec: JailSpec | None = None      # the last launch's spec
        self.started: dict[str, float] = {}         # live jail id -> when it was launched
        self.swept: set[str | None] = set()  # cgroup parents cleared of a killed launcher's
        # The pages a seeded launch writes (jail/warm.py), which seeds copy
        # ahead; learnt from a seeded jail's init right after its launch.
        self.warm_runs: tuple = ()
        self.seeded_since_learning = 0
        self.samples_due = WARM_SAMPLES    # seeded launches still to read this learning
        self.warm_refused = False       # said once: a Watch could not be opened
        self.learn_from: tuple[Jail, warm.Watch] | None = None   # a seeded jail, until read

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        if self.front_pid is not None:
            # systemctl stop sends SIGTERM to us (the main process): the
            # front ends leases in order and closes its socket, and then we
            # end the jails (shutdown).  Python's handler only wakes the loop.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        sel = self.sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "request")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        while True:
            idle = self._seed_wait()
            events = sel.select(idle)
            for key, _ in events:
                if key.data == "signal":
                    self.on_signals(_drain(wake_r))
                elif isinstance(key.data, tuple):     # ("status", jail id)
                    self.on_status(key.data[1])
                elif not self.handle_one():
                    self.shutdown()
                    return
            if not events and idle is not None:
                self._make_seed()

    def _seed_wait(self) -> float | None:
        """How long the loop must have been idle before a seed is made (None:
        no seed is wanted).  Not while a jail launched less than
        SEED_AFTER_S ago runs: a short jail's exit would wait for the seed's
        making (~1 ms of ours); long-lived ones do not hold it up."""
        if self.seed is not None or self.seed_spec is None:
            return None
        now = time.monotonic()
        youngest = max(self.started.values(), default=None)
        wait = SEED_IDLE_S
        if youngest is not None:
            wait = max(wait, youngest + SEED_AFTER_S - now)
        return wait

    def _make_seed(self) -> None:
        self._sweep_once(self.seed_spec.cgroup_parent or self.cgroup_parent)
        try:
            self.seed = make_seed(self.seed_spec, f"{SEED_CGROUP_PREFIX}{os.urandom(4).hex()}",
                                  self.cgroup_parent, self.warm_runs)
        except Exception as e:          # a seed is an optimization: never fatal
            _log(f"no seed for the next launch: {type(e).__name__}: {e}")
            self.seed_spec = None           # not again until the next launch

    def _sweep_once(self, parent: str | None) -> None:
        """Before our first cgroup under `parent`: remove what a launcher
        killed there left (SIGKILL: its jails and seed died with it, their
        cgroups stayed).  Only before our first, so nothing of ours is
        there to be mistaken for it."""
        if parent in self.swept:
            return
        self.swept.add(parent)
        for d in remove_stale_cgroups(parent):
            _log(f"removed {d}, a cgroup a killed launcher left behind")

    def _take_seed(self, spec: JailSpec) -> Seed | None:
        """The ready seed if this spec can use it; one that cannot (another
        shape) or that died is discarded."""
        seed, self.seed = self.seed, None
        if seed is None:
            return None
        if seed.shape == seed_shape(spec, self.cgroup_parent) and seed.alive():
            return seed
        seed.discard()
        return None

    def on_status(self, jail_id: str) -> None:
        """A jail's status pipe is readable: its init reported the program's
        end.  When init also said nothing else of the jail runs, Exited goes
        out now, not after init's own exit (a ~25 MB address space torn
        down) and its reap; the reap then only cleans up."""
        if jail_id not in self.watched:
            return                      # unwatched earlier in this same batch
        self._unwatch(jail_id)
        jail = self.jails[jail_id]
        status = jail.ended()
        if status is not None:
            self.send({"event": "exited", "jail": jail_id, "code": status.code,
                       "signal": status.signal, "oom": status.oom})

    def _watch(self, jail_id: str, jail: Jail) -> None:
        if self.sel is not None and jail.status_fd >= 0:
            # a tuple: no jail id (the front's to choose) can pass for "request"
            self.sel.register(jail.status_fd, selectors.EVENT_READ, ("status", jail_id))
            self.watched[jail_id] = jail.status_fd

    def _unwatch(self, jail_id: str) -> None:
        fd = self.watched.pop(jail_id, None)
        if fd is not None:
            self.sel.unregister(fd)

    def on_signals(self, signums: bytes) -> None:
        if self.front_pid is not None and self.front_status is None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signum in signums:
                    os.kill(self.front_pid, signal.SIGTERM)
        self.reap()

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
        self._learn_warm()
        return True

    def _watch_pages(self, seed: Seed) -> "warm.Watch | None":
        """While a learning is on (the first WARM_SAMPLES seeded launches, and
        again every WARM_RELEARN_EVERY), a Watch on the seed, opened before
        its order (warm.Watch says why)."""
        if self.seeded_since_learning >= WARM_RELEARN_EVERY:
            self.samples_due, self.seeded_since_learning = WARM_SAMPLES, 0
        if not self.samples_due:
            return None
        try:
            return warm.Watch(seed.pid)
        except OSError as e:
            if not self.warm_refused:
                self.warm_refused = True
                _log(f"cannot read a seed's pages, seeds copy nothing ahead: {e}")
            return None

    def _learn_warm(self) -> None:
        """Read, after the reply, which pages the seeded launch just made
        wrote, from its init.  An init that ended before or while it was
        read gives no plan (a part of one would serve until the next
        learning): the next seeded launch is read instead."""
        learn, self.learn_from = self.learn_from, None
        if learn is None:
            return
        jail, watch = learn
        try:
            runs = watch.written_pages()
        finally:
            watch.close()
        if warm.pages(runs) < WARM_MIN_PAGES or _has_ended(jail.pidfd):
            return
        # The first read of a learning replaces the old plan (its memory may
        # have moved since); the others only where they found more.
        if self.samples_due == WARM_SAMPLES or warm.pages(runs) > warm.pages(self.warm_runs):
            self.warm_runs = runs
        self.samples_due -= 1

    def dispatch(self, msg: dict, fds: list[int]) -> dict:
        op, jail_id = msg.get("op"), msg.get("jail")
        if op == "daemon-store":
            return self.daemon_store(msg, fds)
        if op == "pidfd":
            return self.pidfd(msg, fds)
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
        try:
            profile, spec, targets = accept_launch(msg, len(fds), self.envelope)
        except SpecError as e:
            return {"ok": False, "error": "invalid", "message": str(e)}
        except OutsideEnvelope as e:
            _log(f"refused a launch of profile {msg.get('profile')!r}: {e}")
            return {"ok": False, "error": "refused",
                    "message": f"the launcher refused the spec: {e}"}
        self._sweep_once(spec.cgroup_parent or self.cgroup_parent)
        seed = self._take_seed(spec)
        fd_map = dict(zip(targets, fds))
        try:
            if seed is not None:
                watch = self._watch_pages(seed)
                try:
                    jail = launch_seeded(seed, spec, fd_map,
                                         cgroup_name=f"{JAIL_CGROUP_PREFIX}{jail_id}",
                                         cgroup_parent=self.cgroup_parent)
                except BaseException:
                    if watch is not None:
                        watch.close()
                    raise
                self.seeded_since_learning += 1
                if watch is not None:
                    self.learn_from = (jail, watch)
            else:
                jail = launch(spec, fds=fd_map, cgroup_name=f"{JAIL_CGROUP_PREFIX}{jail_id}",
                              cgroup_parent=self.cgroup_parent)
        except SpecError as e:
            return {"ok": False, "error": "invalid", "message": str(e)}
        except LaunchError as e:
            return {"ok": False, "error": "unsupported" if e.unsupported else "launch-failed",
                    "message": str(e), "step": e.step}
        self.jails[jail_id] = jail
        self.started[jail_id] = time.monotonic()
        self.seed_spec = spec if seed_shape(spec, self.cgroup_parent) is not None else None
        self._watch(jail_id, jail)
        return {"ok": True, "pid": jail.pid}

    def pidfd(self, msg: dict, fds: list[int]) -> dict:
        """A pidfd for a caller's pid: the front lives in a pid namespace of
        its own and cannot open one itself.  It gives its holder what any
        process of the front's uid could do to that pid anyway (wait for its
        exit; signal or ptrace only where the uid alone allows it), and the
        front checks with the bus that the pid is still its caller's."""
        pid = msg.get("pid")
        if fds or set(msg) != {"v", "seq", "op", "pid"} or type(pid) is not int or pid <= 0:
            raise wire.WireError("a pidfd request is exactly {op, pid} with a positive pid")
        try:
            fd = os.pidfd_open(pid)
        except OSError as e:
            return {"ok": False, "error": "not-found", "message": f"pid {pid}: {e.strerror}"}
        try:
            uid = pidfd_uid(pid, fd)
        except OSError as e:
            os.close(fd)
            return {"ok": False, "error": "not-found", "message": f"pid {pid}: {e.strerror}"}
        return {"ok": True, "uid": uid, "_fds": [fd]}

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
                break
            if pid == 0:
                break
            if pid == self.front_pid:
                self.front_status = raw     # its socket end is closed: serve() ends
            elif self.seed is not None and pid == self.seed.pid:
                _log(f"the seed for the next launch died ({raw:#x}); not made again "
                     f"until the next launch")
                self.seed.pid = -1          # reaped here
                self.seed.discard()
                self.seed = self.seed_spec = None
            elif pid in by_pid:               # anything else was an orphan: just reaped
                jail_id, jail = by_pid[pid]
                self._unwatch(jail_id)        # before reaped() closes the pipe
                self.started.pop(jail_id, None)
                # Exited goes out before the jail's (empty) cgroup is removed:
                # the removal is below, in retry_cgroups.
                status = jail.reaped(raw, defer_removal=True)
                del self.jails[jail_id]
                if jail.leftover is not None:
                    _log(f"jail {jail_id}: its cgroup is not empty yet; retrying")
                    self.leftover_cgroups.append(jail.leftover)
                if jail.early is None:        # else on_status sent it already
                    self.send({"event": "exited", "jail": jail_id, "code": status.code,
                               "signal": status.signal, "oom": status.oom})
                if jail.empty_cgroup is not None:
                    self.leftover_cgroups.append(jail.empty_cgroup)
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
        fds = msg.pop("_fds", [])
        try:
            if fds:
                socket.send_fds(self.sock, [wire.encode(msg)], fds)
            else:
                self.sock.send(wire.encode(msg))
        except OSError:
            pass                            # the front is gone; serve() notices
        finally:
            for fd in fds:
                os.close(fd)

    def shutdown(self) -> None:
        if self.seed is not None:
            self.seed.discard()
            self.seed = None
        for jail_id in list(self.watched):
            self._unwatch(jail_id)
        # The front is gone: no one will be told about these jails, so end them.
        for jail in self.jails.values():
            jail.signal_all(signal.SIGKILL)      # with a cgroup: kill-all
        for jail in self.jails.values():
            jail.wait()
            if jail.leftover is not None:
                self.leftover_cgroups.append(jail.leftover)
        self.retry_cgroups()


def _is_ours(name: str) -> bool:
    """A cgroup name a launcher gives: a seed's, or a jail's (its id)."""
    return name.startswith(SEED_CGROUP_PREFIX) or (
        name.startswith(JAIL_CGROUP_PREFIX)
        and wire.JAIL_ID.fullmatch(name[len(JAIL_CGROUP_PREFIX):]) is not None)


def remove_stale_cgroups(parent: str | None) -> list[str]:
    """The jail and seed cgroups under `parent` (None: our own cgroup) that
    are empty: left by a launcher that was killed (SIGKILL: nothing removed
    them; its jails and its seed die with it).  rmdir refuses a cgroup with
    a process in it, so a live jail or seed of another launcher is safe.
    What is not: a cgroup another launcher under the same parent has made
    and not yet moved its jail into (that launch then fails at its
    'cgroup' step, a seed's is only skipped); privbrokerd is one per
    machine, and a launcher sweeps a parent once, before its first jail."""
    removed = []
    system = cgroups.System.current()
    for h in system.hierarchies:
        top = h.dir_of(parent if parent is not None else h.own)
        if top is None:
            continue
        try:
            names = [n for n in os.listdir(top) if _is_ours(n)]
        except OSError:
            continue
        for name in names:
            try:
                os.rmdir(os.path.join(top, name))
                removed.append(os.path.join(top, name))
            except OSError:
                pass                    # not empty (a live seed), or gone already
    return removed


def accept_launch(msg: dict, nfds: int, envelope: Envelope) -> tuple[str, "JailSpec", list[int]]:
    """Everything the launcher checks before it forks a jail, in order: the
    message's shape (WireError), the spec's own consistency (SpecError), and
    the envelope (OutsideEnvelope).  Pure: tests/test_fuzz.py feeds it
    mutated messages."""
    targets = msg.get("fd_targets")
    if (not isinstance(targets, list) or len(targets) != nfds
            or not all(type(t) is int and 0 <= t < 1024 for t in targets)
            or len(set(targets)) != len(targets)):
        raise wire.WireError("fd_targets must list one distinct fd number per fd passed")
    profile = msg.get("profile")
    if not isinstance(profile, str):
        raise wire.WireError("a launch names its profile")
    spec = wire.spec_from_wire(msg.get("spec"))
    validate(spec)                  # re-validated here, whoever sent it
    envelope.check(profile, spec)
    return profile, spec, targets


def _drain(fd: int) -> bytes:
    """Everything in the wakeup pipe: the numbers of the signals received."""
    got = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def _has_ended(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited."""
    return bool(select.select([pidfd], [], [], 0)[0])


def _log(text: str) -> None:
    # fd 2 itself: sys.stderr may wrap an fd that _keep_only closed.
    try:
        os.write(2, f"privbroker-launcher: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def _which_fd_is_bad(sock: socket.socket, fds: list[int]) -> str:
    """For an EBADF from a send: the socket's own fd, or one passed with the
    request (closed by someone before its turn): said in the error."""
    bad = []
    for fd in (sock.fileno(), *fds):
        try:
            os.fstat(fd)
        except OSError:
            bad.append(fd)
    if not bad:
        return ""
    return (" (not open: " + ", ".join("the socket's fd" if fd == sock.fileno() else f"fd {fd}"
                                       for fd in bad) + ")")


def pidfd_uid(pid: int, pidfd: int) -> int:
    """The real uid of the process `pidfd` refers to (opened for `pid`).
    /proc/<pid> is read first and the process checked alive after: while it
    lives its pid cannot name another process, so what was read was its.
    OSError (ESRCH) when it is gone."""
    with open(f"/proc/{pid}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    signal.pidfd_send_signal(pidfd, 0)
    return uid


def start(envelope: Envelope,
          layout: daemon_store.Layout | None = None) -> tuple[int, socket.socket]:
    """Fork a launcher as a child; return (its pid, the front's end of the
    socket).  `layout`: where daemon stores are (None: daemon-store requests
    refused).  privbrokerd uses `run` instead."""
    cgroup_parent = claim_cgroup()
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            front.close()
            _keep_only(back.fileno())
            launcher = _Launcher(back, envelope, layout)
            launcher.cgroup_parent = cgroup_parent
            launcher.serve()
        finally:
            os._exit(0)
    back.close()
    return pid, front


def run(sock: socket.socket, envelope: Envelope, layout: daemon_store.Layout | None,
        front_pid: int, cgroup_parent: str | None) -> int:
    """Serve as the launcher in this process, whose child `front_pid` holds
    the other end of `sock`, until the front is gone.  The exit status: 0
    after an orderly stop of the front, 1 otherwise (systemd restarts us)."""
    _keep_only(sock.fileno())
    launcher = _Launcher(sock, envelope, layout, front_pid)
    launcher.cgroup_parent = cgroup_parent
    launcher.serve()
    if launcher.front_status is None:
        _, launcher.front_status = os.waitpid(front_pid, 0)
    code = os.waitstatus_to_exitcode(launcher.front_status)
    if code != 0:
        _log(f"the front exited with status {code}")
    return 0 if code == 0 else 1


def claim_cgroup() -> str | None:
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
    called for every exit event; `on_lost()` if the launcher goes away.  A
    reply that carries fds has them as a list under "fds"."""

    def __init__(self, sock: socket.socket, on_exit, on_lost=None):
        self.sock = sock
        self.sock.setblocking(False)
        self.on_exit, self.on_lost = on_exit, on_lost
        self.seq = 0
        self.pending: dict[int, asyncio.Future] = {}
        # Requests not yet sent, in order: (seq, data, fds).  One writer
        # sends them: the launcher's socket queues only so many messages
        # (SEQPACKET: net.unix.max_dgram_qlen), and a send that would block
        # must wait its turn.  (asyncio's sock_sendall cannot be shared: a
        # second waiting sender replaces the first one's wakeup, whose
        # request then never went out; send_fds just failed with EAGAIN.)
        self.outbox: collections.deque = collections.deque()
        self._writer_waiting = False
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock, self._readable)

    async def request(self, msg: dict, fds: list[int] = ()) -> dict:
        """Send one request and wait for its reply.  The fds must stay open
        until the reply has come (the request may wait in the outbox)."""
        self.seq += 1
        seq = self.seq
        data = wire.encode({**msg, "seq": seq})     # WireError: too large, nothing sent
        fut = self.loop.create_future()
        self.pending[seq] = fut
        self.outbox.append((seq, data, list(fds)))
        if len(self.outbox) == 1:
            self._send_queued()
        reply = await fut
        if not reply.get("ok"):
            raise LauncherFailed(reply.get("error", "failed"), reply.get("message", ""))
        return reply

    async def pidfd(self, pid: int) -> tuple[int, int]:
        """A pidfd for `pid` in the launcher's (the host's) pid namespace,
        and the real uid of the process it refers to."""
        reply = await self.request({"op": "pidfd", "pid": pid})
        fds = reply.get("fds", [])
        if len(fds) != 1 or type(reply.get("uid")) is not int:
            for fd in fds:
                os.close(fd)
            raise LauncherFailed("failed", "the launcher sent no pidfd")
        return fds[0], reply["uid"]

    def _send_queued(self) -> None:
        """Send what the socket takes now, in order; wait for it to be
        writable for the rest."""
        while self.outbox:
            seq, data, fds = self.outbox[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
            except BlockingIOError:
                if not self._writer_waiting:
                    self.loop.add_writer(self.sock, self._send_queued)
                    self._writer_waiting = True
                return
            except OSError as e:
                self.outbox.popleft()
                fut = self.pending.pop(seq, None)
                if fut is not None and not fut.done():
                    fut.set_exception(LauncherFailed("lost", f"launcher unreachable: {e}"
                                                             f"{_which_fd_is_bad(self.sock, fds)}"))
                continue
            self.outbox.popleft()
        if self._writer_waiting:
            self.loop.remove_writer(self.sock)
            self._writer_waiting = False

    def _readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _RECV, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self._lost()
            return
        msg = wire.decode(data)
        fut = self.pending.pop(msg.get("seq"), None) if "seq" in msg else None
        if fut is not None and not fut.cancelled():
            fut.set_result({**msg, "fds": fds} if fds else msg)
            return
        for fd in fds:
            os.close(fd)                    # nobody is waiting for it
        if msg.get("event") == "exited":
            self.on_exit(msg["jail"], msg["code"], msg["signal"], bool(msg.get("oom")))

    def _lost(self) -> None:
        self.loop.remove_reader(self.sock)
        if self._writer_waiting:
            self.loop.remove_writer(self.sock)
            self._writer_waiting = False
        self.outbox.clear()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(LauncherFailed("lost", "the launcher exited"))
        self.pending.clear()
        if self.on_lost:
            self.on_lost()
