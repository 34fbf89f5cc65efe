"""Decision lines: written straight to the handler setup() installed, as the
same bytes Logger.log would write; through Logger.log whenever anything else
listens or the direct write fails (broker/logs.py)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DECIDE = ("L.decision(logging.INFO, 'OpenPath', 'allowed', args={'path': '/dev/x y'}, "
          "result={'rule': 'r', 'done': 'opened O_RDWR'})")
SAME_TEXT = ("L.log.info('decision method=OpenPath verdict=allowed path=\"/dev/x y\" rule=r "
             "done=\"opened O_RDWR\"')")


def run(code: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", "import logging, broker.logs as L\n" + code],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


def syslog_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "log"))
    s.settimeout(5)
    return s


def test_stderr_lines_are_the_bytes_logging_writes():
    r = run(f"L.setup('info', 'stderr')\n{DECIDE}\n{SAME_TEXT}\n"
            "assert L._direct.frames, 'the direct way was not taken'")
    direct, logged = r.stderr.splitlines()
    assert direct == logged == ('privbrokerd: INFO decision method=OpenPath verdict=allowed '
                                'path="/dev/x y" rule=r done="opened O_RDWR"')


def test_syslog_datagrams_are_the_bytes_logging_sends(tmp_path):
    s = syslog_socket(tmp_path)
    try:
        run(f"L.SYSLOG_SOCKET = {str(tmp_path / 'log')!r}\nL.setup('info', 'journal')\n"
            f"{DECIDE}\n{SAME_TEXT}\n"
            "assert L._direct.frames, 'the direct way was not taken'\n"
            # tag_front's new format is used from then on
            f"L.tag_front()\n{DECIDE}\n")
        direct, logged, tagged = s.recv(4096), s.recv(4096), s.recv(4096)
    finally:
        s.close()
    assert direct == logged
    assert direct.startswith(b"<30>privbrokerd[") and direct.endswith(b'"opened O_RDWR"\0')
    assert tagged.split(b"]", 1)[1] == direct.split(b"]", 1)[1]


def test_another_handler_gets_the_line_too(tmp_path):
    # e.g. pytest's caplog: with a second handler the line goes through
    # Logger.log, so every handler sees it
    s = syslog_socket(tmp_path)
    try:
        r = run(f"L.SYSLOG_SOCKET = {str(tmp_path / 'log')!r}\nL.setup('info', 'journal')\n"
                "seen = []\n"
                "class H(logging.Handler):\n"
                "    def emit(self, record): seen.append(record.getMessage())\n"
                f"logging.getLogger().addHandler(H())\n{DECIDE}\nprint(seen[0])")
        datagram = s.recv(4096)
    finally:
        s.close()
    assert r.stdout.startswith("decision method=OpenPath")
    assert b"decision method=OpenPath" in datagram


def test_a_failed_direct_write_goes_through_logging(tmp_path):
    # the syslog socket broke (journald restarted): SysLogHandler reconnects
    s = syslog_socket(tmp_path)
    try:
        run(f"L.SYSLOG_SOCKET = {str(tmp_path / 'log')!r}\nL.setup('info', 'journal')\n"
            f"L._direct.handler.socket.close()\n{DECIDE}")
        datagram = s.recv(4096)
    finally:
        s.close()
    assert b"decision method=OpenPath" in datagram


def test_below_the_level_nothing_is_written():
    r = run(f"L.setup('warning', 'stderr')\n{DECIDE}")
    assert r.stderr == ""
