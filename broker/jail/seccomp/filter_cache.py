"""Compile once, load many: compiled programs cached on disk.

The key hashes everything a program depends on: the policy's bytes and its
@include/@frequency files' (found by a light scan, no parsing), the default
action, the architecture, the running kernel's version (a supplementary
constant depends on it), the syscall-name supplement's version, the
compiler's version and the constants table's digest.  A hit costs a few file
reads and stats and imports neither the parser nor the compiler; a miss
compiles (and a faulty policy raises PolicyError, never a cached answer).
Entries are trusted only as cache.py allows; at most KEEP are kept.
"""
from __future__ import annotations

import hashlib
import os
import re

from . import cache, syscall_names

COMPILER_VERSION = 1
KEEP = 512              # compiled programs kept; the oldest go first
_DIRECTIVE = re.compile(r"^\s*@(include|frequency)\s+(\S+)")
_INSN = 8


def _sources(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, bytes]] | None:
    """The policy's bytes and, recursively, its @include/@frequency files'.
    None when something is off: compiling will then say what."""
    real = os.path.realpath(path)
    if real in seen or len(seen) > 16:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    out = [(os.path.abspath(path), data)]
    for line in data.decode("utf-8", "replace").splitlines():
        m = _DIRECTIVE.match(line)
        if m:
            target = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                   m.group(2)))
            more = _sources(target, seen + (real,))
            if more is None:
                return None
            out.extend(more)
    return out


def cache_key(path: str | os.PathLike, default: str | None = None) -> str | None:
    """What a compiled program depends on, hashed; None if the sources can't be read."""
    from . import constants
    sources = _sources(os.fspath(path))
    if sources is None:
        return None
    h = hashlib.sha256()
    release = re.match(r"\d+\.\d+", os.uname().release)
    h.update(f"v{COMPILER_VERSION}\0{syscall_names.arch()}\0sup{syscall_names.TABLE_VERSION}\0"
             f"{release.group() if release else ''}\0{default}\0".encode())
    h.update(constants.table_digest().encode() + b"\0")
    for p, data in sources:
        h.update(p.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def compiled_filter(path: str | os.PathLike, default: str | None = None) -> bytes:
    """compile_policy(path, default), cached on disk (see the module doc)."""
    path = os.fspath(path)
    key = cache_key(path, default)
    d = cache.cache_dir() if key else None
    target = os.path.join(d, "filters", f"{key}.bpf") if d else None
    if target:
        data = cache.read_trusted(target)
        if data and len(data) % _INSN == 0:
            return data
    from .compiler import compile_policy
    program = compile_policy(path, default)
    if target and cache_key(path, default) == key:    # unchanged while we compiled
        if cache.write_atomic(target, program):
            _prune(os.path.dirname(target))
    return program


def _prune(directory: str, keep: int = KEEP) -> None:
    """Best effort: keep only the `keep` most recently written programs."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.endswith(".bpf")]
        if len(entries) <= keep:
            return
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[:len(entries) - keep]:
            os.unlink(e.path)
    except OSError:
        pass
