"""Daemon-store mounts (broker/daemon_store.py), without the bus.

Everything runs in a temporary tree (templates, run dirs, homes) and every
mount is made in the private mount namespace of a worker process
(ns_worker.py); the host's mount table is checked after each test.  Jails are
started by privjail inside that namespace, so they copy it as a daemon's
would.  After every refused request the worker's mount table is compared
with the one before it.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import ns_worker
from broker import daemon_store as ds
from broker import policy, wire
from broker.daemon_store import DaemonStoreError, Layout, Request
from broker.jail import syscalls as sc
from conftest import PRIVJAIL, ROOT
from ns_worker import NamespaceWorker, mounts_under

HASH = "0123456789abcdef0123456789abcdef01234567"
OTHER_HASH = "fedcba9876543210fedcba9876543210fedcba98"
T_UID, T_GID, T_MODE = 4321, 4322, 0o750        # the template's owner, group, mode
STRANGER = 3999                                 # a uid that owns nothing legitimately


@pytest.fixture(scope="module")
def ns():
    with NamespaceWorker() as w:
        yield w


@dataclass
class Tree:
    root: Path
    layout: Layout

    @property
    def home(self) -> Path:
        return self.root / "home"

    def user_root(self, h: str = HASH) -> Path:
        return self.home / ".shadow" / h / "mount" / "root"

    def store(self, daemon: str = "foo", h: str = HASH) -> Path:
        return self.user_root(h) / daemon

    def cache(self, daemon: str = "foo", h: str = HASH) -> Path:
        return self.user_root(h) / ".cache" / daemon

    def run(self, daemon: str = "foo") -> Path:
        return self.root / "run" / "daemon-store" / daemon

    def run_cache(self, daemon: str = "foo") -> Path:
        return self.root / "run" / "daemon-store-cache" / daemon

    def template(self, daemon: str = "foo") -> Path:
        return self.root / "etc" / "daemon-store" / daemon


def make_tree(root: Path) -> Tree:
    t = Tree(root, Layout(templates_dir=str(root / "etc" / "daemon-store"),
                          run_dir=str(root / "run" / "daemon-store"),
                          cache_run_dir=str(root / "run" / "daemon-store-cache"),
                          home_root=str(root / "home")))
    t.template().mkdir(parents=True)
    os.chown(t.template(), T_UID, T_GID)
    os.chmod(t.template(), T_MODE)
    t.user_root().mkdir(parents=True)
    return t


@pytest.fixture
def bare_tree(ns):
    """A tree with one template (foo) and one user's home, nothing mounted."""
    root = Path(tempfile.mkdtemp(prefix="privbroker-ds-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    try:
        yield make_tree(root)
    finally:
        ns.call(ns_worker.detach_all_under, root)
        leaked = mounts_under(root)
        shutil.rmtree(root, ignore_errors=True)
        assert leaked == [], "a mount reached the host's mount table"


@pytest.fixture
def tree(ns, bare_tree):
    """The same, after init (as at broker start)."""
    ns.call(ds.init, bare_tree.layout)
    return bare_tree


def mount(ns, t: Tree, daemon="foo", h=HASH) -> list[str]:
    return ns.call(ds.mount, t.layout, Request(daemon, h))


def unmount(ns, t: Tree, daemon="foo", h=HASH, lazy=False) -> list[str]:
    return ns.call(ds.unmount, t.layout, Request(daemon, h, lazy))


def refused(ns, t: Tree, kind: str, fn=ds.mount, daemon="foo", h=HASH) -> str:
    """The request is refused with this kind and the mount table is unchanged."""
    before = ns.mounts_under(t.root)
    with pytest.raises(DaemonStoreError) as e:
        ns.call(fn, t.layout, Request(daemon, h))
    assert e.value.kind == kind, e.value
    assert ns.mounts_under(t.root) == before, "a refused request changed the mount table"
    return str(e.value)


def owner_mode(p: Path) -> tuple[int, int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


# -- init -----------------------------------------------------------------------------

def test_init_makes_each_templates_run_dirs_shared_mount_points(ns, bare_tree):
    t = bare_tree
    (t.root / "etc" / "daemon-store" / "bar").mkdir()
    (t.root / "etc" / "daemon-store" / "not a daemon").mkdir()        # not a plain name
    os.symlink(t.template(), t.root / "etc" / "daemon-store" / "linked")  # not a directory
    results = ns.call(ds.init, t.layout)
    assert [(r.daemon, r.variant, r.error) for r in results] == [
        ("bar", "store", None), ("bar", "cache", None),
        ("foo", "store", None), ("foo", "cache", None)]
    expected = sorted(f"{p} {p} rw,nosuid,nodev,noexec,relatime shared"
                      for p in (t.run("bar"), t.run_cache("bar"), t.run(), t.run_cache()))
    assert ns.mounts_under(t.root) == expected
    # again: nothing stacks
    ns.call(ds.init, t.layout)
    assert ns.mounts_under(t.root) == expected


def test_init_without_templates_does_nothing(ns, bare_tree):
    shutil.rmtree(bare_tree.root / "etc")
    assert ns.call(ds.init, bare_tree.layout) == []
    assert ns.mounts_under(bare_tree.root) == []


def test_init_reports_a_run_dir_that_is_a_symlink_and_does_the_rest(ns, bare_tree):
    t = bare_tree
    t.run().parent.mkdir(parents=True)
    (t.root / "elsewhere").mkdir()
    os.symlink(t.root / "elsewhere", t.run())
    results = {(r.daemon, r.variant): r.error for r in ns.call(ds.init, t.layout)}
    assert "symbolic link" in results[("foo", "store")]
    assert results[("foo", "cache")] is None
    assert ns.mounts_under(t.root) == [
        f"{t.run_cache()} {t.run_cache()} rw,nosuid,nodev,noexec,relatime shared"]


# -- mount, unmount --------------------------------------------------------------------

def test_mount_binds_store_and_cache_nosuid_nodev_noexec(ns, tree):
    t = tree
    assert mount(ns, t) == ["store", "cache"]
    assert ns.mounts_under(t.root) == sorted([
        f"{t.run()} {t.run()} rw,nosuid,nodev,noexec,relatime shared",
        f"{t.run()}/{HASH} {t.store()} rw,nosuid,nodev,noexec,relatime shared",
        f"{t.run_cache()} {t.run_cache()} rw,nosuid,nodev,noexec,relatime shared",
        f"{t.run_cache()}/{HASH} {t.cache()} rw,nosuid,nodev,noexec,relatime shared"])
    # what the user's store holds is what the worker sees at the target
    (t.store() / "data").write_text("store")
    (t.cache() / "data").write_text("cache")
    seen = Path(f"/proc/{ns.pid}/root{t.run()}/{HASH}/data")
    assert seen.read_text() == "store"
    assert Path(f"/proc/{ns.pid}/root{t.run_cache()}/{HASH}/data").read_text() == "cache"


def test_the_store_gets_the_templates_owner_group_and_mode(ns, tree):
    t = tree
    mount(ns, t)
    assert owner_mode(t.store()) == (T_UID, T_GID, T_MODE)
    assert owner_mode(t.cache()) == (T_UID, T_GID, T_MODE)
    # and as the daemon sees it, through the mount
    st = os.stat(f"/proc/{ns.pid}/root{t.run()}/{HASH}")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (T_UID, T_GID, T_MODE)
    # .cache, made here, is root's and private
    assert owner_mode(t.user_root() / ".cache") == (0, 0, 0o700)


def test_modes_do_not_depend_on_the_umask(ns, bare_tree):
    """privbrokerd's unit runs with umask 0077: a daemon (not root) must
    still be able to walk /run/daemon-store/<daemon>/<hash>."""
    t = bare_tree
    old = ns.call(os.umask, 0o077)
    try:
        mount(ns, t)
    finally:
        ns.call(os.umask, old)
    for p in (t.run().parent, t.run(), t.run() / HASH, t.run_cache() / HASH):
        assert owner_mode(p) == (0, 0, 0o755), p
    assert owner_mode(t.user_root() / ".cache") == (0, 0, 0o700)
    assert owner_mode(t.store()) == (T_UID, T_GID, T_MODE)


def test_an_existing_store_is_brought_to_the_template(ns, tree):
    t = tree
    t.store().mkdir()
    os.chmod(t.store(), 0o777)
    (t.store() / "kept").write_text("x")
    mount(ns, t)
    assert owner_mode(t.store()) == (T_UID, T_GID, T_MODE)
    assert (t.store() / "kept").read_text() == "x"


def test_mount_and_unmount_are_idempotent_and_never_stack(ns, tree):
    t = tree
    before = ns.mounts_under(t.root)
    assert mount(ns, t) == ["store", "cache"]
    mounted = ns.mounts_under(t.root)
    assert mount(ns, t) == []                     # asked twice: no error, no second layer
    assert ns.mounts_under(t.root) == mounted
    assert unmount(ns, t) == ["store", "cache"]
    assert ns.mounts_under(t.root) == before
    assert not (t.run() / HASH).exists()          # the empty mount point is removed
    assert unmount(ns, t) == []                   # asked twice: no error
    assert ns.mounts_under(t.root) == before
    assert (t.store()).is_dir()                   # the user's data stays


def test_a_store_missing_only_its_cache_gets_the_cache(ns, tree):
    t = tree
    mount(ns, t)
    ns.call(sc.umount2, f"{t.run_cache()}/{HASH}", 0)
    assert mount(ns, t) == ["cache"]


def test_two_users_two_daemons(ns, tree):
    t = tree
    (t.root / "etc" / "daemon-store" / "bar").mkdir()
    t.user_root(OTHER_HASH).mkdir(parents=True)
    for daemon in ("foo", "bar"):
        for h in (HASH, OTHER_HASH):
            assert mount(ns, t, daemon, h) == ["store", "cache"]
    assert len(ns.mounts_under(t.root)) == 4 + 8      # run dirs (bar's made on demand) + binds
    assert unmount(ns, t, "bar", HASH) == ["store", "cache"]
    assert len(ns.mounts_under(t.root)) == 4 + 6


def test_mount_without_init_makes_the_run_dirs_itself(ns, bare_tree):
    t = bare_tree
    assert mount(ns, t) == ["store", "cache"]
    assert f"{t.run()} {t.run()} rw,nosuid,nodev,noexec,relatime shared" in \
        ns.mounts_under(t.root)


def test_a_vault_mounted_at_mount_is_crossed(ns, tree):
    """On ChromeOS the user's vault is a mount at .shadow/<hash>/mount: that
    one crossing is expected; any other is refused (below)."""
    t = tree
    vault = t.user_root().parent
    ns.call(sc.mount, "tmpfs", str(vault), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
    ns.call(os.makedirs, str(t.user_root()), 0o755)
    assert mount(ns, t) == ["store", "cache"]
    assert f"{t.run()}/{HASH} /root/foo rw,nosuid,nodev,noexec,relatime shared" in \
        ns.mounts_under(t.root)


def test_a_sticky_group_writable_parent_is_accepted(ns, tree):
    os.chmod(tree.user_root(), 0o1770)
    assert mount(ns, tree) == ["store", "cache"]


def test_unmount_of_a_busy_store_fails_unless_lazy(ns, tree):
    t = tree
    mount(ns, t)
    target = f"{t.run()}/{HASH}"
    pid = ns.call(ns_worker.spawn, ["/bin/sh", "-c", f"cd {target} && echo in && exec sleep 60"],
                  str(t.root / "busy.out"))
    wait_for(t.root / "busy.out", "in")
    try:
        message = str(pytest.raises(DaemonStoreError, unmount, ns, t).value)
        assert f"{target} busy" in message and "--lazy" in message
        # what could be unmounted was; the busy one stays
        assert sorted(m.split()[0] for m in ns.mounts_under(t.root)) == sorted(
            [str(t.run()), target, str(t.run_cache())])
        assert unmount(ns, t, lazy=True) == ["store"]
        assert sorted(m.split()[0] for m in ns.mounts_under(t.root)) == sorted(
            [str(t.run()), str(t.run_cache())])
    finally:
        ns.call(ns_worker.reap, pid, kill=True)


# -- the attacks: every one refused, and the mount table unchanged ----------------------

@pytest.mark.parametrize("daemon", ["..", ".", "../foo", "foo/..", "foo/bar", "/foo", "",
                                    "foo\0", ".foo", "a" * 65, "foo bar", "f\u00f6o"])
def test_daemon_names_that_are_not_plain_are_invalid(ns, tree, daemon):
    for fn in (ds.mount, ds.unmount):
        assert "daemon name" in refused(ns, tree, ds.INVALID, fn, daemon=daemon)


@pytest.mark.parametrize("h", [HASH.upper(), HASH[:-1], HASH + "0", "g" * 40, "", "..",
                               "../" + HASH[3:], HASH[:39] + "/", " " + HASH[1:], HASH + "\n"])
def test_user_hashes_of_the_wrong_form_are_invalid(ns, tree, h):
    for fn in (ds.mount, ds.unmount):
        assert "user hash" in refused(ns, tree, ds.INVALID, fn, h=h)


def test_the_user_hash_form_is_the_deployments():
    layout = Layout(user_hash_pattern="[0-9A-F]{16}")
    ds.check_request(layout, Request("foo", "0123456789ABCDEF"))
    with pytest.raises(DaemonStoreError):
        ds.check_request(layout, Request("foo", HASH))
    # a loose pattern still never lets a path through
    loose = Layout(user_hash_pattern=".*")
    for h in ("..", ".", "a/b", "", "a\0"):
        with pytest.raises(DaemonStoreError):
            ds.check_request(loose, Request("foo", h))


def test_a_missing_template_is_not_found(ns, tree):
    assert "no daemon store template" in refused(ns, tree, ds.NOT_FOUND, daemon="bar")
    assert not tree.store("bar").exists()


@pytest.mark.parametrize("kind", ["symlink", "file", "dangling"])
def test_a_template_that_is_not_a_directory_is_not_found(ns, tree, kind):
    p = tree.template("bar")
    if kind == "symlink":
        os.symlink(tree.template(), p)
    elif kind == "dangling":
        os.symlink(tree.root / "nowhere", p)
    else:
        p.write_text("")
    refused(ns, tree, ds.NOT_FOUND, daemon="bar")
    assert not tree.store("bar").exists()


def test_a_home_that_is_not_there_is_not_found(ns, tree):
    assert "not mounted" in refused(ns, tree, ds.NOT_FOUND, h=OTHER_HASH)
    shutil.rmtree(tree.user_root())
    assert "not mounted" in refused(ns, tree, ds.NOT_FOUND)


# Each level of the source paths, relative to the home root; and of the targets.
SOURCE_LEVELS = [".shadow", f".shadow/{HASH}", f".shadow/{HASH}/mount",
                 f".shadow/{HASH}/mount/root", f".shadow/{HASH}/mount/root/foo",
                 f".shadow/{HASH}/mount/root/.cache", f".shadow/{HASH}/mount/root/.cache/foo"]


def snapshot(top: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, top)] = owner_mode(Path(p))
    return out


@pytest.mark.parametrize("level", SOURCE_LEVELS)
@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_symlink_at_any_level_of_the_source_is_refused(ns, tree, level, how):
    t = tree
    # The complete layout exists, stores included (root's, 0700: a chown or
    # chmod through the link would show).
    for d in (t.store(), t.cache()):
        d.mkdir(parents=True)
        os.chmod(d, 0o700)
    # Move the real directory at `level` away and put a symlink to it there:
    # everything below is still there, only reached through the link.
    real = t.home / level
    evil = t.root / "evil" / real.name
    evil.parent.mkdir()
    real.rename(evil)
    os.symlink(evil if how == "absolute" else os.path.relpath(evil, real.parent), real)
    before = snapshot(t.root / "evil")
    message = refused(ns, t, ds.FAILED)
    assert f"{real} is a symbolic link" in message
    assert snapshot(t.root / "evil") == before            # nothing chowned or chmodded
    assert not any(p.name == "foo" and p.stat().st_uid == T_UID
                   for p in (t.root / "evil").rglob("*"))


@pytest.mark.parametrize("level", ["run", "run_cache", "target", "cache_target"])
def test_a_symlink_at_the_target_is_refused(ns, bare_tree, level):
    t = bare_tree
    elsewhere = t.root / "elsewhere"
    elsewhere.mkdir()
    path = {"run": t.run(), "run_cache": t.run_cache(),
            "target": t.run() / HASH, "cache_target": t.run_cache() / HASH}[level]
    if level.endswith("target"):
        ns.call(ds.init, t.layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, path)
    assert "symbolic link" in refused(ns, t, ds.FAILED)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("which", ["store", "cache"])
def test_a_source_that_is_a_file_is_refused(ns, tree, which):
    p = tree.store() if which == "store" else tree.cache()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("not a directory")
    assert f"{p} is not a directory" in refused(ns, tree, ds.FAILED)
    assert owner_mode(p) == (0, 0, 0o644)


@pytest.mark.parametrize("level", [".shadow", f".shadow/{HASH}", f".shadow/{HASH}/mount",
                                   f".shadow/{HASH}/mount/root"])
def test_a_parent_that_is_a_file_is_refused(ns, tree, level):
    p = tree.home / level
    shutil.rmtree(p)
    p.write_text("")
    assert f"{p} is not a directory" in refused(ns, tree, ds.FAILED)


def test_a_store_owned_by_someone_else_is_refused(ns, tree):
    tree.store().mkdir()
    os.chown(tree.store(), STRANGER, STRANGER)
    assert f"owned by uid {STRANGER}" in refused(ns, tree, ds.FAILED)
    assert owner_mode(tree.store()) == (STRANGER, STRANGER, 0o755)


@pytest.mark.parametrize("level", [f".shadow/{HASH}", f".shadow/{HASH}/mount/root"])
def test_a_parent_owned_or_writable_by_others_is_refused(ns, tree, level):
    p = tree.home / level
    os.chmod(p, 0o777)
    assert "writable by group or others" in refused(ns, tree, ds.FAILED)
    os.chmod(p, 0o755)
    os.chown(p, STRANGER, STRANGER)
    assert f"owned by uid {STRANGER}" in refused(ns, tree, ds.FAILED)


def test_a_mount_planted_in_the_users_tree_is_refused(ns, tree):
    """Only `mount` may be a mount point; a bind planted below it (say at
    root/foo, pointing at a directory of the attacker's choosing) is not
    followed (RESOLVE_NO_XDEV)."""
    t = tree
    chosen = t.root / "chosen"
    chosen.mkdir()
    t.store().mkdir()
    ns.call(sc.mount, str(chosen), str(t.store()), None, sc.MS_BIND)
    assert f"{t.store()} is a mount point" in refused(ns, t, ds.FAILED)
    assert owner_mode(chosen) == (0, 0, 0o755)


def test_something_else_mounted_at_the_target_is_not_stacked_on(ns, tree):
    t = tree
    other = t.root / "other"
    other.mkdir()
    (t.run() / HASH).mkdir()
    ns.call(sc.mount, str(other), str(t.run() / HASH), None, sc.MS_BIND)
    assert "something else is mounted" in refused(ns, t, ds.FAILED)


def test_a_failure_at_the_cache_leaves_the_store_unmounted(ns, tree):
    """Both or neither: the store was bound first, and is undone."""
    t = tree
    other = t.root / "other"
    other.mkdir()
    (t.run_cache() / HASH).mkdir()
    ns.call(sc.mount, str(other), str(t.run_cache() / HASH), None, sc.MS_BIND)
    refused(ns, t, ds.FAILED)
    assert not (t.run() / HASH).exists()              # its mount point went too


def test_a_failure_after_an_implicit_init_undoes_it_too(ns, bare_tree):
    t = bare_tree
    t.run_cache().mkdir(parents=True)
    os.symlink(t.root, t.run_cache() / HASH)
    refused(ns, t, ds.FAILED)                         # not even the run dirs stay mounted


def test_a_request_refused_by_the_launcher_shape_check():
    ok = {"v": 1, "seq": 3, **wire.daemon_store_to_wire("mount", Request("foo", HASH))}
    assert wire.daemon_store_from_wire(ok) == ("mount", Request("foo", HASH, False))
    for bad in ({**ok, "extra": 1}, {k: v for k, v in ok.items() if k != "lazy"},
                {**ok, "action": "chown"}, {**ok, "lazy": 1}, {**ok, "daemon": ["foo"]},
                {**ok, "user_hash": None}):
        with pytest.raises(wire.WireError):
            wire.daemon_store_from_wire(bad)


# -- jails see stores come and go --------------------------------------------------------

WATCH = r"""
echo ready
until [ -e "$1/marker" ] && [ -e "$2/marker" ]; do sleep 0.02; done
echo seen
stat -c 'owner %u %g %a' "$1"
grep -F " $1 " /proc/self/mountinfo
grep -F " $2 " /proc/self/mountinfo
echo reported
while [ -e "$1/marker" ] || [ -e "$2/marker" ]; do sleep 0.02; done
echo gone
[ -e "$1" ] || echo no-mount-point
"""

NEVER = r"""
echo ready
i=0
while [ $i -lt 60 ]; do [ -e "$1/marker" ] && { echo seen; exit 0; }; sleep 0.05; i=$((i+1)); done
echo never
"""


def wait_for(path: Path, token: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if token in text.split():
            return text
        time.sleep(0.02)
    raise AssertionError(f"{token!r} never appeared in {path}: "
                         f"{path.read_text() if path.exists() else ''!r}")


def daemon_jail(t: Tree, *flags: str) -> list[str]:
    """privjail as a ChromeOS daemon profile asks for its store: the
    minimalistic mount namespace, and the run dirs bound recursively."""
    run, cache = t.run(), t.run_cache()
    return [*PRIVJAIL, "--profile", "minimalistic-mountns", "-p", "--die-with-parent", *flags,
            "-k", f"{run},{run},none,MS_BIND|MS_REC",
            "-k", f"{cache},{cache},none,MS_BIND|MS_REC"]


def test_a_jail_started_before_the_mount_sees_it_come_and_go(ns, tree):
    t = tree
    out = t.root / "jail.out"
    target, cache_target = f"{t.run()}/{HASH}", f"{t.run_cache()}/{HASH}"
    pid = ns.call(ns_worker.spawn, [*daemon_jail(t, "-Kslave"), "--", "/bin/sh", "-c", WATCH,
                                    "watch", target, cache_target], str(out))
    try:
        wait_for(out, "ready")                        # the jail exists before the mount
        mount(ns, t)
        (t.store() / "marker").write_text("x")
        (t.cache() / "marker").write_text("x")
        wait_for(out, "reported")
        unmount(ns, t)
        text = wait_for(out, "gone")
        assert ns.call(ns_worker.reap, pid) == 0
    finally:
        if pid in ns.call(ns_worker.children):
            ns.call(ns_worker.reap, pid, kill=True)
    lines = text.splitlines()
    assert f"owner {T_UID} {T_GID} {T_MODE:o}" in lines
    inside = [line for line in lines if line[:1].isdigit()]
    assert len(inside) == 2
    for line in inside:
        fields = line.split()
        assert fields[4] in (target, cache_target)
        assert {"nosuid", "nodev", "noexec"} <= set(fields[5].split(","))
        assert any(f.startswith("master:") for f in fields[6:fields.index("-")])  # a slave
    assert "no-mount-point" in lines


def test_a_jail_with_private_propagation_does_not_see_it(ns, tree):
    """The control: without -Kslave the same jail never sees the store."""
    t = tree
    out = t.root / "jail.out"
    pid = ns.call(ns_worker.spawn, [*daemon_jail(t, "-Kprivate"), "--", "/bin/sh", "-c", NEVER,
                                    "never", f"{t.run()}/{HASH}"], str(out))
    try:
        wait_for(out, "ready")
        mount(ns, t)
        (t.store() / "marker").write_text("x")
        assert "never" in wait_for(out, "never").split()
        assert ns.call(ns_worker.reap, pid) == 0
    finally:
        if pid in ns.call(ns_worker.children):
            ns.call(ns_worker.reap, pid, kill=True)


# -- the administrator's CLI (local, as root) ----------------------------------------------

def write_config(t: Tree, extra: str = "") -> Path:
    (t.root / "profiles").mkdir(exist_ok=True)
    path = t.root / "broker.toml"
    path.write_text(f'profiles_dir = "profiles"\n\n[daemon_store]\n'
                    f'templates_dir = "{t.layout.templates_dir}"\n'
                    f'run_dir = "{t.layout.run_dir}"\n'
                    f'cache_run_dir = "{t.layout.cache_run_dir}"\n'
                    f'home_root = "{t.layout.home_root}"\n{extra}')
    return path


def test_cli_init_and_lazy_unmount(ns, bare_tree):
    t = bare_tree
    config = write_config(t)
    cli = [sys.executable, "-m", "client.cli", "daemon-store"]
    rc, out, err = ns.call(ns_worker.run, [*cli, "init", "--config", str(config)])
    assert rc == 0, err
    assert out.splitlines() == [f"foo (store): {t.run()} is a shared mount point",
                                f"foo (cache): {t.run_cache()} is a shared mount point"]
    mount(ns, t)
    rc, out, err = ns.call(ns_worker.run, [*cli, "unmount", "--lazy", "--config", str(config),
                                           "foo", HASH])
    assert (rc, out.strip()) == (0, "detached store and cache"), err
    rc, out, err = ns.call(ns_worker.run, [*cli, "unmount", "--lazy", "--config", str(config),
                                           "..", HASH])
    assert rc == 1 and "[InvalidArgument]" in err
    assert len(ns.mounts_under(t.root)) == 2


# -- policy: [daemon_store] ------------------------------------------------------------------

def test_policy_defaults_are_chromeos_paths_and_root_only():
    pol = policy.parse({"profiles_dir": "p"})
    g = pol.daemon_store
    assert g.layout == Layout("/etc/daemon-store", "/run/daemon-store",
                              "/run/daemon-store-cache", "/home", "[0-9a-f]{40}")
    g.decide(0, frozenset())
    with pytest.raises(policy.AccessDenied, match=r"\[daemon_store\]"):
        g.decide(1000, frozenset({1000}))


def test_policy_example_file_states_the_defaults():
    pol = policy.load(str(ROOT / "examples" / "broker.toml"))
    assert pol.daemon_store == policy.parse({"profiles_dir": "p"}).daemon_store


def test_policy_names_callers_and_paths():
    pol = policy.parse({"profiles_dir": "p", "daemon_store": {
        "users": ["root", 1234], "groups": [4321], "run_dir": "/x/run",
        "user_hash_pattern": "[0-9a-f]{16}"}})
    g = pol.daemon_store
    assert g.uids == {0, 1234} and g.gids == {4321}
    assert g.layout.run_dir == "/x/run" and g.layout.cache_run_dir == "/run/daemon-store-cache"
    g.decide(1234, frozenset())
    g.decide(999, frozenset({4321}))
    nobody = policy.parse({"profiles_dir": "p", "daemon_store": {"users": []}}).daemon_store
    with pytest.raises(policy.AccessDenied):
        nobody.decide(0, frozenset({0}))


@pytest.mark.parametrize("section,error", [
    ({"frob": 1}, "unknown keys frob"),
    ({"run_dir": "relative/run"}, "run_dir must be an absolute path"),
    ({"home_root": 5}, "home_root must be an absolute path"),
    ({"user_hash_pattern": "[0-9"}, "user_hash_pattern"),
    ({"run_dir": "/r", "cache_run_dir": "/r/"}, "must differ"),
    ({"users": ["no-such-user-xyz"]}, "unknown user"),
    ({"users": "root"}, "users must be a list"),
])
def test_policy_refuses_a_broken_section(section, error):
    with pytest.raises(policy.PolicyError, match=error):
        policy.parse({"profiles_dir": "p", "daemon_store": section})


# -- the launcher: the privileged side re-validates whatever it is sent ------------------

def test_the_launcher_revalidates_daemon_store_requests(bare_tree):
    """Sent straight to the launcher, bypassing the front's checks: refused
    there, by the launcher's own Layout (these never reach a mount)."""
    import asyncio

    from broker import launcher

    async def main():
        pid, sock = launcher.start(_sample_envelope(), bare_tree.layout)
        client = launcher.LauncherClient(sock, lambda *a: None)
        try:
            async def ask(**fields):
                msg = {"op": "daemon-store", "action": "mount", "daemon": "foo",
                       "user_hash": HASH, "lazy": False, **fields}
                with pytest.raises(launcher.LauncherFailed) as e:
                    await client.request(msg)
                return e.value.kind, str(e.value)
            assert (await ask(daemon=".."))[0] == ds.INVALID
            assert (await ask(user_hash="../../etc"))[0] == ds.INVALID
            assert (await ask(daemon="bar"))[0] == ds.NOT_FOUND
            assert (await ask(action="chown"))[0] == "malformed"
            assert (await ask(lazy="yes"))[0] == "malformed"
            assert (await ask(extra=1))[0] == "malformed"
        finally:
            sock.close()
            os.waitpid(pid, 0)

    asyncio.run(main())
    assert mounts_under(bare_tree.root) == []


def test_a_launcher_without_a_layout_refuses_daemon_stores():
    import asyncio

    from broker import launcher

    async def main():
        pid, sock = launcher.start(_sample_envelope())
        client = launcher.LauncherClient(sock, lambda *a: None)
        try:
            with pytest.raises(launcher.LauncherFailed) as e:
                await client.request({"op": "daemon-store", "action": "unmount",
                                      "daemon": "foo", "user_hash": HASH, "lazy": False})
            assert e.value.kind == ds.FAILED and "not configured" in str(e.value)
        finally:
            sock.close()
            os.waitpid(pid, 0)

    asyncio.run(main())


def _sample_envelope():
    """The launcher refuses every launch outside the sample policy; these
    tests send it daemon-store requests only."""
    from broker import policy
    from broker.envelope import Envelope
    from conftest import ROOT
    return Envelope(policy.load(str(ROOT / "examples" / "broker.toml")))
