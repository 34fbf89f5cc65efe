"""privbroker audit: find the live processes in the forbidden intersection.

    privbroker audit [--json] [--allowlist FILE] [--all]

Walks /proc and, for every process, reads what decides the ChromeOS
sandboxing guide's forbidden intersection (see broker.jail.exposure, whose
`escapes()` makes the decision here too):

  privilege    any of the real/effective/saved/fs uids is 0 (a process can
               setresuid back to any of them), or CAP_SYS_ADMIN is in its
               permitted set (it can raise it into the effective set at will)
               while it is in the init user namespace;
  namespaces   /proc/PID/ns/{pid,mnt} against the init ones: /proc/1/ns/...,
               or, when that is unreadable, the auditor's own namespaces.
               Unreadable means unprivileged, or an auditor confined by
               Landlock, which denies ptrace-mode access to processes outside
               its domain: on this project's VM even root reads EACCES there
               (only lockdown, capability, landlock and bpf LSMs are active);
  seccomp      "Seccomp:" of /proc/PID/status: 1 (strict) or 2 (filter);
  Landlock     see `landlock_state` (the kernel does not say);
  SELinux      /proc/PID/attr/current when SELinux is enabled, else "disabled".

Every fact is three-valued: a field the auditor may not read (another uid's
namespaces when unprivileged) is None, never a crash, and a process whose
verdict is unknown is still listed ("unverified") - an audit that cannot see
must not say "clean".  Run as root for full detail.

Only processes (thread-group leaders, the numeric entries of /proc) are
read: a thread that changed its own credentials with a raw syscall, unlike
glibc's setuid family which changes them in every thread, is not seen.  The
auditor skips itself (an observer, not a service).

Processes that vanish mid-scan are skipped: each process is read through one
open /proc/PID directory fd, so a reused pid can never mix two processes,
and ENOENT/ESRCH at any point means "gone".  A zombie (it runs nothing) is
skipped the same way.

Exceptions come from an allowlist (like ChromeOS's security.SandboxedServices
baseline): one entry per line, an absolute executable path (matched against
/proc/PID/exe, which the kernel maintains) or a comm name (matched against
/proc/PID/comm; note that a process can set its own comm, so a comm entry is
a convenience, not a guarantee); `#` starts a comment.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable

from .jail.exposure import CAP_SYS_ADMIN, escapes, tri_and, tri_or

PROC = "/proc"
# Fixed inode number of the init pid namespace (include/linux/proc_ns.h, since
# Linux 3.8): tells whether the fallback reference really is the init one.
PROC_PID_INIT_INO = 0xEFFFFFFC

_GONE = (errno.ENOENT, errno.ESRCH)


class _Vanished(Exception):
    """The process exited (or is a zombie) while we read it."""


# ---------------------------------------------------------------------------
# Allowlist
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Allowlist:
    paths: frozenset[str] = frozenset()
    comms: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, lines: Iterable[str]) -> "Allowlist":
        paths, comms = set(), set()
        for line in lines:
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            if entry.startswith("/"):
                paths.add(entry)
            else:
                comms.add(entry[:15])      # comm is at most TASK_COMM_LEN - 1 bytes
        return cls(frozenset(paths), frozenset(comms))

    @classmethod
    def load(cls, path: str) -> "Allowlist":
        with open(path, encoding="utf-8") as f:
            return cls.parse(f)

    def match(self, exe: str | None, comm: str | None) -> str | None:
        """The entry that lists this process, or None."""
        if exe is not None:
            for candidate in (exe, exe.removesuffix(" (deleted)")):
                if candidate in self.paths:
                    return candidate
        if comm is not None and comm in self.comms:
            return comm
        return None

    def __bool__(self) -> bool:
        return bool(self.paths or self.comms)


def as_allowlist(allowlist: "Allowlist | Iterable[str]") -> Allowlist:
    return allowlist if isinstance(allowlist, Allowlist) else Allowlist.parse(allowlist)


# ---------------------------------------------------------------------------
# Reading one process, through its /proc/PID directory fd
# ---------------------------------------------------------------------------

def _read(dfd: int, name: str, *, optional: bool = False) -> str | None:
    """Text of /proc/PID/name.  None when unreadable (EACCES, EINVAL, ...);
    raises _Vanished on ENOENT/ESRCH unless optional (the file may simply
    not exist on this kernel: then None)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            return os.read(fd, 65536).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in _GONE and not optional:
            raise _Vanished from None
        return None


def _readlink(dfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError as e:
        if e.errno in _GONE:
            raise _Vanished from None
        return None


def _ns_inode(link: str | None) -> int | None:
    """'pid:[4026531836]' -> 4026531836."""
    if not link or not link.endswith("]") or ":[" not in link:
        return None
    return int(link[link.index(":[") + 2:-1])


def _status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def landlock_state(dfd: int, lsm_active: bool | None) -> tuple[bool | None, str]:
    """Is the process in a Landlock domain?  (answer, how we know).

    Mainline Linux (6.18 included) exposes no per-process Landlock state:
    /proc/PID/attr has no landlock entry, /proc/PID/status has no field,
    pidfd's PIDFD_GET_INFO has none, and lsm_get_self_attr() is self-only and
    Landlock provides no attribute.  Every Landlock check has the *acting*
    task as subject (ptrace access, signals, abstract sockets), and an
    unsandboxed auditor acts like the root of all domains, so no probe we can
    run reveals another process's domain; Landlock's audit records
    (AUDIT_LANDLOCK_*, 6.15+) name a domain only after it denied something.
    So, in order:

    1. Landlock not active in this kernel (landlock_create_ruleset's ABI
       probe says ENOSYS/EOPNOTSUPP): no process can have a domain -> False.
    2. /proc/PID/attr/landlock/domain exists (an out-of-tree patch proposed
       by ChromeOS for exactly this audit; "none" means unsandboxed) -> its
       answer.
    3. Otherwise unknown (None): the process is listed as unverified when
       Landlock would decide its verdict.
    """
    if lsm_active is False:
        return False, "Landlock is not active in this kernel"
    text = _read(dfd, "attr/landlock/domain", optional=True)
    if text is not None:
        return text.strip() != "none", "attr/landlock/domain"
    return None, "not exposed by the kernel"


@dataclass(frozen=True)
class Finding:
    pid: int
    comm: str | None
    exe: str | None
    cmdline: str | None
    uids: tuple[int, int, int, int] | None      # real, effective, saved, fs
    cap_eff: int | None
    cap_prm: int | None
    cap_sys_admin: bool | None                  # in the permitted set, in the init user ns
    init_user_ns: bool | None
    init_pid_ns: bool | None
    init_mnt_ns: bool | None
    no_new_privs: bool | None
    seccomp: int | None                         # 0 none, 1 strict, 2 filter
    landlock: bool | None
    landlock_source: str
    selinux: str | None                         # context, or "disabled"
    escapes: dict[str, bool | None] = field(default_factory=dict)
    forbidden: bool | None = None               # True, or None = could not be verified
    allowlisted: str | None = None              # the allowlist entry that excuses it

    @property
    def ruid(self) -> int | None:
        return self.uids[0] if self.uids else None

    @property
    def euid(self) -> int | None:
        return self.uids[1] if self.uids else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ruid"], d["euid"] = self.ruid, self.euid
        for k in ("cap_eff", "cap_prm"):
            d[k] = None if d[k] is None else f"{d[k]:016x}"
        d["uids"] = list(self.uids) if self.uids else None
        return d


@dataclass
class Context:
    """What one scan compares every process with."""
    proc: str
    init_ns: dict[str, int | None]
    ns_reference: str
    landlock_active: bool | None
    selinux: str            # "disabled", "permissive" or "enforcing"
    self_pid: int


def _landlock_active() -> bool | None:
    try:
        from .jail.landlock import abi_version
        return abi_version() > 0
    except Exception:        # noqa: BLE001 - an audit must not die on a probe
        return None


def _selinux_mode() -> str:
    try:
        with open("/sys/fs/selinux/enforce") as f:
            return "enforcing" if f.read().strip() == "1" else "permissive"
    except OSError:
        return "disabled"


def _init_namespaces(proc: str) -> tuple[dict[str, int | None], str]:
    names = ("pid", "mnt", "user")
    try:
        ref = {n: _ns_inode(os.readlink(f"{proc}/1/ns/{n}")) for n in names}
        return ref, f"{proc}/1/ns"
    except OSError:
        pass
    ref = {}
    for n in names:
        try:
            ref[n] = _ns_inode(os.readlink(f"{proc}/self/ns/{n}"))
        except OSError:
            ref[n] = None
    note = f"own namespaces ({proc}/1/ns unreadable)"
    if ref["pid"] is not None and ref["pid"] != PROC_PID_INIT_INO:
        note += "; own pid namespace is NOT the init one"
    return ref, note


def make_context(proc: str = PROC) -> Context:
    ref, note = _init_namespaces(proc)
    return Context(proc, ref, note, _landlock_active(), _selinux_mode(), os.getpid())


def inspect(ctx: Context, pid: int, allowlist: Allowlist = Allowlist()) -> Finding | str | None:
    """The Finding for one pid when it is (or may be) in the forbidden
    intersection; None when it is not; "kthread", "gone", "unreadable" or
    "self" when skipped."""
    if pid == ctx.self_pid:
        return "self"        # the auditor itself: an observer, not a service
    try:
        dfd = os.open(f"{ctx.proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return "gone"
    try:
        return _inspect(ctx, dfd, pid, allowlist)
    except _Vanished:
        return "gone"
    finally:
        os.close(dfd)


def _inspect(ctx: Context, dfd: int, pid: int, allowlist: Allowlist) -> Finding | str | None:
    text = _read(dfd, "status")
    if text is None:
        return "unreadable"
    st = _status(text)
    if st.get("State", "").startswith(("Z", "X")):
        raise _Vanished      # a zombie runs no code
    # Kernel threads are not processes of interest: they run kernel code only,
    # have no exe and no userspace to compromise.  6.x says so ("Kthread: 1");
    # older kernels: kthreadd is pid 2 and every kernel thread is its child.
    if st.get("Kthread") == "1" or pid == 2 or st.get("PPid") == "2":
        return "kthread"

    def hexcap(key):
        return int(st[key], 16) if key in st else None

    try:
        uids = tuple(int(x) for x in st["Uid"].split())
    except (KeyError, ValueError):
        uids = None
    cap_eff, cap_prm = hexcap("CapEff"), hexcap("CapPrm")
    seccomp = int(st["Seccomp"]) if "Seccomp" in st else 0   # no field: no CONFIG_SECCOMP
    nnp = st["NoNewPrivs"] == "1" if "NoNewPrivs" in st else None

    ns = {n: _ns_inode(_readlink(dfd, f"ns/{n}")) for n in ("pid", "mnt", "user")}

    def same(n):
        if ns[n] is None or ctx.init_ns.get(n) is None:
            return None
        return ns[n] == ctx.init_ns[n]

    init_pid, init_mnt, init_user = same("pid"), same("mnt"), same("user")
    root = None if uids is None else 0 in uids
    has_sys_admin = None if cap_prm is None else bool(cap_prm & (1 << CAP_SYS_ADMIN))
    # Capabilities held in a child user namespace give nothing over the host.
    sys_admin = tri_and(has_sys_admin, init_user)
    privileged = tri_or(root, sys_admin)
    if privileged is False:
        return None      # cheap exit: most unprivileged processes stop here

    landlock, ll_source = landlock_state(dfd, ctx.landlock_active)
    if ctx.selinux == "disabled":
        selinux, selinux_enforcing = "disabled", False
    else:
        ctxt = _read(dfd, "attr/current", optional=True)
        selinux = ctxt.strip("\0\n ") if ctxt else None
        # Per-domain permissive mode is not visible here; an unconfined
        # domain does not count as a sandbox.
        selinux_enforcing = (None if selinux is None else
                             ctx.selinux == "enforcing" and "unconfined" not in selinux)
    e1, e2, e3, forbidden = escapes(
        privileged=privileged,
        new_pid_ns=None if init_pid is None else not init_pid,
        new_mount_ns=None if init_mnt is None else not init_mnt,
        seccomp=seccomp >= 1, landlock=landlock, selinux_enforcing=selinux_enforcing)
    if forbidden is False:
        return None

    comm = _read(dfd, "comm")
    comm = comm.rstrip("\n") if comm is not None else None
    exe = _readlink(dfd, "exe")
    raw = _read(dfd, "cmdline")
    cmdline = raw.rstrip("\0").replace("\0", " ")[:200] if raw else None
    return Finding(
        pid=pid, comm=comm, exe=exe, cmdline=cmdline, uids=uids,
        cap_eff=cap_eff, cap_prm=cap_prm, cap_sys_admin=sys_admin,
        init_user_ns=init_user, init_pid_ns=init_pid, init_mnt_ns=init_mnt,
        no_new_privs=nnp, seccomp=seccomp, landlock=landlock, landlock_source=ll_source,
        selinux=selinux,
        escapes={"non-root": e1, "namespaces": e2, "seccomp+landlock": e3},
        forbidden=forbidden, allowlisted=allowlist.match(exe, comm))


@dataclass
class Report:
    findings: list[Finding]          # not allowlisted
    allowed: list[Finding]           # excused by the allowlist
    kernel_threads: int
    vanished: int
    unreadable: int
    context: Context

    def to_dict(self) -> dict:
        c = self.context
        return {
            "findings": [f.to_dict() for f in self.findings],
            "allowlisted": [f.to_dict() for f in self.allowed],
            "skipped": {"kernel_threads": self.kernel_threads, "vanished": self.vanished,
                        "unreadable": self.unreadable},
            "auditor": {"uid": os.geteuid(), "pid": c.self_pid,
                        "ns_reference": c.ns_reference, "landlock_active": c.landlock_active,
                        "selinux": c.selinux},
        }


def scan_report(allowlist: "Allowlist | Iterable[str]" = (), *, proc: str = PROC) -> Report:
    allow = as_allowlist(allowlist)
    ctx = make_context(proc)
    report = Report([], [], 0, 0, 0, ctx)
    try:
        names = os.listdir(proc)
    except OSError:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        r = inspect(ctx, int(name), allow)
        if r == "kthread":
            report.kernel_threads += 1
        elif r == "gone":
            report.vanished += 1
        elif r == "unreadable":
            report.unreadable += 1
        elif isinstance(r, Finding):
            (report.allowed if r.allowlisted else report.findings).append(r)
    report.findings.sort(key=lambda f: f.pid)
    report.allowed.sort(key=lambda f: f.pid)
    return report


def scan(allowlist: "Allowlist | Iterable[str]" = (), *, proc: str = PROC) -> list[Finding]:
    """Every live process in the forbidden intersection (or that cannot be
    shown to be outside it) that the allowlist does not excuse."""
    return scan_report(allowlist, proc=proc).findings


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _tri(v) -> str:
    return "?" if v is None else ("yes" if v else "no")


def format_table(report: Report, *, show_allowed: bool = False) -> str:
    rows = [("PID", "COMM", "UID r/e", "CAPEFF", "SYSADM", "INITPID", "INITMNT",
             "SECCOMP", "LANDLOCK", "SELINUX", "VERDICT", "EXE")]
    shown = report.findings + (report.allowed if show_allowed else [])
    for f in shown:
        verdict = "forbidden" if f.forbidden else "unverified"
        if f.allowlisted:
            verdict = "allowed"
        rows.append((
            str(f.pid), f.comm or "?",
            "?" if f.uids is None else f"{f.ruid}/{f.euid}",
            "?" if f.cap_eff is None else f"{f.cap_eff:x}",
            _tri(f.cap_sys_admin), _tri(f.init_pid_ns), _tri(f.init_mnt_ns),
            "?" if f.seccomp is None else {0: "none", 1: "strict", 2: "filter"}.get(f.seccomp, str(f.seccomp)),
            _tri(f.landlock), f.selinux or "?", verdict, f.exe or "?"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    c = report.context
    lines.append("")
    lines.append(f"{len(report.findings)} process(es) in the forbidden intersection or unverified; "
                 f"{len(report.allowed)} allowlisted; skipped {report.kernel_threads} kernel "
                 f"threads, {report.vanished} vanished")
    lines.append(f"init namespaces: {c.ns_reference}; Landlock per process: not exposed by the "
                 f"kernel ('?' = unknown){'' if c.landlock_active is not False else ' (inactive)'}; "
                 f"SELinux: {c.selinux}")
    if os.geteuid() != 0:
        lines.append("not root: other users' namespaces and executables are unreadable (shown as ?)")
    return "\n".join(lines) + "\n"


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):         # no sys.exit() from library code
        raise ValueError(f"{self.prog}: {message}")


def main_audit(argv: list[str]) -> int:
    """Exit status: 0 clean, 1 an unlisted process was found, 2 usage error."""
    ap = _ArgParser(prog="privbroker audit",
                    description="report processes in the forbidden intersection")
    ap.add_argument("--json", action="store_true", help="JSON output")
    ap.add_argument("--allowlist", action="append", default=[], metavar="FILE",
                    help="exceptions: executable paths or comm names, one per line")
    ap.add_argument("--all", action="store_true", help="also show allowlisted processes")
    ap.add_argument("--proc", default=PROC, help=argparse.SUPPRESS)
    try:
        args = ap.parse_args(argv)
        lines: list[str] = []
        for path in args.allowlist:
            with open(path, encoding="utf-8") as f:
                lines.extend(f)
    except SystemExit as e:             # --help
        return int(e.code or 0)
    except (ValueError, OSError) as e:
        print(f"privbroker audit: {e}", file=sys.stderr)
        return 2
    report = scan_report(Allowlist.parse(lines), proc=args.proc)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_table(report, show_allowed=args.all))
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main_audit(sys.argv[1:]))
