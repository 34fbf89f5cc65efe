"""client/devices_cli.py's way of running a command with a device: what the
command gets when the CLI is signalled, from a terminal or by kill."""
from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time

from conftest import ROOT

# Counts the SIGINTs delivered to it for a while, then exits with that
# count.  Python runs a handler once for deliveries that come close
# together; the wakeup fd gets a byte for each one.
COUNTER = ("import os, signal, sys, time\n"
           "r, w = os.pipe(); os.set_blocking(w, False); os.set_blocking(r, False)\n"
           "signal.set_wakeup_fd(w)\n"
           "signal.signal(signal.SIGINT, lambda *a: None)\n"
           "print('ready', flush=True)\n"
           "end = time.monotonic() + 1.5\n"
           "while time.monotonic() < end: time.sleep(0.05)\n"
           "try: n = len(os.read(r, 64))\n"
           "except BlockingIOError: n = 0\n"
           "sys.exit(n)")


def _read_until(fd: int, want: bytes, timeout: float = 10) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while want not in out:
        assert time.monotonic() < deadline, out
        if select.select([fd], [], [], 0.1)[0]:
            out += os.read(fd, 1024)
    return out


def _cli_child(report_fd: int) -> None:
    """In the child: run COUNTER the way `privbroker open/chown -- CMD` does."""
    sys.path.insert(0, str(ROOT))
    from client import devices_cli
    code = devices_cli._spawn([sys.executable, "-c", COUNTER])
    os.write(report_fd, str(code).encode())
    os._exit(0)


def _run_in_terminal(send) -> int:
    """COUNTER under _spawn in a new session on a pty (the CLI and the
    command in the terminal's foreground group); `send(master, cli_pid)`
    once it is ready; the command's exit status."""
    r, w = os.pipe()
    pid, master = pty.fork()
    if pid == 0:
        os.close(r)
        _cli_child(w)
    os.close(w)
    try:
        _read_until(master, b"ready")
        send(master, pid)
        with os.fdopen(r, "rb") as f:
            code = int(f.read() or b"-1")
        os.waitpid(pid, 0)
        return code
    finally:
        os.close(master)


def test_ctrl_c_reaches_the_command_once():
    # the terminal sends SIGINT to the whole foreground group: the command
    # has its copy, and the CLI must not forward another one
    assert _run_in_terminal(lambda master, _pid: os.write(master, b"\x03")) == 1


def test_without_a_terminal_sigint_and_sigterm_are_forwarded():
    # no terminal: nothing else would tell the command (kill, timeout(1),
    # systemd signal the CLI alone)
    for sig, want in ((signal.SIGINT, 1), (signal.SIGTERM, 128 + signal.SIGTERM)):
        r, w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()                                 # no controlling terminal
            os.dup2(out_w, 1)
            os.close(r)
            _cli_child(w)
        os.close(w)
        os.close(out_w)
        try:
            _read_until(out_r, b"ready")
            os.kill(pid, sig)
            with os.fdopen(r, "rb") as f:
                assert int(f.read() or b"-1") == want, sig
            os.waitpid(pid, 0)
        finally:
            os.close(out_r)
