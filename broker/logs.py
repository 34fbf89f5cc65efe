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
    return target


def tag_front() -> None:
    """In the front: its pid is 1 in its own pid namespace, so the syslog tag
    carries the pid the host sees (/proc/self, resolved by the host's procfs
    the front still has), as the journal's _PID field does."""
    host_pid = os.readlink("/proc/self")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.SysLogHandler):
            handler.setFormatter(logging.Formatter(f"privbrokerd[{host_pid}]: %(message)s"))


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
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
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
    log.log(level, "decision " + " ".join(f"{k}={quote(v)}" for k, v in fields.items()))
