"""privbrokerd's log: where it goes, and the one line per decision.

Target (`privbrokerd --log-target`, default auto):
  journal  syslog datagrams to /dev/log, the socket journald listens on
           (and any syslog daemon where there is no journald): the journal
           files each line with its priority, _PID, _UID and the unit;
  stderr   "privbrokerd: LEVEL message" lines;
  auto     journal when systemd started us (INVOCATION_ID or JOURNAL_STREAM
           in the environment) and /dev/log is a socket, stderr otherwise,
           so a broker started by hand or by the tests logs to its terminal.

A decision line is `decision key=value ...` in a fixed key order: method,
verdict (allowed | refused | failed | gone), error kind, the caller (uid, pid,
unique bus name), a summary of the arguments, the outcome and the reason.
What a line never holds: environment values, fd numbers' contents, file
contents, option values other than names, or more than 200 characters of any
one string; every value is quoted and escaped so a caller's string cannot
forge a line or a key (a newline in argv[0] stays '\\n').
"""
from __future__ import annotations

import functools
import logging
import logging.handlers
import os
import re
import stat
import sys

SYSLOG_SOCKET = "/dev/log"
TARGETS = ("auto", "journal", "stderr")
MAX_VALUE = 200

log = logging.getLogger("privbrokerd")


def setup(level: str = "info", target: str = "auto") -> str:
    """Send the process's log to `target` at `level`; returns the target used."""
    if target == "auto":
        target = "journal" if _started_by_systemd() and _is_socket(SYSLOG_SOCKET) else "stderr"
    if target == "journal":
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("privbrokerd[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("privbrokerd: %(levelname)s %(message)s"))
    # No format here names a source line: skip logging's frame walk for it
    # on every line (the logging module's documented optimization).
    logging._srcfile = None
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    global _direct
    _direct = _Direct(handler)
    return target


def tag_front() -> None:
    """In the front: its pid is 1 in its own pid namespace, so the syslog tag
    carries the pid the host sees (/proc/self, resolved by the host's procfs
    the front still has), as the journal's _PID field does."""
    host_pid = os.readlink("/proc/self")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.SysLogHandler):
            handler.setFormatter(logging.Formatter(f"privbrokerd[{host_pid}]: %(message)s"))
    if _direct is not None:
        _direct.frames.clear()          # made with the old format


def _started_by_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


# -- decision lines --------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9\-_.:/,+@]+")


def quote(value) -> str:
    """A value as it appears after key=: bare when plainly safe, else quoted
    with backslash escapes; never a raw control character."""
    if value.__class__ is str:          # most values: one lookup when seen before
        return _quote_text(value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + "...")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    return _quote_text(text)


@functools.lru_cache(maxsize=4096)
def _quote_text(text: str) -> str:
    # Remembered: most values (methods, rule names, a device's path, what
    # was done) repeat from line to line, and a line is written per call.
    # Keys are at most MAX_VALUE + 3 characters: the cache stays ~1 MB.
    if _BARE.fullmatch(text):        # = ASCII letters, digits and -_.:/,+@ only
        return text
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


def summarize(member: str, body: list, arg_names: list[str]) -> dict:
    """What a line says about a call's arguments.  Launch is summarized by
    hand (argv[0] and counts only); other methods show their scalar
    arguments by the introspection XML's names, containers by their size."""
    if member == "Launch" and len(body) == 5:
        profile, argv, env, fds, options = body
        return {"profile": profile, "argv0": argv[0] if argv else "", "argc": len(argv),
                "env_names": len(env), "fds": ",".join(str(n) for n in sorted(fds)) or "-",
                "options": ",".join(sorted(options)) or "-"}
    out = {}
    for i, value in enumerate(body):
        name = arg_names[i] if i < len(arg_names) else f"arg{i}"
        if isinstance(value, (str, int, bool)):
            out[name] = value
        elif isinstance(value, (list, dict)):
            out[name + "_count"] = len(value)
    return out


def decision(level: int, member: str, verdict: str, caller=None, sender: str | None = None,
             args: dict | None = None, kind: str | None = None, result: dict | None = None,
             reason: str | None = None) -> None:
    """Log one decision line (see the module doc for what it holds)."""
    if not log.isEnabledFor(level):     # most quiet calls: build nothing
        return
    fields = {"method": member, "verdict": verdict}
    if kind:
        fields["error"] = kind
    if caller is not None:
        # pid 0: the process that opened the connection is gone (callers.py)
        fields.update(uid=caller.uid, pid=caller.pid or "gone", sender=caller.name)
    elif sender:
        fields["sender"] = sender
    fields.update(args or {})
    fields.update(result or {})
    if reason:
        fields["reason"] = reason
    text = "decision " + " ".join([f"{k}={quote(v)}" for k, v in fields.items()])
    if _direct is None or not _direct.write(level, text):
        log.log(level, text)


# -- the decision line's way out ---------------------------------------------------
# The front writes a decision line for every call it serves, just after the
# reply.  Through Logger.log that is a LogRecord, a formatter pass and the
# handler's emit per line: measured, more than the device core's own work
# for an OpenPath.  While the process logs through the one handler setup()
# installed, with no other handler or filter anywhere (the tests' caplog adds
# one), a decision line is written to that handler's stream or socket
# directly, as the same bytes: what goes before and after the message comes
# from the handler's own formatter (and, for syslog, its priority encoding),
# worked out once per level.  Anything else, and any error while writing,
# goes through Logger.log as before (which reconnects a syslog socket).

_MARK = "\x00privbrokerd-message\x00"
_direct: "_Direct | None" = None


class _Direct:
    def __init__(self, handler: logging.Handler):
        self.handler = handler
        self.frames: dict[int, tuple[str, str] | None] = {}   # level -> (before, after)

    def write(self, level: int, text: str) -> bool:
        """Written (True), or the caller must use Logger.log (False)."""
        if not self._alone(level):
            return False
        frame = self.frames.get(level, False)
        if frame is False:
            frame = self.frames[level] = self._frame(level)
        if frame is None:
            return False
        handler, line = self.handler, frame[0] + text + frame[1]
        try:
            with handler.lock:          # as Handler.handle: whole lines, whatever thread
                if isinstance(handler, logging.handlers.SysLogHandler):
                    handler.socket.send(line.encode("utf-8"))
                else:
                    handler.stream.write(line)
                    handler.stream.flush()
        except Exception:
            return False
        return True

    def _alone(self, level: int) -> bool:
        root, handler = logging.root, self.handler
        return (len(root.handlers) == 1 and root.handlers[0] is handler
                and not log.handlers and log.propagate and not log.filters
                and not root.filters and not handler.filters and level >= handler.level)

    def _frame(self, level: int) -> tuple[str, str] | None:
        """The handler's own output around a message, or None when the
        formatter does anything with the message but place it once."""
        handler = self.handler
        record = logging.LogRecord(log.name, level, "", 0, _MARK, None, None)
        out = handler.format(record)
        if out.count(_MARK) != 1:
            return None
        before, after = out.split(_MARK)
        if isinstance(handler, logging.handlers.SysLogHandler):
            if not handler.unixsocket:
                return None
            prio = handler.encodePriority(handler.facility,
                                          handler.mapPriority(record.levelname))
            before = f"<{prio}>{handler.ident}{before}"
            after += "\000" if handler.append_nul else ""
        elif isinstance(handler, logging.StreamHandler):
            after += handler.terminator
        else:
            return None
        return before, after
