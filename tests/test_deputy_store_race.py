"""Check-vs-use race on a daemon store (issue #9, confused deputy): the
daemon's own uid (the template's owner, who owns its store) swaps the store
directory for a symlink to a victim directory, as fast as the kernel lets
it, while root calls MountDaemonStore and UnmountDaemonStore round after
round on a real privbrokerd (tests/test_daemon_store_bus.py's fixtures: a
private bus, the broker in a mount namespace of its own).

The user's tree is laid out the one way that lets a non-root uid rename the
store at all: <hash>/mount/root is root's but sticky and world-writable (the
broker accepts that), so the store's owner may exchange its own entries in
it.  `foo` is the real store, `alt` a symlink to the victim (root's, 0755);
renameat2(RENAME_EXCHANGE) flips them.  A win: the victim's owner or mode
changed, or a mount whose source is the victim in the broker's mount table.
Checked after every round.  Short by default; PRIVBROKER_SOAK=full runs
thousands of rounds.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_daemon_store import T_GID, T_UID
from test_daemon_store_bus import broker, bus, deployment, tree, users  # noqa: F401 - fixtures

FULL = os.environ.get("PRIVBROKER_SOAK") == "full"
ROUNDS = 3000 if FULL else 100
RACE_HASH = "d" * 40
CALLER = str(ROOT / "tests" / "deputy_caller.py")


def _mounts(pid: int) -> list[tuple[str, str]]:
    """(root within its file system, mount point) of every mount pid sees."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((fields[3], fields[4]))
    return out


def _owner(p) -> tuple[int, int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def racing_tree(tree):
    user_root = tree.user_root(RACE_HASH)
    user_root.mkdir(parents=True, exist_ok=True)
    os.chmod(user_root, 0o1777)               # sticky: the broker accepts it
    victim = tree.root / "race-victim"
    victim.mkdir(exist_ok=True)
    os.chmod(victim, 0o755)
    (user_root / "foo").mkdir(exist_ok=True)
    os.chown(user_root / "foo", T_UID, T_GID)
    if not (user_root / "alt").is_symlink():
        (user_root / "alt").symlink_to(victim)
    os.lchown(user_root / "alt", T_UID, T_GID)
    (user_root / ".cache" / "foo").mkdir(parents=True, exist_ok=True)
    os.chown(user_root / ".cache" / "foo", T_UID, T_GID)
    yield user_root, victim


def test_swapping_the_store_for_a_symlink_never_redirects_the_mount(bus, broker, tree,
                                                                   racing_tree):
    from client import Broker, BrokerCallError
    user_root, victim = racing_tree
    before = _owner(victim)
    flipper = subprocess.Popen([sys.executable, CALLER, "-", "flip", str(user_root), "foo",
                                "alt"], cwd=ROOT, user=T_UID, group=T_GID, extra_groups=[],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes: dict[str, int] = {}
    wins: list[str] = []
    t0 = time.monotonic()
    try:
        assert flipper.stdout.readline().strip() == "flipping", flipper.stderr.read()
        with Broker(bus.address) as b:
            for i in range(ROUNDS):
                try:
                    b.mount_daemon_store("foo", RACE_HASH)
                    key = "mounted"
                except BrokerCallError as e:
                    key = e.name.rsplit(".", 1)[-1]
                outcomes[key] = outcomes.get(key, 0) + 1
                seen = [m for m in _mounts(broker.pid) if m[0].startswith(str(victim))]
                if seen or _owner(victim) != before:
                    wins.append(f"round {i}: {seen} {_owner(victim)}")
                if key == "mounted":
                    b.unmount_daemon_store("foo", RACE_HASH)
    finally:
        flipper.kill()
        flipper.wait()
    elapsed = time.monotonic() - t0
    print(f"\ndeputy race MountDaemonStore store-symlink-swap: {ROUNDS} rounds in "
          f"{elapsed:.1f}s, outcomes {outcomes}, wins {len(wins)}")
    assert wins == [], wins[:10]
    assert outcomes.get("mounted", 0) > 0 and len(outcomes) > 1, outcomes   # the race was live
    assert not [m for m in _mounts(broker.pid) if RACE_HASH in m[1]]        # all unmounted
    assert _owner(victim) == before
