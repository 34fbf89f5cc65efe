"""Copy a seed's pages ahead, while it waits, instead of on its launch.

A seed (launch.make_seed) is a fork of the launcher: it shares every page of
the launcher's memory copy-on-write.  When its order comes, building the jail
(the unpickling, the mounts, the identity and the spawn, all in Python)
writes some 300-600 of those pages, and each write is a page fault that
copies a page: ~2.3 us each on this project's VMs, a fifth of a seeded launch.

So the launcher learns which pages a launch writes, from a seeded jail's
init (still the same process, it keeps its memory after the spawn): the
private writable pages that are present and no longer shared (Watch).  The next
seeds then copy those pages ahead with MADV_POPULATE_WRITE while they wait.

The plan is only a hint, and a wrong one costs time, never correctness:
MADV_POPULATE_WRITE writes nothing, it only does what a write fault would do
(copy a shared page, or map a zero page), so a stale range (memory the
launcher has freed or remapped since) fails or copies a page for nothing.

Only the standard library and syscalls.madvise; nothing here runs at import.
"""
from __future__ import annotations

import os
import re

from . import syscalls as sc

PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_PAGES = 4096              # a plan never copies more than 16 MiB into a seed

# /proc/PID/pagemap: one little-endian u64 per page; of its top byte, bit 7
# (63) is "present" and bit 0 (56) "exclusively mapped" (Linux 4.2).  A
# page both present and exclusive in a fork is one it (or its parent) has
# written since the fork: the copy was made.
_WRITTEN = bytes(1 if b & 0x81 == 0x81 else 0 for b in range(256))
_RUN = re.compile(b"\x01+")


class Watch:
    """A process's /proc/PID/maps and /proc/PID/pagemap, opened now and read
    later.  The kernel checks access when they are opened, so the launcher
    opens them while a seed is still its to read (its uid, dumpable) and
    reads them once the seed is a jail's init, not dumpable and under the
    caller's uid: opening them then would need CAP_SYS_PTRACE, which the
    launcher does not hold (hostns.drop_ptrace).  Raises OSError."""

    def __init__(self, pid: int):
        self.maps = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.maps)
            raise

    def written_pages(self) -> tuple[tuple[int, int], ...]:
        """(address, length) runs of the process's private writable pages
        that are no longer shared with its parent, read once.  A process
        that has ended (or ends meanwhile) yields what was read before,
        maybe nothing; the result is capped at MAX_PAGES."""
        runs, pages = [], 0
        try:
            for lo, hi in _private_writable(_read_all(self.maps)):
                entries = os.pread(self.pagemap, (hi - lo) // PAGE * 8, lo // PAGE * 8)
                for m in _RUN.finditer(entries[7::8].translate(_WRITTEN)):
                    n = min(m.end() - m.start(), MAX_PAGES - pages)
                    runs.append((lo + m.start() * PAGE, n * PAGE))
                    pages += n
                    if pages == MAX_PAGES:
                        return tuple(runs)
        except OSError:
            pass                    # it ended while we read: keep what we have
        return tuple(runs)

    def close(self) -> None:
        os.close(self.maps)
        os.close(self.pagemap)


def written_pages(pid: int) -> tuple[tuple[int, int], ...]:
    """Watch(pid).written_pages(), opened and read now; () if it cannot be
    opened.  The caller guarantees `pid` is its own child, not yet reaped
    (so the pid is not someone else's)."""
    try:
        watch = Watch(pid)
    except OSError:
        return ()
    try:
        return watch.written_pages()
    finally:
        watch.close()


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _private_writable(maps: bytes):
    """(start, end) of each private writable mapping in a /proc/PID/maps text."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=2)
        perms = fields[1]
        if perms[:2] == b"rw" and perms[3:4] == b"p":
            lo, hi = fields[0].split(b"-")
            yield int(lo, 16), int(hi, 16)


def copy_ahead(runs) -> int:
    """Fault in, writable, each (address, length) run of this process's
    memory; returns how many runs it could.  A run that is not (or no
    longer) private writable memory here is skipped: see the module's
    docstring for why that is harmless."""
    done = 0
    for addr, length in runs:
        try:
            sc.madvise(addr, length, sc.MADV_POPULATE_WRITE)
            done += 1
        except OSError:
            pass    # ENOMEM: unmapped now; EINVAL: not writable now (or a kernel
                    # before 5.14); EFAULT: a fault would signal
    return done


def pages(runs) -> int:
    return sum(length for _, length in runs) // PAGE
