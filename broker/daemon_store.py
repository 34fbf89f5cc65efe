"""Daemon-store mounts: a user's per-daemon directories, bound where daemons
that run in their own mount namespace see them come and go.

The mechanism is ChromeOS cryptohome's ("Securely mounting cryptohome daemon
store folders" in the ChromiumOS sandboxing guide).  With the default Layout:

    /etc/daemon-store/<daemon>                  template: owner, group, mode
    /run/daemon-store/<daemon>                  a shared mount point (init)
    /run/daemon-store/<daemon>/<user_hash>      <- bind of the user's store:
    /home/.shadow/<user_hash>/mount/root/<daemon>
    /run/daemon-store-cache/<daemon>            a shared mount point (init)
    /run/daemon-store-cache/<daemon>/<user_hash> <- bind of the user's cache:
    /home/.shadow/<user_hash>/mount/root/.cache/<daemon>

A daemon started with `-Kslave` and a recursive bind of
/run/daemon-store/<daemon> (minijail: `mount = /run/daemon-store/X,
/run/daemon-store/X,none,MS_BIND|MS_REC`) holds a slave of that shared
mount, so the binds made here later appear in its namespace, and go away
from it when they are unmounted.

One template serves both variants (as in cryptohome); a request mounts or
unmounts the pair, and a mount request that fails leaves neither.

Entry points, all privileged, none of them knows D-Bus:

    init(layout)                 every template's run dirs made shared mounts
    mount(layout, request)       -> the variants newly mounted ([] if both were)
    unmount(layout, request)     -> the variants unmounted ([] if neither was)

`Request` is the fixed-shape request the launcher receives (broker/wire.py)
and re-validates with `check_request` against its own Layout, whoever sent
it.  `DaemonStoreFront` at the end is the front's side (policy, early
validation, then the launcher).

How the paths are walked (why a symlink planted in a user's tree cannot
redirect the mount or the chown):
  * The configured roots (templates_dir, run_dir, cache_run_dir, home_root)
    are the administrator's and are opened as given.
  * Everything below them is opened one component at a time with
    openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) from the previous
    component's fd, and RESOLVE_NO_XDEV everywhere except where a mount is
    expected: at `mount` (the user's vault is mounted there), at the run
    dirs' <daemon> (the shared mount) and <user_hash> (to see a bind there).
  * Each directory of the user's tree above the store must be owned by root
    and not writable by group or others unless sticky; the store itself is
    created if missing (mode 0700), must then be owned by root or by the
    template's owner, and gets the template's owner, group and mode through
    fchown/fchmod on its fd.
  * The bind is made from fds: open_tree(OPEN_TREE_CLONE) on the store's fd
    gives a detached mount, mount_setattr gives it MS_NOSUID|MS_NODEV|
    MS_NOEXEC while nobody can see it, and move_mount attaches it onto the
    target's fd.  There is no moment when the mount exists without those
    flags and no path is resolved twice.
  * Unmounting goes through /proc/self/fd/<run dir fd>/<user_hash> with
    UMOUNT_NOFOLLOW: the parent is pinned by its fd and the last component
    is never a symlink.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import ExitStack
from dataclasses import dataclass

from .jail import syscalls as sc

DAEMON_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
DEFAULT_USER_HASH = "[0-9a-f]{40}"
SHADOW = ".shadow"

INVALID, NOT_FOUND, ACCESS_DENIED, FAILED = ("InvalidArgument", "NotFound", "AccessDenied",
                                             "Failed")
KINDS = (INVALID, NOT_FOUND, ACCESS_DENIED, FAILED)

STORE_MODE_NEW = 0o700          # a store created here, until it gets the template's
RUN_DIR_MODE = 0o755            # <run_dir>, <run_dir>/<daemon>, .../<user_hash>
MOUNT_ATTRS = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
MAX_STACKED = 8                 # unmount: layers peeled at one target, at most

_BENEATH = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS
_OPEN_TREE = sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_EMPTY_PATH
_MOVE = sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH


class DaemonStoreError(Exception):
    """A refusal or a failure; `kind` is the D-Bus error kind (KINDS)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):           # picklable (tests run the core in a worker)
        return (type(self), (self.kind, str(self)))


@dataclass(frozen=True)
class Layout:
    """Where everything is.  Every path is absolute; the defaults are
    ChromeOS's.  From the [daemon_store] section of broker.toml."""
    templates_dir: str = "/etc/daemon-store"
    run_dir: str = "/run/daemon-store"
    cache_run_dir: str = "/run/daemon-store-cache"
    home_root: str = "/home"            # stores are under <home_root>/.shadow/
    user_hash_pattern: str = DEFAULT_USER_HASH

    def __post_init__(self):
        for name in ("templates_dir", "run_dir", "cache_run_dir", "home_root"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.startswith("/") or "\0" in v:
                raise ValueError(f"{name} must be an absolute path, not {v!r}")
        if os.path.normpath(self.run_dir) == os.path.normpath(self.cache_run_dir):
            raise ValueError("run_dir and cache_run_dir must differ")
        if not isinstance(self.user_hash_pattern, str):
            raise ValueError("user_hash_pattern must be a regular expression string")
        try:
            re.compile(self.user_hash_pattern)
        except re.error as e:
            raise ValueError(f"user_hash_pattern {self.user_hash_pattern!r}: {e}") from None


@dataclass(frozen=True)
class Request:
    """What the launcher receives: exactly these fields (broker/wire.py)."""
    daemon: str
    user_hash: str
    lazy: bool = False          # unmount: detach even if busy (MNT_DETACH)


@dataclass(frozen=True)
class _Variant:
    name: str                   # "store" or "cache"
    run_attr: str               # the Layout field of its run dir
    under_mount: tuple[str, ...]  # the directories between `mount` and <daemon>


VARIANTS = (_Variant("store", "run_dir", ("root",)),
            _Variant("cache", "cache_run_dir", ("root", ".cache")))


# -- validation (pure) ---------------------------------------------------------

def _plain_name(s: str) -> bool:
    return (isinstance(s, str) and 0 < len(s.encode()) <= 255 and "/" not in s
            and "\0" not in s and s not in (".", ".."))


def check_request(layout: Layout, req: Request) -> None:
    """The names alone, before anything on disk is looked at."""
    if not isinstance(req.daemon, str) or not DAEMON_NAME.fullmatch(req.daemon) \
            or not _plain_name(req.daemon):
        raise DaemonStoreError(INVALID, f"daemon name {req.daemon!r} is not a plain name "
                               f"(letters, digits, '_', '.', '+', '-'; not starting with "
                               f"'.'; at most 64)")
    if not isinstance(req.user_hash, str) or not _plain_name(req.user_hash) \
            or not re.fullmatch(layout.user_hash_pattern, req.user_hash):
        raise DaemonStoreError(INVALID, f"user hash {req.user_hash!r} does not have the form "
                               f"this system uses ({layout.user_hash_pattern})")
    if type(req.lazy) is not bool:
        raise DaemonStoreError(INVALID, "lazy must be a boolean")


# -- small fd helpers ------------------------------------------------------------

def mount_id(fd: int) -> int:
    """The id of the mount an fd is on (as in /proc/self/mountinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOSYS, "no mnt_id in fdinfo")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    options: str
    optional: tuple[str, ...]     # e.g. ("shared:3",), ("master:2",)

    @property
    def shared(self) -> bool:
        return any(o.startswith("shared:") for o in self.optional)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo(path: str = "/proc/self/mountinfo") -> dict[int, MountEntry]:
    out = {}
    with open(path) as f:
        for line in f:
            left, _, _ = line.partition(" - ")
            fields = left.split()
            e = MountEntry(int(fields[0]), int(fields[1]), _unescape(fields[3]),
                           _unescape(fields[4]), fields[5], tuple(fields[6:]))
            out[e.mount_id] = e
    return out


def _what(e: OSError, path: str) -> DaemonStoreError:
    """An OSError met while walking a path, as a refusal that names it."""
    if e.errno == errno.ELOOP:
        return DaemonStoreError(FAILED, f"{path} is a symbolic link; refused (nothing is "
                                f"followed below the configured roots)")
    if e.errno == errno.EXDEV:
        return DaemonStoreError(FAILED, f"{path} is a mount point or leaves its parent; "
                                f"refused")
    if e.errno == errno.ENOTDIR:
        return DaemonStoreError(FAILED, f"{path} is not a directory; refused")
    return DaemonStoreError(FAILED, f"{path}: {e.strerror}")


class _Walk:
    """Directories opened one component at a time from an anchor, every fd
    kept (closed by the ExitStack) and every path remembered for messages."""

    def __init__(self, stack: ExitStack):
        self.stack = stack

    def fd(self, fd: int) -> int:
        self.stack.callback(os.close, fd)
        return fd

    def anchor(self, path: str) -> int:
        """A configured root: the administrator's path, opened as given.
        ENOENT is raised as FileNotFoundError for the caller to name."""
        try:
            return self.fd(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            raise
        except OSError as e:
            raise DaemonStoreError(FAILED, f"{path}: {e.strerror}") from None

    def child(self, dirfd: int, name: str, path: str, *, cross: bool = False,
              read: bool = False, create: int | None = None) -> tuple[int, bool]:
        """(fd of dirfd/name, whether this call made it).  ENOENT is raised
        as FileNotFoundError unless `create` is a mode: then the directory
        is made (owned by us, with exactly that mode, whatever the umask)
        and opened the same way."""
        resolve = _BENEATH | (0 if cross else sc.RESOLVE_NO_XDEV)
        flags = (os.O_RDONLY if read else os.O_PATH) | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            return self.fd(sc.openat2(dirfd, name, flags, 0, resolve)), False
        except FileNotFoundError:
            if create is None:
                raise
        except OSError as e:
            raise _what(e, path) from None
        try:
            os.mkdir(name, create, dir_fd=dirfd)
            created = True
        except FileExistsError:
            created = False         # made meanwhile by someone else: checked as found
        except OSError as e:
            raise _what(e, path) from None
        if created:                 # O_RDONLY: fchmod needs a real fd
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = self.fd(sc.openat2(dirfd, name, flags, 0, resolve))
        except OSError as e:
            raise _what(e, path) from None
        if created:
            os.fchmod(fd, create)
        return fd, created


def _check_dir(fd: int, path: str, owners: set[int], *, private: bool = True) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonStoreError(FAILED, f"{path} is not a directory; refused")
    if st.st_uid not in owners:
        raise DaemonStoreError(FAILED, f"{path} is owned by uid {st.st_uid}, expected "
                               f"{' or '.join(str(o) for o in sorted(owners))}; refused")
    if private and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise DaemonStoreError(FAILED, f"{path} is writable by group or others and not "
                               f"sticky (mode {stat.S_IMODE(st.st_mode):04o}); refused")
    return st


# -- the steps ----------------------------------------------------------------------

def _template(layout: Layout, daemon: str, w: _Walk) -> os.stat_result:
    path = os.path.join(layout.templates_dir, daemon)
    try:
        base = w.anchor(layout.templates_dir)
        fd, _ = w.child(base, daemon, path)
    except FileNotFoundError:
        raise DaemonStoreError(NOT_FOUND, f"no daemon store template {path} (a daemon has "
                               f"a store only if its package installs that "
                               f"directory)") from None
    except DaemonStoreError as e:
        raise DaemonStoreError(NOT_FOUND, f"no usable daemon store template: {e}") from None
    return os.fstat(fd)


def _source(layout: Layout, req: Request, variant: _Variant, tmpl: os.stat_result,
            w: _Walk) -> int:
    """The user's store for this variant, made if missing, with the
    template's owner, group and mode: an O_RDONLY fd on it."""
    me = {os.geteuid()}
    path = layout.home_root
    try:
        fd = w.anchor(layout.home_root)
    except FileNotFoundError:
        raise DaemonStoreError(NOT_FOUND, f"home root {path} does not exist") from None
    levels = [(SHADOW, False, False), (req.user_hash, False, False), ("mount", True, False)]
    levels += [(name, False, name == ".cache") for name in variant.under_mount]
    for name, cross, create in levels:
        path = os.path.join(path, name)
        try:
            fd, _ = w.child(fd, name, path, cross=cross, create=0o700 if create else None)
        except FileNotFoundError:
            raise DaemonStoreError(NOT_FOUND, f"{path} does not exist: the user's home for "
                                   f"hash {req.user_hash} is not mounted") from None
        _check_dir(fd, path, me)
    path = os.path.join(path, req.daemon)
    leaf, created = w.child(fd, req.daemon, path, read=True, create=STORE_MODE_NEW)
    if not created:
        _check_dir(leaf, path, me | {tmpl.st_uid}, private=False)
    os.fchown(leaf, tmpl.st_uid, tmpl.st_gid)
    os.fchmod(leaf, stat.S_IMODE(tmpl.st_mode))
    return leaf


def _run_dir(layout: Layout, variant: _Variant, daemon: str, w: _Walk,
             undo: list) -> int:
    """<run dir>/<daemon> as a shared mount point (bound onto itself first
    if it is not a mount point): an O_PATH fd on that mount's root."""
    base_path = getattr(layout, variant.run_attr)
    path = os.path.join(base_path, daemon)
    try:
        if not os.path.isdir(base_path):        # the administrator's path, made once
            os.makedirs(base_path, exist_ok=True)
            os.chmod(base_path, RUN_DIR_MODE)
        base = w.anchor(base_path)
    except OSError as e:
        raise DaemonStoreError(FAILED, f"{base_path}: {e.strerror}") from None
    fd, _ = w.child(base, daemon, path, cross=True, create=RUN_DIR_MODE)
    _check_dir(fd, path, {os.geteuid()})
    if mount_id(fd) == mount_id(base):
        tree = w.fd(sc.open_tree(fd, "", _OPEN_TREE))
        sc.mount_setattr(tree, "", sc.AT_EMPTY_PATH, attr_set=MOUNT_ATTRS)
        sc.move_mount(tree, "", fd, "", _MOVE)
        undo.append(lambda: _umount_at(base, daemon, sc.MNT_DETACH))
        fd, _ = w.child(base, daemon, path, cross=True)    # the new mount's root
    entry = mountinfo().get(mount_id(fd))
    if entry is None or not entry.shared:
        sc.mount_setattr(fd, "", sc.AT_EMPTY_PATH, propagation=sc.MS_SHARED)
    return fd


def _umount_at(dirfd: int, name: str, flags: int) -> None:
    # The parent is pinned by its fd; the last component is never followed.
    sc.umount2(f"/proc/self/fd/{dirfd}/{name}", flags | sc.UMOUNT_NOFOLLOW)


def _bind(run_fd: int, run_path: str, user_hash: str, source: int, w: _Walk,
          undo: list) -> bool:
    """Bind the store onto <run_fd>/<user_hash>; False if it already is."""
    path = os.path.join(run_path, user_hash)
    target, created = w.child(run_fd, user_hash, path, cross=True, create=RUN_DIR_MODE)
    if created:
        undo.append(lambda: _rmdir(run_fd, user_hash))
    if mount_id(target) != mount_id(run_fd):
        have, want = os.fstat(target), os.fstat(source)
        if (have.st_dev, have.st_ino) == (want.st_dev, want.st_ino):
            return False                             # already: do not stack
        raise DaemonStoreError(FAILED, f"something else is mounted at {path}; refusing to "
                               f"mount over it (unmount it first)")
    _check_dir(target, path, {os.geteuid()})
    tree = w.fd(sc.open_tree(source, "", _OPEN_TREE))
    sc.mount_setattr(tree, "", sc.AT_EMPTY_PATH, attr_set=MOUNT_ATTRS)
    sc.move_mount(tree, "", target, "", _MOVE)
    undo.append(lambda: _umount_at(run_fd, user_hash, sc.MNT_DETACH))
    return True


def _rmdir(dirfd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dirfd)
    except OSError:
        pass                # not empty, still a mount point elsewhere: leave it


def _fail(e: OSError, what: str) -> DaemonStoreError:
    return DaemonStoreError(FAILED, f"{what}: {e.strerror or os.strerror(e.errno or 0)}")


# -- entry points --------------------------------------------------------------------

def mount(layout: Layout, req: Request) -> list[str]:
    """Mount the user's store and cache for this daemon; the variants newly
    mounted.  Both or neither: whatever this call mounted is undone if a
    later step fails."""
    check_request(layout, req)
    undo: list = []
    with ExitStack() as stack:
        w = _Walk(stack)
        try:
            tmpl = _template(layout, req.daemon, w)
            # Every source is walked and checked before any mount is touched.
            sources = [(v, _source(layout, req, v, tmpl, w)) for v in VARIANTS]
            done = []
            for v, source in sources:
                run_fd = _run_dir(layout, v, req.daemon, w, undo)
                run_path = os.path.join(getattr(layout, v.run_attr), req.daemon)
                if _bind(run_fd, run_path, req.user_hash, source, w, undo):
                    done.append(v.name)
            return done
        except BaseException as e:
            _undo(undo)
            if isinstance(e, OSError):
                raise _fail(e, f"mounting the {req.daemon} store of {req.user_hash}") from None
            raise


def _undo(steps: list) -> None:
    for step in reversed(steps):
        try:
            step()
        except OSError:
            pass


def unmount(layout: Layout, req: Request) -> list[str]:
    """Unmount the user's store and cache for this daemon (lazily only if
    req.lazy); the variants that were mounted.  No template is needed: a
    store stays unmountable after its daemon's package is gone."""
    check_request(layout, req)
    done = []
    busy = []
    for v in VARIANTS:
        with ExitStack() as stack:
            w = _Walk(stack)
            run_path = os.path.join(getattr(layout, v.run_attr), req.daemon)
            path = os.path.join(run_path, req.user_hash)
            try:
                base = w.anchor(getattr(layout, v.run_attr))
                run_fd, _ = w.child(base, req.daemon, run_path, cross=True)
            except FileNotFoundError:
                continue
            flags = sc.MNT_DETACH if req.lazy else 0
            unmounted = False
            for _ in range(MAX_STACKED):
                try:
                    target = sc.openat2(run_fd, req.user_hash,
                                        os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _BENEATH)
                except FileNotFoundError:
                    break
                except OSError as e:
                    raise _what(e, path) from None
                try:
                    mounted = mount_id(target) != mount_id(run_fd)
                finally:
                    os.close(target)            # an open fd would make it busy
                if not mounted:
                    break
                try:
                    _umount_at(run_fd, req.user_hash, flags)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        busy.append(path)
                        break
                    raise _fail(e, f"unmounting {path}") from None
                unmounted = True
            else:
                raise DaemonStoreError(FAILED, f"{path} is still a mount point after "
                                       f"{MAX_STACKED} unmounts")
            if path not in busy:
                _rmdir(run_fd, req.user_hash)
            if unmounted:
                done.append(v.name)
    if busy:
        raise DaemonStoreError(FAILED, f"{' and '.join(busy)} busy (a process has files "
                               f"open there); stop it, or detach lazily with "
                               f"`privbroker daemon-store unmount --lazy` as root")
    return done


@dataclass(frozen=True)
class InitResult:
    daemon: str
    variant: str
    path: str
    error: str | None = None


def templates(layout: Layout) -> list[str]:
    """The daemons with a template directory (plain names, no symlinks)."""
    try:
        fd = os.open(layout.templates_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        with os.scandir(fd) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False)
                          and DAEMON_NAME.fullmatch(e.name))
    finally:
        os.close(fd)


def init(layout: Layout) -> list[InitResult]:
    """For every template, <run_dir>/<daemon> and <cache_run_dir>/<daemon>
    as shared mount points.  Idempotent; one daemon's failure does not stop
    the others (each result says)."""
    out = []
    for daemon in templates(layout):
        for v in VARIANTS:
            path = os.path.join(getattr(layout, v.run_attr), daemon)
            with ExitStack() as stack:
                undo: list = []
                try:
                    _run_dir(layout, v, daemon, _Walk(stack), undo)
                except (DaemonStoreError, OSError) as e:
                    _undo(undo)
                    error = str(e) if isinstance(e, DaemonStoreError) else \
                        f"{path}: {os.strerror(e.errno or 0)}"
                    out.append(InitResult(daemon, v.name, path, error))
                else:
                    out.append(InitResult(daemon, v.name, path))
    return out


def perform(layout: Layout, action: str, req: Request) -> list[str]:
    """The launcher's single entry: re-validates, then mounts or unmounts."""
    if action == "mount":
        return mount(layout, req)
    if action == "unmount":
        return unmount(layout, req)
    raise DaemonStoreError(INVALID, f"unknown action {action!r}")


# -- the front's side ------------------------------------------------------------------

class DaemonStoreFront:
    """MountDaemonStore / UnmountDaemonStore as the D-Bus service sees them:
    who may (the policy's [daemon_store] grant), are the names well-formed
    (refused here already, so a bad request never reaches the launcher),
    then the launcher does the privileged part and re-validates."""

    def __init__(self, grant, launcher=None):
        self.grant = grant              # policy.DaemonStoreGrant (who, and the Layout)
        self.layout: Layout = grant.layout
        self.launcher = launcher        # launcher.LauncherClient

    async def mount(self, caller, daemon: str, user_hash: str) -> list[str]:
        return await self._request(caller, "mount", Request(daemon, user_hash))

    async def unmount(self, caller, daemon: str, user_hash: str) -> list[str]:
        # Over the bus, never lazy: a lazy detach is `privbroker daemon-store
        # unmount --lazy`, run by root on the machine.
        return await self._request(caller, "unmount", Request(daemon, user_hash))

    async def _request(self, caller, action: str, req: Request) -> list[str]:
        from . import wire
        from .launcher import LauncherFailed
        self.grant.decide(caller.uid, caller.gids)
        check_request(self.layout, req)
        try:
            reply = await self.launcher.request(wire.daemon_store_to_wire(action, req))
        except LauncherFailed as e:
            kind = e.kind if e.kind in KINDS else FAILED
            raise DaemonStoreError(kind, str(e)) from None
        return list(reply.get("changed", []))
