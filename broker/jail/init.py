"""pid 1 of a jail's pid namespace.

It has one child, the program, and three duties: reap every process that is
orphaned into the namespace, forward SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 to
the program, and exit with the program's status once the program is gone.
When it exits the kernel kills everything else in the namespace, so nothing
outlives the program.

It gives up all privilege first (identity.drop_everything_for_init): it
needs none to wait for and signal its own children.

The program's raw wait status is written to `status_fd` before exiting, so
the launcher learns "killed by signal N" even though pid 1 itself can only
exit with a code.  When every process of the jail runs with init's own
credentials (the program was spawned with them: launch._spawn_and_become_init),
init kills and reaps the rest itself before writing, and adds ENDED_ALL: the
launcher then reports the jail's end at once instead of after init's exit
has been torn down and reaped (~0.4 ms).
"""
from __future__ import annotations

import os
import signal
import struct

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def exit_code_of(status: int) -> int:
    """Shell convention: the exit code, or 128 + the terminating signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


ENDED_ALL = b"\x01"      # after the status: nothing else of the jail runs


def run_init(program_pid: int, status_fd: int | None,
             can_end_all: bool = False) -> "NoReturn":  # noqa: F821
    """Reap and forward until the program exits; never returns.

    can_end_all: every process of the jail runs with our credentials (the
    program was spawned with them and can gain none), so kill(-1) reaches
    all of them.  Then, once the program is gone, we kill and reap the rest
    before writing the status, and say so (ENDED_ALL): the launcher may then
    report the jail's end without waiting for our own exit to be torn down."""
    program_status = None
    waited = set(FORWARDED) | {signal.SIGCHLD}
    # The signals stay blocked (the caller blocked them before forking the
    # program, so none can be lost in between); sigwaitinfo takes them one at
    # a time, with no Python signal handler involved.
    while program_status is None:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            program_status = _reap_all(program_pid)
        else:
            try:
                os.kill(program_pid, info.si_signo)
            except ProcessLookupError:
                pass   # already gone; its SIGCHLD is on the way
    if status_fd is not None:
        report = struct.pack("=i", program_status)
        if can_end_all:
            # What our exit would do anyway, done first: then the status can
            # say that nothing else of the jail runs.
            _kill_and_reap_the_rest()
            report += ENDED_ALL
        try:
            os.write(status_fd, report)
        except OSError:
            pass   # the launcher went away; the exit code still says it
    os._exit(exit_code_of(program_status))


def _kill_and_reap_the_rest() -> None:
    """As pid 1, kill(-1) reaches every other process of the pid namespace
    (and nothing outside it); each becomes our child once its parent is gone,
    so reaping until there is no child left means none of them runs."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass          # nobody else left
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _reap_all(program_pid: int) -> int | None:
    """Reap every exited child; return the program's status if it was one."""
    program_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return program_status
        if pid == 0:
            return program_status
        if pid == program_pid:
            program_status = status
