"""The broker's authorization policy: who may launch which profile, as whom,
and who may mount daemon stores (and where they are).

Read from broker.toml (default /etc/privbroker/broker.toml):

    profiles_dir = "/etc/privbroker/profiles"

    [limits]                      # every caller, unless a grant says otherwise
    max_live_jails = 16
    launches_per_second = 10
    calls_per_second = 200        # all methods, per uid; no grant overrides it

    [[grant]]
    name = "privbroker-group"     # named in every refusal and log line
    users = ["root"]              # names or uids
    groups = ["privbroker"]       # names or gids
    profiles = ["minimal"]
    run_as = "caller"             # default; or a user name; root only if named
    max_live_jails = 4            # optional per-grant limits
    devices = ["open", "chown"]   # OpenPath/CheckPathAccess, ChownDevice (default: none)

    [daemon_store]                # MountDaemonStore/UnmountDaemonStore (optional)
    users = ["root"]              # who may call them (default: root only)
    groups = []
    templates_dir = "/etc/daemon-store"       # the paths: broker/daemon_store.py
    run_dir = "/run/daemon-store"
    cache_run_dir = "/run/daemon-store-cache"
    home_root = "/home"                       # stores: <home_root>/.shadow/<hash>/...
    user_hash_pattern = "[0-9a-f]{40}"

    [devices]                     # dev root, rule chain, lease journal:
    ...                           # broker/devices/config.py

Decisions are made here and nowhere else: `decide()` returns a Grant or
raises AccessDenied whose message names the rule (or the absence of one)
without revealing anything about other users.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field, replace

from .daemon_store import Layout
from .devices import config as devices_config
from .devices.config import DevicesConfig
from .devices.rules import RuleConfigError

DEFAULT_CONFIG = "/etc/privbroker/broker.toml"
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PolicyError(ValueError):
    """The policy file itself is wrong (refused at start-up)."""


class AccessDenied(Exception):
    """The caller may not do this; the message names the rule."""


@dataclass(frozen=True)
class Limits:
    max_live_jails: int = 16
    launches_per_second: float = 10.0


@dataclass(frozen=True)
class Grant:
    name: str
    uids: frozenset[int]
    gids: frozenset[int]
    profiles: frozenset[str]
    run_as: int | None            # None: the caller's own uid
    limits: Limits
    devices: frozenset[str] = frozenset()     # device operations: "open", "chown"

    def covers(self, uid: int, gids: frozenset[int]) -> bool:
        return uid in self.uids or bool(self.gids & gids)

    def jail_uid(self, caller_uid: int) -> int:
        """The uid the jail runs as.  Root only where the grant says so in
        words: run_as = "root", or root listed by name/uid in users."""
        uid = caller_uid if self.run_as is None else self.run_as
        if uid == 0 and self.run_as != 0 and 0 not in self.uids:
            raise AccessDenied(f"grant {self.name!r} would run the jail as root, "
                               f"which it does not name")
        return uid


@dataclass(frozen=True)
class DaemonStoreGrant:
    """Who may mount and unmount daemon stores, and where they are."""
    uids: frozenset[int] = frozenset({0})
    gids: frozenset[int] = frozenset()
    layout: Layout = field(default_factory=Layout)

    def decide(self, uid: int, gids: frozenset[int]) -> None:
        if uid not in self.uids and not self.gids & gids:
            raise AccessDenied(f"uid {uid} may not mount or unmount daemon stores (callers "
                               f"are named in [daemon_store] of the broker's policy file)")


@dataclass(frozen=True)
class Policy:
    profiles_dir: str
    grants: tuple[Grant, ...]
    limits: Limits = field(default_factory=Limits)
    daemon_store: DaemonStoreGrant = field(default_factory=DaemonStoreGrant)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    # How many calls of one uid the broker starts per second (a burst of as
    # many first).  Calls past it wait their turn rather than fail: the bus's
    # pending-reply limit then slows the caller itself.  It applies before a
    # call is matched to a grant, so it is [limits]-only.
    calls_per_second: float = 200.0

    def decide(self, uid: int, gids: frozenset[int], profile: str) -> Grant:
        """The first grant that covers this caller and profile, or AccessDenied."""
        if not PROFILE_NAME.match(profile):
            raise AccessDenied(f"profile name {profile!r} is not a valid name")
        for g in self.grants:
            if g.covers(uid, gids) and profile in g.profiles:
                return g
        raise AccessDenied(f"no grant lets uid {uid} launch profile {profile!r} "
                           f"(grants are in the broker's policy file)")

    def device_grant(self, uid: int, gids: frozenset[int], op: str) -> Grant:
        """The first grant that lets this caller use device operation `op`
        ("open": OpenPath and CheckPathAccess, "chown": ChownDevice and
        CheckPathAccess), or AccessDenied.  Which devices is the rule
        chain's decision ([devices] rules), the same for every caller."""
        for g in self.grants:
            if g.covers(uid, gids) and op in g.devices:
                return g
        raise AccessDenied(f"no grant lets uid {uid} use device operation {op!r} "
                           f"(grants are in the broker's policy file)")


def load(path: str = DEFAULT_CONFIG) -> Policy:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise PolicyError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: {e}") from None
    pol = parse(data, path)
    if not os.path.isabs(pol.profiles_dir):
        # relative to the policy file, so a deployment directory is self-contained
        pol = replace(pol, profiles_dir=os.path.join(os.path.dirname(os.path.abspath(path)),
                                                     pol.profiles_dir))
    return pol


def parse(data: dict, where: str = "policy") -> Policy:
    known = {"profiles_dir", "limits", "grant", "daemon_store", "devices"}
    _no_unknown(data, known, where)
    if "profiles_dir" not in data:
        raise PolicyError(f"{where}: profiles_dir is required")
    limits_table = data.get("limits", {})
    _no_unknown(limits_table, {"max_live_jails", "launches_per_second", "calls_per_second"},
                f"{where} [limits]")
    limits = _limits(limits_table, Limits(), f"{where} [limits]")
    calls = limits_table.get("calls_per_second", Policy.calls_per_second)
    if not isinstance(calls, (int, float)) or isinstance(calls, bool) or calls <= 0:
        raise PolicyError(f"{where} [limits]: calls_per_second must be positive")
    grants = tuple(_grant(g, limits, f"{where} [[grant]] #{i + 1}")
                   for i, g in enumerate(data.get("grant", [])))
    names = [g.name for g in grants]
    if len(set(names)) != len(names):
        raise PolicyError(f"{where}: grant names must be unique")
    stores = _daemon_store(data.get("daemon_store", {}), f"{where} [daemon_store]")
    try:
        devices = devices_config.parse(data.get("devices", {}), f"{where} [devices]")
    except RuleConfigError as e:
        raise PolicyError(str(e)) from None
    return Policy(str(data["profiles_dir"]), grants, limits, stores, devices=devices,
                  calls_per_second=float(calls))


_LAYOUT_KEYS = ("templates_dir", "run_dir", "cache_run_dir", "home_root", "user_hash_pattern")


def _daemon_store(d: dict, where: str) -> DaemonStoreGrant:
    if not isinstance(d, dict):
        raise PolicyError(f"{where}: must be a table")
    _no_unknown(d, {"users", "groups", *_LAYOUT_KEYS}, where)
    for key in ("users", "groups"):
        if not isinstance(d.get(key, []), list):
            raise PolicyError(f"{where}: {key} must be a list")
    try:
        layout = Layout(**{k: d[k] for k in _LAYOUT_KEYS if k in d})
    except ValueError as e:
        raise PolicyError(f"{where}: {e}") from None
    return DaemonStoreGrant(
        uids=frozenset(_uid(u, where) for u in d.get("users", ["root"])),
        gids=frozenset(_gid(g, where) for g in d.get("groups", [])),
        layout=layout)


def _grant(d: dict, default_limits: Limits, where: str) -> Grant:
    _no_unknown(d, {"name", "users", "groups", "profiles", "run_as", "max_live_jails",
                    "launches_per_second", "devices"}, where)
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}: name is required")
    where = f"{where} ({name})"
    profiles = d.get("profiles", [])
    for p in profiles:
        if not isinstance(p, str) or not PROFILE_NAME.match(p):
            raise PolicyError(f"{where}: profile name {p!r} is not valid")
    if not d.get("users") and not d.get("groups"):
        raise PolicyError(f"{where}: names no users and no groups")
    run_as = d.get("run_as", "caller")
    devices = d.get("devices", [])
    if not isinstance(devices, list) or any(op not in ("open", "chown") for op in devices):
        raise PolicyError(f"{where}: devices must be a list of \"open\" and \"chown\"")
    return Grant(
        name=name,
        uids=frozenset(_uid(u, where) for u in d.get("users", [])),
        gids=frozenset(_gid(g, where) for g in d.get("groups", [])),
        profiles=frozenset(profiles),
        run_as=None if run_as == "caller" else _uid(run_as, where),
        limits=_limits(d, default_limits, where),
        devices=frozenset(devices),
    )


def _limits(d: dict, base: Limits, where: str) -> Limits:
    jails = d.get("max_live_jails", base.max_live_jails)
    rate = d.get("launches_per_second", base.launches_per_second)
    if not isinstance(jails, int) or jails < 0:
        raise PolicyError(f"{where}: max_live_jails must be a non-negative integer")
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise PolicyError(f"{where}: launches_per_second must be positive")
    return Limits(jails, float(rate))


def _uid(v, where: str) -> int:
    if isinstance(v, int) and v >= 0:
        return v
    try:
        return pwd.getpwnam(str(v)).pw_uid
    except KeyError:
        raise PolicyError(f"{where}: unknown user {v!r}") from None


def _gid(v, where: str) -> int:
    if isinstance(v, int) and v >= 0:
        return v
    try:
        return grp.getgrnam(str(v)).gr_gid
    except KeyError:
        raise PolicyError(f"{where}: unknown group {v!r}") from None


def _no_unknown(d: dict, known: set[str], where: str) -> None:
    extra = set(d) - known
    if extra:
        raise PolicyError(f"{where}: unknown keys {', '.join(sorted(extra))}")
