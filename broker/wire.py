"""The request format between the broker's front and its launcher.

One SOCK_SEQPACKET message per request, reply or event: a UTF-8 JSON object
of at most MAX_MESSAGE bytes, with file descriptors (the jail's stdio) passed
alongside as SCM_RIGHTS.  Every message carries the protocol version; the
launcher refuses anything it does not understand, whole.

    front -> launcher   {"v": 1, "seq": N, "op": "launch", "jail": ID,
                         "spec": {...JailSpec...}, "fd_targets": [0, 1, 2]}  + fds
                        {"v": 1, "seq": N, "op": "signal", "jail": ID, "signal": S}
                        {"v": 1, "seq": N, "op": "stats", "jail": ID}
                        {"v": 1, "seq": N, "op": "daemon-store", "action": "mount"|"unmount",
                         "daemon": NAME, "user_hash": HASH, "lazy": false}
    launcher -> front   {"v": 1, "seq": N, "ok": true, "pid": P}
                        {"v": 1, "seq": N, "ok": true, "changed": ["store", "cache"]}
                        {"v": 1, "seq": N, "ok": true, "stats": {"memory_bytes": M,
                         "pids": P, "cpu_usec": U, "oom_kills": K, ...}}  (jail cgroup)
                        {"v": 1, "seq": N, "ok": false, "error": KIND, "message": TEXT}
                        {"v": 1, "event": "exited", "jail": ID, "code": C|null,
                         "signal": S|null, "oom": B}   (B: the OOM killer ended it)

This module is pure: it encodes and decodes, and checks shapes.  Sockets are
the caller's business.
"""
from __future__ import annotations

import json
import re

from .daemon_store import Request as DaemonStoreRequest
from .jail.spec import Bind, DeviceRule, FsRule, IdMap, JailSpec, Mount, Rlimit

VERSION = 1
# One SOCK_SEQPACKET message must fit in the socket's send buffer: 212,992
# bytes by default (net.core.wmem_default), of which 212,960 carry data
# (measured).  192 KiB stays inside it on any default-configured kernel.
MAX_MESSAGE = 192 * 1024
MAX_FDS = 16
JAIL_ID = re.compile(r"^[a-z0-9]{1,32}$")


class WireError(ValueError):
    """A message that does not have the agreed shape."""


def encode(msg: dict) -> bytes:
    data = json.dumps({"v": VERSION, **msg}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict:
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise WireError("not a JSON object")
    if msg.get("v") != VERSION:
        raise WireError(f"protocol version {msg.get('v')!r}, expected {VERSION}")
    return msg


# -- JailSpec <-> plain data ---------------------------------------------------

_TUPLE_FIELDS = {"argv", "groups"}


def spec_to_wire(spec: JailSpec) -> dict:
    from .jail.spec import to_dict
    return to_dict(spec)


def spec_from_wire(d: dict) -> JailSpec:
    """Rebuild a JailSpec, refusing unknown fields and wrong types.
    (Whether the spec is *allowed* is the receiver's own check.)"""
    if not isinstance(d, dict):
        raise WireError("spec is not an object")
    fields = dict(d)
    try:
        fields["namespaces"] = frozenset(_strs(fields.get("namespaces", []), "namespaces"))
        fields["mounts"] = tuple(_mount(m) for m in fields.get("mounts", []))
        fields["uid_map"] = tuple(IdMap(**m) for m in fields.get("uid_map", []))
        fields["gid_map"] = tuple(IdMap(**m) for m in fields.get("gid_map", []))
        fields["rlimits"] = tuple(Rlimit(**r) for r in fields.get("rlimits", []))
        fields["landlock"] = tuple(FsRule(**r) for r in fields.get("landlock", []))
        if fields.get("device_allow") is not None:
            fields["device_allow"] = tuple(_device_rule(r) for r in fields["device_allow"])
        fields["env_add"] = _env_pairs(fields.get("env_add", []))
        for name in _TUPLE_FIELDS:
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        spec = JailSpec(**fields)
    except TypeError as e:
        raise WireError(f"spec: {e}") from None
    _check_types(spec)
    return spec


def _mount(m: dict):
    if not isinstance(m, dict):
        raise WireError("mount is not an object")
    m = dict(m)
    kind = m.pop("kind", None)
    if kind == "bind":
        return Bind(**m)
    if kind == "mount":
        return Mount(**m)
    raise WireError(f"unknown mount kind {kind!r}")


def _env_pairs(v) -> tuple[tuple[str, str], ...]:
    # a list of [NAME, VALUE] pairs of strings; anything else is malformed
    # (found by tests/test_fuzz.py: a bare string used to raise ValueError)
    if not isinstance(v, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in v):
        raise WireError("env_add must be a list of [name, value] string pairs")
    return tuple((k, x) for k, x in v)


def _device_rule(r) -> DeviceRule:
    if not isinstance(r, dict):
        raise WireError("device rule is not an object")
    return DeviceRule(**r)


def _strs(v, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise WireError(f"{what} must be a list of strings")
    return v


_INT_OR_NONE = ("uid", "gid", "capabilities", "tmpfs_tmp_size")
_BOOLS = ("pid_init", "mount_dev", "remount_proc_ro", "ambient", "no_new_privs",
          "env_reset", "detach", "die_with_parent", "landlock_best_effort")
_STR_OR_NONE = ("hostname", "pivot_root", "chroot", "cwd", "pidfile", "seccomp_policy",
                "seccomp_bpf", "seccomp_default", "enter_mount_ns")
# the jail's cgroup (cgroups.py)
_INT_OR_NONE += ("memory_limit", "pids_limit", "cpu_weight", "cpu_quota")
_BOOLS += ("own_cgroup",)
_STR_OR_NONE += ("cgroup_parent",)


def _check_types(s: JailSpec) -> None:
    bad = [n for n in _INT_OR_NONE if not (getattr(s, n) is None or
                                           (type(getattr(s, n)) is int))]
    bad += [n for n in _BOOLS if type(getattr(s, n)) is not bool]
    bad += [n for n in _STR_OR_NONE if not (getattr(s, n) is None or
                                            isinstance(getattr(s, n), str))]
    if s.argv is None or not all(isinstance(a, str) for a in s.argv):
        bad.append("argv")     # None used to escape as a TypeError (tests/test_fuzz.py)
    if s.groups is not None and not all(type(g) is int for g in s.groups):
        bad.append("groups")
    if bad:
        raise WireError(f"spec fields of the wrong type: {', '.join(bad)}")


# -- daemon-store requests: exactly these fields, of exactly these types ------------

DAEMON_STORE_ACTIONS = ("mount", "unmount")
_DAEMON_STORE_KEYS = {"v", "seq", "op", "action", "daemon", "user_hash", "lazy"}


def daemon_store_to_wire(action: str, req: DaemonStoreRequest) -> dict:
    return {"op": "daemon-store", "action": action, "daemon": req.daemon,
            "user_hash": req.user_hash, "lazy": req.lazy}


def daemon_store_from_wire(msg: dict) -> tuple[str, DaemonStoreRequest]:
    """(action, request), or WireError.  Whether the names are acceptable is
    the receiver's own check (daemon_store.check_request)."""
    if set(msg) != _DAEMON_STORE_KEYS:
        raise WireError(f"daemon-store request fields {sorted(msg)}, expected "
                        f"{sorted(_DAEMON_STORE_KEYS)}")
    action, daemon, user_hash, lazy = (msg["action"], msg["daemon"], msg["user_hash"],
                                       msg["lazy"])
    if action not in DAEMON_STORE_ACTIONS:
        raise WireError(f"bad daemon-store action {action!r}")
    if not isinstance(daemon, str) or not isinstance(user_hash, str) or type(lazy) is not bool:
        raise WireError("daemon-store request: daemon and user_hash must be strings, "
                        "lazy a boolean")
    return action, DaemonStoreRequest(daemon, user_hash, lazy)
