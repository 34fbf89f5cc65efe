"""Where generated tables and compiled filters are kept, and how they are trusted.

A cached filter decides what a jailed program may do, so a cache entry is
only believed when nobody but us (or root) could have written it: the
directory and the file must be owned by the effective uid or by root and be
writable by neither group nor others.  Anything else is ignored (and
recomputed), never trusted.  Writes are atomic (temporary file + rename).

The directory is, in order: $PRIVBROKER_CACHE_DIR; /var/cache/privbroker for
root, $XDG_CACHE_HOME/privbroker (or ~/.cache/privbroker) for others; a
``_cache`` directory beside this package.  The first one that exists or can
be created, and is safe, is used.  None usable: nothing is cached.
"""
from __future__ import annotations

import os
import stat

ENV_VAR = "PRIVBROKER_CACHE_DIR"


def _candidates() -> list[str]:
    out = []
    env = os.environ.get(ENV_VAR)
    if env:
        return [env]            # an explicit choice is never second-guessed by a fallback
    if os.geteuid() == 0:
        out.append("/var/cache/privbroker")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache")
        out.append(os.path.join(base, "privbroker"))
    out.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cache"))
    return out


def is_safe(st: os.stat_result) -> bool:
    """Owned by us or root, and not writable by group or others."""
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _ensure_dir(d: str) -> None:
    """Create d (and parents) if missing, with exactly our mode whatever the umask."""
    if not os.path.isdir(d):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755 if os.geteuid() == 0 else 0o700)


def cache_dir() -> str | None:
    """The directory to cache in, created if needed; None when none is usable."""
    for d in _candidates():
        try:
            _ensure_dir(d)
            st = os.stat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and is_safe(st) and os.access(d, os.W_OK | os.X_OK):
            return d
    return None


def read_trusted(path: str) -> bytes | None:
    """The file's bytes if it exists and is safe (see module doc), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not is_safe(st) or not is_safe(
                os.stat(os.path.dirname(path))):
            return None
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> bool:
    """Write data to path atomically (mode 0644); False if that was not possible."""
    d = os.path.dirname(path)
    try:
        _ensure_dir(d)
        import tempfile     # only on a write: a cache hit should not pay its import
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
