"""How exposed a jail would be: the forbidden intersection, and a score.

The ChromeOS sandboxing guide forbids one combination.  A process is in the
*forbidden intersection* when all three hold:

  A. it runs as root, or with CAP_SYS_ADMIN;
  B. it is in the init PID and mount namespaces;
  C. it has no seccomp policy plus Landlock policy (and no enforcing SELinux domain).

It escapes with at least one of:

  (1) a non-root uid and no CAP_SYS_ADMIN;
  (2) a new mount AND a new PID namespace, or a new PID namespace plus Landlock;
  (3) a seccomp policy AND a Landlock policy, or an enforcing SELinux domain.

`escapes()` is that rule, once, in three-valued logic (True / False / None =
unknown), so both the launch-time check on a JailSpec
(`check_forbidden_intersection`) and `privbroker audit`, which sees live
processes and cannot always tell, decide by the same formula.

Decisions about a JailSpec that the guide leaves open, and why:

* Privilege means *host* privilege (the guide is about what a compromise
  gives over the machine).  Inside a new user namespace, uid 0 is host root
  only if the uid map maps it to host uid 0 (a bare -m by a root launcher
  does), and capabilities held there give nothing over the host, so they
  never count as host CAP_SYS_ADMIN.  Without a setresuid (uid None) the
  process keeps the launcher's host uid, mapped or not.
* Capabilities across exec: uid 0 (in the namespace that applies) gets its
  bounding set at exec, so an unchanged set (capabilities None) is "all",
  and a mask is the mask.  A non-root uid keeps nothing across exec unless
  the mask is raised as ambient.  A set-uid-root or file-capability program
  could add privilege back when no_new_privs is off; that depends on the
  file, not the spec, so it is not judged here (the score counts a missing
  no_new_privs).
* seccomp in log mode (-L: unlisted syscalls are logged and allowed)
  enforces nothing: it does not count as a seccomp policy, as a permissive
  SELinux domain does not count as an enforcing one.
* Landlock with best effort on a kernel without Landlock enforces nothing:
  pass `landlock_abi=0` to have it not count.  With `landlock_abi=None`
  (unknown; the default) the rules are assumed enforced.
* A JailSpec has no SELinux domain, so for a spec escape (3) is seccomp plus
  Landlock only.

Pure: standard library only, no syscalls (privjail imports this).
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import Bind, JailSpec

CAP_SYS_ADMIN = 21
# linux/capability.h, bit order; 41 capabilities as of Linux 5.9 .. 6.18.
CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill",
    "setgid", "setuid", "setpcap", "linux_immutable", "net_bind_service",
    "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control",
    "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)
ALL_CAPS = (1 << len(CAP_NAMES)) - 1


def cap_names(mask: int) -> list[str]:
    """['cap_chown', ...] for the bits of `mask`; unknown bits as 'cap_N'."""
    out, bit = [], 0
    while mask >> bit:
        if mask & (1 << bit):
            out.append("cap_" + (CAP_NAMES[bit] if bit < len(CAP_NAMES) else str(bit)))
        bit += 1
    return out


# ---------------------------------------------------------------------------
# The rule itself, in three-valued (Kleene) logic.
# ---------------------------------------------------------------------------

def tri_not(a):
    return None if a is None else not a


def tri_and(*xs):
    if any(x is False for x in xs):
        return False
    return None if any(x is None for x in xs) else True


def tri_or(*xs):
    if any(x is True for x in xs):
        return True
    return None if any(x is None for x in xs) else False


def escapes(*, privileged, new_pid_ns, new_mount_ns, seccomp, landlock,
            selinux_enforcing=False):
    """(escape1, escape2, escape3, forbidden), each True, False or None.

    privileged: root or CAP_SYS_ADMIN (on the host).  The one place the
    guide's rule is written down."""
    e1 = tri_not(privileged)
    e2 = tri_or(tri_and(new_mount_ns, new_pid_ns), tri_and(new_pid_ns, landlock))
    e3 = tri_or(tri_and(seccomp, landlock), selinux_enforcing)
    return e1, e2, e3, tri_not(tri_or(e1, e2, e3))


# ---------------------------------------------------------------------------
# What a JailSpec's program would run as.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Privilege:
    """The identity a spec's program runs with, after exec."""
    host_uid: int
    uid_note: str            # how host_uid was decided
    ns_uid: int | None       # uid inside a new user namespace (None: no userns, or unmapped)
    caps: int                # capabilities kept across exec, in `caps_scope`
    caps_scope: str          # "host" or "user namespace"

    @property
    def host_caps(self) -> int:
        return self.caps if self.caps_scope == "host" else 0

    @property
    def host_root(self) -> bool:
        return self.host_uid == 0

    @property
    def host_cap_sys_admin(self) -> bool:
        return bool(self.host_caps & (1 << CAP_SYS_ADMIN))


def _map(uid: int, idmap, out: bool) -> int | None:
    """uid through a uid_map: inside->outside (out=True) or back; None if unmapped."""
    for m in idmap:
        lo = m.inside if out else m.outside
        if lo <= uid < lo + m.count:
            return uid - lo + (m.outside if out else m.inside)
    return None


def privilege(spec: JailSpec, launcher_uid: int = 0) -> Privilege:
    if not spec.has("user"):
        host = spec.uid if spec.uid is not None else launcher_uid
        note = "set by the spec" if spec.uid is not None else "the launcher's, unchanged"
        exec_uid, ns_uid, scope = host, None, "host"
    elif spec.uid is None:
        host, note = launcher_uid, "the launcher's, unchanged: no setresuid in the user namespace"
        ns_uid = _map(launcher_uid, spec.uid_map, out=False)
        exec_uid, scope = ns_uid, "user namespace"
    else:
        ns_uid = spec.uid
        mapped = _map(spec.uid, spec.uid_map, out=True)
        if mapped is None:
            # setresuid() to an unmapped uid fails (EINVAL): the launch would
            # not start; judge the process that would be left, the launcher's uid.
            host, note = launcher_uid, (f"uid {spec.uid} is not in the uid map; "
                                        "judged as the launcher's uid")
        else:
            host, note = mapped, f"uid {spec.uid} in the user namespace, mapped to host uid {mapped}"
        exec_uid, scope = spec.uid, "user namespace"
    if spec.capabilities is None:
        caps = ALL_CAPS if exec_uid == 0 else 0
    elif exec_uid == 0 or spec.ambient:
        caps = spec.capabilities & ALL_CAPS
    else:
        caps = 0    # non-root without ambient: permitted set is cleared at exec
    return Privilege(host, note, ns_uid, caps, scope)


def _seccomp(spec: JailSpec) -> tuple[bool, str]:
    if not (spec.seccomp_policy or spec.seccomp_bpf):
        return False, "no seccomp policy"
    what = "compiled seccomp filter" if spec.seccomp_bpf else "seccomp policy"
    if spec.seccomp_default == "log":
        return False, f"{what} in log mode (-L) allows every syscall"
    return True, what


def _landlock(spec: JailSpec, landlock_abi: int | None) -> tuple[bool, str]:
    if not spec.landlock:
        return False, "no Landlock rules"
    if landlock_abi == 0 and spec.landlock_best_effort:
        return False, "Landlock rules are best effort and this kernel has no Landlock"
    return True, f"Landlock ruleset ({len(spec.landlock)} rule{'s' * (len(spec.landlock) != 1)})"


# ---------------------------------------------------------------------------
# The verdict.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Escape:
    present: bool
    reason: str


@dataclass(frozen=True)
class Verdict:
    forbidden: bool
    non_root: Escape         # (1) non-root uid, no CAP_SYS_ADMIN
    namespaces: Escape       # (2) mount+pid namespaces, or pid namespace + Landlock
    filters: Escape          # (3) seccomp + Landlock
    host_uid: int
    cap_sys_admin: bool      # kept on the host

    add: tuple[str, ...] = ()   # single additions, each enough to escape, for missing()

    def escapes(self) -> tuple[tuple[str, Escape], ...]:
        return (("non-root", self.non_root), ("namespaces", self.namespaces),
                ("seccomp+landlock", self.filters))

    def missing(self) -> str:
        """'' when not forbidden; otherwise what to add (any one is enough)."""
        if not self.forbidden:
            return ""
        return "add at least one of: " + "; or ".join(self.add)


def check_forbidden_intersection(spec: JailSpec, launcher_uid: int = 0, *,
                                 landlock_abi: int | None = None) -> Verdict:
    """Would the jail described by `spec` be in the forbidden intersection?"""
    p = privilege(spec, launcher_uid)
    seccomp, seccomp_why = _seccomp(spec)
    landlock, landlock_why = _landlock(spec, landlock_abi)
    pid_ns, mnt_ns = spec.has("pid"), spec.has("mount")
    e1, e2, e3, forbidden = escapes(
        privileged=p.host_root or p.host_cap_sys_admin,
        new_pid_ns=pid_ns, new_mount_ns=mnt_ns, seccomp=seccomp, landlock=landlock)

    if p.host_root:
        why1 = f"runs as host root ({p.uid_note})"
    elif p.host_cap_sys_admin:
        why1 = f"uid {p.host_uid} keeps CAP_SYS_ADMIN" + (" as ambient" if spec.ambient else "")
    else:
        why1 = f"host uid {p.host_uid} without CAP_SYS_ADMIN"
        if p.caps_scope != "host" and p.caps:
            why1 += " (its capabilities apply in its user namespace only)"

    if pid_ns and mnt_ns:
        why2 = "new mount and pid namespaces"
    elif pid_ns and landlock:
        why2 = "new pid namespace with Landlock"
    elif pid_ns:
        why2 = "new pid namespace, but the init mount namespace and no Landlock"
    elif mnt_ns:
        why2 = "new mount namespace, but the init pid namespace"
    else:
        why2 = "init pid and mount namespaces"

    if seccomp and landlock:
        why3 = f"{seccomp_why} and {landlock_why}"
    elif seccomp or landlock:
        why3 = (f"{seccomp_why}, but {landlock_why}" if seccomp
                else f"{landlock_why}, but {seccomp_why}")
    else:
        why3 = f"{seccomp_why}; {landlock_why}"

    # Each entry alone is enough; duplicates dropped (with a pid namespace,
    # Landlock alone escapes through (2) whatever seccomp says).
    add = ["a non-root uid (-u) without CAP_SYS_ADMIN" if p.host_root
           else "a capability mask without CAP_SYS_ADMIN (-c)"]
    if pid_ns:
        add += ["a mount namespace (-v)", "Landlock rules (--fs-path-*)"]
    elif mnt_ns:
        add.append("a pid namespace (-p)")
    else:
        add.append("a mount and a pid namespace (-v -p)")
    need = [w for ok, w in ((seccomp, "a seccomp policy (-S)"),
                            (landlock, "Landlock rules (--fs-path-*)")) if not ok]
    add.append(" and ".join(need))

    return Verdict(forbidden=bool(forbidden),
                   non_root=Escape(bool(e1), why1), namespaces=Escape(bool(e2), why2),
                   filters=Escape(bool(e3), why3), host_uid=p.host_uid,
                   cap_sys_admin=p.host_cap_sys_admin,
                   add=tuple(dict.fromkeys(a for a in add if a)))


# ---------------------------------------------------------------------------
# The score, in the spirit of `systemd-analyze security`.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Weakness:
    key: str
    weight: int
    what: str        # shown when present
    fix: str         # the "add first:" suggestion


# Fixed table, highest weights first; a tie goes to the earlier row.
WEAKNESSES = (
    Weakness("root", 10, "runs as host root", "run as a non-root uid (-u)"),
    Weakness("cap_sys_admin", 10, "keeps CAP_SYS_ADMIN on the host",
             "drop CAP_SYS_ADMIN with a capability mask (-c)"),
    Weakness("no_seccomp", 8, "no enforcing seccomp filter", "add a seccomp policy (-S)"),
    Weakness("no_landlock", 6, "no Landlock ruleset", "add Landlock rules (--fs-path-*)"),
    Weakness("no_mount_ns", 6, "shares the init mount namespace", "add a mount namespace (-v)"),
    Weakness("other_caps", 5, "keeps other host capabilities",
             "keep fewer capabilities (-c)"),
    Weakness("no_pid_ns", 5, "shares the init pid namespace", "add a pid namespace (-p)"),
    Weakness("no_nnp", 4, "no no_new_privs (set-uid programs can regain privilege)",
             "set no_new_privs (-n)"),
    Weakness("no_net_ns", 4, "shares the host network", "add a network namespace (-e)"),
    Weakness("full_dev", 3, "sees the host's full /dev", "mount a minimal /dev (-d)"),
    Weakness("shares_tmp", 2, "shares the host's /tmp", "mount a private tmpfs on /tmp (-t)"),
    Weakness("no_ipc_ns", 2, "shares the host IPC namespace", "add an IPC namespace (-l)"),
    Weakness("proc_writable", 1, "/proc not read-only", "remount /proc read-only (-r)"),
    Weakness("no_uts_ns", 1, "shares the host UTS namespace", "add a UTS namespace (--uts)"),
    Weakness("no_cgroup_ns", 1, "shares the host cgroup namespace",
             "add a cgroup namespace (-N)"),
)
MAX_WEIGHT = sum(w.weight for w in WEAKNESSES)


def _root_changed(spec: JailSpec) -> bool:
    return bool(spec.pivot_root or spec.chroot)


def _binds(spec: JailSpec, src: str, *, recursive_only: bool = False) -> bool:
    return any(isinstance(m, Bind) and m.src == src and (m.recursive or not recursive_only)
               for m in spec.mounts)


def _present(spec: JailSpec, p: Privilege, seccomp: bool, landlock: bool) -> dict[str, bool]:
    """Which weaknesses the spec has.  /dev and /tmp are judged from the mount
    list (approximate: a non-recursive bind of / shows the root filesystem's
    /tmp but not the separately mounted /dev; Landlock rules are not considered)."""
    ns = spec.has
    return {
        "root": p.host_root,
        "cap_sys_admin": p.host_cap_sys_admin,
        "other_caps": bool(p.host_caps & ~(1 << CAP_SYS_ADMIN)),
        "no_seccomp": not seccomp,
        "no_landlock": not landlock,
        "no_mount_ns": not ns("mount"),
        "no_pid_ns": not ns("pid"),
        "no_nnp": not spec.no_new_privs,
        "no_net_ns": not ns("net"),
        "full_dev": not spec.mount_dev and (
            not _root_changed(spec) or _binds(spec, "/dev")
            or _binds(spec, "/", recursive_only=True)),
        "shares_tmp": spec.tmpfs_tmp_size is None and (
            not _root_changed(spec) or _binds(spec, "/tmp") or _binds(spec, "/")),
        "no_ipc_ns": not ns("ipc"),
        "proc_writable": not (ns("mount") and spec.remount_proc_ro),
        "no_uts_ns": not ns("uts"),
        "no_cgroup_ns": not ns("cgroup"),
    }


def explain_data(spec: JailSpec, launcher_uid: int = 0, *,
                 landlock_abi: int | None = None) -> dict:
    """The report of `explain` as plain data (for JSON)."""
    p = privilege(spec, launcher_uid)
    seccomp, seccomp_why = _seccomp(spec)
    landlock, landlock_why = _landlock(spec, landlock_abi)
    v = check_forbidden_intersection(spec, launcher_uid, landlock_abi=landlock_abi)
    present = _present(spec, p, seccomp, landlock)
    found = [w for w in WEAKNESSES if present[w.key]]
    score = round(10.0 * sum(w.weight for w in found) / MAX_WEIGHT, 1)
    return {
        "argv": list(spec.argv),
        "identity": {"host_uid": p.host_uid, "uid_note": p.uid_note,
                     "userns_uid": p.ns_uid, "gid": spec.gid},
        "capabilities": {"scope": p.caps_scope, "mask": p.caps,
                         "names": ("all" if p.caps == ALL_CAPS else cap_names(p.caps))},
        "namespaces": sorted(spec.namespaces),
        "seccomp": {"enforcing": seccomp, "what": seccomp_why,
                    "default": (spec.seccomp_default or "policy's own (kill-process unless "
                                "@default says otherwise)")
                    if (spec.seccomp_policy or spec.seccomp_bpf) else None},
        "landlock": {"enforced": landlock, "what": landlock_why,
                     "rules": [[r.path, r.access] for r in spec.landlock]},
        "no_new_privs": spec.no_new_privs,
        "forbidden_intersection": {
            "forbidden": v.forbidden,
            "escapes": {name: {"present": e.present, "reason": e.reason}
                        for name, e in v.escapes()},
            "missing": v.missing(),
        },
        "weaknesses": [{"key": w.key, "weight": w.weight, "what": w.what} for w in found],
        "exposure": score,
        "exposure_max": 10.0,
        "add_first": found[0].fix if found else None,
    }


def explain(spec: JailSpec, launcher_uid: int = 0, *, landlock_abi: int | None = None) -> str:
    """A short human report: who the program runs as, what confines it, the
    forbidden-intersection verdict and an exposure score (10 = fully exposed)."""
    d = explain_data(spec, launcher_uid, landlock_abi=landlock_abi)
    ident, caps = d["identity"], d["capabilities"]
    uid_line = f"host uid {ident['host_uid']} ({ident['uid_note']})"
    if ident["userns_uid"] is not None:
        uid_line += f", uid {ident['userns_uid']} in its user namespace"
    if ident["gid"] is not None:
        uid_line += f", gid {ident['gid']}"
    names = caps["names"]
    cap_line = ("all" if names == "all" else ", ".join(names) or "none")
    if caps["scope"] != "host" and caps["mask"]:
        cap_line += " (in its user namespace only; none on the host)"
    missing_ns = [n for n in ("mount", "pid", "net", "ipc", "uts", "cgroup", "user")
                  if n not in d["namespaces"]]
    fi = d["forbidden_intersection"]
    lines = [
        f"jail: {' '.join(d['argv'])}",
        f"  identity:      {uid_line}",
        f"  capabilities:  {cap_line}",
        f"  namespaces:    {', '.join(d['namespaces']) or 'none'}"
        + (f" (shared with the host: {', '.join(missing_ns)})" if missing_ns else ""),
        f"  seccomp:       {d['seccomp']['what']}"
        + (f", default {d['seccomp']['default']}" if d["seccomp"]["default"] else ""),
        f"  landlock:      {d['landlock']['what']}",
        f"  no_new_privs:  {'yes' if d['no_new_privs'] else 'no'}",
        "forbidden intersection: " + ("YES" if fi["forbidden"] else "no"),
    ]
    for name, e in fi["escapes"].items():
        lines.append(f"  escape {name:<17} {'yes' if e['present'] else 'no ':<4} {e['reason']}")
    if fi["missing"]:
        lines.append(f"  {fi['missing']}")
    lines.append(f"exposure: {d['exposure']:.1f} / 10.0 (10 = fully exposed)")
    for w in d["weaknesses"]:
        lines.append(f"  {w['weight']:>3}  {w['what']}")
    if d["add_first"]:
        lines.append(f"add first: {d['add_first']}")
    return "\n".join(lines) + "\n"
