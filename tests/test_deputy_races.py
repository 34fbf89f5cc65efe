"""Check-vs-use races on device paths (issue #9, confused deputy): a caller
swaps what a path names, as fast as the kernel lets it, while it asks the
broker to OpenPath or ChownDevice that path, round after round.

The caller (a real unprivileged user of the granted group) owns a directory
inside the device root.  In it, `x` is a hard link to an allowed node
(hidraw0, made by root), and `alt` is something else; a second process of
the same user exchanges the two names with renameat2(RENAME_EXCHANGE) in a
loop, so at any instant `x` is one or the other:

  symlink-outside   alt -> ../../outside/secret (a node outside the dev root)
  symlink-denied    alt -> ../hidraw1 (a node the rules deny)
  own-hardlink      alt: a hard link to a regular file the caller owns
  dir-swap          the path is d/secret; d is a directory holding a link to
                    hidraw0, alt -> ../../outside (holding another `secret`)

A win would be an fd on any inode but hidraw0's, or any watched node
(outside/secret, hidraw1, the caller's file) whose owner or mode changed, at
any point of a round (during a lease and after its release).  The caller
checks after every round (tests/deputy_caller.py race).  Short by default;
PRIVBROKER_SOAK=full (`make soak`) runs thousands of rounds of each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from dbus_fixture import popen_as
from test_devices_broker import alice, broker, bus, owner, world  # noqa: F401 - fixtures

FULL = os.environ.get("PRIVBROKER_SOAK") == "full"
ROUNDS = 2500 if FULL else 60
CALLER = str(ROOT / "tests" / "deputy_caller.py")
TOTALS: dict[str, int] = {"rounds": 0, "wins": 0}


@pytest.fixture(scope="module")
def arena(world, alice):
    """The caller's own directory beneath the dev root, and a file of its own."""
    u = world / "dev" / "u"
    u.mkdir()
    os.chown(u, alice.uid, alice.gid)
    own = world / "own-file"
    own.write_text("mine\n")
    os.chown(own, alice.uid, alice.gid)
    os.chmod(own, 0o644)
    yield u
    _empty(u)
    u.rmdir()


def _empty(u) -> None:
    for name in os.listdir(u):
        p = u / name
        if p.is_dir() and not p.is_symlink():
            for q in p.iterdir():
                q.unlink()
            p.rmdir()
        else:
            p.unlink()


def _setup(world, u, variant: str) -> str:
    """Make x and alt for one variant; the path the caller asks for."""
    _empty(u)
    hid = world / "dev" / "hidraw0"
    if variant == "dir-swap":
        (u / "x").mkdir()
        os.link(hid, u / "x" / "secret")
        (u / "alt").symlink_to("../../outside")
        return str(u / "x" / "secret")
    os.link(hid, u / "x")
    if variant == "symlink-outside":
        (u / "alt").symlink_to("../../outside/secret")
    elif variant == "symlink-denied":
        (u / "alt").symlink_to("../hidraw1")
    else:
        os.link(world / "own-file", u / "alt")
    return str(u / "x")


@pytest.mark.parametrize("op", ["OpenPath", "ChownDevice"])
@pytest.mark.parametrize("variant", ["symlink-outside", "symlink-denied", "own-hardlink",
                                     "dir-swap"])
def test_swapping_the_path_while_the_broker_works_never_wins(bus, broker, world, arena, alice,
                                                            op, variant):
    path = _setup(world, arena, variant)
    hid = world / "dev" / "hidraw0"
    watch = [hid, world / "outside" / "secret", world / "dev" / "hidraw1",
             world / "own-file"]
    before = [owner(p) for p in watch]
    flipper = popen_as(alice.uid, alice.gid, alice.groups,
                       [sys.executable, CALLER, "-", "flip", str(arena), "x", "alt"],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert flipper.stdout.readline().strip() == "flipping", flipper.stderr.read()
        r = alice.run([sys.executable, CALLER, bus.address, "race", op, path, str(ROUNDS),
                       str(os.stat(hid).st_ino), *map(str, watch)],
                      env=bus.env(), cwd=ROOT, timeout=60 + ROUNDS)
    finally:
        flipper.kill()
        flipper.wait()
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    TOTALS["rounds"] += got["rounds"]
    TOTALS["wins"] += len(got["wins"])
    print(f"\ndeputy race {op} {variant}: {got['rounds']} rounds, outcomes "
          f"{got['outcomes']}, wins {len(got['wins'])} "
          f"(total {TOTALS['rounds']} rounds, {TOTALS['wins']} wins)")
    assert got["wins"] == [], got["wins"][:10]
    assert got["rounds"] == ROUNDS
    # the race was live: the broker saw both names at x
    allowed = "opened" if op == "OpenPath" else "leased"
    assert got["outcomes"].get(allowed, 0) > 0 and len(got["outcomes"]) > 1, got["outcomes"]
    assert [owner(p) for p in watch] == before
