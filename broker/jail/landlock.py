"""Landlock rulesets for minijail's --fs-path-* rules, with the ABI negotiated in one place.

How the module is laid out, top to bottom:

1. The raw syscalls: the three Landlock syscalls and their two structs, through
   ctypes.  There is no policy in this part, so it can move into
   `broker.jail.syscalls` unchanged.  Like the rest of that module, it raises
   OSError carrying the errno.
2. The ABI table (`ABI_TABLE`): which access right each Landlock ABI version
   adds.  Every "what does this kernel know" question is answered from it and
   nowhere else.
3. minijail's rule kinds (`KIND_RIGHTS`), given as sets of right names and
   masked by the ABI in use.
4. `build_ruleset()`, which runs in the parent before fork, and `Ruleset`, whose
   `restrict_self()` is the only step that runs in the child.

The policy on compatibility follows rust-landlock's compat.rs.  The caller
chooses per feature: `best_effort=False` (the default) means hard, so a kernel
without Landlock, or older than `min_abi`, raises `LandlockUnsupported`.
`best_effort=True` enforces whatever the kernel offers, and that can be
nothing.  The choice is never made silently: `Ruleset.enforced` reports the
ABI used, the rights handled, the rights this module knows but the kernel does
not, and the rules skipped.

Differences from minijail (libminijail.c / landlock_util.c) that a reader should know:
* minijail warns and skips a rule path it cannot open.  Here that is an error
  naming the path, except for `DEFAULT_PATHS` entries that do not exist (for
  example /usr/lib64 on some distributions), which are skipped and reported
  the way minijail skips them.
* minijail opens the rule paths in the child, after pivot_root/chroot.  Here
  they are opened in the parent before fork, so they are resolved in the
  parent's view of the filesystem.  `build_ruleset` has no side effect on the
  calling process, so a launcher that needs jail-side paths can call it in the
  child after the mounts instead.
* minijail ignores Landlock on a kernel without it.  Here that ignoring only
  happens when best_effort is asked for.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Collection, Iterable

from .spec import LANDLOCK_ACCESS, FsRule

# ===========================================================================
# 1. Raw syscalls (x86_64 numbers, a stable ABI).  No policy here.
# ===========================================================================

SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1


class LandlockRulesetAttr(ctypes.Structure):
    """struct landlock_ruleset_attr (ABI 6+ layout).  Older ABIs take a prefix of
    it: pass `ruleset_attr_size(abi)` as the size, never sizeof() blindly."""
    _fields_ = [("handled_access_fs", ctypes.c_uint64),   # ABI 1
                ("handled_access_net", ctypes.c_uint64),  # ABI 4
                ("scoped", ctypes.c_uint64)]              # ABI 6


class LandlockPathBeneathAttr(ctypes.Structure):
    """struct landlock_path_beneath_attr: packed, 12 bytes."""
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64),
                ("parent_fd", ctypes.c_int32)]


assert ctypes.sizeof(LandlockPathBeneathAttr) == 12

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_long = ctypes.c_long   # syscall() is variadic: pass every integer at full width


def _raise_errno(name: str):
    err = ctypes.get_errno()
    raise OSError(err, f"{name}: {os.strerror(err)}")


def landlock_create_ruleset(attr: LandlockRulesetAttr | None, size: int, flags: int) -> int:
    """Returns a ruleset fd (always O_CLOEXEC) or, with the VERSION flag, the ABI."""
    ret = _syscall(_long(SYS_landlock_create_ruleset),
                   None if attr is None else ctypes.byref(attr), _long(size), _long(flags))
    if ret < 0:
        _raise_errno("landlock_create_ruleset")
    return ret


def landlock_add_rule(ruleset_fd: int, allowed_access: int, parent_fd: int) -> None:
    """Add one LANDLOCK_RULE_PATH_BENEATH rule."""
    attr = LandlockPathBeneathAttr(allowed_access, parent_fd)
    ret = _syscall(_long(SYS_landlock_add_rule), _long(ruleset_fd),
                   _long(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(attr), _long(0))
    if ret < 0:
        _raise_errno("landlock_add_rule")


def landlock_restrict_self(ruleset_fd: int, flags: int = 0) -> None:
    ret = _syscall(_long(SYS_landlock_restrict_self), _long(ruleset_fd), _long(flags))
    if ret < 0:
        _raise_errno("landlock_restrict_self")


# ===========================================================================
# 2. ABI compatibility: the single table.
# ===========================================================================
# (ABI version that added it, what it is part of, name, bit).  "fs", "net" and
# "scoped" are the fields of struct landlock_ruleset_attr; "restrict_self" are
# flags of landlock_restrict_self(2).  The sources are the kernel's
# include/uapi/linux/landlock.h and Documentation/userspace-api/landlock.rst.
ABI_TABLE: tuple[tuple[int, str, str, int], ...] = (
    (1, "fs", "EXECUTE", 1 << 0),
    (1, "fs", "WRITE_FILE", 1 << 1),
    (1, "fs", "READ_FILE", 1 << 2),
    (1, "fs", "READ_DIR", 1 << 3),
    (1, "fs", "REMOVE_DIR", 1 << 4),
    (1, "fs", "REMOVE_FILE", 1 << 5),
    (1, "fs", "MAKE_CHAR", 1 << 6),
    (1, "fs", "MAKE_DIR", 1 << 7),
    (1, "fs", "MAKE_REG", 1 << 8),
    (1, "fs", "MAKE_SOCK", 1 << 9),
    (1, "fs", "MAKE_FIFO", 1 << 10),
    (1, "fs", "MAKE_BLOCK", 1 << 11),
    (1, "fs", "MAKE_SYM", 1 << 12),
    (2, "fs", "REFER", 1 << 13),        # rename/link across directories; before v2: always denied
    (3, "fs", "TRUNCATE", 1 << 14),     # truncate(2), O_TRUNC, ftruncate (checked at open)
    (4, "net", "BIND_TCP", 1 << 0),
    (4, "net", "CONNECT_TCP", 1 << 1),
    (5, "fs", "IOCTL_DEV", 1 << 15),    # ioctl on char/block devices (checked at open)
    (6, "scoped", "ABSTRACT_UNIX_SOCKET", 1 << 0),
    (6, "scoped", "SIGNAL", 1 << 1),
    (7, "restrict_self", "LOG_SAME_EXEC_OFF", 1 << 0),
    (7, "restrict_self", "LOG_NEW_EXEC_ON", 1 << 1),
    (7, "restrict_self", "LOG_SUBDOMAINS_OFF", 1 << 2),
)

LANDLOCK_ABI_KNOWN = max(row[0] for row in ABI_TABLE)

# The fields of struct landlock_ruleset_attr, in order.
_ATTR_FIELDS = ("fs", "net", "scoped")

# The rights that apply to a non-directory.  The kernel's ACCESS_FILE: a
# rule on a file that asks for any other right fails with EINVAL.
FILE_RIGHTS = frozenset({"EXECUTE", "WRITE_FILE", "READ_FILE", "TRUNCATE", "IOCTL_DEV"})

_BIT = {(part, name): bit for _, part, name, bit in ABI_TABLE}


def rights(part: str, abi: int) -> int:
    """Mask of every right of `part` ("fs", "net", "scoped", "restrict_self") known at `abi`."""
    mask = 0
    for added, p, _, bit in ABI_TABLE:
        if p == part and added <= abi:
            mask |= bit
    return mask


def rights_mask(part: str, names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        mask |= _BIT[(part, name)]
    return mask


def right_names(part: str, mask: int) -> list[str]:
    """The names of the bits set in `mask`, in table order."""
    return [name for _, p, name, bit in ABI_TABLE if p == part and mask & bit]


def ruleset_attr_size(abi: int) -> int:
    """Size of struct landlock_ruleset_attr as known at `abi`: it grows by one u64
    field when the first right of that field appears (net at v4, scoped at v6)."""
    known = [f for f in _ATTR_FIELDS if rights(f, abi)]
    return 8 * (_ATTR_FIELDS.index(known[-1]) + 1) if known else 8


@functools.cache
def abi_version() -> int:
    """The running kernel's Landlock ABI.  0 means unsupported (ENOSYS) or
    disabled at boot (EOPNOTSUPP).  Probed once per process."""
    try:
        return landlock_create_ruleset(None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


# ===========================================================================
# 3. minijail's rule kinds (landlock_util.h: ACCESS_FS_ROUGHLY_*, and
#    landlock_get_{rw,advanced_rw}_mask).  Each kind is a set of names; a name
#    the ABI in use does not know drops out of the mask.
# ===========================================================================
_READ = frozenset({"READ_FILE", "READ_DIR"})
_BASIC_WRITE = frozenset({"WRITE_FILE", "REMOVE_DIR", "REMOVE_FILE", "MAKE_DIR", "MAKE_REG"})
_FULL_WRITE = _BASIC_WRITE | {"MAKE_CHAR", "MAKE_SOCK", "MAKE_FIFO", "MAKE_BLOCK", "MAKE_SYM"}

KIND_RIGHTS: dict[str, frozenset[str]] = {
    "ro": _READ,
    "rx": _READ | {"EXECUTE"},
    "rw": _READ | _BASIC_WRITE | {"TRUNCATE"},
    # No EXECUTE, as in minijail: an advanced-rw directory that must also be
    # executable needs a second rx rule.
    "advanced-rw": _READ | _FULL_WRITE | {"REFER", "TRUNCATE", "IOCTL_DEV"},
    # Not one of minijail's kinds (a jail spec cannot name it: spec.py
    # LANDLOCK_ACCESS): the broker front's device root.  Nodes may be opened
    # read-write and ioctl'd through the fd (IOCTL_DEV is decided at open and
    # travels with the fd to whoever receives it), nothing may be created,
    # removed or renamed there.
    "dev-rw": _READ | {"WRITE_FILE", "IOCTL_DEV"},
}
assert set(LANDLOCK_ACCESS) <= set(KIND_RIGHTS)


def handled_access_fs(abi: int) -> int:
    """What a ruleset handles (denies unless a rule allows it): every FS right
    the ABI knows.  Network and scopes are not handled, as in minijail."""
    return rights("fs", abi)


def access_mask(kind: str, abi: int, *, is_dir: bool = True) -> int:
    """The allowed_access of a rule of `kind` at `abi`, for a directory or a file."""
    names = KIND_RIGHTS[kind] if is_dir else KIND_RIGHTS[kind] & FILE_RIGHTS
    return rights_mask("fs", names) & handled_access_fs(abi)


# minijail0 --fs-default-paths (minijail_enable_default_fs_restrictions).
DEFAULT_PATHS: tuple[FsRule, ...] = (
    FsRule("/lib", "rx"), FsRule("/lib64", "rx"),
    FsRule("/usr/lib", "rx"), FsRule("/usr/lib64", "rx"),
    FsRule("/bin", "rx"), FsRule("/sbin", "rx"),
    FsRule("/usr/bin", "rx"), FsRule("/usr/sbin", "rx"),
    FsRule("/etc/passwd", "ro"), FsRule("/etc/group", "ro"),
)


# ===========================================================================
# 4. Errors, the ruleset, and the two steps.
# ===========================================================================

class LandlockError(OSError):
    """A Landlock step failed.  The message gives the syscall, the errno and,
    where there is one, the path."""

    def __init__(self, err: int, syscall: str, path: str | None = None, detail: str = ""):
        self.syscall = syscall
        self.detail = detail
        msg = f"{syscall}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, msg, path)

    def __reduce__(self):
        return (type(self), (self.errno, self.syscall, self.filename, self.detail))


class LandlockUnsupported(LandlockError):
    """The kernel lacks Landlock, or lacks the ABI version asked for, and hard
    enforcement was asked for."""


class LandlockPathError(LandlockError):
    """A rule's path could not be opened."""


class LandlockRuleError(LandlockError):
    """The kernel refused a ruleset or a rule."""


class LandlockRestrictError(LandlockError):
    """landlock_restrict_self failed in the child."""


_RESTRICT_HINTS = {
    errno.EPERM: "the caller needs no_new_privs (prctl PR_SET_NO_NEW_PRIVS) or "
                 "CAP_SYS_ADMIN in its user namespace; set no_new_privs before this step",
    errno.E2BIG: "the process already has 16 stacked Landlock domains",
    errno.EBADF: "the ruleset fd is closed",
}


class Ruleset:
    """A ruleset ready to enforce, built before fork.

    The fd is O_CLOEXEC (the kernel always sets it), so the jailed program
    never inherits it.  One Ruleset can restrict any number of children.  The
    parent closes it when it no longer needs it."""

    def __init__(self, fd: int, kernel_abi: int, abi: int, rules: tuple, skipped: tuple,
                 reason: str | None):
        self._fd = fd
        self._closed = False
        self.kernel_abi = kernel_abi
        self.abi = abi                  # the ABI version the ruleset was built for (0: none)
        self._rules = rules             # ((path, kind, allowed_mask), ...)
        self._skipped = skipped
        self._reason = reason
        self.handled_net = 0            # build_ruleset(deny_tcp=True): TCP rights denied
        self.scoped = 0                 # build_ruleset(scopes=...): IPC scopes

    @property
    def fd(self) -> int:
        return self._fd

    def restrict_self(self) -> None:
        """In the child: enforce the ruleset on the calling thread and on
        everything it later starts.  This needs no_new_privs or CAP_SYS_ADMIN,
        and in a multi-threaded process it restricts only the calling thread.
        It imports nothing and allocates next to nothing.  A Ruleset built
        best-effort on a kernel without Landlock does nothing here, as
        `enforced` reports."""
        if self._fd < 0:
            if self._closed:
                raise LandlockRestrictError(errno.EBADF, "landlock_restrict_self", None,
                                            _RESTRICT_HINTS[errno.EBADF])
            return
        try:
            landlock_restrict_self(self._fd, 0)
        except OSError as e:
            raise LandlockRestrictError(e.errno, "landlock_restrict_self", None,
                                        _RESTRICT_HINTS.get(e.errno, "")) from None

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._closed = True

    def __enter__(self) -> Ruleset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def enforced(self) -> dict:
        """What restrict_self() enforces: the report for status and audit."""
        handled = handled_access_fs(self.abi) if self.abi else 0
        return {
            "enforced": self.abi > 0,
            "kernel_abi": self.kernel_abi,
            "abi": self.abi,
            "handled_access_fs": right_names("fs", handled),
            "handled_access_net": right_names("net", self.handled_net),
            "scoped": right_names("scoped", self.scoped),
            "not_handled_fs": right_names("fs", rights("fs", LANDLOCK_ABI_KNOWN) & ~handled),
            "rules": [{"path": p, "access": k, "allowed": right_names("fs", m)}
                      for p, k, m in self._rules],
            "skipped": list(self._skipped),
            "reason": self._reason,
        }

    def __repr__(self) -> str:
        return (f"Ruleset(fd={self._fd}, abi={self.abi}, rules={len(self._rules)}, "
                f"skipped={len(self._skipped)})")


def _check_rule(rule: FsRule) -> None:
    # Check again here, on the privileged side: a spec may have skipped validate().
    if rule.access not in KIND_RIGHTS:
        raise LandlockRuleError(errno.EINVAL, "build_ruleset", rule.path,
                                f"access must be one of {', '.join(LANDLOCK_ACCESS)}, "
                                f"not {rule.access!r}")
    if not rule.path.startswith("/") or "\0" in rule.path:
        raise LandlockRuleError(errno.EINVAL, "build_ruleset", rule.path,
                                "Landlock rule paths must be absolute")


def build_ruleset(rules: Iterable[FsRule], best_effort: bool = False, *,
                  min_abi: int = 1, target_abi: int | None = None,
                  optional: Collection[FsRule] = DEFAULT_PATHS,
                  deny_tcp: bool = False, scopes: Collection[str] = ()) -> Ruleset:
    """Create a ruleset that handles every FS right of the ABI in use and allows
    what `rules` grant.  This runs in the parent, before fork.

    best_effort  False (hard): raise LandlockUnsupported if the kernel has no
                 Landlock or an ABI older than min_abi.  True: enforce what
                 the kernel offers, possibly nothing, and report it.
    min_abi      The oldest ABI accepted in hard mode (3, for example, to
                 require TRUNCATE).
    target_abi   Use at most this ABI, so behaviour stays fixed across kernel
                 upgrades.  The default is the newest this module knows.
    optional     Rules whose path may be missing (ENOENT): they are skipped and
                 reported.  Any other path that cannot be opened is an error
                 naming it.
    deny_tcp     Also handle the network rights (ABI 4: TCP bind and connect)
                 with no rule allowing them.  Not minijail's behaviour; the
                 broker's own front uses it.  Below ABI 4: not restricted.
    scopes       IPC scopes to set ("SIGNAL", "ABSTRACT_UNIX_SOCKET", ABI 6):
                 signals and abstract-socket connections leave the domain no
                 more.  Below ABI 6: not restricted.
    """
    rules = tuple(rules)
    for rule in rules:
        _check_rule(rule)
    if target_abi is not None and not max(min_abi, 1) <= target_abi:
        raise LandlockRuleError(errno.EINVAL, "build_ruleset", None,
                                f"target_abi {target_abi} is below min_abi {min_abi}")
    kernel = abi_version()
    abi = min(kernel, LANDLOCK_ABI_KNOWN if target_abi is None else target_abi)
    if abi < max(min_abi, 1):
        if kernel == 0:
            what = "this kernel has no Landlock (or it is disabled at boot)"
        else:
            missing = right_names("fs", rights("fs", min_abi) & ~rights("fs", abi))
            what = (f"Landlock ABI {abi} is in use (kernel {kernel}), {min_abi} is required"
                    + (f"; missing rights: {', '.join(missing)}" if missing else ""))
        if not best_effort:
            raise LandlockUnsupported(errno.EOPNOTSUPP, "landlock_create_ruleset", None,
                                      what + "; ask for best effort to accept less")
        if abi < 1:
            return Ruleset(-1, kernel, 0, (), (), what + "; best effort: not enforced")
    if abi < LANDLOCK_ABI_KNOWN:
        reason = f"Landlock ABI {abi} (kernel {kernel}): rights from later ABIs are not restricted"
    elif kernel > LANDLOCK_ABI_KNOWN:
        reason = (f"kernel Landlock ABI {kernel} is newer than this module's table "
                  f"({LANDLOCK_ABI_KNOWN}): rights it added are not restricted")
    else:
        reason = None

    # The net and scoped fields exist from ABI 4 and 6: rights() masks them to
    # the ABI in use, and ruleset_attr_size() tells the kernel how much it reads.
    attr = LandlockRulesetAttr(handled_access_fs(abi),
                               rights("net", abi) if deny_tcp else 0,
                               rights_mask("scoped", scopes) & rights("scoped", abi))
    try:
        fd = landlock_create_ruleset(attr, ruleset_attr_size(abi), 0)
    except OSError as e:
        raise LandlockRuleError(e.errno, "landlock_create_ruleset", None,
                                f"handled_access_fs={attr.handled_access_fs:#x}, "
                                f"ABI {abi}") from None
    added, skipped = [], []
    try:
        for rule in rules:
            try:
                # Symlinks are followed, as minijail does (/lib -> usr/lib on
                # merged-/usr systems).  The rule attaches to the target inode.
                pfd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ENOENT and rule in optional:
                    skipped.append(rule.path)
                    continue
                raise LandlockPathError(e.errno, "open(O_PATH)", rule.path,
                                        f"Landlock {rule.access} rule") from None
            try:
                is_dir = stat.S_ISDIR(os.fstat(pfd).st_mode)
                allowed = access_mask(rule.access, abi, is_dir=is_dir)
                landlock_add_rule(fd, allowed, pfd)
            except OSError as e:
                raise LandlockRuleError(e.errno, "landlock_add_rule", rule.path,
                                        f"Landlock {rule.access} rule") from None
            finally:
                os.close(pfd)   # the ruleset holds the inode now
            added.append((rule.path, rule.access, allowed))
    except BaseException:
        os.close(fd)
        raise
    ruleset = Ruleset(fd, kernel, abi, tuple(added), tuple(skipped), reason)
    ruleset.handled_net, ruleset.scoped = attr.handled_access_net, attr.scoped
    return ruleset
