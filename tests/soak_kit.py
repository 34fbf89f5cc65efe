"""What the soak, fault and confused-deputy tests observe about a running
privbrokerd, from the outside (/proc, /sys/fs/cgroup, the bus), and a raw
D-Bus client for the callers that misbehave on purpose.

The broker's processes are found generically, so these tests hold whatever
shape privilege separation gives the broker (issue #11): the *front* is the
process the bus says owns org.privbroker.Broker1 (GetConnectionUnixProcessID);
the broker's processes are the privbrokerd process we started, the front,
and every descendant of either that is not inside a jail cgroup
(privbroker-<jail id>).  Jails are never counted as the broker's own.

Not a conftest: the tests import what they use from here.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BUS_NAME = "org.privbroker.Broker1"
OBJ = "/org/privbroker/Broker1"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# the v1 hierarchies jail cgroups use (broker/jail/cgroups.py: _V1_ALWAYS, cpu, devices)
JAIL_HIERARCHIES = ("freezer", "pids", "memory", "cpuacct", "cpu", "devices")


# -- processes -----------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def all_processes() -> dict[int, tuple[str, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                out[int(entry)] = st
    return out


def descendants(roots: set[int], procs: dict[int, tuple[str, int]] | None = None) -> set[int]:
    procs = all_processes() if procs is None else procs
    found = set(r for r in roots if r in procs)
    grew = True
    while grew:
        more = {pid for pid, (_, ppid) in procs.items() if ppid in found} - found
        grew = bool(more)
        found |= more
    return found


def in_jail_cgroup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/privbroker-" in f.read()
    except OSError:
        return False


def bus_owner_pid(bus) -> int:
    """The front: the pid the bus reports for the owner of the broker's name."""
    r = subprocess.run(["busctl", f"--address={bus.address}", "call", "org.freedesktop.DBus",
                        "/org/freedesktop/DBus", "org.freedesktop.DBus",
                        "GetConnectionUnixProcessID", "s", BUS_NAME],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[1])


def broker_processes(root_pid: int, front: int) -> set[int]:
    procs = all_processes()
    return {p for p in descendants({root_pid, front}, procs) if not in_jail_cgroup(p)}


def launcher_pids(root_pid: int, front: int) -> set[int]:
    """The broker's processes other than the front and the privbrokerd
    process itself (today: the launcher, the front's child)."""
    return broker_processes(root_pid, front) - {root_pid, front}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            pass
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def mounts_of(pid: int) -> list[str]:
    """The mount table of pid's mount namespace (mount ids dropped)."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f)


@dataclass
class Snapshot:
    """What the broker holds at one moment."""
    front: int
    fds: dict[int, int]                     # broker process -> open fds
    rss_front_kib: int
    zombies: list[int]                      # zombie children of broker processes
    mounts: dict[int, list[str]] = field(default_factory=dict)   # mount ns -> its table

    @classmethod
    def take(cls, root_pid: int, front: int) -> "Snapshot":
        procs = all_processes()
        mine = {p for p in descendants({root_pid, front}, procs) if not in_jail_cgroup(p)}
        zombies = [p for p, (state, ppid) in procs.items() if state == "Z" and ppid in mine]
        live = {p for p in mine if procs[p][0] != "Z"}
        namespaces = {}
        for p in live:
            namespaces.setdefault(os.stat(f"/proc/{p}/ns/mnt").st_ino, p)
        return cls(front, {p: fd_count(p) for p in live}, rss_kib(front), zombies,
                   {ns: mounts_of(p) for ns, p in namespaces.items()})

    def describe(self) -> str:
        return (f"front {self.front} rss {self.rss_front_kib} KiB; fds "
                + ", ".join(f"{p}:{n}" for p, n in sorted(self.fds.items()))
                + f"; zombies {len(self.zombies)}; mounts "
                + ", ".join(str(len(t)) for t in self.mounts.values()))


def wait_for(pred, timeout: float = 10, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# -- jail cgroups ------------------------------------------------------------------

def jail_cgroup_dirs(under: list[Path] | None = None, ids: set[str] | None = None,
                     seeds: bool = False) -> list[Path]:
    """Directories named privbroker-<id> (every id, or those in `ids`) in the
    v1 jail hierarchies, or beneath the given directories.  The launcher's
    seed for its next launch (privbroker-seed-*, broker/jail/launch.py) is no
    jail: left out unless `seeds`."""
    tops = under if under is not None else [CGROUP_ROOT / h for h in JAIL_HIERARCHIES]
    found = []
    for top in tops:
        for dirpath, dirnames, _ in os.walk(top):
            for d in list(dirnames):
                if d.startswith("privbroker-seed-") and not seeds:
                    continue
                if d.startswith("privbroker-") and (ids is None or d[len("privbroker-"):] in ids):
                    found.append(Path(dirpath) / d)
                    dirnames.remove(d)
    return found


def cgroup_members(d: Path) -> list[int]:
    pids = []
    for dirpath, _, files in os.walk(d):
        if "cgroup.procs" in files:
            try:
                pids += [int(x) for x in (Path(dirpath) / "cgroup.procs").read_text().split()]
            except OSError:
                pass
    return pids


class BrokerCgroup:
    """A cgroup of its own, in each v1 hierarchy jails use, for one broker
    under test: the broker's jail cgroups are made beneath it (the launcher's
    own cgroup is their parent), so "leftover jail cgroups" means exactly
    subdirectories here, whatever other tests run on the machine; and
    pids.max here bounds the broker's pid space."""

    def __init__(self, tag: str):
        self.dirs: dict[str, Path] = {}
        for h in JAIL_HIERARCHIES:
            own = _own_cgroup(h)
            if own is None:
                continue
            d = CGROUP_ROOT / h / own.lstrip("/") / f"soak-{tag}"
            d.mkdir(exist_ok=True)
            self.dirs[h] = d

    def wrap(self, argv: list[str]) -> list[str]:
        """argv, started inside this cgroup (a shell joins it, then execs)."""
        joins = " ".join(f'echo $$ > "{d}/cgroup.procs";' for d in self.dirs.values())
        return ["/bin/sh", "-c", f'{joins} exec "$@"', "sh", *argv]

    def jail_dirs(self, seeds: bool = False) -> list[Path]:
        return jail_cgroup_dirs(list(self.dirs.values()), seeds=seeds)

    def set_pids_max(self, value: int | str) -> None:
        (self.dirs["pids"] / "pids.max").write_text(str(value))

    def pids_current(self) -> int:
        return int((self.dirs["pids"] / "pids.current").read_text())

    def remove(self) -> None:
        for d in self.dirs.values():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                d.rmdir()
            except OSError:
                pass


def _own_cgroup(hierarchy: str) -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy in controllers.split(","):
                return path
    return None


# -- a raw D-Bus client ------------------------------------------------------------

class RawBus:
    """A blocking D-Bus connection on a plain socket: EXTERNAL auth, unix fds,
    Hello; then messages marshalled and read with dbus-fast's own code.  For
    callers that do what a library would not: send and vanish, hand the
    socket to another process, send an fd that is not open."""

    def __init__(self, address: str):
        path = address.split("unix:path=", 1)[1].split(",", 1)[0]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode()
                          + b"\r\n")
        self._expect(b"OK")
        self.sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
        self._expect(b"AGREE_UNIX_FD")
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0
        from dbus_fast._private.unmarshaller import Unmarshaller
        self.reader = Unmarshaller(sock=self.sock, negotiate_unix_fd=True)
        self.name = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus", "Hello").body[0]

    def _expect(self, word: bytes) -> None:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("the bus closed the connection during auth")
            line += chunk
        if not line.startswith(word):
            raise ConnectionError(f"auth: {line!r}")

    def send(self, dest, path, iface, member, signature="", body=(), fds=()) -> int:
        from dbus_fast import Message
        self.serial += 1
        msg = Message(destination=dest, path=path, interface=iface, member=member,
                      signature=signature, body=list(body), serial=self.serial,
                      unix_fds=list(fds))
        data = msg._marshall(True)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        return self.serial

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply_to(self, serial: int, timeout: float = 30):
        self.sock.settimeout(timeout)
        while True:
            msg = None
            while msg is None:
                msg = self.reader.unmarshall()
            if msg.reply_serial == serial:
                return msg
            for fd in msg.unix_fds:
                os.close(fd)

    def call(self, dest, path, iface, member, signature="", body=(), fds=(), timeout=30):
        return self.reply_to(self.send(dest, path, iface, member, signature, body, fds),
                             timeout)

    def broker(self, member, signature="", body=(), fds=(), iface=BUS_NAME):
        return self.send(BUS_NAME, OBJ, iface, member, signature, body, fds)

    def close(self) -> None:
        self.sock.close()
