"""Symbolic constants (O_RDONLY, AF_UNIX, TCGETS, LOOP_SET_FD, ...) for policies.

Like minijail, the values come from this machine's C library and kernel
headers, never from a hand-typed list: the headers are run through the C
preprocessor (``cc -E -dM``) to list every object-like macro with an
upper-case name, and a generated C program that prints each one's value is
compiled and run once.  Macros that are not integer constant expressions
(types, strings, function calls, ioctl numbers over incomplete structs) fail
to compile; their lines are dropped and the program is rebuilt.

The table is cached (see cache.py) as ``constants-<arch>-<digest>.json``
beside a small ``constants-<arch>.meta.json`` that lists every header that
went into it with its size and mtime.  The digest is a hash of the generator,
the header list and the headers' contents; it is the table's version, and it
is part of every compiled filter's cache key.  A header that changed (a
package upgrade) makes the table stale and it is regenerated on next use.

`ensure_constants()` builds the table now (an install step calls it);
otherwise it is built on first need.  One supplement exists, for the gap
between the installed headers and the running kernel: NEWER_THAN_HEADERS,
consulted only for a name the headers lack and only when the running kernel
is at least the version that introduced it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from . import cache

GENERATOR_VERSION = 1

# Header groups, each compiled as its own translation unit (some glibc and
# kernel headers cannot share one).  A name found in an earlier group wins.
# The first group is the set minijail's constant generator uses, plus a few
# that ChromeOS policies need (GRND_*, futex, capabilities, ...); `__has_include` skips a
# header this machine lacks.
HEADER_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("minijail", (
        "asm/prctl.h", "errno.h", "fcntl.h", "linux/fd.h", "linux/fs.h",
        "linux/loop.h", "linux/mman.h", "linux/net.h", "linux/prctl.h",
        "linux/sched.h", "linux/serial.h", "linux/sockios.h", "linux/termios.h",
        "signal.h", "stddef.h", "sys/mman.h", "sys/resource.h", "sys/socket.h",
        "sys/stat.h", "sys/types.h", "linux/random.h",
        "sys/prctl.h", "sys/wait.h", "sys/epoll.h", "sys/eventfd.h",
        "sys/timerfd.h", "sys/inotify.h", "sys/signalfd.h", "sys/personality.h",
        "sys/file.h", "sys/xattr.h", "sched.h", "time.h", "unistd.h", "poll.h",
        "linux/falloc.h", "linux/memfd.h", "linux/futex.h", "linux/capability.h",
        "linux/securebits.h", "linux/seccomp.h", "linux/audit.h", "linux/filter.h",
        "linux/close_range.h", "linux/openat2.h", "linux/ioprio.h",
        "linux/membarrier.h", "linux/mempolicy.h", "linux/keyctl.h",
        "linux/userfaultfd.h", "linux/rseq.h",
    )),
    ("libc-net", (
        "sys/socket.h", "netinet/in.h", "netinet/tcp.h", "netinet/udp.h",
        "net/if.h", "sys/un.h", "sys/mount.h", "sys/ptrace.h", "sys/quota.h",
        "sys/reboot.h", "sys/swap.h", "sys/fsuid.h", "sys/klog.h", "sys/shm.h",
        "sys/sem.h", "sys/msg.h", "termios.h", "sys/ioctl.h", "linux/vm_sockets.h",
        "linux/netlink.h", "linux/if_alg.h",
    )),
    ("uapi", (
        "linux/if.h", "linux/if_ether.h", "linux/if_packet.h", "linux/if_tun.h",
        "linux/if_arp.h", "linux/rtnetlink.h", "linux/ethtool.h",
        "linux/wireless.h", "linux/nl80211.h", "linux/net_tstamp.h",
        "linux/in.h", "linux/in6.h", "linux/tcp.h", "linux/udp.h",
        "linux/fscrypt.h", "linux/fiemap.h", "linux/blkpg.h", "linux/hdreg.h",
        "linux/cdrom.h", "linux/mount.h", "linux/stat.h", "linux/fuse.h",
        "linux/nbd.h", "linux/btrfs.h", "linux/dma-buf.h", "linux/sync_file.h",
        "linux/kd.h", "linux/vt.h", "linux/tiocl.h", "linux/tty.h",
        "linux/input.h", "linux/uinput.h", "linux/hidraw.h", "linux/hiddev.h",
        "linux/usbdevice_fs.h", "linux/videodev2.h", "linux/media.h",
        "linux/uvcvideo.h", "linux/cec.h", "linux/i2c.h", "linux/i2c-dev.h",
        "linux/spi/spidev.h", "linux/gpio.h", "linux/watchdog.h", "linux/rtc.h",
        "linux/mmc/ioctl.h", "linux/nvme_ioctl.h", "linux/vfio.h",
        "linux/vhost.h", "linux/kvm.h", "linux/perf_event.h", "linux/bpf.h",
        "linux/io_uring.h", "linux/landlock.h", "linux/android/binder.h",
        "linux/ppdev.h", "linux/sockios.h", "linux/ptrace.h", "linux/wait.h",
        "linux/fanotify.h", "linux/inotify.h", "linux/quota.h", "linux/reboot.h",
        "linux/sysctl.h", "linux/kcmp.h", "linux/auto_fs.h", "linux/loadpin.h",
        "linux/fsverity.h", "linux/tee.h", "linux/iommufd.h", "linux/psp-sev.h",
        "linux/virtio_ids.h", "linux/vm_sockets.h", "linux/pidfd.h", "sound/asound.h",
        "mtd/mtd-user.h", "scsi/sg.h",
    )),
)

# Never usable as values: pointer or function-call macros (minijail drops the same).
_EXCLUDED = re.compile(r"^(SIG_|NULL$|MAP_FAILED$|SIGRTMIN$|SIGRTMAX$|RLIM_SAVED)")
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_DEFINE = re.compile(r"^#define ([A-Za-z_][A-Za-z0-9_]*)(\(?)\s*(.*)$")
_FLOAT = re.compile(r"(?<![\w.])\d+\.\d*|(?<![\w.])\.\d")

# Kernel UAPI values newer than the installed headers (linux-libc-dev 6.1 on
# Debian 12): name -> (value, first kernel version).  Used only when the
# generated table lacks the name and the running kernel is new enough.
NEWER_THAN_HEADERS: dict[str, tuple[int, tuple[int, int]]] = {
    "MADV_GUARD_INSTALL": (102, (6, 13)),   # include/uapi/asm-generic/mman-common.h
    "MADV_GUARD_REMOVE": (103, (6, 13)),
}


class ConstantsUnavailable(RuntimeError):
    """The constants table could not be generated (no C compiler or headers)."""


def _arch() -> str:
    return os.uname().machine


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class Constants:
    """A generated constants table: name -> unsigned 64-bit value."""

    def __init__(self, values: dict[str, int], digest: str):
        self.values = values
        self.digest = digest

    def get(self, name: str) -> int | None:
        v = self.values.get(name)
        if v is not None:
            return v
        extra = NEWER_THAN_HEADERS.get(name)
        if extra and _kernel_version() >= extra[1]:
            return extra[0]
        return None

    def __len__(self) -> int:
        return len(self.values)


# -- generation --------------------------------------------------------------

def _compiler() -> str:
    import shutil
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for cand in ("gcc", "cc", "clang"):
        path = shutil.which(cand)
        if path:
            return path
    raise ConstantsUnavailable(
        "no C compiler found (install gcc, libc6-dev and linux-libc-dev): "
        "symbolic constants are read from the system headers")


def _prelude(headers) -> str:
    lines = []
    for h in headers:
        lines.append(f"#if __has_include(<{h}>)\n#include <{h}>\n#endif")
    return "\n".join(lines) + "\n"


def _run(cmd, **kw):
    import subprocess       # only generation needs it
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _compiles(cc: str, headers, workdir: str) -> bool:
    src = os.path.join(workdir, "check.c")
    with open(src, "w") as f:
        f.write(_prelude(headers))
    return _run([cc, "-fsyntax-only", "-w", "-x", "c", src]).returncode == 0


def _working_headers(cc: str, headers, workdir: str) -> list[str]:
    """The headers of a group that compile together (all of them, normally)."""
    if _compiles(cc, headers, workdir):
        return list(headers)
    ok: list[str] = []
    for h in headers:                    # rare path: keep each header that still fits
        if _compiles(cc, ok + [h], workdir):
            ok.append(h)
    return ok


def _macros(cc: str, headers, workdir: str) -> tuple[dict[str, str], set[str]]:
    """Object-like macros (name -> body) the headers define, and the files read."""
    src = os.path.join(workdir, "macros.c")
    dep = os.path.join(workdir, "macros.d")
    with open(src, "w") as f:
        f.write(_prelude(headers))
    p = _run([cc, "-E", "-dM", "-MD", "-MF", dep, "-x", "c", src, "-o",
              os.path.join(workdir, "macros.out")])
    if p.returncode != 0:
        raise ConstantsUnavailable(f"the C preprocessor failed: {p.stderr.strip()[:500]}")
    macros = {}
    with open(os.path.join(workdir, "macros.out")) as f:
        for line in f:
            m = _DEFINE.match(line.rstrip("\n"))
            if m and not m.group(2):
                macros[m.group(1)] = m.group(3).strip()
    with open(dep) as f:
        words = f.read().replace("\\\n", " ").split()
    files = {os.path.realpath(w) for w in words[1:] if w.startswith("/")}
    files = {p for p in files if not p.startswith(os.path.realpath(workdir))}
    return macros, files


def _candidate(name: str, body: str) -> bool:
    return bool(_NAME.match(name) and body and not _EXCLUDED.match(name)
                and '"' not in body and not _FLOAT.search(body))


def _evaluate(cc: str, headers, names: list[str], workdir: str) -> dict[str, int]:
    """Compile and run a program printing each macro's value; drop what fails."""
    src = os.path.join(workdir, "values.c")
    exe = os.path.join(workdir, "values")
    prelude = _prelude(headers) + "#include <stdio.h>\n"
    first = prelude.count("\n") + 3
    remaining = list(names)
    for _ in range(12):
        with open(src, "w") as f:
            f.write(prelude)
            f.write("struct pb_ent { const char *n; unsigned long long v; };\n")
            f.write("static const struct pb_ent pb_tab[] = {\n")
            for n in remaining:       # one entry per line: an error's line names its macro
                f.write(f'{{"{n}", (unsigned long long)({n})}},\n')
            f.write("{0, 0}};\nint main(void) {\n"
                    "  for (const struct pb_ent *e = pb_tab; e->n; e++)\n"
                    '    printf("%s %llx\\n", e->n, e->v);\n  return 0;\n}\n')
        p = _run([cc, "-w", "-O0", "-ftrack-macro-expansion=0", "-fmax-errors=0",
                  "-fdiagnostics-color=never", "-x", "c", src, "-o", exe])
        if p.returncode == 0:
            break
        bad = set()
        for m in re.finditer(re.escape(src) + r":(\d+):", p.stderr):
            idx = int(m.group(1)) - first
            if 0 <= idx < len(remaining):
                bad.add(idx)
        if not bad:
            raise ConstantsUnavailable(
                f"could not build the constants program: {p.stderr.strip()[:500]}")
        remaining = [n for i, n in enumerate(remaining) if i not in bad]
    else:
        raise ConstantsUnavailable("could not build the constants program")
    out = _run([exe], timeout=60)
    if out.returncode != 0:
        raise ConstantsUnavailable("the constants program failed")
    values = {}
    for line in out.stdout.splitlines():
        n, v = line.split()
        values[n] = int(v, 16)
    return values


def _digest(files) -> str:
    h = hashlib.sha256()
    h.update(f"gen{GENERATOR_VERSION}\0{_arch()}\0".encode())
    h.update(repr(HEADER_GROUPS).encode())
    for path in sorted(files):
        h.update(path.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


def generate() -> tuple[dict[str, int], list[str]]:
    """Build the table from the headers now: (name -> value, headers read)."""
    import tempfile
    cc = _compiler()
    table: dict[str, int] = {}
    files: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="privbroker-constants-") as work:
        for _name, headers in HEADER_GROUPS:
            usable = _working_headers(cc, headers, work)
            if not usable:
                continue
            macros, deps = _macros(cc, usable, work)
            files |= deps
            names = sorted(n for n, b in macros.items() if n not in table and _candidate(n, b))
            for n, v in _evaluate(cc, usable, names, work).items():
                table.setdefault(n, v)
    if not table:
        raise ConstantsUnavailable("no constants found in the system headers")
    return table, sorted(files)


# -- cache -------------------------------------------------------------------

_memo: dict[str, Constants] = {}


def _meta_path(d: str) -> str:
    return os.path.join(d, f"constants-{_arch()}.meta.json")


def _fresh_meta(d: str) -> dict | None:
    raw = cache.read_trusted(_meta_path(d))
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        if meta.get("version") != GENERATOR_VERSION or meta.get("groups") != repr(HEADER_GROUPS):
            return None
        for path, size, mtime in meta["deps"]:
            st = os.stat(path)
            if st.st_size != size or st.st_mtime_ns != mtime:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def table_digest() -> str:
    """The current table's version, cheaply (no table load) when it is cached.

    "unavailable" when no table can be had (no compiler): only policies
    without symbolic constants can then compile."""
    d = cache.cache_dir()
    if d:
        meta = _fresh_meta(d)
        if meta:
            return meta["digest"]
    try:
        return ensure_constants().digest
    except ConstantsUnavailable:
        return "unavailable"


def ensure_constants(force: bool = False) -> Constants:
    """The constants table, generated and cached if missing or stale."""
    d = cache.cache_dir()
    if d and not force:
        meta = _fresh_meta(d)
        if meta:
            hit = _memo.get(meta["digest"])
            if hit:
                return hit
            raw = cache.read_trusted(os.path.join(d, meta["table"]))
            if raw is not None:
                try:
                    values = json.loads(raw)
                    if isinstance(values, dict) and values:
                        c = _memo[meta["digest"]] = Constants(values, meta["digest"])
                        return c
                except ValueError:
                    pass
    if not force and _memo and not d:
        return next(iter(_memo.values()))
    values, files = generate()
    digest = _digest(files)
    c = _memo[digest] = Constants(values, digest)
    if d:
        table_name = f"constants-{_arch()}-{digest[:16]}.json"
        deps = []
        for path in files:
            try:
                st = os.stat(path)
                deps.append([path, st.st_size, st.st_mtime_ns])
            except OSError:
                pass
        if cache.write_atomic(os.path.join(d, table_name),
                              json.dumps(values, sort_keys=True).encode()):
            meta = {"version": GENERATOR_VERSION, "groups": repr(HEADER_GROUPS),
                    "arch": _arch(), "digest": digest, "table": table_name, "deps": deps}
            if cache.write_atomic(_meta_path(d), json.dumps(meta).encode()):
                for old in os.listdir(d):          # tables of earlier headers
                    if old.startswith(f"constants-{_arch()}-") and old != table_name:
                        try:
                            os.unlink(os.path.join(d, old))
                        except OSError:
                            pass
    return c


def lookup(name: str) -> int | None:
    """The value of a symbolic constant, or None if this machine has none."""
    return ensure_constants().get(name)
