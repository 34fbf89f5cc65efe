"""JailSpec: one immutable value that says everything a jail is.

Parsers (minijail0 flags, minijail config files, later the broker's profiles)
produce a JailSpec; the launcher reads nothing else.  All cross-field rules
live in `validate()`, one small named check each, so a reader finds every
"this option needs that option" decision in one place.

This module is pure data: no syscalls, no imports beyond the standard library.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

RLIM_INFINITY = (1 << 64) - 1   # resource.RLIM_INFINITY as an unsigned value

PROPAGATIONS = ("slave", "shared", "private", "unbindable", "unchanged")
NAMESPACES = ("user", "pid", "mount", "net", "ipc", "uts", "cgroup")


class SpecError(ValueError):
    """The spec is inconsistent; the message names the conflicting fields."""


@dataclass(frozen=True)
class IdMap:
    """One line of /proc/PID/uid_map or gid_map: ids inside, outside, count."""
    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class Bind:
    """A bind mount of a host path into the jail (read-only unless writable)."""
    src: str
    dest: str
    writable: bool = False
    recursive: bool = False


@dataclass(frozen=True)
class Mount:
    """A filesystem mount (minijail's -k): mount(src, dest, fstype, flags, data)."""
    src: str
    dest: str
    fstype: str
    flags: int = 0
    data: str = ""


@dataclass(frozen=True)
class FsRule:
    """A Landlock rule: what the jail may do beneath `path`.
    access is one of LANDLOCK_ACCESS (minijail's --fs-path-* kinds)."""
    path: str
    access: str


LANDLOCK_ACCESS = ("ro", "rx", "rw", "advanced-rw")
SECCOMP_DEFAULTS = ("kill-process", "kill-thread", "trap", "log")


@dataclass(frozen=True)
class Rlimit:
    resource: int       # RLIMIT_* number
    soft: int           # RLIM_INFINITY for unlimited
    hard: int


@dataclass(frozen=True)
class JailSpec:
    argv: tuple[str, ...]

    # -- namespaces -------------------------------------------------------
    namespaces: frozenset[str] = frozenset()
    pid_init: bool = True              # False: the program is pid 1 itself (-I)
    hostname: str | None = None        # needs the uts namespace
    uid_map: tuple[IdMap, ...] = ()    # needs the user namespace
    gid_map: tuple[IdMap, ...] = ()

    # -- filesystem (all need the mount namespace) ------------------------
    propagation: str = "slave"         # applied to the whole tree first (-K); "unchanged" for bare -K
    pivot_root: str | None = None      # -P: new root directory
    chroot: str | None = None          # -C
    mounts: tuple[Bind | Mount, ...] = ()   # in the order given
    mount_dev: bool = False            # -d: minimal /dev
    remount_proc_ro: bool = False      # -r
    tmpfs_tmp_size: int | None = None  # -t: bytes; 0 means the kernel default
    cwd: str | None = None             # working directory inside the jail

    # -- resources --------------------------------------------------------
    rlimits: tuple[Rlimit, ...] = ()

    # -- identity and privilege -------------------------------------------
    uid: int | None = None             # None: unchanged
    gid: int | None = None
    groups: tuple[int, ...] | None = None   # exact supplementary groups; None: unchanged
    capabilities: int | None = None    # mask kept; None: unchanged
    ambient: bool = False              # raise the kept caps as ambient
    securebits_skip: int = 0           # -B: securebits not to set
    no_new_privs: bool = False

    # -- confinement (installed last, after identity: see launch.PROGRAM_STEPS)
    landlock: tuple[FsRule, ...] = ()  # empty: no Landlock ruleset
    landlock_best_effort: bool = False # True: a kernel without Landlock is not an error
    seccomp_policy: str | None = None  # -S: a policy in minijail's language
    seccomp_bpf: str | None = None     # --seccomp-bpf-binary: a compiled program
    # Action for unlisted syscalls: None means the policy's @default, else
    # kill-process; -L sets "log".  A compiled filter (-seccomp-bpf) has its
    # own default built in, so it takes none.
    seccomp_default: str | None = None

    # -- process ----------------------------------------------------------
    env_reset: bool = False
    env_add: tuple[tuple[str, str], ...] = ()
    pidfile: str | None = None
    detach: bool = False               # -i: launcher exits once the program runs
    die_with_parent: bool = False

    def has(self, ns: str) -> bool:
        return ns in self.namespaces

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)


def to_dict(spec: JailSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["namespaces"] = sorted(spec.namespaces)
    d["mounts"] = [dict(kind=type(m).__name__.lower(), **dataclasses.asdict(m))
                   for m in spec.mounts]
    return d


# ---------------------------------------------------------------------------
# Validation: every cross-field rule, one named check each.
# ---------------------------------------------------------------------------

def _needs_mount_ns(s: JailSpec) -> str | None:
    users = [name for name, used in (
        ("pivot_root (-P)", s.pivot_root), ("chroot (-C)", s.chroot),
        ("mounts (-b/-k)", s.mounts), ("mount_dev (-d)", s.mount_dev),
        ("remount_proc_ro (-r)", s.remount_proc_ro),
        ("tmpfs /tmp (-t)", s.tmpfs_tmp_size is not None)) if used]
    if users and not s.has("mount"):
        return f"{', '.join(users)} need a mount namespace (-v)"
    return None


def _pid_init_needs_pid_ns(s: JailSpec) -> str | None:
    if not s.pid_init and not s.has("pid"):
        return "running the program as pid 1 (-I) needs a pid namespace (-p)"
    return None


def _hostname_needs_uts(s: JailSpec) -> str | None:
    if s.hostname is not None and not s.has("uts"):
        return "setting a hostname needs a uts namespace (--uts)"
    return None


def _maps_need_user_ns(s: JailSpec) -> str | None:
    if (s.uid_map or s.gid_map) and not s.has("user"):
        return "uid/gid maps (-m/-M) need a user namespace (-U)"
    return None


def _one_root_change(s: JailSpec) -> str | None:
    if s.pivot_root and s.chroot:
        return "pivot_root (-P) and chroot (-C) cannot both be set"
    return None


def _ambient_needs_caps(s: JailSpec) -> str | None:
    if s.ambient and s.capabilities is None:
        return "ambient capabilities (--ambient) need a capability mask (-c)"
    return None


def _securebits_need_caps(s: JailSpec) -> str | None:
    if s.securebits_skip and s.capabilities is None:
        return "skipping securebits (-B) only applies with a capability mask (-c)"
    return None


def _propagation_known(s: JailSpec) -> str | None:
    if s.propagation not in PROPAGATIONS:
        return f"propagation must be one of {', '.join(PROPAGATIONS)}, not {s.propagation!r}"
    return None


def _namespaces_known(s: JailSpec) -> str | None:
    unknown = set(s.namespaces) - set(NAMESPACES)
    if unknown:
        return f"unknown namespaces: {', '.join(sorted(unknown))}"
    return None


def _paths_absolute(s: JailSpec) -> str | None:
    paths = [("pivot_root", s.pivot_root), ("chroot", s.chroot), ("cwd", s.cwd),
             ("pidfile", s.pidfile)]
    for m in s.mounts:
        paths.append(("mount destination", m.dest))
        if isinstance(m, Bind):
            paths.append(("bind source", m.src))
    for what, p in paths:
        if p is not None and not p.startswith("/"):
            return f"{what} must be an absolute path, not {p!r}"
    return None


def _argv_present(s: JailSpec) -> str | None:
    if not s.argv or not s.argv[0]:
        return "no program given"
    if any("\0" in a for a in s.argv):
        return "program arguments may not contain NUL"
    return None


def _env_names_valid(s: JailSpec) -> str | None:
    for k, v in s.env_add:
        if not k or "=" in k or "\0" in k or "\0" in v:
            return f"environment name {k!r} is invalid (empty, or contains '=' or NUL)"
    return None


def _id_maps_valid(s: JailSpec) -> str | None:
    for m in s.uid_map + s.gid_map:
        if m.count < 1 or min(m.inside, m.outside) < 0:
            return f"id map {m.inside} {m.outside} {m.count} is invalid"
    return None


def _one_seccomp_source(s: JailSpec) -> str | None:
    if s.seccomp_policy and s.seccomp_bpf:
        return "a seccomp policy (-S) and a compiled filter (--seccomp-bpf-binary) exclude each other"
    if s.seccomp_default is not None:
        if s.seccomp_default not in SECCOMP_DEFAULTS:
            return f"seccomp default action must be one of {', '.join(SECCOMP_DEFAULTS)}"
        if s.seccomp_bpf:
            return ("a compiled filter (--seccomp-bpf-binary) has its default action built "
                    "in; -L and --seccomp-default need a policy (-S)")
        if not s.seccomp_policy:
            return "a seccomp default action (-L, --seccomp-default) needs a policy (-S)"
    return None


def _landlock_rules_valid(s: JailSpec) -> str | None:
    for r in s.landlock:
        if r.access not in LANDLOCK_ACCESS:
            return f"Landlock access for {r.path} must be one of {', '.join(LANDLOCK_ACCESS)}"
        if not r.path.startswith("/"):
            return f"Landlock path must be absolute, not {r.path!r}"
    return None


def _rlimits_ordered(s: JailSpec) -> str | None:
    for r in s.rlimits:
        if r.soft > r.hard:
            return f"rlimit {r.resource}: soft limit {r.soft} exceeds hard limit {r.hard}"
    return None


CHECKS = (
    _argv_present, _namespaces_known, _propagation_known, _needs_mount_ns,
    _pid_init_needs_pid_ns, _hostname_needs_uts, _maps_need_user_ns,
    _one_root_change, _ambient_needs_caps, _securebits_need_caps,
    _paths_absolute, _env_names_valid, _id_maps_valid, _rlimits_ordered,
    _one_seccomp_source, _landlock_rules_valid,
)


def validate(spec: JailSpec) -> JailSpec:
    """Raise SpecError naming the first inconsistency; return the spec if sound."""
    for check in CHECKS:
        problem = check(spec)
        if problem:
            raise SpecError(problem)
    return spec
