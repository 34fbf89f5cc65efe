"""A caller process for the confused-deputy tests (tests/test_deputy*.py),
run as a real unprivileged uid: it talks to the broker on a raw connection
(tests/soak_kit.py RawBus), so it can send what a library would not, and
prints one JSON line of what it saw.

    deputy_caller.py ADDRESS launch JSON     one Launch; JSON: {"profile", "env",
                                             "objects": N fresh pipes, "send": the
                                             unix fds, each "out" or an object
                                             index, "fd_map": {target: index}}
    deputy_caller.py ADDRESS pidreuse        connect, fork; the parent exits, the
                                             child waits for a line on stdin, then
                                             launches `id` on the inherited connection
    deputy_caller.py ADDRESS race OP PATH ROUNDS ALLOWED_INO WATCH...
                                             OP (OpenPath or ChownDevice) on PATH,
                                             ROUNDS times, while something else
                                             flips PATH; after every round checks
                                             what it got and that the WATCH paths'
                                             (uid, gid, mode) did not change
    deputy_caller.py - flip DIR A B          renameat2(RENAME_EXCHANGE) of DIR/A
                                             and DIR/B in a loop until killed

The jail's view comes from a probe run inside it (python3 -c PROBE): every
open fd with its (st_dev, st_ino) and link, and its environment, written as
JSON to the fd named by $OUT.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import stat
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from soak_kit import BUS_NAME, OBJ, RawBus  # noqa: E402

LAUNCH_SIG = "sasa{ss}a{uh}a{sv}"
PROBE = r"""
import json, os
d = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
fds = {}
for name in os.listdir(d):
    n = int(name)
    if n == d:
        continue
    try:
        st = os.fstat(n)
        fds[n] = [st.st_dev, st.st_ino, os.readlink(name, dir_fd=d)]
    except OSError:
        pass
os.close(d)
os.write(int(os.environ["OUT"]), json.dumps({"fds": fds, "env": dict(os.environ),
                                             "uid": os.getuid()}).encode())
"""
JAIL_PYTHON = "/usr/bin/python3"


def read_all(fd: int, timeout: float = 30) -> bytes:
    """Everything written to a pipe until every writer closed it."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    raise TimeoutError(f"the pipe was not closed within {timeout}s (read {data[:200]!r})")


def reply_of(raw: RawBus, serial: int) -> dict:
    msg = raw.reply_to(serial, timeout=60)
    for fd in msg.unix_fds:
        os.close(fd)
    if msg.error_name:
        return {"error": msg.error_name, "message": msg.body[0] if msg.body else ""}
    return {"reply": list(msg.body)}


def launch(address: str, req: dict) -> dict:
    """One Launch of the probe; the jail's report, or the error."""
    objects = [os.pipe() for _ in range(req.get("objects", 0))]
    out_r, out_w = os.pipe()
    send = [out_w if s == "out" else objects[s][1] for s in req["send"]]
    fd_map = {int(t): i for t, i in req["fd_map"].items()}
    env = dict(req.get("env", {}))
    if "OUT" not in env:
        env["OUT"] = str(next(t for t, i in fd_map.items() if req["send"][i] == "out"))
    body = [req.get("profile", "minimal"), req.get("argv", [JAIL_PYTHON, "-c", PROBE]),
            env, fd_map, {}]
    mine = [out_w, *(w for _, w in objects)]
    raw = RawBus(address)
    try:
        serial = raw.broker("Launch", LAUNCH_SIG, body, fds=send)
        if req.get("close_early"):         # before the broker has even read the call
            for fd in mine:
                os.close(fd)
            mine = []
        got = reply_of(raw, serial)
    finally:
        for fd in mine:
            os.close(fd)                   # the jail holds its own copies
    if "reply" in got:
        data = read_all(out_r)
        got["jail"] = json.loads(data) if data else None
    got["out"] = list(_ident(out_r))
    got["objects"] = [list(_ident(r)) for r, _ in objects]
    for fd in [out_r, *(r for r, _ in objects)]:
        os.close(fd)
    raw.close()
    return got


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def pidreuse(address: str) -> None:
    """The connection outlives the process that opened it: the bus keeps
    that process's pid for the connection, and the pid is freed."""
    raw = RawBus(address)                  # Hello done: the bus recorded our pid
    opener = os.getpid()
    child = os.fork()
    if child:
        os._exit(0)                        # the opener exits; the test reaps it
    print(json.dumps({"opener": opener, "holder": os.getpid()}), flush=True)
    sys.stdin.readline()                   # the test has given `opener` to another process
    out_r, out_w = os.pipe()
    got = reply_of(raw, raw.broker("Launch", LAUNCH_SIG,
                                   ["minimal", [JAIL_PYTHON, "-c", PROBE], {"OUT": "1"},
                                    {1: 0}, {}], fds=[out_w]))
    os.close(out_w)
    if "reply" in got:
        got["jail"] = json.loads(read_all(out_r))
    got["uid"] = os.getuid()
    print(json.dumps(got), flush=True)
    raw.close()


def owners(paths: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for p in paths:
        st = os.lstat(p)
        out.append((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
    return out


def race(address: str, op: str, path: str, rounds: int, allowed_ino: int,
         watch: list[str]) -> dict:
    """OP on PATH, ROUNDS times.  A win: an fd handed back that is not the
    allowed inode; a lease during which a watched node other than the first
    (the allowed one) changed owner or mode, or the first is not ours; any
    watched node not as it was once the round is over."""
    before = owners(watch)
    result: dict = {"rounds": 0, "outcomes": {}, "wins": [], "uid": os.getuid()}
    raw = RawBus(address)
    for i in range(rounds):
        msg = raw.reply_to(raw.broker(op, "s", [path]), timeout=60)
        result["rounds"] += 1
        if msg.error_name:
            key = msg.error_name.rsplit(".", 1)[-1]
        elif op == "OpenPath":
            fd = msg.unix_fds[0]
            st = os.fstat(fd)
            os.close(fd)
            key = "opened"
            if st.st_ino != allowed_ino:
                result["wins"].append(f"round {i}: opened inode {st.st_ino}")
        else:
            key = "leased"
            lease = msg.body[0]
            during = owners(watch)
            if during[1:] != before[1:] or during[0][0] != os.getuid():
                result["wins"].append(f"round {i}: during the lease {during}, was {before}")
            rel = raw.reply_to(raw.broker("ReleaseDevice", "s", [lease]), timeout=60)
            if rel.error_name:
                result["wins"].append(f"round {i}: release failed: {rel.error_name}")
        result["outcomes"][key] = result["outcomes"].get(key, 0) + 1
        now = owners(watch)
        if now != before:
            result["wins"].append(f"round {i}: {dict(zip(watch, now))} was "
                                  f"{dict(zip(watch, before))}")
            before = now
    raw.close()
    return result


_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = 316            # x86_64


def flip(directory: str, a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    a_b, b_b = a.encode(), b.encode()
    print("flipping", flush=True)
    n = 0
    while True:
        if libc.syscall(_SYS_RENAMEAT2, dfd, a_b, dfd, b_b, _RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), f"renameat2 {a} <-> {b}")
        n += 1


if __name__ == "__main__":
    address, mode = sys.argv[1], sys.argv[2]
    if mode == "launch":
        print(json.dumps(launch(address, json.loads(sys.argv[3]))), flush=True)
    elif mode == "pidreuse":
        pidreuse(address)
    elif mode == "race":
        op, path, rounds, ino = sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
        print(json.dumps(race(address, op, path, rounds, ino, sys.argv[7:])), flush=True)
    elif mode == "flip":
        flip(sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode}")
