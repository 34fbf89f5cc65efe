"""Resource control for jails: one cgroup per jail, on cgroup v2 or v1.

This module alone decides which cgroup version is in use; the rest of the
jail engine sees a plain API:

    system = System.probe()                      # what this machine mounts
    cg = system.create("privjail-123-ab", Limits.from_spec(spec))
    cg.add(pid)                                  # a child that has not run anything yet
    cg.stats()                                   # memory, pids, CPU time, OOM kills
    cg.kill_all()                                # every process, however it forked
    cg.remove()                                  # once the last process is gone

Which version (System.probe):
  * v1 when the controllers a jail needs (memory, pids, cpu) are mounted as
    v1 hierarchies, even if a v2 hierarchy is mounted beside them ("hybrid":
    systemd's layout, and this project's test machines: v1 memory, pids, cpu,
    cpuacct, devices and freezer, plus a v2 mount with no controllers);
  * v2 when the unified hierarchy is all there is (or no v1 controller is
    mounted);
  * none: no cgroup file system; asking for a cgroup is Unsupported.

Where: each jail's cgroup is a child of the launcher's own cgroup in every
hierarchy (so the launcher's own limits still cover its jails), or of an
explicit parent path (the same path in every hierarchy, like docker's
--cgroup-parent).  The name is the caller's (one per jail).

Per version:
                 v1                                   v2
  memory limit   memory.limit_in_bytes (+memsw)        memory.max (+ swap.max 0)
  pids limit     pids.max                             pids.max
  CPU weight     cpu.shares = weight * 1024 / 100     cpu.weight
  CPU quota      cpu.cfs_quota_us / cfs_period_us     cpu.max
  devices        devices.deny a, devices.allow RULE   an eBPF device program
                                                      (devfilter.py), the same
                                                      rules, default deny
  kill-all       freeze, SIGKILL each member, thaw    cgroup.kill
  OOM kills      memory.oom_control "oom_kill"        memory.events "oom_kill"
  CPU time       cpuacct.usage (ns)                   cpu.stat usage_usec

A signal to "every member" never trusts a pid read from cgroup.procs alone:
it opens a pidfd, then checks /proc/PID/cgroup still names this cgroup, then
signals through the pidfd, so a recycled pid can never be hit (a pidfd's
process that was reaped makes the signal fail instead).

Errors: CgroupError names the step, the path and the errno; Unsupported (a
subclass) is what this machine cannot do at all.  Everything a failed create
made is removed before it raises.

Only the standard library; nothing here runs at import.
"""
from __future__ import annotations

import errno as _errno
import os
import signal
import time
from dataclasses import dataclass

from .spec import DeviceRule, JailSpec

V1, V2 = "v1", "v2"

# v1 controllers a jail cgroup uses when they are mounted: freezer (kill-all),
# pids, memory and cpuacct (accounting) for every jail; cpu and devices only
# when a limit asks for them.
_V1_ALWAYS = ("freezer", "pids", "memory", "cpuacct")
# v2 controllers enabled for accounting when the parent offers them.
_V2_ACCOUNTING = ("memory", "pids")

CPU_PERIOD_US = 100_000         # cpu quota period (systemd's CPUQuota= uses the same)
V1_DEFAULT_SHARES = 1024        # cpu.shares for weight 100 (v2's default weight)

KILL_TIMEOUT = 5.0              # seconds kill_all/remove wait for the cgroup to empty

_current: "tuple[tuple[str, str], System] | None" = None   # System.current()'s memo


class CgroupError(Exception):
    """A cgroup step failed: `step` (create, limits, join, kill, remove, ...),
    `path` and `errno` say where and why."""

    def __init__(self, step: str, message: str, path: str | None = None, err: int = 0):
        self.step, self.path, self.errno, self.message = step, path, err, message
        where = f" ({path})" if path else ""
        super().__init__(f"cgroup {step}: {message}{where}")


class Unsupported(CgroupError):
    """This machine's cgroups cannot do what was asked (a missing controller,
    no cgroup file system at all)."""


def _check_name(step: str, name: str) -> None:
    """A cgroup name is one path component of our choosing, nothing else."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CgroupError(step, f"bad cgroup name {name!r}")


@dataclass(frozen=True)
class Limits:
    """What a jail's cgroup enforces; None: no limit of that kind."""
    memory: int | None = None               # bytes
    pids: int | None = None                 # tasks (threads count)
    cpu_weight: int | None = None           # 1..10000, 100 = the default share
    cpu_quota: int | None = None            # percent of one CPU
    devices: tuple[DeviceRule, ...] | None = None   # None: no device control

    @classmethod
    def from_spec(cls, spec: JailSpec) -> "Limits":
        return cls(spec.memory_limit, spec.pids_limit, spec.cpu_weight, spec.cpu_quota,
                   spec.device_allow)

    @property
    def wants_cpu(self) -> bool:
        return self.cpu_weight is not None or self.cpu_quota is not None


@dataclass(frozen=True)
class Stats:
    """A cgroup's accounting; None where this machine does not account it."""
    memory_bytes: int | None      # memory charged now (v1 usage_in_bytes, v2 memory.current)
    pids: int | None              # tasks now
    cpu_usec: int | None          # CPU time used, user + system
    oom_kills: int | None         # processes the OOM killer took in this cgroup
    pids_limit_hits: int | None   # forks refused by pids.max

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def wants_cgroup(spec: JailSpec) -> bool:
    """Does this jail get its own cgroup?"""
    return (spec.own_cgroup or spec.memory_limit is not None or spec.pids_limit is not None
            or spec.cpu_weight is not None or spec.cpu_quota is not None
            or spec.device_allow is not None)


# ---------------------------------------------------------------------------
# What this machine mounts
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Hierarchy:
    version: str                  # V1 or V2
    mountpoint: str
    root: str                     # the mount's root inside the hierarchy (mountinfo field 4)
    controllers: frozenset[str]   # v1: bound to this hierarchy; v2: offered to our cgroup
    own: str                      # the probing process's cgroup in it ("/a/b")

    def dir_of(self, path: str) -> str | None:
        """The directory of the cgroup at `path` (hierarchy terms), if this
        mount shows it."""
        if self.root != "/" and path != self.root and not path.startswith(self.root + "/"):
            return None
        rel = path[len(self.root):] if self.root != "/" else path
        return self.mountpoint + rel.rstrip("/") if rel.strip("/") else self.mountpoint

    def proc_key(self) -> str:
        """How /proc/PID/cgroup names this hierarchy (the middle field)."""
        return "" if self.version == V2 else ",".join(sorted(self.controllers))


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1:i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _known_v1_controllers(proc: str) -> set[str]:
    try:
        lines = _read(f"{proc}/cgroups").splitlines()
    except OSError:
        return set()
    return {line.split()[0] for line in lines[1:] if line.strip()}


def parse_mounts(mountinfo: str, self_cgroup: str, known: set[str]) -> list[Hierarchy]:
    """The cgroup hierarchies in a mountinfo text, with our cgroup in each
    (from /proc/self/cgroup's text).  Pure: tests feed it made-up texts."""
    own_v1: dict[frozenset[str], str] = {}
    own_v2 = None
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            own_v2 = path
        else:
            own_v1[frozenset(c for c in ctrls.split(",") if c in known)] = path
    found: list[Hierarchy] = []
    seen: set = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype, root, mountpoint = rfields[0], _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2" and own_v2 is not None and "v2" not in seen:
            seen.add("v2")
            found.append(Hierarchy(V2, mountpoint, root, frozenset(), own_v2))
        elif fstype == "cgroup":
            ctrls = frozenset(o for o in rfields[2].split(",") if o in known)
            if ctrls and ctrls not in seen and ctrls in own_v1:
                seen.add(ctrls)
                found.append(Hierarchy(V1, mountpoint, root, ctrls, own_v1[ctrls]))
    return found


@dataclass(frozen=True)
class System:
    """The cgroup version in use and its hierarchies, probed once."""
    version: str | None
    hierarchies: tuple[Hierarchy, ...]

    @classmethod
    def probe(cls, prefer: str | None = None, proc: str = "/proc") -> "System":
        """prefer: V1 or V2 to pick that version where both are mounted
        (tests use V2 to drive the unified hierarchy of a hybrid machine)."""
        try:
            mountinfo = _read(f"{proc}/self/mountinfo")
            self_cgroup = _read(f"{proc}/self/cgroup")
        except OSError:
            return cls(None, ())
        hs = parse_mounts(mountinfo, self_cgroup, _known_v1_controllers(proc))
        v1 = tuple(h for h in hs if h.version == V1)
        v2 = tuple(h for h in hs if h.version == V2)
        if v2:
            h = v2[0]
            d = h.dir_of(h.own)
            try:
                offered = frozenset(_read(f"{d}/cgroup.controllers").split()) if d else frozenset()
            except OSError:
                offered = frozenset()
            v2 = (Hierarchy(V2, h.mountpoint, h.root, offered, h.own),)
        v1_limits = {c for h in v1 for c in h.controllers} & {"memory", "pids", "cpu"}
        if prefer == V2 and v2:
            return cls(V2, v2)
        if prefer == V1 and v1:
            return cls(V1, v1)
        if v1_limits:
            return cls(V1, v1)
        if v2:
            return cls(V2, v2)
        return cls(V1, v1) if v1 else cls(None, ())

    @classmethod
    def current(cls) -> "System":
        """probe(), remembered for as long as this process's mount table and
        cgroup membership read the same: a launcher asks once per jail, and
        reading those two files is a fraction of parsing them (and of the
        further reads a probe makes).  Any change to either probes afresh."""
        global _current
        try:
            key = (_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"))
        except OSError:
            return cls.probe()
        if _current is None or _current[0] != key:
            _current = (key, cls.probe())
        return _current[1]

    def hierarchy(self, controller: str) -> Hierarchy | None:
        if self.version == V2:
            h = self.hierarchies[0]
            return h if controller in h.controllers else None
        return next((h for h in self.hierarchies if controller in h.controllers), None)

    # -- create ---------------------------------------------------------------
    def plan(self, limits: Limits) -> list[Hierarchy]:
        """The hierarchies a jail with these limits needs; Unsupported before
        anything is made if one is missing."""
        if self.version is None:
            raise Unsupported("probe", "no cgroup file system is mounted (looked for cgroup "
                              "and cgroup2 in /proc/self/mountinfo)")
        needed = [c for c, asked in (("memory", limits.memory is not None),
                                     ("pids", limits.pids is not None),
                                     ("cpu", limits.wants_cpu),
                                     ("devices", limits.devices is not None)) if asked]
        if self.version == V2:
            return list(self.hierarchies)        # devices: a device program (devfilter)
        missing = [c for c in needed if self.hierarchy(c) is None]
        if missing:
            raise Unsupported("probe", f"the {', '.join(missing)} controller"
                              f"{'s are' if len(missing) > 1 else ' is'} not mounted "
                              f"(cgroup v1)")
        wanted = [c for c in _V1_ALWAYS if self.hierarchy(c) is not None] + needed
        plan: list[Hierarchy] = []
        for c in wanted:
            h = self.hierarchy(c)
            if h not in plan:
                plan.append(h)
        return plan

    def create(self, name: str, limits: Limits, parent: str | None = None,
               set_limits: bool = True) -> "Cgroup":
        """Make the jail's cgroup(s) and set its limits.  `parent`: a cgroup
        path ("/a/b") used in every hierarchy; None: our own cgroup.
        set_limits=False: the directories the limits need, no value written
        yet (a seed's cgroup, launch.py: the request's limits come later)."""
        _check_name("create", name)
        plan = self.plan(limits)
        dirs: dict[Hierarchy, str] = {}
        paths: dict[Hierarchy, str] = {}
        for h in plan:
            base = parent if parent is not None else h.own
            path = base.rstrip("/") + "/" + name
            d = h.dir_of(path)
            if d is None:
                raise Unsupported("create", f"cgroup {path} is outside what {h.mountpoint} "
                                  f"shows (mounted from {h.root})")
            dirs[h], paths[h] = d, path
        cg = Cgroup(self.version, name, dirs, paths)
        try:
            if self.version == V2:
                _enable_v2_controllers(os.path.dirname(dirs[plan[0]]), limits,
                                       self.hierarchies[0].controllers)
            for h, d in dirs.items():
                try:
                    os.mkdir(d, 0o755)
                except OSError as e:
                    if e.errno == _errno.EEXIST:
                        raise CgroupError("create", "a cgroup of that name already exists",
                                          d, e.errno) from None
                    raise CgroupError("create", e.strerror, d, e.errno) from None
                cg.made.append(d)
            if set_limits:
                cg.set_limits(limits)
        except BaseException:
            cg.remove(timeout=0)
            raise
        return cg


def _enable_v2_controllers(parent_dir: str, limits: Limits, offered: frozenset[str]) -> None:
    """Turn on, in the parent's subtree_control, the controllers the limits
    need (an error if impossible) and those accounting wants (if possible)."""
    needed = {c for c, asked in (("memory", limits.memory is not None),
                                 ("pids", limits.pids is not None),
                                 ("cpu", limits.wants_cpu)) if asked}
    try:
        enabled = set(_read(f"{parent_dir}/cgroup.subtree_control").split())
        offered = frozenset(_read(f"{parent_dir}/cgroup.controllers").split())
    except OSError as e:
        raise CgroupError("create", e.strerror, parent_dir, e.errno) from None
    missing = needed - offered
    if missing:
        raise Unsupported("create", f"the {', '.join(sorted(missing))} controller(s) are not "
                          f"available to this cgroup (not delegated to it by its parent)",
                          parent_dir)
    for c in sorted(needed | (set(_V2_ACCOUNTING) & offered)):
        if c in enabled:
            continue
        try:
            _write(f"{parent_dir}/cgroup.subtree_control", f"+{c}")
        except OSError as e:
            if c not in needed:
                continue          # accounting only: go without
            hint = (" (it has processes of its own: cgroup v2 enables controllers only "
                    "for cgroups without; give a parent with --cgroup-parent, or run "
                    "the launcher in a delegated cgroup)" if e.errno == _errno.EBUSY else "")
            raise Unsupported("create", f"cannot enable the {c} controller for its "
                              f"children: {e.strerror}{hint}", parent_dir, e.errno) from None


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_key(path: str, key: str) -> int | None:
    """`key N` from a flat keyed file (memory.events, cpu.stat, pids.events)."""
    try:
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------------------
# One jail's cgroup
# ---------------------------------------------------------------------------

class Cgroup:
    """A jail's cgroup: one directory per hierarchy in use."""

    def __init__(self, version: str, name: str, dirs: dict[Hierarchy, str],
                 paths: dict[Hierarchy, str]):
        self.version, self.name = version, name
        self.dirs, self.paths = dirs, paths
        self.made: list[str] = []       # directories created, in order

    def __repr__(self) -> str:
        return f"Cgroup({self.version}, {list(self.dirs.values())})"

    def dir(self, controller: str) -> str | None:
        if self.version == V2:
            return next(iter(self.dirs.values()))
        return next((d for h, d in self.dirs.items() if controller in h.controllers), None)

    @property
    def _procs_hierarchy(self) -> Hierarchy:
        """The hierarchy whose membership lists count: freezer (frozen pids
        cannot exit), else pids, else any."""
        if self.version == V1:
            for c in ("freezer", "pids"):
                h = next((h for h in self.dirs if c in h.controllers), None)
                if h is not None:
                    return h
        return next(iter(self.dirs))

    def rename(self, name: str) -> None:
        """Give the cgroup another name in every hierarchy (cgroup v1 only:
        v2 refuses to rename a cgroup).  All or nothing."""
        if self.version != V1:
            raise Unsupported("rename", "cgroup v2 does not rename cgroups")
        _check_name("rename", name)
        done: list[tuple[Hierarchy, str, str]] = []
        try:
            for h, d in self.dirs.items():
                new = os.path.join(os.path.dirname(d), name)
                os.rename(d, new)
                done.append((h, d, new))
        except OSError as e:
            for h, old, new in reversed(done):
                try:
                    os.rename(new, old)
                except OSError:         # left under the new name: remove() must find it
                    self.dirs[h] = new
                    self.made = [new if m == old else m for m in self.made]
            raise CgroupError("rename", e.strerror, e.filename, e.errno) from None
        for h, old, new in done:
            self.dirs[h] = new
            self.paths[h] = os.path.join(os.path.dirname(self.paths[h]), name)
            self.made = [new if m == old else m for m in self.made]
        self.name = name

    # -- limits -----------------------------------------------------------------
    def set_limits(self, limits: Limits) -> None:
        for path, value in self._limit_files(limits):
            try:
                _write(path, value)
            except OSError as e:
                raise CgroupError("limits", f"cannot write {value!r}: {e.strerror}", path,
                                  e.errno) from None
        if self.version == V2 and limits.devices is not None:
            self._attach_device_program(limits.devices)

    def _attach_device_program(self, rules: tuple[DeviceRule, ...]) -> None:
        """v2 has no devices controller: the allow list is an eBPF program
        attached to the cgroup (devfilter.py), before any process is in it."""
        from . import devfilter
        d = next(iter(self.dirs.values()))
        try:
            devfilter.attach(d, rules)
        except OSError as e:
            why = (" (a device program needs CAP_SYS_ADMIN or CAP_BPF, and a kernel built "
                   "with CONFIG_CGROUP_BPF)"
                   if e.errno in (_errno.EPERM, _errno.EINVAL, _errno.ENOSYS) else "")
            raise CgroupError("devices", f"cannot install the device allow list: "
                                         f"{e.strerror or e}{why}", d, e.errno) from None

    def _limit_files(self, limits: Limits) -> list[tuple[str, str]]:
        """(file, value) in the order they must be written."""
        out = []
        mem, pids, cpu, dev = (self.dir(c) for c in ("memory", "pids", "cpu", "devices"))
        if self.version == V1:
            if limits.memory is not None:
                out.append((f"{mem}/memory.limit_in_bytes", str(limits.memory)))
                # swap counts too where swap is accounted (after the memory
                # limit: memsw may never be below it)
                if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
                    out.append((f"{mem}/memory.memsw.limit_in_bytes", str(limits.memory)))
            if limits.pids is not None:
                out.append((f"{pids}/pids.max", str(limits.pids)))
            if limits.cpu_weight is not None:
                shares = max(2, limits.cpu_weight * V1_DEFAULT_SHARES // 100)
                out.append((f"{cpu}/cpu.shares", str(shares)))
            if limits.cpu_quota is not None:
                out.append((f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US)))
                out.append((f"{cpu}/cpu.cfs_quota_us",
                            str(limits.cpu_quota * CPU_PERIOD_US // 100)))
            if limits.devices is not None:
                out.append((f"{dev}/devices.deny", "a"))
                out += [(f"{dev}/devices.allow", format_device_rule(r)) for r in limits.devices]
        else:
            d = next(iter(self.dirs.values()))
            if limits.memory is not None:
                out.append((f"{d}/memory.max", str(limits.memory)))
                if os.path.exists(f"{d}/memory.swap.max"):
                    out.append((f"{d}/memory.swap.max", "0"))
            if limits.pids is not None:
                out.append((f"{d}/pids.max", str(limits.pids)))
            if limits.cpu_weight is not None:
                out.append((f"{d}/cpu.weight", str(limits.cpu_weight)))
            if limits.cpu_quota is not None:
                out.append((f"{d}/cpu.max",
                            f"{limits.cpu_quota * CPU_PERIOD_US // 100} {CPU_PERIOD_US}"))
        return out

    # -- joining ----------------------------------------------------------------
    def add(self, pid: int) -> None:
        """Move the process `pid` (all its threads) in, in every hierarchy.
        The caller makes sure the pid names whom it means (its own child,
        not yet reaped) and that the process has made no child yet."""
        for d in self.dirs.values():
            try:
                _write(f"{d}/cgroup.procs", str(pid))
            except OSError as e:
                raise CgroupError("join", f"cannot move pid {pid}: {e.strerror}", d,
                                  e.errno) from None

    # -- members ----------------------------------------------------------------
    def _subtree(self) -> list[str]:
        """The procs hierarchy's directory and every cgroup below it (a jail
        with the rights may make its own), deepest first."""
        top = self.dirs[self._procs_hierarchy]
        try:
            # cgroupfs counts a directory's links as 2 + its subdirectories:
            # 2 is a leaf, and needs no listing of its couple of dozen files.
            if os.stat(top).st_nlink <= 2:
                return [top]
        except OSError:
            return [top]
        return [d for d, _, _ in os.walk(top, topdown=False)] or [top]

    def pids(self) -> list[int]:
        """Processes in the cgroup and below it, as read now."""
        out = []
        for d in self._subtree():
            try:
                out += [int(p) for p in _read(f"{d}/cgroup.procs").split()]
            except (OSError, ValueError):
                pass
        return out

    def empty(self) -> bool:
        if self.version == V2:
            top = self.dirs[self._procs_hierarchy]
            populated = _read_key(f"{top}/cgroup.events", "populated")
            if populated is not None:
                return populated == 0
        return not self.pids()

    def contains(self, pid: int) -> bool:
        """Is pid (now) in this cgroup or below it?  Read from /proc/PID/cgroup."""
        h = self._procs_hierarchy
        key, path = h.proc_key(), self.paths[h]
        try:
            lines = _read(f"/proc/{pid}/cgroup").splitlines()
        except OSError:
            return False
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, ctrls, p = parts
            if ",".join(sorted(c for c in ctrls.split(",") if c in h.controllers)) == key \
                    and (ctrls == "") == (h.version == V2):
                return p == path or p.startswith(path + "/")
        return False

    def signal_members(self, sig: int, exclude: frozenset[int] = frozenset()) -> int:
        """Signal every process in the cgroup but `exclude`; returns how many
        were signalled.  pidfd, then membership, then the signal through the
        pidfd: a recycled pid is never hit."""
        sent = 0
        for pid in self.pids():
            if pid in exclude:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue            # gone already
            try:
                if self.contains(pid):
                    signal.pidfd_send_signal(fd, sig)
                    sent += 1
            except OSError:
                pass                # exited (or reaped) meanwhile
            finally:
                os.close(fd)
        return sent

    # -- kill-all -------------------------------------------------------------
    def kill_all(self, timeout: float = KILL_TIMEOUT) -> bool:
        """SIGKILL every process in the cgroup, however it forked or whatever
        session it made; True once the cgroup is empty (within timeout)."""
        deadline = time.monotonic() + timeout
        if self.version == V2 and os.path.exists(f"{self.dirs[self._procs_hierarchy]}/cgroup.kill"):
            try:
                _write(f"{self.dirs[self._procs_hierarchy]}/cgroup.kill", "1")
            except OSError as e:
                raise CgroupError("kill", e.strerror, self.dirs[self._procs_hierarchy],
                                  e.errno) from None
            return self.wait_empty(deadline)
        # Freeze, so nothing forks or exits while the list is read and
        # signalled; SIGKILL every member; thaw, and they die.
        while True:
            frozen = self._freeze(True, deadline)
            try:
                self.signal_members(signal.SIGKILL)
            finally:
                if frozen:
                    self._freeze(False, deadline + 1.0)
            if self.wait_empty(min(deadline, time.monotonic() + 0.2)) or \
                    time.monotonic() >= deadline:
                return self.empty()

    def _freeze(self, on: bool, deadline: float) -> bool:
        """Freeze (or thaw) and wait until the kernel says so; False if this
        cgroup has no freezer or freezing did not finish in time."""
        if self.version == V1:
            d = self.dir("freezer")
            if d is None:
                return False
            path, value = f"{d}/freezer.state", "FROZEN" if on else "THAWED"
            check = lambda: _read(path).strip() == value     # noqa: E731
        else:
            d = self.dirs[self._procs_hierarchy]
            path, value = f"{d}/cgroup.freeze", "1" if on else "0"
            if not os.path.exists(path):
                return False
            check = lambda: _read_key(f"{d}/cgroup.events", "frozen") == int(on)  # noqa: E731
        try:
            _write(path, value)
        except OSError:
            return False
        pause = 0.0005
        while True:
            try:
                if check():
                    return True
            except OSError:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def wait_empty(self, deadline: float) -> bool:
        pause = 0.0005
        while not self.empty():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True

    # -- accounting -------------------------------------------------------------
    def stats(self) -> Stats:
        mem, pids, acct = self.dir("memory"), self.dir("pids"), self.dir("cpuacct")
        if self.version == V1:
            memory = _read_int(f"{mem}/memory.usage_in_bytes") if mem else None
            ns = _read_int(f"{acct}/cpuacct.usage") if acct else None
            cpu = ns // 1000 if ns is not None else None
        else:
            d = next(iter(self.dirs.values()))
            memory = _read_int(f"{d}/memory.current")
            cpu = _read_key(f"{d}/cpu.stat", "usage_usec")
        tasks = _read_int(f"{pids}/pids.current") if pids else None
        if tasks is None:
            tasks = self._count_tasks()
        hits = _read_key(f"{pids}/pids.events", "max") if pids else None
        return Stats(memory, tasks, cpu, self.oom_kills(), hits)

    def _count_tasks(self) -> int | None:
        name = "tasks" if self.version == V1 else "cgroup.threads"
        try:
            return sum(len(_read(f"{d}/{name}").split()) for d in self._subtree())
        except OSError:
            return None

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer took in this cgroup (limit hit)."""
        mem = self.dir("memory")
        if mem is None:
            return None
        if self.version == V1:
            return _read_key(f"{mem}/memory.oom_control", "oom_kill")
        return _read_key(f"{mem}/memory.events", "oom_kill")

    # -- the end ----------------------------------------------------------------
    def remove(self, timeout: float = KILL_TIMEOUT) -> bool:
        """rmdir every directory (and any the jail made below them) once it
        is empty; True when all are gone.  Waits up to `timeout` for
        processes that are still exiting."""
        deadline = time.monotonic() + timeout
        pause = 0.0005
        self._rmdir_tops()
        while self.made:
            busy = False
            for top in list(self.made):
                for d, _, _ in os.walk(top, topdown=False):
                    try:
                        os.rmdir(d)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        if e.errno != _errno.EBUSY:
                            raise CgroupError("remove", e.strerror, d, e.errno) from None
                        busy = True
                if not os.path.exists(top):
                    self.made.remove(top)
            if not busy and not self.made:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True

    def _rmdir_tops(self) -> None:
        """The common case, first: each directory empty of processes and
        with no cgroup below it, so one rmdir apiece removes it (no listing).
        What that does not remove (EBUSY, anything else) is left for the
        walk in remove(), which decides about it."""
        for top in list(self.made):
            try:
                os.rmdir(top)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self.made.remove(top)

    def destroy(self, timeout: float = KILL_TIMEOUT) -> bool:
        """kill_all, then remove: nothing of the jail is left when True.

        A cgroup already empty needs no kill-all: no process is in it to
        fork or be signalled, and only a member's fork (or a write to its
        cgroup.procs, which takes root on the host) could put one there.
        That is how a jail with a pid namespace ends (its init's exit took
        everything in the namespace), and skipping the freeze/thaw keeps
        the kernel's freezer off the exit path."""
        deadline = time.monotonic() + timeout
        if not self.empty():
            self.kill_all(timeout)
        return self.remove(max(0.0, deadline - time.monotonic()))


def format_device_rule(r: DeviceRule) -> str:
    """'c 1:3 rwm' (v1 devices.allow syntax); type 'a' is every device."""
    if r.type == "a":
        return "a"
    num = lambda n: "*" if n is None else str(n)   # noqa: E731
    return f"{r.type} {num(r.major)}:{num(r.minor)} {r.access}"


def enter_leaf(leaf: str = "broker", proc: str = "/proc",
               prefer: str | None = None) -> str | None:
    """For a daemon given a delegated cgroup on v2 (systemd Delegate=yes):
    move this process into `<own cgroup>/<leaf>`, so that its own cgroup can
    enable controllers for jail cgroups beside the leaf (v2 allows processes
    only in cgroups that enable none).  Returns the parent to create jail
    cgroups under, or None when nothing needs doing (v1, or v2 root)."""
    system = System.probe(prefer=prefer, proc=proc)
    if system.version != V2:
        return None
    h = system.hierarchies[0]
    if h.own == "/":
        return None
    d = h.dir_of(h.own)
    if d is None:
        return None
    leaf_dir = f"{d}/{leaf}"
    try:
        os.mkdir(leaf_dir, 0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise CgroupError("leaf", e.strerror, leaf_dir, e.errno) from None
    try:
        _write(f"{leaf_dir}/cgroup.procs", "0")
    except OSError as e:
        raise CgroupError("leaf", e.strerror, leaf_dir, e.errno) from None
    return h.own
