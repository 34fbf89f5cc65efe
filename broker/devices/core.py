"""The device core: OpenPath, CheckPathAccess, ChownDevice, ReleaseDevice.

Nothing here knows D-Bus: the service hands in the caller (anything with
uid, gids and name, its unique bus name) and a path or lease id, and gets
back an fd, a bool or a lease id (with `info`, below), or a DeviceError.  For each request, in order:

  1. policy     - may this caller use this device operation at all
                  ([[grant]] devices = ["open", "chown"] in broker.toml);
  2. path       - beneath the dev root, canonical, no symlinks: an O_PATH fd
                  on a character or block device (safe_open).  The dev root
                  is opened at the first request and held: paths resolve
                  beneath that directory, so something mounted over the dev
                  root later is not seen before the broker restarts;
  3. record     - the udev record of the device number fstat gave (record);
  4. rules      - the chain's decision (chain), naming the deciding rule;
  5. action     - open (O_RDWR, O_RDONLY if the rule allows the fallback;
                  O_RDONLY or O_WRONLY when that is all the allowing rules
                  grant), then lockdown/detach as the verdict says; or the
                  lease (refused for a grant of less than read-write).

Each operation returns its result with `info`, a dict for the request's one
log line (the service's decision line, broker/logs.py): the verdict, the
deciding rule, what every rule answered that did not IGNORE, and what was
done; a DeviceError carries the same as `.info`.  The core logs nothing per
request itself (lease ends, which no request causes, are logged by leases.py).

Decisions are remembered when they read nothing that can change within a
device instance (record.py: the reader's `live` flag); the key is what they
did read: the path, the node's owner, group and mode, the device instance
(sysfs directory and its identity) and whether udev has initialized it.  A
USB device's decision reads its interfaces and their drivers, which change
without a new instance: it is remembered only while the kernel's uevents are
watched (uevents.py), and every remembered decision is forgotten as soon as
any uevent arrives.  Where it saw an interface free, or held through usbfs
(claims no uevent announces), it is used again only after a readlink of each
such interface's driver link gives what it gave (`rechecks`, record.py).
Decisions that read what the kernel does not announce (udev's database, live
attributes, a node's ACL: the reader's `unannounced`) are made afresh every
time.

Looking the instance up (the MAJ:MIN link, the directory, udev's database
entry) is skipped while uevents are watched and none has arrived since a
decision for the same node (path, inode, number, owner, group, mode) was
made about an initialized device: nothing the lookup reads can have changed
unannounced.  Another device gets a number only after the one before it was
removed, and the kernel queues "remove" on our socket before the number is
free; udevd deletes a database entry only on "remove" (it writes a new one
over the old on other events).  The socket is drained after the node is
opened and fstat'ed, so an event not yet in it is about something that
happened after the node was reached.  What stays unannounced is the other
direction, a device becoming initialized: those decisions always look.
"""
from __future__ import annotations

import errno
import os
import weakref

from . import chain, safe_open, usbdevfs
from .config import DevicesConfig
from .errors import DeviceError, denied
from .leases import LeaseManager, read_acl
from .record import UdevReader
from .uevents import UeventMonitor
from .rules import DETACH, LOCKDOWN, Device
from .rules.base import (FREE, HELD_BY_USBFS, READ, READ_WRITE, usb_interface_holder,
                         usb_interfaces)

DECISION_CACHE = 1024
GRANT_CACHE = 1024
# Subsystems whose drivers' open() looks at no flag but the access mode
# (hidraw, usbfs): O_NONBLOCK would change nothing, so they are opened
# without it and need no fcntl after.  Every other node is opened
# O_NONBLOCK (safe_open.reopen): a tty waits in open() for carrier, a sound
# device while it is busy, and the front must not wait with them.
OPEN_NEVER_WAITS = frozenset({"hidraw", "usb"})


class DeviceCore:
    def __init__(self, config: DevicesConfig, policy, use_openat2: bool = True,
                 ioctl=None):
        self.config = config
        self.policy = policy                 # .device_grant(uid, gids, op) or AccessDenied
        self.reader = UdevReader(config.sysfs, config.udev_data)
        self.leases = LeaseManager(config.journal, config.lease_timeout_s,
                                   config.max_leases_per_caller)
        self.use_openat2 = use_openat2
        self.ioctl = ioctl                   # None: fcntl.ioctl
        # key -> (decision, rechecks: the unannounced reads to repeat
        # before it is used again, record.py)
        self._decisions: dict[tuple, tuple[chain.Decision, tuple]] = {}
        # (path, node identity, number, mode, owner) -> (one of _decisions'
        # decisions, node.open_may_wait, its rechecks), while nothing was
        # announced (_quiet_since_decided)
        self._by_node: dict[tuple, tuple[chain.Decision, bool, tuple]] = {}
        self._grants: dict[tuple, bool] = {}  # (uid, gids, op) -> policy.device_grant's answer
        self.uevents: UeventMonitor | None = None   # opened on first use (in the front)
        self._root_fd = -1                   # the dev root, opened on first use (likewise)
        self._fd_dir = -1                    # our /proc/self/fd, likewise (_own_fd_dir)
        _cores.add(self)

    # -- the four operations -----------------------------------------------------------
    def check_path_access(self, caller, path: str) -> tuple[bool, dict]:
        """Would OpenPath(path) succeed for this caller (as far as the rules
        and the path go; the open itself is not tried)."""
        self._authorize(caller, ("open", "chown"))
        try:
            node, decision = self._evaluate(path)
        except DeviceError as e:
            if e.kind == "InvalidArgument":
                raise
            return False, {"answer": False, "why": f"{e.kind}: {e}"}
        node.close()
        ok = decision.allowed and self._granted(caller, "open")
        info = {"answer": ok, **_decided(decision)}
        if decision.allowed and not ok:
            info["why"] = "no grant to open"
        elif decision.reason:           # no rule was asked (no udev record): say so
            info["why"] = decision.reason
        return ok, info

    def open_path(self, caller, path: str) -> tuple[int, dict]:
        """An fd on the node, opened by the broker (the caller's to keep)."""
        self._authorize(caller, ("open",))
        node, decision = self._decide_or_refuse_for(caller, path)
        try:
            fd, how = self._open(node, decision, path)
        except DeviceError as e:
            e.info = _decided(decision)
            raise
        finally:
            node.close()
        return fd, {**decision.log_fields, "done": how}

    def chown_device(self, caller, path: str) -> tuple[str, dict]:
        """Give the node to the caller's uid for a lease; returns the lease id."""
        self._authorize(caller, ("chown",))
        node, decision = self._decide_or_refuse_for(caller, path)
        why_not = _why_no_lease(decision)
        if why_not:
            node.close()
            e = denied(f"{path!r}: {why_not}: use OpenPath")
            e.info = _decided(decision)
            raise e
        mode, before = decision.rule.lease_mode, node.st
        try:
            lease = self.leases.take(caller.name, caller.uid, path, node, mode)
        except DeviceError as e:
            e.info = _decided(decision)
            raise
        return lease.lease_id, {
            **_decided(decision), "lease": lease.lease_id,
            "done": f"uid {before.st_uid}->{caller.uid} mode "
                    f"{before.st_mode & 0o7777:04o}->{mode:04o}, journaled first"}

    def release_device(self, caller, lease_id: str) -> dict:
        if not isinstance(lease_id, str) or not 0 < len(lease_id) <= 64:
            raise DeviceError("InvalidArgument", "not a lease id")
        lease = self.leases.release(caller.name, lease_id)
        # The lease is over either way; a failed restore is retried (leases.py)
        return {"node": lease.path, "done": "restored" if lease.restored else
                "restore FAILED; retried at the device's next lease and at start"}

    # -- events --------------------------------------------------------------------------
    def caller_gone(self, name: str) -> None:
        self.leases.caller_gone(name)

    def replay(self) -> list[str]:
        return self.leases.replay(self.use_openat2)

    def close(self) -> None:
        self.leases.close_all()
        if self.uevents is not None:
            self.uevents.close()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        self._drop_fd_dir()

    # -- steps ---------------------------------------------------------------------------
    def _granted(self, caller, op: str) -> bool:
        # The policy is fixed for the broker's life, so its answer for a
        # (uid, groups, op) is too: asked once (a few callers, a few ops).
        key = (caller.uid, caller.gids, op)
        granted = self._grants.get(key)
        if granted is None:
            try:
                self.policy.device_grant(caller.uid, caller.gids, op)
                granted = True
            except Exception:
                granted = False
            _remember(self._grants, key, granted, GRANT_CACHE)
        return granted

    def _authorize(self, caller, ops: tuple[str, ...]) -> None:
        for op in ops:
            if self._granted(caller, op):
                return
        raise denied(f"no grant lets uid {caller.uid} use device operation "
                     f"{' or '.join(repr(o) for o in ops)} (grants are in the broker's policy "
                     f"file)")

    def _forget_if_sysfs_changed(self) -> None:
        """Before anything is read for a request: any uevent since the last
        one (or no way to know) makes every remembered decision stale."""
        if self.uevents is None:
            self.uevents = UeventMonitor()
        # Not watching (from the start): only decisions keyed by what they
        # read were kept, nothing to forget.  A socket that fails now was
        # watching: what it guarded goes.
        was_watching = self.uevents.watching
        if self.uevents.changed() and was_watching:
            if self._decisions:
                self._decisions.clear()
            if self._by_node:
                self._by_node.clear()

    def _dev_root_fd(self) -> int:
        """The dev root, held open from the first request on: every path is
        resolved beneath this one directory.  Not opened yet (or it could
        not be opened): -1, and the path is resolved from the root's name."""
        if self._root_fd < 0:
            try:
                self._root_fd = safe_open.open_root(self.config.dev_root)
            except OSError:
                pass            # open_node reports it, by the root's name
        return self._root_fd

    def _own_fd_dir(self) -> int:
        """This process's /proc/self/fd, held from the first open on (-1 if
        it cannot be opened: reopen then goes by the full path).  A forked
        child drops its inherited copy (_after_fork): it names the parent's
        fds."""
        if self._fd_dir < 0:
            try:
                self._fd_dir = safe_open.open_own_fd_dir()
            except OSError:
                pass
        return self._fd_dir

    def _drop_fd_dir(self) -> None:
        if self._fd_dir >= 0:
            os.close(self._fd_dir)
            self._fd_dir = -1

    def _may_remember(self) -> bool:
        """The decision just made read only what cannot change within the
        device instance, or else only what the kernel announces, and we are
        listening."""
        reader = self.reader
        return not reader.live or (not reader.unannounced and self.uevents.watching)

    def _evaluate(self, path: str):
        node = safe_open.open_node(self.config.dev_root, path, self.use_openat2,
                                   self._dev_root_fd())
        try:
            st = node.st
            # Drained after the fstat: an event not in the socket yet is
            # about a change made after the node was opened (module doc).
            self._forget_if_sysfs_changed()
            node_key = (path, st.st_dev, st.st_ino, st.st_rdev, st.st_mode, st.st_uid,
                        st.st_gid)
            remembered = self._by_node.get(node_key)
            if remembered is not None and _still_so(remembered[2]):
                decision, node.open_may_wait, _ = remembered
                return node, decision
            record = self.reader.for_stat(st)
            if record is None:
                return node, chain.no_record(path)
            node.open_may_wait = record.subsystem not in OPEN_NEVER_WAITS
            key = (path, st.st_rdev, st.st_mode, st.st_uid, st.st_gid, record.syspath,
                   record.ident, record.is_initialized)
            entry = self._decisions.get(key)          # (decision, its rechecks)
            if entry is None or not _still_so(entry[1]):
                self.reader.live = self.reader.unannounced = False
                self.reader.rechecks = []
                decision = chain.decide(self.config.rules, Device(
                    path, st, record, node_acl=lambda: self._node_acl(node)))
                entry = (decision, tuple(self.reader.rechecks))
                if self._may_remember():
                    _remember(self._decisions, key, entry)
            decision, rechecks = entry
            if self._decisions.get(key) is entry and self._quiet_since_decided(record):
                _remember(self._by_node, node_key, (decision, node.open_may_wait, rechecks))
            return node, decision
        except BaseException:
            node.close()
            raise

    def _node_acl(self, node) -> bytes | None:
        """The node's access ACL, for a rule that asks (allow_group).  An ACL
        changes with no uevent, and its group entry with no change of mode
        (setfacl, logind's uaccess): a decision that read it is made afresh
        every time."""
        self.reader.live = self.reader.unannounced = True
        try:
            return read_acl(node.fd)
        except OSError:
            return b""          # unreadable: grants nothing (acl_group_obj)

    def _quiet_since_decided(self, record) -> bool:
        """Until the next uevent, may requests for this node skip sysfs and
        udev's database?  Only while uevents are watched (every way the
        node's device can change is then announced) and once udev has
        initialized the device (an initialized device stays so until it is
        removed; the other way round changes with no kernel event)."""
        return self.uevents.watching and record.is_initialized

    def _decide_or_refuse(self, path: str):
        node, decision = self._evaluate(path)
        if not decision.allowed:
            node.close()
            e = denied(f"{path!r}: denied by {decision.explanation}")
            e.info = _decided(decision)
            raise e
        return node, decision

    def _decide_or_refuse_for(self, caller, path: str):
        """_decide_or_refuse, but a caller learns why a path was refused only
        as far as it could have looked the path up itself.  The front
        resolves with CAP_DAC_OVERRIDE: "is a regular file", "is a FIFO",
        "no such device node" would otherwise tell anyone with an open
        grant which names exist, and what they are, in a directory it may
        not search (another user's 0700 directory in /dev/shm).  Its answer
        is then NotFound; the log line keeps the truth ("hidden")."""
        try:
            return self._decide_or_refuse(path)
        except DeviceError as e:
            if self._caller_may_search(caller, path):
                raise
            hidden = DeviceError("NotFound", f"{path!r}: no such device node")
            hidden.info = {**e.info, "hidden": f"{e.kind}: {e}"}
            raise hidden from None

    def _caller_may_search(self, caller, path: str) -> bool:
        try:
            rel = safe_open.check_path(self.config.dev_root, path)
        except DeviceError:
            return True         # refused for the string alone: nothing was looked up
        root_fd = self._dev_root_fd()
        if caller.uid == 0 or root_fd < 0:
            return True
        return safe_open.searchable_by(root_fd, rel, caller.uid, caller.gids)

    def _open(self, node, decision, path: str) -> tuple[int, str]:
        if decision.access != READ_WRITE:
            return self._open_restricted(node, decision, path)
        try:
            fd, how = safe_open.reopen(node.fd, os.O_RDWR, self._own_fd_dir(),
                                       node.open_may_wait), "opened O_RDWR"
        except OSError as e:
            if not (decision.rule.readonly_fallback
                    and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                raise DeviceError("Failed", f"{path!r}: open: {e.strerror}") from None
            try:
                fd, how = safe_open.reopen(node.fd, os.O_RDONLY, self._own_fd_dir(),
                                           node.open_may_wait), \
                    f"O_RDWR refused ({e.strerror}), opened O_RDONLY"
            except OSError as e2:
                raise DeviceError("Failed", f"{path!r}: open: {e2.strerror}") from None
        if decision.verdict in (LOCKDOWN, DETACH):
            try:
                how += "; " + self._usb_restrict(fd, node, decision)
            except BaseException as e:
                os.close(fd)
                if isinstance(e, DeviceError):
                    raise
                if isinstance(e, OSError):
                    raise DeviceError("Failed", f"{path!r}: {decision.verdict.value}: "
                                                f"{e.strerror}; the fd was not handed out") \
                        from None
                raise
        return fd, how

    def _open_restricted(self, node, decision, path: str) -> tuple[int, str]:
        """The allowing rules grant read only or write only (allow_group on a
        node whose group may not do both): opened so, and nothing more."""
        flags = os.O_RDONLY if decision.access == READ else os.O_WRONLY
        try:
            fd = safe_open.reopen(node.fd, flags, self._own_fd_dir(), node.open_may_wait)
        except OSError as e:
            raise DeviceError("Failed", f"{path!r}: open: {e.strerror}") from None
        # never with lockdown or detach: the chain denies those (chain.py)
        return fd, (f"opened {'O_RDONLY' if flags == os.O_RDONLY else 'O_WRONLY'} "
                    f"({decision.log_fields['access']}, as the allowing rules grant)")

    def _usb_restrict(self, fd: int, node, decision) -> str:
        record = self.reader.for_stat(node.st)
        if record is None or record.subsystem != "usb" or record.devtype != "usb_device":
            raise DeviceError("Failed", f"{decision.verdict.value} applies to USB device "
                                        f"nodes only; the fd was not handed out")
        # Lockdown lets the fd claim only free interfaces; detach takes only
        # kernel drivers' (another program's usbfs claim is left alone).
        free, kernel = [], []
        for iface in usb_interfaces(record):
            number = iface.attribute_hex("bInterfaceNumber")
            holder = usb_interface_holder(iface)
            if number is not None and holder != HELD_BY_USBFS:
                (free if holder == FREE else kernel).append(number)
        kw = {} if self.ioctl is None else {"ioctl": self.ioctl}
        if decision.verdict is LOCKDOWN:
            mask = usbdevfs.lockdown(fd, free, **kw)
            return f"USBDEVFS_DROP_PRIVILEGES mask={mask:#x}"
        try:
            done = usbdevfs.detach(fd, kernel, **kw)
        except usbdevfs.DetachFailed as e:
            # the drivers detached before the failure do not come back by
            # themselves (usbdevfs.py): the refusal and its log line say so
            left = (f"interfaces {e.detached} stay without their kernel driver until it is "
                    f"probed again" if e.detached else "no driver was detached")
            raise DeviceError("Failed", f"USBDEVFS_DISCONNECT_CLAIM of interface {e.interface}: "
                                        f"{e.cause.strerror}; the fd was not handed out; "
                                        f"{left}") from None
        return f"USBDEVFS_DISCONNECT_CLAIM interfaces={done}"


# Every core, so that a forked child drops what names its parent's fds.
_cores: "weakref.WeakSet[DeviceCore]" = weakref.WeakSet()


def _after_fork() -> None:
    for core in list(_cores):
        core._drop_fd_dir()


os.register_at_fork(after_in_child=_after_fork)


def _why_no_lease(decision: chain.Decision) -> str:
    """A lease hands over the node itself.  Terms that only the broker's own
    fd can keep refuse it (the empty string: none)."""
    if decision.verdict in (LOCKDOWN, DETACH):
        return (f"allowed only {decision.verdict.value} (rule {decision.rule_name!r}), "
                f"which needs the broker's own fd")
    if decision.access != READ_WRITE:
        # the lease makes the caller the node's owner, and an owner may chmod
        return (f"allowed {decision.log_fields['access']} (rule {decision.rule_name!r}), "
                f"which a lease could not hold the caller to")
    return ""


def _still_so(rechecks) -> bool:
    """Do the unannounced reads a remembered decision made (usbfs: a USB
    interface free, or held through usbfs; record.py) still give the same
    answers?  One readlink each."""
    return all(rec.driver_now() == seen for rec, seen in rechecks)


def _remember(cache: dict, key: tuple, value, limit: int = DECISION_CACHE) -> None:
    """Bounded: a full cache starts over (re-deciding is cheap; a table a
    caller could grow without end is not)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _decided(decision: chain.Decision) -> dict:
    """What a log line says about the rules' decision (a copy: callers add
    to it)."""
    return dict(decision.log_fields)
