"""Run functions in a private mount namespace of their own, for tests.

    with NamespaceWorker() as ns:
        ns.call(daemon_store.init, layout)     # runs in the worker's namespace
        ns.mounts_under(tree)                  # its mount table, read from outside

The worker is `unshare --mount --propagation private python3 ns_worker.py`: a
new mount namespace whose every mount is private, so nothing it mounts
reaches the host's mount table, and nothing is left when it exits (the
namespace, and every mount in it, goes with its last process).  Processes it
starts (`spawn`) are in that namespace too: a jail started there copies it.

Calls are pickled: the function by reference (it must be importable in the
worker: broker.* or this module), arguments and the result or the exception
by value.  Not a conftest: the tests import what they use from here.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class NamespaceWorker:
    def __init__(self):
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, __file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        self.pid = self.proc.pid
        assert self.call(os.getpid) == self.pid        # unshare execs: same process

    def call(self, fn, *args, **kwargs):
        pickle.dump((fn, args, kwargs), self.proc.stdin)
        self.proc.stdin.flush()
        ok, value = pickle.load(self.proc.stdout)
        if not ok:
            raise value
        return value

    def mountinfo(self) -> list[str]:
        with open(f"/proc/{self.pid}/mountinfo") as f:
            return f.read().splitlines()

    def mounts_under(self, path) -> list[str]:
        """The worker's mounts at or below path: 'mount point, root, options,
        propagation' (mount ids left out, so two snapshots compare)."""
        return mounts_under(path, f"/proc/{self.pid}/mountinfo")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> "NamespaceWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mounts_under(path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    path = str(path).rstrip("/")
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            point = fields[4].replace("\\040", " ")
            if point == path or point.startswith(path + "/"):
                propagation = " ".join(f.split(":")[0] for f in fields[6:]) or "private"
                out.append(f"{point} {fields[3]} {fields[5]} {propagation}")
    return sorted(out)


# -- run inside the worker --------------------------------------------------------

_children: dict[int, subprocess.Popen] = {}


def spawn(argv: list[str], stdout: str) -> int:
    """Start argv here (in the worker's namespace), output to the file stdout."""
    with open(stdout, "wb") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    _children[p.pid] = p
    return p.pid


def reap(pid: int, timeout: float = 20, kill: bool = False) -> int:
    p = _children.pop(pid)
    if kill:
        p.kill()
    return p.wait(timeout=timeout)


def children() -> list[int]:
    return list(_children)


def detach_all_under(path) -> None:
    """Detach every mount at or below path, deepest first (stacked ones too)."""
    from broker.jail import syscalls as sc
    path = str(path).rstrip("/")
    for _ in range(8):
        with open("/proc/self/mountinfo") as f:
            points = {line.split()[4].replace("\\040", " ") for line in f}
        points = [p for p in points if p == path or p.startswith(path + "/")]
        if not points:
            return
        for p in sorted(points, key=lambda p: p.count("/"), reverse=True):
            try:
                sc.umount2(p, sc.MNT_DETACH)
            except OSError:
                pass


def run(argv: list[str], **kw) -> tuple[int, str, str]:
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, **kw)
    return p.returncode, p.stdout, p.stderr


def _serve() -> None:
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                   # stray output must not corrupt the replies
    while True:
        try:
            fn, args, kwargs = pickle.load(requests)
        except EOFError:
            break
        try:
            reply = (True, fn(*args, **kwargs))
        except BaseException as e:      # noqa: BLE001 - handed back to the test
            reply = (False, e)
        try:
            data = pickle.dumps(reply)
        except Exception:               # an unpicklable result or exception
            data = pickle.dumps((False, RuntimeError(f"{type(reply[1]).__name__}: "
                                                     f"{reply[1]}")))
        replies.write(data)
        replies.flush()
    for p in _children.values():
        p.kill()
        p.wait()


if __name__ == "__main__":
    # One instance of this module: the functions the tests send by reference
    # (ns_worker.spawn, ...) and the loop share its state.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ns_worker
    ns_worker._serve()
