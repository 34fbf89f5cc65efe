"""The broker's jail core: profiles, request options, limits, live jails.

Nothing here knows D-Bus: the service hands in plain values (who, which
profile, argv, env, fd numbers, options) and gets back a jail id or a
BrokerError.  The decisions, in order:

  1. policy.decide        - may this caller launch this profile, as whom;
  2. limits               - live jails and launch rate per caller uid;
  3. profile              - the server-side minijail config file, parsed once;
  4. request              - argv, env and fd numbers are well-formed;
  5. options              - each one can only tighten the profile;
  6. exposure             - the final spec must not be in the forbidden
                            intersection (jail/exposure.py decides);
  7. launcher             - the spec goes to the launcher process.
"""
from __future__ import annotations

import asyncio
import pwd
import resource
import secrets
import time
from dataclasses import dataclass, field, replace

from .envelope import (BROKER_FORCED, DEFAULT_CPU_WEIGHT, Profiles, ProfileError,
                       is_loader_env)
from .jail import config as jail_config
from .jail import landlock
from .jail.exposure import check_forbidden_intersection
from .jail.spec import RLIM_INFINITY, JailSpec, Rlimit
from .policy import AccessDenied, Policy

MAX_ARGV = 1024
MAX_ENV = 1024
MAX_STRING = 64 * 1024
MAX_TOTAL = 1024 * 1024
MAX_FD_NUMBER = 1023


class BrokerError(Exception):
    """A refusal with a D-Bus error kind: AccessDenied, InvalidArgument,
    NotFound, PolicyViolation, LimitExceeded, Unsupported, Failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def invalid(message: str) -> BrokerError:
    return BrokerError("InvalidArgument", message)


@dataclass
class LiveJail:
    jail_id: str
    owner: str              # unique bus name of the launching caller
    uid: int                # the caller's uid
    profile: str
    argv: tuple[str, ...]
    pid: int = 0
    started: float = field(default_factory=time.time)
    die_with_caller: bool = True
    timeout: asyncio.TimerHandle | None = None
    limits: dict = field(default_factory=dict)   # the cgroup limits it runs under


@dataclass
class _Rate:
    tokens: float
    stamp: float


class JailCore:
    def __init__(self, policy: Policy, launcher_client, on_exited):
        self.policy = policy
        self.launcher = launcher_client
        self.on_exited = on_exited       # (LiveJail, code, signal, oom) -> None
        self.live: dict[str, LiveJail] = {}
        self.starting: dict[int, int] = {}   # per caller uid: launches awaiting the launcher
        self.rates: dict[int, _Rate] = {}
        self.profiles = Profiles(policy.profiles_dir)
        self.landlock_abi = landlock.abi_version()   # 0: Landlock rules would enforce nothing

    # -- Launch -----------------------------------------------------------------
    async def launch(self, caller, profile: str, argv: list[str], env: dict[str, str],
                     fds: dict[int, int], options: dict) -> LiveJail:
        grant = self.policy.decide(caller.uid, caller.gids, profile)
        uid = grant.jail_uid(caller.uid)
        self._check_limits(caller.uid, grant.limits)
        check_request(argv, env, fds)
        base = self.profile_spec(profile)
        spec = apply_options(base, options)
        spec = replace(spec, argv=tuple(argv), uid=uid, gid=primary_gid(uid, caller),
                       env_add=tuple(env.items()),
                       # the same for every broker jail (why: broker/envelope.py),
                       # and checked again by the launcher
                       **BROKER_FORCED)
        self._check_exposure(profile, spec)
        jail = LiveJail(secrets.token_hex(8), caller.name, caller.uid, profile, tuple(argv),
                        die_with_caller=bool(options.get("die_with_caller", True)))
        jail.limits = {k: getattr(spec, k) for k in CGROUP_LIMITS
                       if getattr(spec, k) is not None}
        targets = sorted(fds)
        from . import wire
        from .launcher import LauncherFailed
        # Counted against max_live_jails from here on, so that launches
        # awaiting the launcher at the same time cannot all pass the check.
        self.starting[caller.uid] = self.starting.get(caller.uid, 0) + 1
        try:
            reply = await self.launcher.request(
                {"op": "launch", "jail": jail.jail_id, "profile": profile,
                 "spec": wire.spec_to_wire(spec), "fd_targets": targets},
                [fds[t] for t in targets])
        except wire.WireError as e:     # argv and env within MAX_TOTAL, but JSON-escaped
            raise invalid(f"the launch request is too large: {e}") from None
        except LauncherFailed as e:
            raise BrokerError(_LAUNCHER_ERRORS.get(e.kind, "Failed"), str(e)) from None
        else:
            jail.pid = reply["pid"]
            self.live[jail.jail_id] = jail
        finally:
            self.starting[caller.uid] -= 1
            if not self.starting[caller.uid]:
                del self.starting[caller.uid]
        if "timeout_s" in options:
            jail.timeout = asyncio.get_running_loop().call_later(
                options["timeout_s"], self._kill_soon, jail.jail_id)
        return jail

    def _check_exposure(self, profile: str, spec: JailSpec) -> None:
        """The broker never starts a jail in the forbidden intersection, whatever
        the profile says: the launcher runs as root, so that is what a spec
        without a uid change would get."""
        verdict = check_forbidden_intersection(spec, 0, landlock_abi=self.landlock_abi)
        if verdict.forbidden:
            raise BrokerError("PolicyViolation",
                              f"profile {profile!r} would run uid {verdict.host_uid} in the "
                              f"forbidden intersection ("
                              + "; ".join(f"{n}: {e.reason}" for n, e in verdict.escapes())
                              + f"); the profile must {verdict.missing()}")

    def _check_limits(self, uid: int, limits) -> None:
        mine = sum(1 for j in self.live.values() if j.uid == uid) + self.starting.get(uid, 0)
        if mine >= limits.max_live_jails:
            raise BrokerError("LimitExceeded", f"uid {uid} already has {mine} live jails "
                              f"(limit {limits.max_live_jails})")
        now = time.monotonic()
        rate = self.rates.setdefault(uid, _Rate(limits.launches_per_second, now))
        rate.tokens = min(limits.launches_per_second,
                          rate.tokens + (now - rate.stamp) * limits.launches_per_second)
        rate.stamp = now
        if rate.tokens < 1:
            raise BrokerError("LimitExceeded", f"uid {uid} launches faster than "
                              f"{limits.launches_per_second:g} per second")
        rate.tokens -= 1

    def profile_spec(self, name: str) -> JailSpec:
        """The profile's spec, parsed once per version of its file."""
        try:
            return self.profiles.spec(name)
        except ProfileError as e:
            raise BrokerError("NotFound" if e.missing else "Failed", str(e)) from None

    # -- Signal, list, exits ----------------------------------------------------
    def own(self, caller, jail_id: str) -> LiveJail:
        jail = self.live.get(jail_id)
        if jail is None or jail.owner != caller.name:
            # The same answer whether it is someone else's or does not exist.
            raise BrokerError("NotFound", f"you have no jail {jail_id!r}")
        return jail

    async def signal(self, caller, jail_id: str, sig: int) -> None:
        jail = self.own(caller, jail_id)
        if not 0 < sig < 65:
            raise invalid(f"signal {sig} is not a valid signal number")
        await self.launcher.request({"op": "signal", "jail": jail.jail_id, "signal": sig})

    def list(self, caller) -> list[LiveJail]:
        return [j for j in self.live.values() if j.owner == caller.name]

    async def stats(self, jail: LiveJail) -> dict:
        """The jail's cgroup accounting now: memory_bytes, pids, cpu_usec,
        oom_kills (what this machine accounts); {} once it is gone."""
        try:
            reply = await self.launcher.request({"op": "stats", "jail": jail.jail_id})
        except Exception:
            return {}         # exited meanwhile: its exit event is on the way
        stats = reply.get("stats")
        return stats if isinstance(stats, dict) else {}

    def exited(self, jail_id: str, code, sig, oom: bool = False) -> None:
        jail = self.live.pop(jail_id, None)
        if jail is None:
            return
        if jail.timeout:
            jail.timeout.cancel()
        self.on_exited(jail, code, sig, oom)

    def caller_gone(self, name: str) -> None:
        for jail in list(self.live.values()):
            if jail.owner == name and jail.die_with_caller:
                self._kill_soon(jail.jail_id)

    def _kill_soon(self, jail_id: str) -> None:
        if jail_id in self.live:
            asyncio.ensure_future(self._kill(jail_id))

    async def _kill(self, jail_id: str) -> None:
        try:
            await self.launcher.request({"op": "signal", "jail": jail_id, "signal": 9})
        except Exception:
            pass          # already gone: its exit event is on the way


# -- request checks (pure) ---------------------------------------------------------

def check_request(argv: list[str], env: dict[str, str], fds: dict[int, int]) -> None:
    if not argv or not argv[0]:
        raise invalid("argv must name a program")
    if len(argv) > MAX_ARGV or len(env) > MAX_ENV:
        raise invalid(f"at most {MAX_ARGV} arguments and {MAX_ENV} environment entries")
    total = 0
    for s in list(argv) + list(env) + list(env.values()):
        if "\0" in s:
            raise invalid("arguments and environment may not contain NUL")
        if len(s) > MAX_STRING:
            raise invalid(f"a string longer than {MAX_STRING} bytes")
        total += len(s)
    if total > MAX_TOTAL:
        raise invalid(f"argv and env together exceed {MAX_TOTAL} bytes")
    for name in env:
        if not name or "=" in name:
            raise invalid(f"environment name {name!r} is empty or contains '='")
        # a caller must never point a jailed program's loader at its own code
        if is_loader_env(name):
            raise BrokerError("AccessDenied", f"environment name {name!r} is not allowed "
                              f"(the dynamic loader acts on it)")
    for n in fds:
        if not 0 <= n <= MAX_FD_NUMBER:
            raise invalid(f"fd number {n} is out of range 0..{MAX_FD_NUMBER}")


def primary_gid(uid: int, caller) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        if uid == caller.uid and caller.gids:
            return min(caller.gids)
        raise BrokerError("Failed", f"uid {uid} has no user entry") from None


# -- options: each one only tightens ------------------------------------------------

def apply_options(spec: JailSpec, options: dict) -> JailSpec:
    known = {"cwd", "no_network", "rlimits", "timeout_s", "die_with_caller",
             *CGROUP_OPTIONS}
    unknown = set(options) - known
    if unknown:
        raise invalid(f"unknown options: {', '.join(sorted(unknown))} "
                      f"(known: {', '.join(sorted(known))})")
    if "cwd" in options:
        cwd = options["cwd"]
        if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
            raise invalid("option cwd must be an absolute path")
        spec = replace(spec, cwd=cwd)
    if options.get("no_network"):
        spec = replace(spec, namespaces=spec.namespaces | {"net"})
    if "timeout_s" in options:
        t = options["timeout_s"]
        if not isinstance(t, int) or t <= 0:
            raise invalid("option timeout_s must be a positive number of seconds")
    if "die_with_caller" in options and not isinstance(options["die_with_caller"], bool):
        raise invalid("option die_with_caller must be a boolean")
    if "rlimits" in options:
        spec = replace(spec, rlimits=_tighter_rlimits(spec, options["rlimits"]))
    for name, field_name in CGROUP_OPTIONS.items():
        if name in options:
            spec = replace(spec, **{field_name: _tighter_cgroup_limit(spec, name, options[name])})
    return spec


# Launch options that set a cgroup limit -> the JailSpec field.  Each may only
# lower the profile's limit (or, for cpu_weight, its share: 100 where the
# profile says nothing); a profile without a limit allows any.
CGROUP_OPTIONS = {"memory_limit": "memory_limit", "pids_limit": "pids_limit",
                  "cpu_weight": "cpu_weight", "cpu_quota": "cpu_quota"}
CGROUP_LIMITS = ("memory_limit", "pids_limit", "cpu_weight", "cpu_quota")
_LAUNCHER_ERRORS = {"unsupported": "Unsupported", "invalid": "InvalidArgument",
                    # the launcher's envelope (broker/envelope.py) refused the spec
                    "refused": "AccessDenied"}


def _tighter_cgroup_limit(spec: JailSpec, name: str, value) -> int:
    """A request's cgroup limit: parsed like the profile key (memory_limit
    takes bytes, '512M' or '25%'; cpu_quota takes 50 or '50%'), and at most
    the profile's own."""
    from .jail.spec import SpecError, validate
    parse = {"memory_limit": jail_config.parse_memory_limit,
             "cpu_quota": jail_config.parse_cpu_quota}.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise invalid(f"option {name} must be a number or a string")
    try:
        if parse is not None:
            asked = parse(str(value))
        else:
            asked = jail_config._parse_count(str(value), "a whole number", 1 << 32)
        validate(replace(spec, argv=("/bin/true",), **{CGROUP_OPTIONS[name]: asked}))
    except (ValueError, SpecError) as e:
        raise invalid(f"option {name}: {e}") from None
    current = getattr(spec, CGROUP_OPTIONS[name])
    ceiling = DEFAULT_CPU_WEIGHT if name == "cpu_weight" and current is None else current
    if ceiling is not None and asked > ceiling:
        raise BrokerError("AccessDenied", f"option {name} ({asked}) would loosen the "
                          f"profile (at most {ceiling})")
    return asked


def _tighter_rlimits(spec: JailSpec, asked: dict) -> tuple[Rlimit, ...]:
    """{"RLIMIT_NOFILE": (soft, hard)}: each at most what the profile (or,
    where it says nothing, the broker's own limit) would give."""
    current = {r.resource: r for r in spec.rlimits}
    for name, value in asked.items():
        res = getattr(resource, name, None) if name.startswith("RLIMIT_") else None
        if not isinstance(res, int):
            raise invalid(f"unknown rlimit {name!r}")
        try:
            soft, hard = (int(v) for v in value)
        except (TypeError, ValueError):
            raise invalid(f"rlimit {name} must be (soft, hard)") from None
        if res in current:
            ceiling = current[res].hard
        else:
            h = resource.getrlimit(res)[1]
            ceiling = RLIM_INFINITY if h == resource.RLIM_INFINITY else h
        if not 0 <= soft <= hard <= ceiling:
            raise BrokerError("AccessDenied", f"rlimit {name} ({soft}, {hard}) would loosen "
                              f"the profile (hard limit at most {ceiling})")
        current[res] = Rlimit(res, soft, hard)
    return tuple(current.values())


# Referenced by the service for the error mapping of the policy layer.
__all__ = ["JailCore", "BrokerError", "AccessDenied", "LiveJail", "check_request",
           "apply_options"]
