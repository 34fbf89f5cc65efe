"""MountDaemonStore / UnmountDaemonStore end to end: a private system-style
bus with the project's policy, privbrokerd on it in a private mount namespace
of its own (`unshare --mount`, so none of its mounts reaches the host), its
launcher doing the mounts, and callers that are real processes of real uids.
The broker's mount table is read from /proc/<pid>/mountinfo; a jail it
launched before the mount reports, from the inside, what it sees."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import (NOBODY_UID, NOGROUP_GID, PrivateBus, ThrowawayUser, ensure_group,
                          run_as, start_broker, stop_broker)
from ns_worker import mounts_under
from test_daemon_store import (HASH, OTHER_HASH, T_GID, T_MODE, T_UID, WATCH, make_tree,
                               wait_for)

BUS_NAME = "org.privbroker.Broker1"
OBJ = "/org/privbroker/Broker1"
CLIENT = [sys.executable, "-m", "client.cli"]


@pytest.fixture(scope="module")
def users():
    """granted: named in [daemon_store]; member: may call the broker (group
    privbroker) but is not named there."""
    _, created = ensure_group("privbroker")
    with ThrowawayUser(groups=["privbroker"], prefix="pbds") as granted, \
            ThrowawayUser(groups=["privbroker"], prefix="pbds") as member:
        yield granted, member
    if created:
        subprocess.run(["groupdel", "privbroker"], capture_output=True)


@pytest.fixture(scope="module")
def tree():
    root = Path(tempfile.mkdtemp(prefix="privbroker-dsbus-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    t = make_tree(root)
    t.user_root(OTHER_HASH).mkdir(parents=True)
    yield t
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(tree, users):
    granted, _ = users
    d = tree.root / "deploy"
    (d / "profiles").mkdir(parents=True)
    run, cache = tree.run(), tree.run_cache()
    # A daemon's profile that asks for its store, as ChromeOS profiles do.
    (d / "profiles" / "dstore.conf").write_text(
        "% minijail-config-file v0\np\nprofile = minimalistic-mountns\nK = slave\n"
        f"mount = {run},{run},none,MS_BIND|MS_REC\n"
        f"mount = {cache},{cache},none,MS_BIND|MS_REC\n")
    L = tree.layout
    (d / "broker.toml").write_text(f"""
profiles_dir = "profiles"
[limits]
calls_per_second = 100000     # test_deputy_store_race.py calls back to back

[[grant]]
name = "daemons"
users = ["root"]
profiles = ["dstore"]

[daemon_store]
users = ["root", "{granted.name}"]
templates_dir = "{L.templates_dir}"
run_dir = "{L.run_dir}"
cache_run_dir = "{L.cache_run_dir}"
home_root = "{L.home_root}"
""")
    return d


@pytest.fixture(scope="module")
def bus(users):
    with PrivateBus() as b:
        yield b


@pytest.fixture(scope="module")
def broker(bus, deployment, tree):
    proc = start_broker(bus, deployment / "broker.toml", deployment / "broker.log",
                        wrap=lambda argv: ["unshare", "--mount", "--propagation", "private",
                                           *argv])
    yield proc
    stop_broker(proc)
    assert mounts_under(tree.root) == [], "a mount reached the host's mount table"


def busctl(bus, *args, uid=None):
    argv = ["busctl", f"--address={bus.address}", *args]
    if uid is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return run_as(uid, NOGROUP_GID, [], argv, env=bus.env())


def broker_mounts(broker, tree) -> list[str]:
    return mounts_under(tree.root, f"/proc/{broker.pid}/mountinfo")


def call(bus, member, daemon, user_hash, user=None):
    argv = [*CLIENT, "--bus-address", bus.address, "daemon-store", member, daemon, user_hash]
    if user is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    return user.run(argv, env=bus.env(), cwd=ROOT, timeout=30)


def test_the_broker_makes_the_run_dirs_shared_at_start(broker, tree):
    assert broker_mounts(broker, tree) == sorted(
        f"{p} {p} rw,nosuid,nodev,noexec,relatime shared" for p in (tree.run(), tree.run_cache()))
    assert mounts_under(tree.root) == []              # in the broker's namespace only


def test_root_mounts_and_a_jail_started_before_sees_it_come_and_go(bus, broker, tree):
    from client import Broker
    t = tree
    out = t.root / "jail.out"
    target, cache_target = f"{t.run()}/{HASH}", f"{t.run_cache()}/{HASH}"
    before = broker_mounts(broker, t)
    with Broker(bus.address) as b, open(out, "wb") as f:
        jail = b.launch("dstore", ["/bin/sh", "-c", WATCH, "watch", target, cache_target],
                        stdin=None, stdout=f, stderr=f)
        try:
            wait_for(out, "ready")
            b.mount_daemon_store("foo", HASH)
            assert sorted(set(broker_mounts(broker, t)) - set(before)) == [
                f"{cache_target} {t.cache()} rw,nosuid,nodev,noexec,relatime shared",
                f"{target} {t.store()} rw,nosuid,nodev,noexec,relatime shared"]
            b.mount_daemon_store("foo", HASH)             # again: no error, no new layer
            assert len(broker_mounts(broker, t)) == len(before) + 2
            (t.store() / "marker").write_text("x")
            (t.cache() / "marker").write_text("x")
            wait_for(out, "reported")
            b.unmount_daemon_store("foo", HASH)
            text = wait_for(out, "gone")
            assert jail.wait(timeout=20).code == 0
        finally:
            if "gone" not in out.read_text().split():
                jail.signal(9)
    assert f"owner {T_UID} {T_GID} {T_MODE:o}" in text.splitlines()
    inside = [line for line in text.splitlines() if line[:1].isdigit()]
    assert len(inside) == 2 and all(" master:" in line for line in inside)   # slaves
    assert broker_mounts(broker, t) == before
    again = call(bus, "unmount", "foo", HASH)             # again: no error
    assert again.returncode == 0, again.stderr


def test_a_user_the_policy_names_may_mount(bus, broker, tree, users):
    granted, _ = users
    r = call(bus, "mount", "foo", OTHER_HASH, user=granted)
    assert r.returncode == 0, r.stderr
    assert f"{tree.run()}/{OTHER_HASH} {tree.store(h=OTHER_HASH)} " \
           f"rw,nosuid,nodev,noexec,relatime shared" in broker_mounts(broker, tree)
    r = call(bus, "unmount", "foo", OTHER_HASH, user=granted)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("member", ["mount", "unmount"])
def test_a_caller_without_a_grant_is_refused_by_the_broker(bus, broker, tree, users, member):
    _, outsider = users          # may talk to the broker (group privbroker), not named
    before = broker_mounts(broker, tree)
    r = call(bus, member, "foo", HASH, user=outsider)
    assert r.returncode == 1
    assert "[org.privbroker.Error.AccessDenied]" in r.stderr
    assert f"uid {outsider.uid} may not mount or unmount daemon stores" in r.stderr
    assert broker_mounts(broker, tree) == before


def test_nobody_is_stopped_by_the_bus(bus, broker, tree):
    before = broker_mounts(broker, tree)
    r = busctl(bus, "call", BUS_NAME, OBJ, BUS_NAME, "MountDaemonStore", "ss", "foo", HASH,
               uid=NOBODY_UID)
    assert r.returncode != 0
    assert "Access denied" in r.stderr or "AccessDenied" in r.stderr
    assert broker_mounts(broker, tree) == before


@pytest.mark.parametrize("daemon,user_hash,error", [
    ("..", HASH, "InvalidArgument"),
    ("foo/bar", HASH, "InvalidArgument"),
    ("foo", HASH.upper(), "InvalidArgument"),
    ("foo", "../" + HASH[3:], "InvalidArgument"),
    ("bar", HASH, "NotFound"),
    ("foo", "f" * 40, "NotFound"),                       # no such user's home
    ("foo", "link", "Failed"),                           # (made below) a symlinked store
])
def test_refusals_are_named_and_change_nothing(bus, broker, tree, daemon, user_hash, error):
    from client import Broker, BrokerCallError
    if user_hash == "link":
        user_hash = "e" * 40
        tree.user_root(user_hash).mkdir(parents=True, exist_ok=True)
        if not tree.store(h=user_hash).is_symlink():
            (tree.root / "victim").mkdir(exist_ok=True)
            os.symlink(tree.root / "victim", tree.store(h=user_hash))
    before = broker_mounts(broker, tree)
    with Broker(bus.address) as b:
        with pytest.raises(BrokerCallError) as e:
            b.mount_daemon_store(daemon, user_hash)
    assert e.value.name == f"org.privbroker.Error.{error}", e.value
    assert broker_mounts(broker, tree) == before
    if error == "Failed":
        assert "symbolic link" in e.value.message
        assert (tree.root / "victim").stat().st_uid == 0


def test_a_wrong_signature_is_invalid_argument(bus, broker):
    r = busctl(bus, "call", BUS_NAME, OBJ, BUS_NAME, "MountDaemonStore", "s", "foo")
    assert r.returncode != 0
    assert "takes (ss), got (s)" in r.stderr
