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
class DeviceRule:
    """One entry of a device allow list, 'c 1:3 rwm': type 'a' (every
    device), 'b' or 'c'; major and minor numbers, None for '*'; access, a
    non-empty subset of 'rwm' (read, write, mknod)."""
    type: str
    major: int | None
    minor: int | None
    access: str


# cgroup limits (see cgroups.py): bounds checked by _cgroup_limits_valid
MIN_MEMORY_LIMIT = 4 << 20     # the jail's own setup (a forked launcher) is charged too
MAX_PIDS_LIMIT = 4194304       # the kernel's PID_MAX_LIMIT
CPU_WEIGHT_RANGE = (1, 10000)  # cgroup v2's cpu.weight range; 100 is the default
MAX_CPU_QUOTA = 100000         # percent of one CPU (1000 CPUs)

@dataclass(frozen=True)
class JailSpec:
    argv: tuple[str, ...]

    # -- namespaces -------------------------------------------------------
    namespaces: frozenset[str] = frozenset()
    pid_init: bool = True              # False: the program is pid 1 itself (-I)
    hostname: str | None = None        # needs the uts namespace
    uid_map: tuple[IdMap, ...] = ()    # needs the user namespace
    gid_map: tuple[IdMap, ...] = ()
    enter_mount_ns: str | None = None  # -V: join this mount namespace first

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
    # cgroup: any limit below gives the jail its own cgroup (cgroups.py),
    # made before the child runs and removed when the jail ends, its
    # leftover processes killed.  own_cgroup asks for one without limits
    # (kill-all and accounting).
    own_cgroup: bool = False
    cgroup_parent: str | None = None   # None: under the launcher's own cgroup
    memory_limit: int | None = None    # bytes (a percent of RAM is resolved by the parser)
    pids_limit: int | None = None      # tasks, the jail's init included
    cpu_weight: int | None = None      # 1..10000, 100 is everyone's default
    cpu_quota: int | None = None       # percent of one CPU (200: two CPUs' worth)
    device_allow: tuple[DeviceRule, ...] | None = None  # None: no device control

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
    new_session_keyring: bool = False  # -w: a fresh session keyring, not the launcher's
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


def _enter_mount_ns_valid(s: JailSpec) -> str | None:
    if s.enter_mount_ns is None:
        return None
    if not s.enter_mount_ns.startswith("/"):
        return "the mount namespace to enter (-V) must be an absolute path"
    if s.has("user"):
        # setns into a namespace owned by the initial user namespace fails
        # from inside a new one; joining first and then unsharing the user
        # namespace would make every mount locked: refuse the combination.
        return "entering a mount namespace (-V) cannot be combined with a user namespace (-U)"
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


def _int_in(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _cgroup_limits_valid(s: JailSpec) -> str | None:
    if s.memory_limit is not None and not _int_in(s.memory_limit, MIN_MEMORY_LIMIT, 1 << 62):
        return (f"memory limit (--memory-limit) must be at least {MIN_MEMORY_LIMIT >> 20}M "
                f"(the jail's own setup is charged to it), got {s.memory_limit!r}")
    if s.pids_limit is not None and not _int_in(s.pids_limit, 1, MAX_PIDS_LIMIT):
        return f"pids limit (--pids-limit) must be 1 to {MAX_PIDS_LIMIT}, got {s.pids_limit!r}"
    if s.cpu_weight is not None and not _int_in(s.cpu_weight, *CPU_WEIGHT_RANGE):
        return (f"CPU weight (--cpu-weight) must be {CPU_WEIGHT_RANGE[0]} to "
                f"{CPU_WEIGHT_RANGE[1]}, got {s.cpu_weight!r}")
    if s.cpu_quota is not None and not _int_in(s.cpu_quota, 1, MAX_CPU_QUOTA):
        return (f"CPU quota (--cpu-quota) must be 1% to {MAX_CPU_QUOTA}% of one CPU, "
                f"got {s.cpu_quota!r}")
    return None


def _device_rules_valid(s: JailSpec) -> str | None:
    for r in s.device_allow or ():
        text = f"{r.type} {r.major}:{r.minor} {r.access}"
        if r.type not in ("a", "b", "c"):
            return f"device rule {text!r}: type must be a, b or c"
        if any(n is not None and not _int_in(n, 0, (1 << 32) - 1) for n in (r.major, r.minor)):
            return f"device rule {text!r}: major and minor must be numbers or '*'"
        if (not isinstance(r.access, str) or not r.access
                or any(c not in "rwm" for c in r.access) or len(set(r.access)) != len(r.access)):
            return f"device rule {text!r}: access must be some of r, w, m"
    return None


def _cgroup_parent_valid(s: JailSpec) -> str | None:
    p = s.cgroup_parent
    if p is not None and (not p.startswith("/") or "\0" in p
                          or any(part in (".", "..") for part in p.split("/"))):
        return f"cgroup parent (--cgroup-parent) must be an absolute cgroup path, not {p!r}"
    return None


def _cgroup_needs_launcher(s: JailSpec) -> str | None:
    # The launcher removes the jail's cgroup when the jail ends: it must stay.
    wants = (s.own_cgroup or s.memory_limit is not None or s.pids_limit is not None
             or s.cpu_weight is not None or s.cpu_quota is not None
             or s.device_allow is not None or s.cgroup_parent is not None)
    if wants and s.detach:
        return ("a jail cgroup (--memory-limit, --pids-limit, --cpu-*, --device-allow, "
                "--own-cgroup) is removed by privjail when the jail ends: it cannot be "
                "combined with -i")
    return None


CHECKS = (
    _argv_present, _namespaces_known, _propagation_known, _needs_mount_ns,
    _pid_init_needs_pid_ns, _hostname_needs_uts, _maps_need_user_ns,
    _one_root_change, _ambient_needs_caps, _securebits_need_caps,
    _paths_absolute, _env_names_valid, _id_maps_valid, _rlimits_ordered,
    _one_seccomp_source, _landlock_rules_valid, _enter_mount_ns_valid,
    _cgroup_limits_valid, _device_rules_valid, _cgroup_parent_valid, _cgroup_needs_launcher,
)


def validate(spec: JailSpec) -> JailSpec:
    """Raise SpecError naming the first inconsistency; return the spec if sound."""
    for check in CHECKS:
        problem = check(spec)
        if problem:
            raise SpecError(problem)
    return spec
