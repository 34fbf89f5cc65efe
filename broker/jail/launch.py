"""Apply a JailSpec in a child and exec; report how the program ended.

Processes (L is the caller of `launch`, e.g. privjail or the broker's launcher):

  L --fork--> A: unshares the namespaces.  With a user namespace, A unshares
                 it first and L writes the id maps (only a process outside
                 the namespace may map arbitrary ids), so that every other
                 namespace is created owned by the new user namespace.
  A --fork--> B: with a pid namespace, B is its pid 1.  A reports B's pid and
                 exits; B is re-parented to L, which is a child subreaper.
                 Without a pid namespace A simply continues as B.  Without a
                 user namespace there is no A at all: L unshares the pid
                 namespace for its next child only, forks B directly into
                 it, and restores its own at once (setns).
  B            : builds the jail (JAIL_STEPS).  With a pid namespace and an
                 init, B forks the program C and becomes init (init.py);
                 otherwise B itself is the program.
  C            : takes the program's identity and execs (PROGRAM_STEPS).
                 When the program keeps no capability, has no_new_privs and
                 no seccomp filter, init can hold every one of its
                 restrictions too: B then takes them itself and starts the
                 program with posix_spawn (vfork + exec), which saves a copy
                 of this process, its copy-on-write faults and its teardown
                 at exec (~1.2 ms a launch; _become_init).

The jail's cgroup is made by L while A makes the namespaces, and L moves A
into it before it first answers A (MAPPED or GO): until then A makes no
process and runs nothing of the jail, so every process of it is born inside.

L only ever waits for, or signals, its own children (A, then B), by pids that
cannot be recycled until L reaps them, and signals B through a pidfd: it can
never hit the wrong process (the pitfall of Mozilla bug 986397).

Every child reports a failed step over a SOCK_SEQPACKET socket whose ends are
close-on-exec: L reads until end of file, which arrives exactly when the
program has exec'd (or everybody has exited).  A failed launch is killed and
reaped before `launch` raises, and its namespaces, and every mount in them,
go with it.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import json
import os
import pickle
import resource
import select
import signal
import socket
import struct
import threading
from _signal import pthread_sigmask as _sigmask   # why: see _ALL_SIGNALS
from dataclasses import dataclass

import prctl

# Everything the children use is imported here, before any fork: after a
# pivot_root or a uid change the interpreter may no longer be able to read
# its own library directory.
from . import cgroups
from . import syscalls as sc
from . import warm
from .identity import drop_everything_for_init, drop_privileges
from .init import ENDED_ALL, FORWARDED, run_init
from .landlock import build_ruleset
from .mounts import setup_filesystem
from .seccomp.load import PreparedFilter, prepare_filter
from .spec import RLIM_INFINITY, JailSpec, validate

# Exit statuses privjail uses for a launch that never reached the program
# (minijail's values where it has one).
EXIT_NO_ACCESS = 126      # exec: permission denied, not executable
EXIT_NO_COMMAND = 127     # exec: no such program
EXIT_MOUNT = 251          # a mount step failed
EXIT_SETUP = 252          # another jail step failed
EXIT_INIT = 254           # the jail's init failed

_STEP_EXIT = {"mounts": EXIT_MOUNT, "init": EXIT_INIT}

# Messages on the control socket: one byte of kind, then a payload.
_MSG_USERNS = b"U"    # A -> L: user ns unshared, write my maps
_MSG_MAPPED = b"M"    # L -> A: maps written
_MSG_PID = b"P"       # A -> L: the jail's top pid (in L's pid ns)
_MSG_GO = b"G"        # L -> B: you are mine now; build the jail
_MSG_ERROR = b"E"     # any -> L: a step failed (JSON payload)
_MSG_READY = b"R"     # seed -> L: my namespaces are made; waiting for my order
_MSG_ORDER = b"O"     # L -> seed: your spec, fds and filter (pickled; fds attached); GO


class LaunchError(Exception):
    """A jail step failed before the program ran.  Nothing is left behind."""

    unsupported = False       # True: this machine cannot do it (cgroups.Unsupported)

    def __init__(self, step: str, err: int, message: str):
        self.step, self.errno, self.message = step, err, message
        super().__init__(f"jail setup failed at step '{step}': {message}")

    @property
    def exit_code(self) -> int:
        if self.step == "exec":
            return EXIT_NO_COMMAND if self.errno == _errno.ENOENT else EXIT_NO_ACCESS
        return _STEP_EXIT.get(self.step, EXIT_SETUP)


@dataclass(frozen=True)
class ExitStatus:
    code: int | None      # exit code, or None when killed by a signal
    signal: int | None    # terminating signal, or None
    oom: bool = False     # SIGKILLed by the OOM killer: the jail's memory limit was hit

    @classmethod
    def from_wait_status(cls, status: int) -> "ExitStatus":
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status), None)

    @property
    def shell_code(self) -> int:
        return 128 + self.signal if self.signal is not None else self.code


class Jail:
    """A running jail, as seen from L.  `pid` is the jail's top process (its
    pid 1 when it has a pid namespace), a child of L."""

    def __init__(self, pid: int, pidfd: int, status_fd: int, own_pid_ns: bool,
                 cgroup: cgroups.Cgroup | None = None):
        self.pid, self.pidfd, self._status_fd = pid, pidfd, status_fd
        self.own_pid_ns = own_pid_ns
        self.status: ExitStatus | None = None
        self.cgroup = cgroup       # the jail's own cgroup, if it has one
        self.leftover: cgroups.Cgroup | None = None   # a cgroup that would not go away
        self.empty_cgroup: cgroups.Cgroup | None = None   # reaped(defer_removal=True)
        self.early: ExitStatus | None = None   # ended(): over before our pid is reaped
        self._program_status: int | None = None   # read from the pipe before the reap

    @property
    def status_fd(self) -> int:
        """init's status pipe (-1: none, or closed): readable once the
        program is gone (or init is); see ended()."""
        return self._status_fd

    def ended(self) -> ExitStatus | None:
        """Read init's report when the status pipe is readable.  The jail's
        end, when init says nothing else of it runs (it killed and reaped the
        rest first: init.run_init, can_end_all); then the end may be reported
        before init's own exit is torn down and reaped.  None otherwise: the
        reap (reaped, wait) says how it ended."""
        if self.early is not None or self.status is not None:
            return self.early
        program, all_gone = _read_status(self._status_fd)
        if program is None:
            return None
        self._program_status = program
        if not all_gone:
            return None
        status = ExitStatus.from_wait_status(program)
        if status.signal == signal.SIGKILL and self.cgroup is not None \
                and (self.cgroup.oom_kills() or 0) > 0:
            status = ExitStatus(None, signal.SIGKILL, oom=True)
        self.early = status
        return status

    def signal(self, sig: int) -> None:
        """Signal the jail's top process (its init forwards the usual ones)."""
        if self.status is None:
            signal.pidfd_send_signal(self.pidfd, sig)

    def signal_all(self, sig: int) -> None:
        """Signal every process in the jail.  SIGKILL to pid 1 of the jail's
        pid namespace takes all of it; any other signal goes to each process
        in that namespace but pid 1 (which would forward it a second time).
        Without a pid namespace only the top process is known, unless the
        jail has a cgroup: then its members are every process in it, and
        SIGKILL is the cgroup's kill-all (no double fork escapes it).

        SIGKILL with a pid namespace goes to pid 1 alone even with a
        cgroup: the kernel then kills everything in the namespace before
        pid 1's exit is reported, and nothing leaves a pid namespace, so at
        the reap the cgroup is empty (and if not, _end_cgroup kills what is
        there before the exit is reported).  That keeps the freezer's waits
        (milliseconds, and the launcher is single-threaded) off the path of
        every jail whose caller went away."""
        if self.status is not None:
            return
        if self.cgroup is not None and not (sig == signal.SIGKILL and self.own_pid_ns):
            if sig == signal.SIGKILL:
                self.cgroup.kill_all()
            else:
                self.cgroup.signal_members(
                    sig, frozenset({self.pid}) if self.own_pid_ns else frozenset())
            return
        if sig == signal.SIGKILL or not self.own_pid_ns:
            self.signal(sig)
            return
        for pidfd in _pidfds_in_pid_ns(os.stat(f"/proc/{self.pid}/ns/pid").st_ino, self.pid):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)

    def reaped(self, raw: int, defer_removal: bool = False) -> ExitStatus:
        """The caller reaped our pid itself (in a waitpid(-1) loop).

        defer_removal: when the jail's cgroup is already empty (a jail with
        a pid namespace always is: its pid 1's exit took every process in
        it), leave the empty directory in `empty_cgroup` for the caller to
        remove after it has reported the exit; rmdir of each hierarchy is
        ~0.2 ms of the exit path.  A cgroup with processes left in it is
        emptied now either way, so the exit is never reported while any
        process of the jail still runs."""
        self._finish(raw, defer_removal)
        return self.status

    def wait(self) -> ExitStatus:
        if self.status is None:
            _, raw = os.waitpid(self.pid, 0)
            self._finish(raw)
        return self.status

    def poll(self) -> ExitStatus | None:
        if self.status is None:
            pid, raw = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._finish(raw)
        return self.status

    def _finish(self, raw: int, defer_removal: bool = False) -> None:
        # With an init, the program's own status comes through the status
        # pipe; without one (or if init was killed), the top process's status
        # is the program's.
        program = self._program_status
        if program is None:
            program, _ = _read_status(self._status_fd)
        self.status = self.early or \
            ExitStatus.from_wait_status(program if program is not None else raw)
        self.close()
        if self.cgroup is not None:
            self._end_cgroup(defer_removal)

    def _end_cgroup(self, defer_removal: bool = False) -> None:
        """The jail is over: say whether the OOM killer ended it, kill what
        is left in its cgroup (processes that daemonized away from the
        program), and remove the cgroup (or, deferred, leave it empty)."""
        cg, self.cgroup = self.cgroup, None
        if self.status.signal == signal.SIGKILL and (cg.oom_kills() or 0) > 0:
            self.status = ExitStatus(None, signal.SIGKILL, oom=True)
        if defer_removal and cg.empty():
            self.empty_cgroup = cg
            return
        try:
            gone = cg.destroy()
        except cgroups.CgroupError:
            gone = False
        if not gone:
            self.leftover = cg      # the caller may retry cg.destroy() later

    def stats(self) -> cgroups.Stats | None:
        """The jail's cgroup accounting, while it runs and has a cgroup."""
        return self.cgroup.stats() if self.cgroup is not None and self.status is None else None

    def close(self) -> None:
        for fd in (self.pidfd, self._status_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self._status_fd = -1


def _pidfds_in_pid_ns(ns_ino: int, exclude: int):
    """pidfds of the live processes in the pid namespace ns_ino.  A pid is
    only trusted once a pidfd holds it and the process is still alive: a live
    process keeps its pid, so the namespace check cannot hit a recycled pid."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            fd = os.pidfd_open(int(entry))
        except OSError:
            continue
        try:
            signal.pidfd_send_signal(fd, 0)
            if os.stat(f"/proc/{entry}/ns/pid").st_ino == ns_ino:
                yield fd
                continue
        except OSError:
            pass
        os.close(fd)


def _read_status(fd: int) -> tuple[int | None, bool]:
    """init's report on the status pipe: the program's raw wait status (None:
    nothing written, init died first) and whether init said nothing else of
    the jail runs any more (init.ENDED_ALL)."""
    if fd < 0:
        return None, False
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 5)
    except BlockingIOError:
        return None, False
    if len(data) < 4:
        return None, False
    return struct.unpack("=i", data[:4])[0], data[4:] == ENDED_ALL


# ---------------------------------------------------------------------------
# L: the launching side
# ---------------------------------------------------------------------------

def launch(spec: JailSpec, fds: dict[int, int] | None = None, *,
           cgroup_name: str | None = None, cgroup_parent: str | None = None) -> Jail:
    """Start the jail; return once the program has exec'd (or raise LaunchError).

    `fds` maps child fd numbers to fds of ours; those become the program's
    fds exactly and nothing else is kept.  None: the program inherits our
    0, 1 and 2.  The caller becomes a child subreaper (harmless for a
    launcher, and what lets the jail's pid 1 be our child).

    A jail with limits (or own_cgroup) gets its own cgroup, named
    `cgroup_name` (default privjail-PID-RANDOM), under spec.cgroup_parent,
    else `cgroup_parent`, else our own cgroup.  L makes it while its first
    child makes the namespaces, and moves that child into it before
    answering it for the first time (_join_cgroup says why that is early
    enough).
    """
    validate(spec)
    seccomp = seccomp_filter(spec)   # a policy that cannot compile: refused before any fork
    mount_ns = _open_mount_ns(spec)  # likewise a -V file that cannot be opened
    prctl.set_child_subreaper(1)
    sc.last_cap()                    # cached here once, so no jail's child reads /proc for it
    ours = theirs = None
    status_r = status_w = -1
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        status_r, status_w = os.pipe()
    except BaseException:
        for sock in (ours, theirs):
            if sock is not None:
                sock.close()
        _close_all([status_r, status_w, mount_ns])
        raise
    # Without a user namespace, L can fork the jail's pid 1 itself (one fork
    # fewer): the pid namespace must then be made by L, for its next child
    # only, and L's own is restored at once.  With one, the pid namespace
    # must belong to the new user namespace, so A makes both.
    direct = spec.has("pid") and not spec.has("user")
    pid_a = cgroup = top = jail = None
    try:
        pid_a = _fork_into_new_pid_ns() if direct else _fork()
        if pid_a == 0:
            try:                        # never unwind into L's stack (nor its except below)
                ours.close()
                os.close(status_r)
                ctx = _Ctx(spec, theirs, status_w, fds, seccomp, mount_ns)
            except BaseException:
                os._exit(EXIT_SETUP)
            _run_child_a(ctx, in_pid_ns=direct)  # never returns
        theirs.close()
        _close_all([status_w, mount_ns])
        cgroup = _make_cgroup(spec, cgroup_name, cgroup_parent)
        if cgroup is not None:
            _join_cgroup(cgroup, pid_a)
        top = _drive(spec, ours, pid_a, direct)
        jail = Jail(top, os.pidfd_open(top), status_r, spec.has("pid") and spec.pid_init,
                    cgroup)
        if spec.pidfile:
            _write_pidfile(spec.pidfile, top)
        _wait_for_exec(ours, went=_send_go(ours))
        return jail
    except BaseException as e:
        if pid_a is None:               # the fork itself failed
            theirs.close()
            _close_all([status_w, mount_ns])
        else:
            _abort(pid_a, top)
        if jail is not None:
            jail.close()                # its pidfd and the status pipe
        else:
            os.close(status_r)
        if spec.pidfile and top is not None:
            _remove_quietly(spec.pidfile)
        if cgroup is not None:
            _drop_cgroup(cgroup, e)
        raise
    finally:
        ours.close()


# -- seeds: a jail's first process made ahead of its request -------------------
# Before a jail's first process can start its setup, a launch spends about
# 1.3 ms (the engine alone, this 2-cpu machine): L forks itself, the child
# makes its namespaces, L makes the jail's cgroup and moves the child in
# (and a move after idleness can wait for an RCU grace period: README).
# None of that depends on the request, only on its shape: which namespaces,
# which cgroup hierarchies, which kinds of limits.  A seed is that process
# made ahead, while L is idle (the broker's launcher keeps one ready for the
# shape of its last launch); launch_seeded() then sends it the request (its
# spec, fds and seccomp program: the order, which is also GO) and it builds
# the jail exactly as a freshly forked child would.  Only namespaces that
# start empty are made ahead (_SEED_AHEAD says why).
#
# Only what needs nothing from L between the namespaces can be seeded: a pid
# namespace of its own (L forks pid 1 directly), no user namespace (its maps
# are L's to write), no -V (a mount namespace joined before the others),
# explicit fds, a cgroup of its own, and no pidfile (privjail's -f).  On cgroup v1 the seed's cgroup is
# made and joined ahead and renamed to the jail's name at launch; v2 renames
# no cgroup, so there it is made and joined at launch, as without a seed.


def seed_shape(spec: JailSpec, cgroup_parent: str | None = None) -> tuple | None:
    """What a seed for `spec` is made of; None if no seed can serve it."""
    if (not spec.has("pid") or spec.has("user") or spec.enter_mount_ns is not None
            or not cgroups.wants_cgroup(spec) or spec.pidfile is not None):
        return None
    limits = cgroups.Limits.from_spec(spec)
    kinds = tuple(k for k in ("memory", "pids", "cpu_weight", "cpu_quota", "devices")
                  if getattr(limits, k) is not None)
    return (spec.namespaces, spec.cgroup_parent or cgroup_parent, kinds)


class Seed:
    """A jail's first process, made before its request: pid 1 of a new pid
    namespace, its other namespaces made, on cgroup v1 in a cgroup of its
    own.  It runs nothing until its order comes; discard() ends it."""

    def __init__(self, shape: tuple, pid: int, sock: socket.socket, status_r: int,
                 cgroup: cgroups.Cgroup | None):
        self.shape, self.pid, self.sock, self.status_r = shape, pid, sock, status_r
        self.cgroup = cgroup
        self.used = False

    def alive(self) -> bool:
        """Not exited (a seed is our child: waitpid reaps it if it has)."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False                # reaped already (a waitpid(-1) loop)
        if pid == 0:
            return True
        self.pid = -1                   # reaped just now
        return False

    def discard(self) -> None:
        """End it (if still there), reap it, remove its cgroup, close ours."""
        if self.used:
            return
        self.used = True
        if self.pid > 0:
            _abort(self.pid, None)
        self.sock.close()
        os.close(self.status_r)
        if self.cgroup is not None:
            try:
                self.cgroup.destroy()
            except cgroups.CgroupError:
                pass


def make_seed(spec: JailSpec, cgroup_name: str, cgroup_parent: str | None = None,
              warm_runs: tuple = ()) -> Seed:
    """A seed for specs shaped like `spec`.  Raises LaunchError (nothing
    left behind) if it cannot be made; returns once its namespaces exist.
    `warm_runs` (what a warm.Watch read from an earlier seeded jail) are
    the pages the seed copies ahead once it has said READY (warm.py says
    why)."""
    shape = seed_shape(spec, cgroup_parent)
    if shape is None:
        raise ValueError("no seed can serve this spec (seed_shape)")
    prctl.set_child_subreaper(1)
    sc.last_cap()                       # cached before the fork, as launch() does
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        status_r, status_w = os.pipe()
    except BaseException:
        ours.close()
        theirs.close()
        raise
    pid = cgroup = None
    try:
        pid = _fork_into_new_pid_ns()
        if pid == 0:
            try:
                ours.close()
                os.close(status_r)
            except BaseException:
                os._exit(EXIT_SETUP)
            _run_seed(theirs, status_w, spec.namespaces, warm_runs)     # never returns
        theirs.close()
        os.close(status_w)
        if _expect(ours, _MSG_READY) != b"":
            raise LaunchError("protocol", 0, "a seed said more than READY")
        if cgroups.System.current().version == cgroups.V1:
            try:
                cgroup = cgroups.System.current().create(
                    cgroup_name, cgroups.Limits.from_spec(spec), spec.cgroup_parent
                    or cgroup_parent, set_limits=False)
            except cgroups.CgroupError as e:
                raise LaunchError("cgroup", e.errno, str(e)) from None
            _join_cgroup(cgroup, pid)
        return Seed(shape, pid, ours, status_r, cgroup)
    except BaseException:
        if pid is None:
            theirs.close()
            os.close(status_w)
        else:
            _abort(pid, None)
        ours.close()
        os.close(status_r)
        if cgroup is not None:
            try:
                cgroup.destroy()
            except cgroups.CgroupError:
                pass
        raise


def _run_seed(sock: socket.socket, status_w: int, namespaces: frozenset,
              warm_runs: tuple) -> "NoReturn":  # noqa: F821
    """The seed: make the namespaces, say READY, copy the pages a launch
    writes, wait for the order, then build the jail as any first process
    would (its order is its GO)."""
    try:
        prctl.set_pdeathsig(signal.SIGKILL)    # must not outlive a dead L
        name = prctl.get_name()
        prctl.set_name("pb-seed")              # what ps shows while it waits
        ahead = _ns_flags(namespaces & _SEED_AHEAD)
        if ahead:
            sc.unshare(ahead)
        sock.send(_MSG_READY)
        # After READY, so L is not held up; an order that comes meanwhile
        # waits for about what the page faults would have cost it.
        warm.copy_ahead(warm_runs)
        msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_ORDER, _MAX_ORDER_FDS)
    except BaseException:
        os._exit(EXIT_SETUP)
    if msg[:1] != _MSG_ORDER:
        os._exit(0)                            # discarded (end of file), or not for us
    try:
        # pickle: the bytes come from L, over a socketpair only L and this
        # process hold, and both run the same code (this process is L's fork)
        spec, targets, seccomp = pickle.loads(msg[1:])
        ctx = _Ctx(spec, sock, status_w, dict(zip(targets, fds)), seccomp)
        prctl.set_name(name)                   # as any jail's first process
    except BaseException:
        os._exit(EXIT_SETUP)
    try:
        now = _ns_flags(namespaces - _SEED_AHEAD - {"pid"})
        if now:
            sc.unshare(now)
    except BaseException as e:
        _report_and_exit(ctx, e)
    _run_jail(ctx, go=True)


# Made ahead: the namespaces that start empty (net, ipc) or whose view does
# not change (cgroup: rooted at L's cgroup, as for A).  Not ahead: those that
# start as a copy of the host's (mount: its mount table; uts: its hostname),
# which must be the host's as it is at the launch, not at the seed's making
# (a mount made meanwhile on a private host mount would be missing).  The net
# namespace is most of the cost (0.36 of 0.41 ms here); mount and uts take ~0.1.
_SEED_AHEAD = frozenset({"net", "ipc", "cgroup"})


def _ns_flags(names) -> int:
    flags = 0
    for ns in names:
        flags |= sc.NS_FLAGS[ns]
    return flags


_MAX_ORDER = 1 << 20          # a spec and a seccomp program (at most 32 KiB)
_MAX_ORDER_FDS = 253          # SCM_MAX_FD


def launch_seeded(seed: Seed, spec: JailSpec, fds: dict[int, int], *,
                  cgroup_name: str, cgroup_parent: str | None = None) -> Jail:
    """launch(), with the seed as the jail's first process.  The caller
    checked seed_shape(spec) == seed.shape and seed.alive().  The seed is
    used up either way; on failure nothing of it is left."""
    if seed.used or seed_shape(spec, cgroup_parent) != seed.shape:
        raise ValueError("this seed cannot serve this spec")
    seed.used = True
    status_r, sock, pid, cgroup = seed.status_r, seed.sock, seed.pid, seed.cgroup
    jail = None
    try:
        validate(spec)
        seccomp = seccomp_filter(spec)
        order = _MSG_ORDER + pickle.dumps((spec, list(fds), seccomp))
        if cgroup is not None:              # v1: made and joined ahead
            try:
                cgroup.rename(cgroup_name)
                cgroup.set_limits(cgroups.Limits.from_spec(spec))
            except cgroups.CgroupError as e:
                raise LaunchError("cgroup", e.errno, str(e)) from None
        else:
            cgroup = _make_cgroup(spec, cgroup_name, cgroup_parent)
            _join_cgroup(cgroup, pid)
        jail = Jail(pid, os.pidfd_open(pid), status_r, spec.pid_init, cgroup)
        try:
            socket.send_fds(sock, [order], list(fds.values()))
            went = True
        except (BrokenPipeError, ConnectionResetError):
            went = False
        _wait_for_exec(sock, went)
        return jail
    except BaseException as e:
        _abort(pid, None)
        if jail is not None:
            jail.close()                # its pidfd and the status pipe
        else:
            os.close(status_r)
        if cgroup is not None:
            _drop_cgroup(cgroup, e)
        raise
    finally:
        sock.close()


def _close_all(fds: list[int | None]) -> None:
    """Close L's copies of what only a child needs (None, -1: not open)."""
    for fd in fds:
        if fd is not None and fd >= 0:
            os.close(fd)


def _make_cgroup(spec: JailSpec, name: str | None,
                 parent: str | None) -> cgroups.Cgroup | None:
    """Make the jail's cgroup (None: it gets none)."""
    if not cgroups.wants_cgroup(spec):
        return None
    name = name or f"privjail-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        return cgroups.System.current().create(name, cgroups.Limits.from_spec(spec),
                                               spec.cgroup_parent or parent)
    except cgroups.CgroupError as e:        # create() left nothing behind
        err = LaunchError("cgroup", e.errno, str(e))
        err.unsupported = isinstance(e, cgroups.Unsupported)
        raise err from None


def _join_cgroup(cg: cgroups.Cgroup, pid_a: int) -> None:
    """Move A into the jail's cgroup.  Early enough: until L first answers
    it (MAPPED or GO, both sent after this), A makes no process and runs
    nothing of the jail, so every process of the jail is born inside; what
    A did before (unshare) is the same for every jail.  Made here rather
    than before the fork, the cgroup (~0.3 ms on cgroup v1) is ready while A
    is still making its namespaces.  A is our child and not yet reaped: its
    pid cannot name anyone else."""
    try:
        cg.add(pid_a)
    except cgroups.CgroupError as e:
        raise LaunchError("cgroup", e.errno, str(e)) from None


def _drop_cgroup(cg: cgroups.Cgroup, exc: BaseException) -> None:
    """A launch failed: empty and remove its cgroup.  A setup that the OOM
    killer ended gets an error that says so, not 'exited before reporting'."""
    oom = (cg.oom_kills() or 0) > 0
    try:
        cg.destroy()
    except cgroups.CgroupError:
        pass
    if oom and isinstance(exc, LaunchError) and exc.step != "cgroup":
        exc.step, exc.errno = "cgroup", _errno.ENOMEM
        exc.message = (f"the jail ran out of memory under its memory limit "
                       f"({cg.name}) before its program ran; raise --memory-limit")
        exc.args = (f"jail setup failed at step 'cgroup': {exc.message}",)


def seccomp_filter(spec: JailSpec) -> PreparedFilter | None:
    """The jail's seccomp program, compiled (or read) here in L so that the
    child only has to load it: a policy is cached by content, so this is a
    file read on every launch but the first."""
    if not (spec.seccomp_policy or spec.seccomp_bpf):
        return None
    from .seccomp import PolicyError, compiled_filter
    from .seccomp.exec_check import check_allows_execve
    try:
        if spec.seccomp_policy:
            bpf = compiled_filter(spec.seccomp_policy, spec.seccomp_default)
        else:
            bpf = _read_bpf_file(spec.seccomp_bpf)
        check_allows_execve(bpf, spec.seccomp_policy or spec.seccomp_bpf)
        return prepare_filter(bpf)
    except PolicyError as e:
        raise LaunchError("seccomp", _errno.EINVAL, str(e)) from None
    except ValueError as e:                 # a malformed compiled program
        raise LaunchError("seccomp", _errno.EINVAL,
                          f"{spec.seccomp_bpf or spec.seccomp_policy}: {e}") from None


def _open_mount_ns(spec: JailSpec) -> int | None:
    """-V: the mount namespace to join, opened here so a bad path is refused
    before any fork; A joins it (setns checks it really is a mount ns)."""
    if spec.enter_mount_ns is None:
        return None
    try:
        return os.open(spec.enter_mount_ns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError("namespaces", e.errno, f"cannot open the mount namespace "
                          f"{spec.enter_mount_ns}: {e.strerror}") from None


def _read_bpf_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(BPF_FILE_LIMIT + 1)
    except OSError as e:
        raise LaunchError("seccomp", e.errno, f"cannot read compiled filter {path}: "
                          f"{e.strerror}") from None


BPF_FILE_LIMIT = 4096 * 8      # BPF_MAXINSNS instructions of 8 bytes


# Signal masks are set with _signal.pthread_sigmask, the C function under
# signal.pthread_sigmask, which takes and returns plain ints: the wrapper turns
# every number of the mask it returns into a Signals member, and restoring the
# full mask after a fork made ~65 of those in each process, every object they
# touched a copy-on-write fault: up to ~0.3 ms per fork on the launch's critical
# path.  Like the wrapper it runs any Python handler made pending meanwhile.
_ALL_SIGNALS = tuple(sorted(int(s) for s in signal.valid_signals()))


def _fork() -> int:
    """fork(); in a single-threaded process, without the interpreter's
    at-fork work.

    os.fork() runs every os.register_at_fork hook (threading's, logging's,
    random's, ...) and rebuilds the thread states in the child.  In the
    broker's launcher that costs about 0.6 ms per fork, nearly all of it
    copy-on-write page faults, and a launch forks twice on its critical
    path.  That work repairs what *other* threads held at the fork; a
    process with one thread has nothing to repair, so its child may go on
    exactly as the parent was.  What remains is a signal whose Python
    handler is pending at the fork: it would run in the child as well.  So
    every signal is blocked across the fork (a handler already pending
    runs in the parent when pthread_sigmask returns, before the fork), and
    both processes then restore the mask.  With more than one thread:
    os.fork(), as before."""
    if threading.active_count() != 1:
        return os.fork()
    old = _sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        return sc.fork_bare()
    finally:
        _sigmask(signal.SIG_SETMASK, old)


def _fork_into_new_pid_ns() -> int:
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.unshare(sc.CLONE_NEWPID)
        pid = -1
        try:
            pid = _fork()
        finally:
            if pid != 0:                   # the parent (or a failed fork): back home
                sc.setns(own, sc.CLONE_NEWPID)
        return pid
    finally:
        os.close(own)


def _drive(spec: JailSpec, sock: socket.socket, pid_a: int, direct: bool) -> int:
    """Talk A through the namespace setup; return the jail's top pid.
    Forked directly into its pid namespace, A is the top and says nothing
    until it fails or has exec'd: GO goes out without waiting for it."""
    if direct:
        return pid_a
    if spec.has("user"):
        _expect(sock, _MSG_USERNS)
        write_id_maps(pid_a, spec)
        sock.send(_MSG_MAPPED)
    top = struct.unpack("=i", _expect(sock, _MSG_PID))[0]
    if top != pid_a:
        # A exits right after reporting; reaping it is what makes B our child.
        _, status = os.waitpid(pid_a, 0)
        if status != 0:
            raise LaunchError("namespaces", 0, f"intermediate process failed ({status})")
    return top


def write_id_maps(pid: int, spec: JailSpec) -> None:
    for name, entries in (("uid_map", spec.uid_map), ("gid_map", spec.gid_map)):
        if entries:
            text = "".join(f"{m.inside} {m.outside} {m.count}\n" for m in entries)
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)


def _expect(sock: socket.socket, kind: bytes) -> bytes:
    msg = sock.recv(4096)
    if msg[:1] == kind:
        return msg[1:]
    _raise_reported(msg)


def _send_go(sock: socket.socket) -> bool:
    """GO; False when the jail's top process is already gone (it may have
    reported why first: _wait_for_exec reads that)."""
    try:
        sock.send(_MSG_GO)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _wait_for_exec(sock: socket.socket, went: bool) -> None:
    """End of file: the program has exec'd (every end of the socket is
    close-on-exec), unless GO never reached the jail."""
    msg = sock.recv(4096)
    if msg or not went:
        _raise_reported(msg)


def _raise_reported(msg: bytes) -> "NoReturn":  # noqa: F821
    if msg[:1] == _MSG_ERROR:
        r = json.loads(msg[1:])
        raise LaunchError(r["step"], r["errno"], r["message"])
    if not msg:
        raise LaunchError("namespaces", 0, "the jail exited before reporting")
    raise LaunchError("protocol", 0, f"unexpected message {msg[:16]!r}")


def _abort(pid_a: int, top: int | None) -> None:
    """Kill and reap whatever of the launch exists; ignore what is gone."""
    for pid in dict.fromkeys((top, pid_a)):
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _write_pidfile(path: str, pid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# The children.  None of these functions ever returns: a Python exception
# must never unwind into the launcher's stack in a forked child.
# ---------------------------------------------------------------------------

class _Ctx:
    """What the child steps share: the spec, the control socket, the fds."""

    def __init__(self, spec, sock, status_fd, fds, seccomp=None, mount_ns_fd=None):
        self.spec, self.sock, self.status_fd, self.fds = spec, sock, status_fd, fds
        self.step = "namespaces"
        self.ruleset = None       # the Landlock ruleset, built in the jail's view
        self.seccomp: PreparedFilter | None = seccomp   # compiled by L, loaded by C
        self.mount_ns_fd: int | None = mount_ns_fd   # -V: opened by L, joined by A


def _report_and_exit(ctx: _Ctx, exc: BaseException) -> "NoReturn":  # noqa: F821
    err = getattr(exc, "errno", None) or 0
    message = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename \
        else (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    if err == _errno.EOVERFLOW and ctx.spec.has("user"):
        message += (" (the user namespace's maps give neither 0 nor the jail's -u/-g ids, so "
                    "a file the setup makes would have no owner: map 0, or pass -u/-g ids "
                    "the maps give)")
    try:
        ctx.sock.send(_MSG_ERROR + json.dumps(
            {"step": ctx.step, "errno": err, "message": message or type(exc).__name__}).encode())
    except OSError:
        pass
    os._exit(LaunchError(ctx.step, err, "").exit_code)


def _run_child_a(ctx: _Ctx, in_pid_ns: bool) -> "NoReturn":  # noqa: F821
    """A: make the namespaces; fork pid 1 unless we already are it."""
    spec, sock = ctx.spec, ctx.sock
    try:
        prctl.set_pdeathsig(signal.SIGKILL)   # A must not outlive a dead L
        # Until L first answers (MAPPED, GO) A makes no process and runs
        # nothing of the jail: L moves A into the jail's cgroup meanwhile.
        if ctx.mount_ns_fd is not None:       # first: needs the launcher's full privilege
            sc.setns(ctx.mount_ns_fd, sc.CLONE_NEWNS)
            os.close(ctx.mount_ns_fd)
            ctx.mount_ns_fd = None
        if spec.has("user"):
            sc.unshare(sc.CLONE_NEWUSER)
            sock.send(_MSG_USERNS)
            if sock.recv(16) != _MSG_MAPPED:
                os._exit(EXIT_SETUP)
            _take_setup_ids(spec)
        flags = 0
        for ns in spec.namespaces - {"user"} - ({"pid"} if in_pid_ns else set()):
            flags |= sc.NS_FLAGS[ns]
        if flags:
            sc.unshare(flags)
        if in_pid_ns:
            _run_jail(ctx)              # L knows our pid from fork(): nothing to report
        if spec.has("pid"):
            pid_b = _fork()     # B: pid 1 of the new pid namespace
            if pid_b == 0:
                _run_jail(ctx)
            sock.send(_MSG_PID + struct.pack("=i", pid_b))
            os._exit(0)
        sock.send(_MSG_PID + struct.pack("=i", os.getpid()))
        _run_jail(ctx)
    except BaseException as e:
        _report_and_exit(ctx, e)


def setup_ids(spec: JailSpec) -> tuple[int | None, int | None]:
    """The uid and gid A takes in its new user namespace for the setup
    (None: keep what it has).

    Until then A still has the host's ids, which the maps need not give
    (they read as the overflow id there), and a file the setup makes (the
    minimal /dev's nodes) could then have no owner: the kernel refuses it
    (EOVERFLOW).  So A takes ids the maps give: the namespace's root where
    they map 0, else the jail's own -u/-g where they map those (the program
    runs as them anyway).  Otherwise A keeps the overflow ids, and a step
    that must make a file fails, with an error that says why."""
    def pick(mapping, wanted):
        for candidate in (0, wanted):
            if candidate is not None and any(m.inside <= candidate < m.inside + m.count
                                             for m in mapping):
                return candidate
        return None
    return pick(spec.uid_map, spec.uid), pick(spec.gid_map, spec.gid)


def _take_setup_ids(spec: JailSpec) -> None:
    """Take setup_ids().  A keeps its capabilities in the namespace: the
    kernel clears them only on a change away from the namespace's root uid,
    and A (host uid 0) is not that uid unless the maps give 0, in which
    case this is a change *to* it."""
    uid, gid = setup_ids(spec)
    if gid is not None:
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)


def _await_go(ctx: _Ctx) -> None:
    if ctx.sock.recv(16) != _MSG_GO:
        os._exit(EXIT_SETUP)      # the launcher gave up on us


def _die_with_parent(ctx: _Ctx) -> None:
    """Arm PDEATHSIG, then make sure L did not die before it was armed.
    Called again after every credential change, which clears PDEATHSIG."""
    if not ctx.spec.die_with_parent:
        # A armed PDEATHSIG for the setup phase; without a pid namespace A
        # goes on to be the program, which must then survive the launcher.
        prctl.set_pdeathsig(0)
        return
    prctl.set_pdeathsig(signal.SIGKILL)
    p = select.poll()
    p.register(ctx.sock, select.POLLIN)
    for _, ev in p.poll(0):
        if ev & (select.POLLHUP | select.POLLERR):
            os._exit(EXIT_SETUP)


def _step_mounts(ctx: _Ctx) -> None:
    if ctx.spec.has("mount"):
        setup_filesystem(ctx.spec)


def _step_hostname(ctx: _Ctx) -> None:
    if ctx.spec.hostname is not None:
        socket.sethostname(ctx.spec.hostname)


def _step_rlimits(ctx: _Ctx) -> None:
    for r in ctx.spec.rlimits:
        conv = lambda v: resource.RLIM_INFINITY if v == RLIM_INFINITY else v  # noqa: E731
        resource.setrlimit(r.resource, (conv(r.soft), conv(r.hard)))


def _step_landlock_rules(ctx: _Ctx) -> None:
    if ctx.spec.landlock:
        ctx.ruleset = build_ruleset(ctx.spec.landlock, best_effort=ctx.spec.landlock_best_effort)


def _step_new_session(ctx: _Ctx) -> None:
    # A jail must not keep the caller's controlling terminal: with it, ioctl
    # TIOCSTI types commands into the caller's shell (bubblewrap's
    # CVE-2017-5226; tests/escape/test_escape_terminal.py).  In a session of
    # its own the terminal stays usable as stdio, but TIOCSTI gets EPERM and
    # no terminal signal reaches the jail directly: the launcher forwards them.
    os.setsid()


# The jail's first process, B.  Order and why:
JAIL_STEPS = (
    ("die-with-parent", _die_with_parent),  # first: a dead launcher means no jail
    ("session", _step_new_session),    # before the program can touch the caller's terminal
    ("mounts", _step_mounts),          # needs full privilege in the new namespaces
    ("landlock-rules", _step_landlock_rules),  # after mounts: rule paths are the jail's paths
    ("hostname", _step_hostname),      # needs CAP_SYS_ADMIN in the uts namespace
    ("rlimits", _step_rlimits),        # raising a hard limit needs CAP_SYS_RESOURCE
)


def _run_jail(ctx: _Ctx, go: bool = False) -> "NoReturn":  # noqa: F821
    try:
        ctx.step = "namespaces"
        if not go:
            _await_go(ctx)
        for ctx.step, step in JAIL_STEPS:
            step(ctx)
        if ctx.spec.has("pid") and ctx.spec.pid_init:
            ctx.step = "init"
            _become_init(ctx)
        _run_program(ctx)
    except BaseException as e:
        _report_and_exit(ctx, e)


_INIT_WAITS = tuple(int(s) for s in (*FORWARDED, signal.SIGCHLD))


def _become_init(ctx: _Ctx) -> "NoReturn":  # noqa: F821
    # Block the signals init waits for *before* forking, so none that arrives
    # between the fork and the wait loop is lost; the program unblocks them.
    _sigmask(signal.SIG_BLOCK, _INIT_WAITS)
    if _program_may_be_spawned(ctx.spec, ctx.seccomp):
        _spawn_and_become_init(ctx)
    program = _fork()
    if program == 0:
        _run_program(ctx)
    # The same ids the program takes: an id that cannot be taken is the
    # identity step's error, whichever of the two processes meets it first.
    ctx.step = "identity"
    drop_everything_for_init(ctx.spec)
    ctx.step = "init"
    _die_with_parent(ctx)
    ctx.sock.close()
    _close_fds_except({ctx.status_fd})
    run_init(program, ctx.status_fd)


def _program_may_be_spawned(spec: JailSpec, seccomp) -> bool:
    """True when init may take, before the program exists, every restriction
    the program gets, so that the program needs no setup of its own and can
    be started with posix_spawn (vfork + exec: no copy of this process, no
    copy-on-write faults, nothing to tear down at its exec).  That holds when
    the program ends up with no capability at all and no_new_privs (which init
    always has), and without a seccomp filter (init must not run under the
    program's policy: it waits, reaps, writes and forwards signals)."""
    return (seccomp is None and spec.capabilities == 0 and not spec.ambient
            and spec.no_new_privs)


def _spawn_and_become_init(ctx: _Ctx) -> "NoReturn":  # noqa: F821
    """PROGRAM_STEPS, with init (this process) taking each restriction for
    itself before posix_spawn starts the program, which inherits them all."""
    spec = ctx.spec
    try:                  # (no landlock before identity: no_new_privs is a condition)
        ctx.step = "identity"
        drop_privileges(spec)
        prctl.set_dumpable(False)          # drop_everything_for_init says why
        ctx.step = "init"
        _die_with_parent(ctx)
        ctx.step = "keyring"
        _step_keyring(ctx)
        ctx.step = "landlock"
        _step_landlock(ctx)
        ctx.step = "fds"
        actions = _spawn_fd_actions(ctx)
        ctx.step = "cwd"
        _step_cwd(ctx)
        ctx.step = "exec"
        program = _spawn(list(spec.argv), _program_env(spec), actions)
    except BaseException as e:
        _report_and_exit(ctx, e)
    ctx.step = "init"
    ctx.sock.close()                       # L sees end of file: the program has exec'd
    _close_fds_except({ctx.status_fd})
    run_init(program, ctx.status_fd, can_end_all=True)   # every process has our creds


def _spawn_fd_actions(ctx: _Ctx) -> list:
    """posix_spawn file actions that make the program's fds exactly the
    requested ones (or our 0, 1, 2 when none were).  Every other fd of ours
    is closed now or close-on-exec: the control socket, the status pipe and
    the staged sources."""
    ours = {ctx.sock.fileno(), ctx.status_fd}
    for fd in ours:
        os.set_inheritable(fd, False)
    if ctx.fds is None:
        _close_fds_except(ours | {0, 1, 2})
        return []
    _, staged = _stage_above_targets(ctx.fds, ours)
    _close_fds_except(ours | set(staged.values()))
    return [(os.POSIX_SPAWN_DUP2, tmp, target) for target, tmp in staged.items()]


def _spawn(argv: list[str], env: dict[str, str], actions: list) -> int:
    """posix_spawn, with os.execvpe's PATH search (PATH from the program's
    environment, first hit that can be executed)."""
    kw = dict(file_actions=actions, setsigmask=(), setsigdef=_PROGRAM_DEFAULT_SIGNALS)
    if "/" in argv[0]:
        return os.posix_spawn(argv[0], argv, env, **kw)
    saved = None
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        try:
            return os.posix_spawn(os.path.join(d, argv[0]), argv, env, **kw)
        except OSError as e:
            if e.errno not in (_errno.ENOENT, _errno.ENOTDIR) and saved is None:
                saved = e
            last = e
    raise saved if saved is not None else last


# What the program gets at default, whatever Python or init did with them.
_PROGRAM_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)


def _step_signals(ctx: _Ctx) -> None:
    # exec keeps ignored signals ignored and the mask as is: Python ignores
    # SIGPIPE and SIGXFSZ, and init blocked several; the program gets defaults.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    _sigmask(signal.SIG_SETMASK, ())


def _step_identity(ctx: _Ctx) -> None:
    drop_privileges(ctx.spec)


def _step_fds(ctx: _Ctx) -> None:
    """Make the program's fds exactly the requested ones; keep only the
    (close-on-exec) control socket, for reporting a failed exec."""
    sock_fd = ctx.sock.fileno()
    if ctx.fds is None:
        _close_fds_except({0, 1, 2, sock_fd})
        return
    base, staged = _stage_above_targets(ctx.fds, {sock_fd})
    new_sock = fcntl.fcntl(sock_fd, fcntl.F_DUPFD_CLOEXEC, base)
    ctx.sock = socket.socket(fileno=new_sock)
    for target, tmp in staged.items():
        os.dup2(tmp, target, inheritable=True)
    _close_fds_except(set(staged) | {new_sock})


def _stage_above_targets(fds: dict[int, int], ours: set[int]) -> tuple[int, dict[int, int]]:
    """Move every source out of the way first, so placing one never clobbers
    another (or one of `ours`): target -> a close-on-exec copy of its source
    at or above `base`, which is past every target, source and fd of ours."""
    base = max([2, *ours, *fds, *fds.values()]) + 1
    return base, {target: fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, base)
                  for target, src in fds.items()}


def _step_cwd(ctx: _Ctx) -> None:
    if ctx.spec.cwd:
        os.chdir(ctx.spec.cwd)


def _program_env(spec: JailSpec) -> dict[str, str]:
    env = {} if spec.env_reset else dict(os.environ)
    env.update(spec.env_add)
    return env


def _step_exec(ctx: _Ctx) -> None:
    argv = list(ctx.spec.argv)
    env = _program_env(ctx.spec)
    if "/" in argv[0]:
        os.execve(argv[0], argv, env)
    os.execvpe(argv[0], argv, env)


def _step_landlock_privileged(ctx: _Ctx) -> None:
    # Without no_new_privs, landlock_restrict_self needs CAP_SYS_ADMIN, which
    # only the not-yet-dropped identity has.
    if ctx.ruleset is not None and not ctx.spec.no_new_privs:
        ctx.ruleset.restrict_self()


def _step_landlock(ctx: _Ctx) -> None:
    # With no_new_privs, restrict as late as possible (minijail's order), so
    # identity changes never have to get through the ruleset.
    if ctx.ruleset is not None and ctx.spec.no_new_privs:
        ctx.ruleset.restrict_self()


def _step_keyring(ctx: _Ctx) -> None:
    # After the identity change, so the keyring belongs to the jailed user;
    # what the launcher's session keyring holds is then out of reach.
    if ctx.spec.new_session_keyring:
        sc.join_new_session_keyring()


def _step_seccomp_privileged(ctx: _Ctx) -> None:
    # Without no_new_privs, installing a filter needs CAP_SYS_ADMIN, which
    # only the not-yet-dropped identity has: minijail's order, and the same
    # consequence: the policy must allow the identity change's syscalls.
    if ctx.seccomp is not None and not ctx.spec.no_new_privs:
        ctx.seccomp.load()


def _step_seccomp(ctx: _Ctx) -> None:
    # With no_new_privs: the last thing before exec, so the policy only has
    # to allow what the program (and execve itself) does.
    if ctx.seccomp is not None and ctx.spec.no_new_privs:
        ctx.seccomp.load()


# The program's process, C (or B when it has no init).  Order and why:
PROGRAM_STEPS = (
    ("signals", _step_signals),        # before anything can block in exec
    ("landlock", _step_landlock_privileged),  # only without no_new_privs: needs CAP_SYS_ADMIN
    ("seccomp", _step_seccomp_privileged),    # likewise; after Landlock, whose syscalls
                                              # the policy then need not allow
    ("identity", _step_identity),      # groups, gid, uid, caps, securebits, no_new_privs
    ("die-with-parent", _die_with_parent),  # again: the uid change cleared PDEATHSIG
    ("keyring", _step_keyring),        # after identity: owned by the jailed user
    ("landlock", _step_landlock),      # after no_new_privs and after mounts; before seccomp
    ("fds", _step_fds),                # after identity: nothing above needs them
    ("cwd", _step_cwd),                # as the jailed user, so its access rights apply
    ("seccomp", _step_seccomp),        # last before exec: the policy need allow little else
    ("exec", _step_exec),              # last; the control socket closes on success
)


def _run_program(ctx: _Ctx) -> "NoReturn":  # noqa: F821
    try:
        for ctx.step, step in PROGRAM_STEPS:
            step(ctx)
        raise AssertionError("exec returned")
    except BaseException as e:
        _report_and_exit(ctx, e)


def _close_fds_except(keep: set[int]) -> None:
    lo = 0
    for fd in sorted(keep):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)
