"""ChownDevice leases and the journal that makes them crash-safe.

A lease gives a device node to a caller's uid (owner := caller, mode := the
rule's lease mode, group unchanged) until it is released, the caller's bus
connection goes away, or the optional timeout passes; then the original
owner, group, mode and POSIX ACL are put back.  Everything is done through
the O_PATH fd the broker opened (chown/chmod/xattrs on /proc/self/fd/N), never
by path; the fd is held for the lease's life.

The journal (one JSON object per line, append-only) records the original
*before* anything is changed, and is fsync'd first:

  {"op": "take", "id": ..., "root": ..., "rel": ..., "dev": st_dev, "ino": ...,
   "rdev": ..., "kind": "c", "uid": ..., "gid": ..., "mode": ..., "acl": b64|null,
   "to_uid": ..., "to_mode": ..., "t": ..., "boot": boot id|null}
  {"op": "end", "id": ...}                  once the original is back

so after a crash every "take" without its "end" names a node that may still
be changed.  replay() (at start, before the broker is on the bus) finds each
again beneath its root without following symlinks and restores it if it is
still the same inode (dev, ino, rdev), also when it was moved (renamed)
beneath its root; a node that is gone or was recreated (unplugged,
replugged: udev made a fresh one) is left alone, and so is one on devtmpfs
when the take was recorded in an earlier boot.  A torn line is
a "take" whose write never completed, so nothing was changed for it; a
write that fails part way is cut off again, and a record never follows a
torn line on the same line.  A record that is not well formed is skipped
(logged), never the reason the others are not replayed.
The journal must be private to the broker (owned by its uid, not writable by
group or others, nor its directory): a forged "take" would make replay hand
a node to anyone.

One lease per device (by device number: a hard link or a second node of the
same device is the same device): a second ChownDevice gets Busy, whoever
holds it (the message says nothing about the holder).  A device whose
restore failed stays Busy until a retry, at its next ChownDevice or at
start, puts its original back.  A caller (uid) holds at
most `max_per_uid` leases.  Note that an fd a holder opened during the lease
stays usable after it: Linux has no revoke(); the lease decides who may
*open* the node.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import json
import logging
import os
import secrets
import stat as stat_mod
import time
from dataclasses import dataclass, field

from ..jail import syscalls
from . import safe_open
from .errors import DeviceError

log = logging.getLogger("privbrokerd")

ACL_XATTR = "system.posix_acl_access"
COMPACT_AFTER = 256          # journal lines before it is rewritten with pending takes only
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# File systems whose nodes do not outlive a boot (devtmpfs is tmpfs, or ramfs
# without CONFIG_TMPFS): a take recorded in an earlier boot changed a node
# that is gone, and the one there now (inode numbers repeat from boot to
# boot) got its owner and mode from this boot's udev, not from us.
FORGETS_AT_BOOT = frozenset({syscalls.TMPFS_MAGIC, syscalls.RAMFS_MAGIC})
MOVED_SEARCH_LIMIT = 100_000   # entries looked at for nodes moved under the dev root


class JournalError(Exception):
    pass


# -- the journal ----------------------------------------------------------------------

class Journal:
    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.lines = 0
        self.owner = os.geteuid()       # whose private file it is (hand_to)
        self.group = -1                 # and its group, once handed over
        self.lock_fd: int | None = None  # hold_exclusively(): kept for the process's life

    def _check_private(self, st: os.stat_result, what: str) -> None:
        if st.st_uid != self.owner or st.st_mode & 0o022:
            raise JournalError(f"{what} must be owned by uid {self.owner} and not writable "
                               f"by group or others (it is uid {st.st_uid}, mode "
                               f"{stat_mod.S_IMODE(st.st_mode):04o})")

    def hand_to(self, uid: int, gid: int) -> None:
        """Make the journal (its directory, and the file if there is one) the
        private property of `uid`: privbrokerd, as root, hands it to the
        front's user before replaying it, so that the front, which writes it,
        and every later start agree on whose it is.  Through fds opened
        without following symlinks, never by path."""
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        for path, flags in ((d, os.O_DIRECTORY), (self.path, 0)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                             | flags)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise JournalError(f"{path}: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                if not (stat_mod.S_ISDIR(st.st_mode) if flags else stat_mod.S_ISREG(st.st_mode)):
                    raise JournalError(f"{path} is not a {'directory' if flags else 'file'}")
                os.fchown(fd, uid, gid)
                os.fchmod(fd, stat_mod.S_IMODE(st.st_mode) & ~0o077)
            finally:
                os.close(fd)
        self.owner, self.group = uid, gid

    def hold_exclusively(self, wait_s: float = 2.0) -> int:
        """Lock `<journal>.lock` through the replay and, in the front (which
        inherits the fd; the launcher closes its copy), for as long as the
        journal is written; or raise JournalError.  Two brokers on one
        journal would undo each other: the second one's replay restores the
        first one's live leases, and its rewrite leaves the first appending
        to a deleted file, so those leases are lost at the next crash.
        Waits a little: the processes of a run that just ended may still be
        on their way out."""
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        lock = f"{self.path}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise JournalError(f"{lock}: {e.strerror}") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.lock_fd = fd
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise JournalError(f"another privbrokerd is using the journal {self.path} "
                                       f"(it holds {lock}): one broker per journal") from None
                time.sleep(0.05)
            except OSError as e:
                os.close(fd)
                raise JournalError(f"{lock}: {e.strerror}") from None

    def _open(self) -> int:
        if self.fd is None:
            d = os.path.dirname(self.path) or "."
            os.makedirs(d, mode=0o700, exist_ok=True)
            self._check_private(os.stat(d), f"the journal's directory {d}")
            created = not os.path.lexists(self.path)
            # O_RDWR: append() reads the last byte (a torn line before it)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                self._check_private(os.fstat(fd), f"the journal {self.path}")
                if created:
                    _fsync_dir(d)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        return self.fd

    def append(self, record: dict) -> None:
        """Write one line and fsync it; returns only once it is on disk.  A
        write that fails part way is cut off again: the next record must
        not be glued to half a line, which replay could not read (and a
        lease's take unread is a node never restored)."""
        fd = self._open()
        data = _line(record)
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            # what the cut could not remove (or a crash mid-write left):
            # the torn line stays a line of its own
            data = b"\n" + data
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise
        self.lines += 1

    def read(self) -> list[dict]:
        """Every complete record; a torn or garbled line is skipped (logged)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            d = os.path.dirname(self.path) or "."
            self._check_private(os.stat(d), f"the journal's directory {d}")
            self._check_private(os.fstat(fd), f"the journal {self.path}")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        finally:
            os.close(fd)
        out = []
        for n, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not _well_formed(rec):
                    raise ValueError("not a journal record")
                out.append(rec)
            except ValueError:
                log.warning("device lease journal %s: line %d unreadable (a torn write "
                            "is expected only on the last line); skipped", self.path, n)
        return out

    def rewrite(self, keep: list[dict]) -> None:
        """Replace the journal by exactly `keep`, atomically (tmp, fsync,
        rename, fsync dir).  The new file is the journal owner's: replay
        rewrites it as root at start, and a root-owned journal would make
        the front refuse every later lease (_check_private)."""
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = f"{self.path}.tmp"
        try:
            os.unlink(tmp)                  # a failed rewrite's, perhaps not the owner's
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            if os.geteuid() != self.owner:
                os.fchown(fd, self.owner, self.group)
            _write_all(fd, b"".join(_line(rec) for rec in keep))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass            # the next rewrite removes it; the error to report is the first
            raise
        os.close(fd)
        os.rename(tmp, self.path)
        _fsync_dir(d)
        self.close()
        self.lines = len(keep)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _line(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# What replay trusts a record to hold.  The journal is private, but a
# record a bug or a disk garbled must be skipped, not stop the replay of
# the others (or the broker's start) with a TypeError.
_ID_MAX = 2**32 - 2                  # uid_t/gid_t; -1 means "unchanged" to chown


def _int(value, low: int = 0, high: int = 2**64 - 1) -> bool:
    return value.__class__ is int and low <= value <= high


def _well_formed(rec) -> bool:
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        return False
    if rec.get("op") == "end":
        return True
    if rec.get("op") != "take":
        return False
    if not (isinstance(rec.get("root"), str) and rec["root"].startswith("/")
            and isinstance(rec.get("rel"), str) and rec.get("kind") in ("c", "b")
            and all(_int(rec.get(k)) for k in ("dev", "ino", "rdev"))
            and all(_int(rec.get(k), 0, _ID_MAX) for k in ("uid", "gid"))
            and _int(rec.get("mode"), 0, 0o7777)):
        return False
    if not isinstance(rec.get("boot"), (str, type(None))):
        return False
    if rec.get("acl") is None:
        return True
    try:
        base64.b64decode(rec["acl"], validate=True)
    except (TypeError, ValueError):
        return False
    return True


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pending(records: list[dict]) -> list[dict]:
    """The takes without an end, in journal order."""
    open_: dict[str, dict] = {}
    for rec in records:
        if rec["op"] == "take":
            open_[rec["id"]] = rec
        else:
            open_.pop(rec["id"], None)
    return list(open_.values())


# -- changing and restoring a node through its fd ------------------------------------

def read_acl(fd: int) -> bytes | None:
    try:
        return os.getxattr(safe_open.fd_path(fd), ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def restore(fd: int, uid: int, gid: int, mode: int, acl: bytes | None) -> None:
    """Owner, group, mode, then the ACL (which also sets the group bits its
    mask stands for, consistent with the original mode)."""
    p = safe_open.fd_path(fd)
    os.chown(p, uid, gid)
    os.chmod(p, stat_mod.S_IMODE(mode))
    if acl is not None:
        os.setxattr(p, ACL_XATTR, acl)
    else:
        try:
            os.removexattr(p, ACL_XATTR)       # one the holder may have added
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise


# -- leases ---------------------------------------------------------------------------

@dataclass
class Lease:
    lease_id: str
    owner: str                       # the caller's unique bus name
    uid: int                         # the caller's uid: the node's owner during the lease
    path: str
    node: safe_open.Node             # holds the O_PATH fd
    orig: dict                       # the journal's "take" record
    started: float = field(default_factory=time.time)
    timer: asyncio.TimerHandle | None = None
    restored: bool | None = None     # once ended: was the original put back

    @property
    def key(self) -> tuple[str, int]:
        return _device(self.node.kind, self.node.st.st_rdev)


def _device(kind: str, rdev: int) -> tuple[str, int]:
    """What one lease at a time is about: the device, not the node's inode.
    Two nodes of one device (a hard link, or a second mknod of its number)
    open the same device, so a lease on one makes the other Busy."""
    return kind, rdev


class LeaseManager:
    def __init__(self, journal_path: str, timeout_s: float = 0, max_per_uid: int = 8):
        self.journal = Journal(journal_path)
        self.timeout_s = timeout_s
        self.max_per_uid = max_per_uid
        self.by_id: dict[str, Lease] = {}
        self.by_node: dict[tuple[str, int], str] = {}   # _device -> lease id
        # takes whose restore failed: retried at the device's next take and
        # at start; until one succeeds the device is not leased again (its
        # "original" would be the old holder's ownership)
        self.stale: dict[str, dict] = {}
        self.boot = _boot_id()
        self._nodes_beneath: dict[str, dict] = {}   # replay: root -> _device_nodes(root)

    # -- taking -------------------------------------------------------------------
    def take(self, owner: str, uid: int, path: str, node: safe_open.Node, mode: int) -> Lease:
        """Journal the original, then chown/chmod through the fd.  The node
        (and its fd) belongs to the lease from here on, also on failure."""
        key = _device(node.kind, node.st.st_rdev)
        if key in self.by_node:
            node.close()
            raise DeviceError("Busy", f"{path!r} is already leased; try again once it is "
                                      f"released")
        if not self._restore_stale(key, node):
            node.close()
            raise DeviceError("Busy", f"{path!r} is still changed by an earlier lease the "
                                      f"broker could not undo; try again later")
        if sum(1 for lease in self.by_id.values() if lease.uid == uid) >= self.max_per_uid:
            node.close()
            raise DeviceError("LimitExceeded", f"uid {uid} already holds {self.max_per_uid} "
                                               f"device leases (the broker's limit)")
        try:
            st = os.fstat(node.fd)
            acl = read_acl(node.fd)
        except OSError as e:
            node.close()
            raise DeviceError("Failed", f"{path!r}: {e.strerror}") from None
        lease_id = secrets.token_hex(8)
        rec = {"op": "take", "id": lease_id, "root": node.root, "rel": node.rel,
               "dev": st.st_dev, "ino": st.st_ino, "rdev": st.st_rdev, "kind": node.kind,
               "uid": st.st_uid, "gid": st.st_gid, "mode": stat_mod.S_IMODE(st.st_mode),
               "acl": None if acl is None else base64.b64encode(acl).decode(),
               "to_uid": uid, "to_mode": mode, "t": round(time.time(), 3), "boot": self.boot}
        try:
            self.journal.append(rec)
        except (OSError, JournalError) as e:
            node.close()
            log.error("device lease journal %s: %s", self.journal.path, e)
            raise DeviceError("Failed", "the broker cannot record the lease; nothing was "
                                        "changed") from None
        p = safe_open.fd_path(node.fd)
        try:
            os.chmod(p, mode)        # first: no moment where the caller owns the old mode
            os.chown(p, uid, -1)
        except OSError as e:
            self._undo(lease_id, node, rec, f"take failed: {e.strerror}")
            raise DeviceError("Failed", f"{path!r}: {e.strerror}") from None
        lease = Lease(lease_id, owner, uid, path, node, rec)
        self.by_id[lease_id] = lease
        self.by_node[key] = lease_id
        if self.timeout_s > 0:
            lease.timer = asyncio.get_running_loop().call_later(
                self.timeout_s, self._expire, lease_id)
        return lease

    # -- ending -------------------------------------------------------------------
    def release(self, owner: str, lease_id: str) -> Lease:
        lease = self.by_id.get(lease_id)
        if lease is None or lease.owner != owner:
            # the same answer whether it never existed or is someone else's
            raise DeviceError("NotFound", f"no lease {lease_id!r} held by this connection")
        self.end(lease, "released")
        return lease

    def caller_gone(self, owner: str) -> list[Lease]:
        gone = [lease for lease in self.by_id.values() if lease.owner == owner]
        for lease in gone:
            self.end(lease, "the caller disconnected")
        return gone

    def _expire(self, lease_id: str) -> None:
        lease = self.by_id.get(lease_id)
        if lease is not None:
            lease.timer = None
            self.end(lease, f"timed out after {self.timeout_s:g}s")

    def end(self, lease: Lease, why: str) -> None:
        """Restore the original and journal the end (lease.restored says
        whether the original is back)."""
        self.by_id.pop(lease.lease_id, None)
        self.by_node.pop(lease.key, None)
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        lease.restored = self._undo(lease.lease_id, lease.node, lease.orig, why,
                                    path=lease.path, uid=lease.uid)

    def _restore_stale(self, key: tuple[str, int], node: safe_open.Node) -> bool:
        """Before a device is leased again: put back what a failed restore
        left on this very node.  False if that fails again.  A stale take
        about another inode of the device (since replaced) is left to
        replay, which restores only the inode it names."""
        st = node.st
        for lease_id, rec in list(self.stale.items()):
            if _device(rec["kind"], rec["rdev"]) != key or \
                    (rec["dev"], rec["ino"]) != (st.st_dev, st.st_ino):
                continue
            try:
                restore(node.fd, rec["uid"], rec["gid"], rec["mode"], _acl(rec))
            except OSError as e:
                log.error("device lease %s: restoring uid=%d gid=%d mode=%04o failed again "
                          "(%s)", lease_id, rec["uid"], rec["gid"], rec["mode"], e.strerror)
                return False
            del self.stale[lease_id]
            log.info("device lease %s: restored uid=%d gid=%d mode=%04o (at last)",
                     lease_id, rec["uid"], rec["gid"], rec["mode"])
            self._journal_end(lease_id)
        return True

    def _undo(self, lease_id: str, node: safe_open.Node, rec: dict, why: str,
              path: str | None = None, uid: int | None = None) -> bool:
        path = path or f"{rec['root'].rstrip('/')}/{rec['rel']}"
        try:
            restore(node.fd, rec["uid"], rec["gid"], rec["mode"], _acl(rec))
        except OSError as e:
            self.stale[lease_id] = rec
            log.error("device lease %s on %r: %s; restoring uid=%d gid=%d mode=%04o FAILED "
                      "(%s); the journal keeps it for the next start", lease_id, path, why,
                      rec["uid"], rec["gid"], rec["mode"], e.strerror)
            node.close()
            return False
        node.close()
        log.info("device lease %s on %r (uid %s): %s; restored uid=%d gid=%d mode=%04o%s",
                 lease_id, path, uid if uid is not None else rec.get("to_uid"), why,
                 rec["uid"], rec["gid"], rec["mode"], " acl" if rec.get("acl") else "")
        self._journal_end(lease_id)
        return True

    def _journal_end(self, lease_id: str) -> None:
        try:
            if not self.by_id and not self.stale:
                self.journal.rewrite([])             # nothing pending: start afresh
            elif self.journal.lines >= COMPACT_AFTER:
                self.journal.rewrite([lease.orig for lease in self.by_id.values()]
                                     + list(self.stale.values()))
            else:
                self.journal.append({"op": "end", "id": lease_id})
        except (OSError, JournalError) as e:
            # restored already; the worst case is a redundant restore at start
            log.error("device lease journal %s: %s", self.journal.path, e)

    # -- after a crash ----------------------------------------------------------------
    def replay(self, use_openat2: bool = True) -> list[str]:
        """Restore every node a previous run left changed.  Returns one line
        per lease, as logged."""
        try:
            records = self.journal.read()
        except (OSError, JournalError) as e:
            log.error("device lease journal %s: %s; nothing replayed", self.journal.path, e)
            return []
        lines, keep = [], []
        self._nodes_beneath = {}
        for rec in pending(records):
            try:
                line, retry = self._replay_one(rec, use_openat2)
            except Exception as e:     # a bug here must not leave the other nodes changed
                line, retry = (f"device lease {rec['id']}: replay failed ({e!r}); kept for "
                               f"the next start"), True
            if retry:
                log.warning("%s", line)
            else:
                log.info("%s", line)
            lines.append(line)
            if retry:
                keep.append(rec)
        self.stale = {rec["id"]: rec for rec in keep}
        try:
            if records or os.path.lexists(self.journal.path):
                self.journal.rewrite(keep)
        except (OSError, JournalError) as e:
            log.error("device lease journal %s: %s", self.journal.path, e)
        return lines

    def _replay_one(self, rec: dict, use_openat2: bool) -> tuple[str, bool]:
        # (Journal.read kept only well-formed records)
        lease_id, root, rel = rec["id"], rec["root"], rec["rel"]
        want = rec["dev"], rec["ino"], rec["rdev"]
        uid, gid, mode, acl = rec["uid"], rec["gid"], rec["mode"], _acl(rec)
        path = f"{root.rstrip('/')}/{rel}"
        head = f"device lease {lease_id} on {path!r} (left by a previous run)"
        try:
            try:
                fd = safe_open.open_beneath(root, rel, use_openat2)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                moved = self._moved(root, want)
                if moved is None:
                    return f"{head}: the node is gone; nothing to restore", False
                head += f", moved to {moved!r}"
                fd = safe_open.open_beneath(root, moved, use_openat2)
        except OSError as e:
            return f"{head}: cannot reach the node ({e.strerror}); kept for the next start", \
                e.errno not in (errno.ELOOP, errno.EXDEV)
        try:
            if rec.get("boot") not in (None, self.boot) and self.boot is not None \
                    and syscalls.fs_type(fd) in FORGETS_AT_BOOT:
                return (f"{head}: recorded before the last reboot, and the node it changed "
                        f"did not outlive it; left alone"), False
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_rdev) != want or not (
                    stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode)):
                return f"{head}: a different node is there now (recreated); left alone", False
            try:
                restore(fd, uid, gid, mode, acl)
            except OSError as e:
                return f"{head}: restore failed ({e.strerror}); kept for the next start", True
            return (f"{head}: restored uid={uid} gid={gid} mode={mode:04o}"
                    f"{' acl' if acl is not None else ''}", False)
        finally:
            os.close(fd)

    def _moved(self, root: str, want: tuple[int, int, int]) -> str | None:
        """Where beneath root the node (dev, ino, rdev) is now, if it was
        renamed: the root is walked once per replay, and only when a node is
        missing.  (The caller re-opens the name found and checks it again.)"""
        if root not in self._nodes_beneath:
            self._nodes_beneath[root] = _device_nodes(root)
        return self._nodes_beneath[root].get(want)

    def close_all(self, why: str = "the broker is stopping") -> None:
        for lease in list(self.by_id.values()):
            self.end(lease, why)
        self.journal.close()


def _boot_id() -> str | None:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _device_nodes(root: str) -> dict[tuple[int, int, int], str]:
    """(dev, ino, rdev) -> name below root, of the device nodes beneath root
    (no symlink followed; at most MOVED_SEARCH_LIMIT entries looked at)."""
    found: dict[tuple[int, int, int], str] = {}
    seen = 0
    for dirpath, _dirs, names in os.walk(root, onerror=lambda e: None):
        for name in names:
            seen += 1
            if seen > MOVED_SEARCH_LIMIT:
                return found
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.setdefault((st.st_dev, st.st_ino, st.st_rdev), rel)
    return found


def _acl(rec: dict) -> bytes | None:
    return None if rec.get("acl") is None else base64.b64decode(rec["acl"])
