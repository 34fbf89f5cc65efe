"""The request format between the broker's front and its launcher.

One SOCK_SEQPACKET message per request, reply or event: a UTF-8 JSON object
of at most MAX_MESSAGE bytes, with file descriptors (the jail's stdio) passed
alongside as SCM_RIGHTS.  Every message carries the protocol version; the
launcher refuses anything it does not understand, whole.

    front -> launcher   {"v": 1, "seq": N, "op": "launch", "jail": ID,
                         "spec": {...JailSpec...}, "fd_targets": [0, 1, 2]}  + fds
                        {"v": 1, "seq": N, "op": "signal", "jail": ID, "signal": S}
    launcher -> front   {"v": 1, "seq": N, "ok": true, "pid": P}
                        {"v": 1, "seq": N, "ok": false, "error": KIND, "message": TEXT}
                        {"v": 1, "event": "exited", "jail": ID, "code": C|null,
                         "signal": S|null}

This module is pure: it encodes and decodes, and checks shapes.  Sockets are
the caller's business.
"""
from __future__ import annotations

import json
import re

from .jail.spec import Bind, FsRule, IdMap, JailSpec, Mount, Rlimit

VERSION = 1
MAX_MESSAGE = 256 * 1024
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
        fields["env_add"] = tuple((str(k), str(v)) for k, v in fields.get("env_add", []))
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


def _strs(v, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise WireError(f"{what} must be a list of strings")
    return v


_INT_OR_NONE = ("uid", "gid", "capabilities", "tmpfs_tmp_size")
_BOOLS = ("pid_init", "mount_dev", "remount_proc_ro", "ambient", "no_new_privs",
          "env_reset", "detach", "die_with_parent", "landlock_best_effort")
_STR_OR_NONE = ("hostname", "pivot_root", "chroot", "cwd", "pidfile", "seccomp_policy",
                "seccomp_bpf", "seccomp_default")


def _check_types(s: JailSpec) -> None:
    bad = [n for n in _INT_OR_NONE if not (getattr(s, n) is None or
                                           (type(getattr(s, n)) is int))]
    bad += [n for n in _BOOLS if type(getattr(s, n)) is not bool]
    bad += [n for n in _STR_OR_NONE if not (getattr(s, n) is None or
                                            isinstance(getattr(s, n), str))]
    if not all(isinstance(a, str) for a in s.argv):
        bad.append("argv")
    if s.groups is not None and not all(type(g) is int for g in s.groups):
        bad.append("groups")
    if bad:
        raise WireError(f"spec fields of the wrong type: {', '.join(bad)}")
