"""`privbroker open | check | chown`: the device subcommands.

    privbroker open PATH [--fd N] [-- CMD [ARGS...]]
        The broker opens PATH (rule-checked) and hands over the fd.  With CMD:
        run it with the device as fd N (default 3; $PRIVBROKER_FD says which)
        and exit with its status.  Without: say how it was opened.
    privbroker check PATH
        Would `open` be allowed?  Prints allowed/denied; exit 0 or 1.
    privbroker chown PATH [-- CMD [ARGS...]]
        Lease PATH to your uid.  With CMD: hold the lease while it runs, then
        release, and exit with its status (128+signal if a signal ended it;
        SIGTERM, SIGINT and SIGHUP sent to us go to CMD, as for `open`,
        except those a terminal sends CMD itself; a lease that ended first,
        by its timeout, is only reported).
        Without: print the lease id and hold it until SIGINT/SIGTERM/SIGHUP.
        The lease also ends when this program exits or dies (the broker sees
        its connection go), and the broker restores the node.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import threading

COMMANDS = ("open", "check", "chown")


def add_parsers(sub) -> None:
    p = sub.add_parser("open", help="have the broker open a device node for you")
    p.add_argument("path")
    p.add_argument("--fd", type=int, default=3, help="fd number for CMD (default 3)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("check", help="would `open` be allowed")
    p.add_argument("path")
    p = sub.add_parser("chown", help="lease a device node to your uid")
    p.add_argument("path")
    p.add_argument("argv", nargs=argparse.REMAINDER)


def _cmd(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


ACCESS_MODES = {os.O_RDWR: "read-write", os.O_RDONLY: "read-only", os.O_WRONLY: "write-only"}


def dispatch(b, args) -> int:
    if args.cmd == "check":
        ok = b.check_path_access(args.path)
        print(f"{args.path}: {'allowed' if ok else 'denied'}")
        return 0 if ok else 1
    if args.cmd == "open":
        fd = b.open_path(args.path)
        try:
            cmd = _cmd(args.argv)
            if not cmd:
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                print(f"{args.path}: opened {ACCESS_MODES.get(mode, f'with mode {mode}')}")
                return 0
            return _spawn_with_fd(cmd, fd, args.fd)
        finally:
            os.close(fd)
    if args.cmd == "chown":
        lease = b.chown_device(args.path)
        code = 0
        try:
            cmd = _cmd(args.argv)
            if cmd:
                code = _spawn(cmd)
            else:
                print(f"{args.path}: lease {lease}; held until interrupted", flush=True)
                _wait_for_signal()
        finally:
            _release(b, lease)
        return code
    return 2


def _release(b, lease: str) -> None:
    """The lease may have ended already (its timeout, a broker restart):
    the node was restored then, and the command's status still stands."""
    from .api import BrokerCallError
    try:
        b.release_device(lease)
    except BrokerCallError as e:
        if not e.name.endswith(".NotFound"):
            raise
        print(f"privbroker: lease {lease} had already ended (the broker restored the node)",
              file=sys.stderr)


def _spawn_with_fd(cmd: list[str], fd: int, target: int) -> int:
    """Run cmd with `fd` as its fd `target` (posix_spawn's dup2: no
    pre-exec Python code in a threaded process)."""
    env = dict(os.environ, PRIVBROKER_FD=str(target))
    actions = [(os.POSIX_SPAWN_DUP2, fd, target)] if fd != target else []
    if fd == target:
        os.set_inheritable(fd, True)
    return _spawn(cmd, env, actions)


def _spawn(cmd: list[str], env=None, actions=()) -> int:
    """Run cmd and wait for it; its exit status, or 128+signal.  SIGTERM,
    and SIGINT and SIGHUP unless a terminal sends them to cmd itself, go to
    it while we wait on: the device is given back only once the command that
    has it is done."""
    pidfd: list[int] = []           # signalled through a pidfd: never a recycled pid
    early: list[int] = []           # signals that came before the child did
    shared = _terminal_signals_reach_cmd()

    def forward(sig, _frame):
        if sig in shared:
            return                  # the terminal sent cmd its own copy
        if not pidfd:
            early.append(sig)
            return
        try:
            signal.pidfd_send_signal(pidfd[0], sig)
        except OSError:
            pass                    # it has ended, or is not ours to signal (setuid)

    before = {sig: signal.signal(sig, forward)
              for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        pid = os.posix_spawnp(cmd[0], cmd, os.environ if env is None else env,
                              file_actions=list(actions))
        pidfd.append(os.pidfd_open(pid))
        for sig in early:
            forward(sig, None)
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if pidfd:
            os.close(pidfd[0])
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else \
        128 + os.WTERMSIG(status)


def _terminal_signals_reach_cmd() -> frozenset:
    """The signals a terminal sends the whole foreground process group,
    when that is ours (cmd is in it too): Ctrl-C and a hangup reach cmd
    without us, and must not reach it twice."""
    try:
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return frozenset()
    try:
        foreground = os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        foreground = False
    finally:
        os.close(tty)
    return frozenset({signal.SIGINT, signal.SIGHUP}) if foreground else frozenset()


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda _s, _f: done.set())
    while not done.wait(0.5):
        pass
