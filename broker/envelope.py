"""The launch envelope: the specs the launcher will start for the front.

The front (D-Bus, the policy, every parser of untrusted input) builds each
jail's spec and the launcher starts it as root.  A compromised front writes
whatever spec it likes, so the launcher does not take a spec on trust: it
reads the same policy file and the same profiles itself (it is handed the
policy before the front exists) and refuses any spec the front could never
have produced from them.

A broker jail's spec is its profile's spec with exactly these changes
(broker/jails.py makes them; `check` below is the other side of the same
contract):

  request     argv, env_add (no loader variables), cwd (absolute)
  identity    uid and gid: a uid some grant of this profile can give
              (root only where a grant names root), the gid that uid's
              passwd entry names
  tightening  namespaces may gain "net"; rlimits and cgroup limits may only
              go down (profile.rlimits may not lose an entry)
  forced      BROKER_FORCED, the same for every broker jail
  the rest    equal to the profile's, field by field: a JailSpec field added
              later is covered without touching this module

and, like every broker jail, it must stay out of the forbidden intersection
(jail/exposure.py decides).

What the launcher cannot check is *which caller* asked: it never sees the
bus.  So a compromised front can start any profile some grant names, as any
uid some grant of that profile could give; the bound is the policy's, not
one caller's.  Root is never among them unless the policy names root.
"""
from __future__ import annotations

import dataclasses
import os
import pwd
import resource

from .jail import config as jail_config
from .jail.exposure import check_forbidden_intersection
from .jail.spec import RLIM_INFINITY, JailSpec
from .policy import Policy

# What every broker jail gets, whatever its profile says.  Why each:
BROKER_FORCED = dict(
    groups=(),                  # no supplementary groups inherited from anyone
    env_reset=True,             # the broker's own environment never leaks in
    detach=False,               # the launcher tracks (and reaps) every jail
    pidfile=None,               # no path written on the host on a caller's behalf
    die_with_parent=True,       # a dead launcher leaves no jail behind
    new_session_keyring=True,   # never the broker's session keyring
    own_cgroup=True,            # kill-all on Signal/disconnect, and accounting
)
# Fields a request sets (checked below one by one, never compared to the profile).
REQUEST_FIELDS = frozenset({"argv", "env_add", "cwd", "uid", "gid", "namespaces", "rlimits",
                            "memory_limit", "pids_limit", "cpu_weight", "cpu_quota"})
# A request's namespaces may add only this one (the no_network option).
ADDABLE_NAMESPACES = frozenset({"net"})
# Environment names the dynamic loader (ld.so) acts on: every LD_*, and
# GLIBC_TUNABLES, which ld.so itself parses before the program runs (its
# parser was the Looney Tunables overflow, CVE-2023-4911).  is_loader_env
# decides; the front (broker/jails.py) and the launcher (below) refuse them.
LOADER_ENV_PREFIX = "LD_"
LOADER_ENV_NAMES = frozenset({"GLIBC_TUNABLES"})
# cpu_weight where the profile sets none: everyone's default share.
DEFAULT_CPU_WEIGHT = 100


def is_loader_env(name: str) -> bool:
    """Does the dynamic loader act on this environment name?"""
    return name.startswith(LOADER_ENV_PREFIX) or name in LOADER_ENV_NAMES


class ProfileError(Exception):
    """A profile that does not exist (missing=True) or does not parse."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class OutsideEnvelope(Exception):
    """A spec the policy and profiles could never produce."""


class Profiles:
    """The profiles directory: each NAME.conf parsed once per version of the
    file.  The front and the launcher each hold one and read the same files."""

    def __init__(self, directory: str):
        self.directory = directory
        self._cache: dict[str, tuple[tuple[int, int], JailSpec]] = {}

    def spec(self, name: str) -> JailSpec:
        path = os.path.join(self.directory, name + ".conf")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ProfileError(f"no profile {name!r}", missing=True) from None
        version = (st.st_mtime_ns, st.st_ino)
        cached = self._cache.get(name)
        if cached and cached[0] == version:
            return cached[1]
        try:
            spec = jail_config.parse_command_line(["--config", path, "--", "/bin/true"])
        except jail_config.ConfigError as e:
            raise ProfileError(f"profile {name!r} is broken: {e}") from None
        self._cache[name] = (version, spec)
        return spec


class Envelope:
    def __init__(self, policy: Policy, profiles: Profiles | None = None):
        self.policy = policy
        self.profiles = profiles or Profiles(policy.profiles_dir)

    def check(self, profile: str, spec: JailSpec) -> None:
        """Return if the front could have built `spec` for `profile`; else
        OutsideEnvelope naming the first field that is out of bounds."""
        try:
            base = self.profiles.spec(profile)
        except ProfileError as e:
            raise OutsideEnvelope(str(e)) from None
        _check_uid(self.policy, profile, spec.uid)
        _check_gid(spec.uid, spec.gid)
        _check_forced(spec)
        _check_request_fields(base, spec)
        _check_unchanged(base, spec)
        verdict = check_forbidden_intersection(spec, 0)
        if verdict.forbidden:
            raise OutsideEnvelope("the spec is in the forbidden intersection")


def granted_uid(policy: Policy, profile: str, uid: int) -> bool:
    """Could some grant of `profile` run a jail as `uid`?  (Grant.jail_uid is
    the per-caller form of the same rule.)"""
    for g in policy.grants:
        if profile not in g.profiles:
            continue
        if g.run_as is not None and g.run_as == uid:
            return True
        if g.run_as is None and (uid != 0 or 0 in g.uids):
            return True
    return False


def _check_uid(policy: Policy, profile: str, uid) -> None:
    if type(uid) is not int:
        raise OutsideEnvelope("the spec must set the jail's uid")
    if not any(profile in g.profiles for g in policy.grants):
        raise OutsideEnvelope(f"no grant names profile {profile!r}")
    if not granted_uid(policy, profile, uid):
        raise OutsideEnvelope(f"no grant of profile {profile!r} runs jails as uid {uid}")


def _check_gid(uid: int, gid) -> None:
    if type(gid) is not int:
        raise OutsideEnvelope("the spec must set the jail's gid")
    try:
        expected = pwd.getpwuid(uid).pw_gid
    except KeyError:
        # No passwd entry: the front took one of the caller's own groups,
        # which the launcher cannot see; it can still refuse group root.
        if gid == 0 and uid != 0:
            raise OutsideEnvelope(f"gid 0 for uid {uid}, which has no passwd entry") from None
        return
    if gid != expected:
        raise OutsideEnvelope(f"gid {gid} is not uid {uid}'s primary group ({expected})")


def _check_forced(spec: JailSpec) -> None:
    for name, value in BROKER_FORCED.items():
        if getattr(spec, name) != value:
            raise OutsideEnvelope(f"{name} must be {value!r} in a broker jail")


def _check_request_fields(base: JailSpec, spec: JailSpec) -> None:
    if not spec.argv or not spec.argv[0]:
        raise OutsideEnvelope("argv must name a program")
    for name, _ in spec.env_add:
        if is_loader_env(name):
            raise OutsideEnvelope(f"environment name {name!r} is not allowed")
    if spec.cwd is not None and spec.cwd != base.cwd and not spec.cwd.startswith("/"):
        raise OutsideEnvelope("cwd must be absolute")
    if not base.namespaces <= spec.namespaces:
        raise OutsideEnvelope("namespaces: the profile's may not be removed")
    if not spec.namespaces - base.namespaces <= ADDABLE_NAMESPACES:
        raise OutsideEnvelope(f"namespaces: only {sorted(ADDABLE_NAMESPACES)} may be added")
    _check_rlimits(base, spec)
    for name in ("memory_limit", "pids_limit", "cpu_quota", "cpu_weight"):
        profile_value, value = getattr(base, name), getattr(spec, name)
        if value is None:
            if profile_value is not None:
                raise OutsideEnvelope(f"{name}: the profile's limit may not be removed")
            continue
        ceiling = profile_value
        if name == "cpu_weight" and ceiling is None:
            ceiling = DEFAULT_CPU_WEIGHT
        if ceiling is not None and value > ceiling:
            raise OutsideEnvelope(f"{name} {value} exceeds the profile's {ceiling}")


def _check_rlimits(base: JailSpec, spec: JailSpec) -> None:
    profile = {r.resource: r for r in base.rlimits}
    asked = {r.resource: r for r in spec.rlimits}
    if len(asked) != len(spec.rlimits):
        raise OutsideEnvelope("rlimits: a resource is listed twice")
    if not set(profile) <= set(asked):
        raise OutsideEnvelope("rlimits: the profile's may not be removed")
    for res, r in asked.items():
        if res in profile:
            ceiling = profile[res].hard
        else:
            hard = resource.getrlimit(res)[1]
            ceiling = RLIM_INFINITY if hard == resource.RLIM_INFINITY else hard
        if not 0 <= r.soft <= r.hard <= ceiling:
            raise OutsideEnvelope(f"rlimit {res}: ({r.soft}, {r.hard}) exceeds {ceiling}")


def _check_unchanged(base: JailSpec, spec: JailSpec) -> None:
    for f in dataclasses.fields(JailSpec):
        if f.name in REQUEST_FIELDS or f.name in BROKER_FORCED:
            continue
        if getattr(spec, f.name) != getattr(base, f.name):
            raise OutsideEnvelope(f"{f.name} differs from the profile's")
