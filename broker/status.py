"""What `privbroker status` (and `busctl introspect`) shows: the broker's
read-only status properties, and the counters behind them.

Cores that hold something plug in a count without this module (or the
service) knowing them: `status.counts["LeasesHeld"] = lambda: ...`.  A count
nobody registered reads 0, so the properties exist (and the introspection
XML stays true) whatever cores this broker runs.

Everything here may be read by any local user (the bus policy lets everyone
read properties): numbers only, per caller *uid* at most, never a name, a
path, a profile or a jail id.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable

from dbus_fast import Variant

COUNTS = ("LeasesHeld", "MountsHeld")


class Status:
    def __init__(self):
        self.started = time.monotonic()
        self.calls: Counter[str] = Counter()        # member -> calls
        self.refusals: Counter[str] = Counter()     # error kind -> refusals
        self.counts: dict[str, Callable[[], int]] = {}

    def called(self, member: str) -> None:
        self.calls[member] += 1

    def refused(self, kind: str) -> None:
        self.refusals[kind] += 1

    def count(self, name: str) -> int:
        fn = self.counts.get(name)
        try:
            return max(0, int(fn())) if fn is not None else 0
        except Exception:            # a core's bug must not break status
            return 0

    def properties(self, live_jails_by_uid: dict[int, int]) -> dict[str, Variant]:
        props = {
            "Uptime": Variant("t", int(time.monotonic() - self.started)),
            "LiveJails": Variant("a{uu}", dict(live_jails_by_uid)),
            "Calls": Variant("a{st}", dict(self.calls)),
            "Refusals": Variant("a{st}", dict(self.refusals)),
        }
        for name in COUNTS:
            props[name] = Variant("u", self.count(name))
        return props


def store_mounts_held(run_dirs: tuple[str, ...], mountinfo_path: str = "/proc/self/mountinfo"
                      ) -> int:
    """Daemon-store mounts in place: mount points <run_dir>/<daemon>/<hash>.
    Read from our mountinfo: the launcher makes them in the host's
    namespace, and they propagate into ours (a slave of it) under systemd."""
    from .daemon_store import mountinfo
    roots = [os.path.normpath(d) for d in run_dirs]
    points = set()
    for e in mountinfo(mountinfo_path).values():
        parent, _, _ = e.mount_point.rpartition("/")
        if os.path.dirname(parent) in roots:
            points.add(e.mount_point)
    return len(points)
