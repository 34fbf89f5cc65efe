"""ChownDevice leases and their journal (broker/devices/leases.py), on real
nodes in a temporary dev root."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import stat
import struct
import subprocess
import time

import pytest

from broker.devices import leases as leases_mod
from broker.devices import safe_open
from broker.devices.errors import DeviceError
from broker.devices.leases import Journal, JournalError, LeaseManager
from udev_tree import make_node

UID = 4321


def acl(*entries) -> bytes:
    """system.posix_acl_access: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


NOID = 0xFFFFFFFF
BASE_ACL = [(0x01, 6, NOID), (0x04, 6, NOID), (0x20, 0, NOID)]


@pytest.fixture
def env(tmp_path):
    dev = tmp_path / "dev"
    make_node(dev, "a", "c", 1, 3, mode=0o660, gid=46)
    make_node(dev, "b", "c", 1, 5, mode=0o640, gid=0)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return dev, state / "leases.journal"


def node(dev, name):
    return safe_open.open_node(str(dev), f"{dev}/{name}")


def owner(p):
    st = os.stat(p)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_take_journals_and_fsyncs_before_anything_changes(env, monkeypatch):
    dev, journal = env
    events = []
    real = {n: getattr(os, n) for n in ("fsync", "chmod", "chown")}

    def spy(name):
        def call(*a, **kw):
            if name != "fsync":
                # the original is on disk before the node changes
                recs = [json.loads(x) for x in journal.read_text().splitlines()]
                assert recs[-1]["op"] == "take" and recs[-1]["uid"] == 0
                assert recs[-1]["gid"] == 46 and recs[-1]["mode"] == 0o660
            events.append(name)
            return real[name](*a, **kw)
        return call

    for n in real:
        monkeypatch.setattr(os, n, spy(n))
    lm = LeaseManager(str(journal))
    lease = lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    monkeypatch.undo()
    assert events.index("fsync") < events.index("chmod") < events.index("chown")
    assert owner(dev / "a") == (UID, 46, 0o600)
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    lm.release(":1.1", lease.lease_id)
    assert owner(dev / "a") == (0, 46, 0o660)
    assert journal.read_text() == ""                      # nothing pending: emptied


def test_one_lease_per_node_and_per_uid_limit(env):
    dev, journal = env
    os.link(dev / "a", dev / "a-hardlink")
    lm = LeaseManager(str(journal), max_per_uid=1)
    lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    make_node(dev, "a-again", "c", 1, 3, mode=0o660)     # another node of the same device
    for who, path in ((":1.2", "a"), (":1.1", "a"), (":1.2", "a-hardlink"), (":1.2", "a-again")):
        with pytest.raises(DeviceError) as e:
            lm.take(who, UID + 1, f"{dev}/{path}", node(dev, path), 0o600)
        assert e.value.kind == "Busy"
        assert ":1.1" not in str(e.value) and str(UID) not in str(e.value)
    with pytest.raises(DeviceError) as e:
        lm.take(":1.1", UID, f"{dev}/b", node(dev, "b"), 0o600)
    assert e.value.kind == "LimitExceeded"
    assert owner(dev / "b") == (0, 0, 0o640)


def test_only_the_holding_connection_releases(env):
    dev, journal = env
    lm = LeaseManager(str(journal))
    lease = lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    for who, lid in ((":1.2", lease.lease_id), (":1.1", "nope")):
        with pytest.raises(DeviceError) as e:
            lm.release(who, lid)
        assert e.value.kind == "NotFound"
    assert owner(dev / "a") == (UID, 46, 0o600)
    lm.caller_gone(":1.1")
    assert owner(dev / "a") == (0, 46, 0o660)
    assert lm.by_id == {} and lm.by_node == {}


def test_replay_after_a_crash_restores(env):
    dev, journal = env
    LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    LeaseManager(str(journal)).take(":1.2", UID, f"{dev}/b", node(dev, "b"), 0o606)
    assert owner(dev / "a")[0] == owner(dev / "b")[0] == UID
    with open(journal, "ab") as f:
        f.write(b'{"op":"take","id":"torn","ro')            # a write the crash cut off
    lines = LeaseManager(str(journal)).replay()
    assert owner(dev / "a") == (0, 46, 0o660) and owner(dev / "b") == (0, 0, 0o640)
    assert len(lines) == 2 and all("restored" in x for x in lines)
    assert journal.read_text() == ""
    assert LeaseManager(str(journal)).replay() == []


@pytest.mark.parametrize("use_openat2", [True, False])
def test_replay_leaves_a_recreated_or_vanished_node_alone(env, use_openat2):
    dev, journal = env
    lm = LeaseManager(str(journal))
    lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    lm.take(":1.1", UID, f"{dev}/b", node(dev, "b"), 0o600)
    os.unlink(dev / "a")
    make_node(dev, "a", "c", 1, 3, mode=0o666, uid=UID)       # udev made a new one
    os.unlink(dev / "b")
    lines = LeaseManager(str(journal)).replay(use_openat2)
    assert owner(dev / "a") == (UID, 0, 0o666)
    assert "different node" in lines[0] and "gone" in lines[1]
    assert journal.read_text() == ""


def test_replay_never_follows_a_symlink_put_in_the_nodes_place(env, tmp_path):
    dev, journal = env
    make_node(tmp_path, "victim", "c", 1, 3, mode=0o600)
    LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    os.unlink(dev / "a")
    (dev / "a").symlink_to(tmp_path / "victim")
    LeaseManager(str(journal)).replay()
    assert owner(tmp_path / "victim") == (0, 0, 0o600)


def test_the_acl_is_restored_and_one_the_holder_added_removed(env):
    dev, journal = env
    p = dev / "b"
    original = acl(*BASE_ACL[:1], (0x02, 6, 1000), *BASE_ACL[1:2], (0x10, 6, NOID),
                   BASE_ACL[2])
    try:
        os.setxattr(p, leases_mod.ACL_XATTR, original)
    except OSError as e:
        pytest.skip(f"no POSIX ACLs here: {e}")
    before = owner(p)
    lm = LeaseManager(str(journal))
    lease = lm.take(":1.1", UID, str(p), node(dev, "b"), 0o600)
    # the holder owns the node now: it may change the ACL, e.g. grant uid 2000
    os.setxattr(p, leases_mod.ACL_XATTR, acl(*BASE_ACL[:1], (0x02, 6, 2000),
                                               *BASE_ACL[1:2], (0x10, 6, NOID), BASE_ACL[2]))
    lm.release(":1.1", lease.lease_id)
    assert os.getxattr(p, leases_mod.ACL_XATTR) == original and owner(p) == before
    # a node without an ACL gets none back
    q = dev / "a"
    lease = lm.take(":1.1", UID, str(q), node(dev, "a"), 0o600)
    os.setxattr(q, leases_mod.ACL_XATTR, acl(*BASE_ACL[:1], (0x02, 6, 2000), *BASE_ACL[1:2],
                                               (0x10, 6, NOID), BASE_ACL[2]))
    lm.release(":1.1", lease.lease_id)
    with pytest.raises(OSError):
        os.getxattr(q, leases_mod.ACL_XATTR)
    assert owner(q) == (0, 46, 0o660)


def test_a_journal_others_could_write_is_refused(env):
    dev, journal = env
    os.chmod(journal.parent, 0o777)
    with pytest.raises(DeviceError) as e:
        LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    assert e.value.kind == "Failed" and "nothing was changed" in str(e.value)
    assert owner(dev / "a") == (0, 46, 0o660)
    os.chmod(journal.parent, 0o700)
    journal.write_text(json.dumps({"op": "take", "id": "x", "root": str(dev), "rel": "a",
                                   "dev": 0, "ino": 0, "rdev": 0, "uid": UID, "gid": 0,
                                   "mode": 0o666}) + "\n")
    os.chmod(journal, 0o666)                   # a forged take must not be replayed
    assert LeaseManager(str(journal)).replay() == []
    assert owner(dev / "a") == (0, 46, 0o660)


def test_the_lease_timeout(env):
    dev, journal = env

    async def scenario():
        lm = LeaseManager(str(journal), timeout_s=0.05)
        lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
        assert owner(dev / "a")[0] == UID
        await asyncio.sleep(0.3)
        return lm

    lm = asyncio.run(scenario())
    assert owner(dev / "a") == (0, 46, 0o660) and lm.by_id == {}


def test_the_journal_stays_small(env):
    dev, journal = env
    lm = LeaseManager(str(journal))
    held = lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    for _ in range(leases_mod.COMPACT_AFTER + 10):
        lease = lm.take(":1.2", UID, f"{dev}/b", node(dev, "b"), 0o600)
        lm.release(":1.2", lease.lease_id)
    recs = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(recs) < 30
    assert [r["id"] for r in leases_mod.pending(recs)] == [held.lease_id]


# -- the journal under failure: start-up as root, full disks, torn and garbled lines --

FRONT_UID, FRONT_GID = 4000, 4000


def test_a_journal_replayed_at_start_stays_the_fronts(env):
    """privbrokerd hands the journal to the front's user, then replays it as
    root, which rewrites it: the new file must still be the front's, or the
    front refuses every lease after a restart."""
    dev, journal = env
    journal.write_text("")                           # an earlier run's (leases came and went)
    lm = LeaseManager(str(journal))
    lm.journal.hand_to(FRONT_UID, FRONT_GID)
    assert lm.replay() == []
    st = os.stat(journal)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (FRONT_UID, FRONT_GID, 0o600)
    lease = lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)   # the front's next lease
    lm.release(":1.1", lease.lease_id)
    assert owner(dev / "a") == (0, 46, 0o660)
    assert os.stat(journal).st_uid == FRONT_UID


def test_a_root_owned_leftover_tmp_does_not_become_the_journal(env):
    dev, journal = env
    tmp = journal.parent / (journal.name + ".tmp")
    tmp.write_text("left by a rewrite that failed\n")   # root's
    journal.write_text("")
    lm = LeaseManager(str(journal))
    lm.journal.hand_to(FRONT_UID, FRONT_GID)
    lm.replay()
    assert os.stat(journal).st_uid == FRONT_UID and journal.read_text() == ""
    assert not tmp.exists()


@contextlib.contextmanager
def small_fs(path, pages: int):
    """A tmpfs of `pages` pages mounted on path (a real ENOSPC)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4}k,mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(d, leave: int = 0):
    """Fill the file system at d, then free `leave` bytes again."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    os.ftruncate(fd, os.fstat(fd).st_size - leave)
    os.close(fd)


def test_a_take_the_disk_cut_short_loses_no_later_lease(env):
    """ENOSPC part way through a take's record: the take is refused, and the
    half line must not swallow the next take's record (a lease replay could
    not read is a node never restored)."""
    dev, journal = env
    with small_fs(journal.parent, 2):
        lm = LeaseManager(str(journal))
        lm.take(":1.9", UID, f"{dev}/b", node(dev, "b"), 0o600)     # keeps the journal
        # end records up to a few bytes short of the journal's page, then no
        # page left: the next take's record is written in part
        pad = 4096 - 40 - os.stat(journal).st_size
        lm.journal.append({"op": "end", "id": "p" * (pad - 22)})
        fill(journal.parent)
        size = os.stat(journal).st_size
        with pytest.raises(DeviceError) as e:
            lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
        assert e.value.kind == "Failed" and "nothing was changed" in str(e.value)
        assert owner(dev / "a") == (0, 46, 0o660)
        assert os.stat(journal).st_size == size               # the half record cut off
        os.unlink(journal.parent / "filler")
        lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
        lm.journal.close()                                    # the front dies here
        lines = LeaseManager(str(journal)).replay()
    assert owner(dev / "a") == (0, 46, 0o660) and owner(dev / "b") == (0, 0, 0o640)
    assert sum("restored" in x for x in lines) == 2, lines


def test_a_torn_tail_stays_a_line_of_its_own(env):
    """What a crash (or a cut that failed) left at the end without its
    newline: the next record goes on a new line."""
    dev, journal = env
    journal.write_bytes(b'{"op":"take","id":"torn","ro')
    LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    lines = LeaseManager(str(journal)).replay()
    assert owner(dev / "a") == (0, 46, 0o660)
    assert len(lines) == 1 and "restored" in lines[0]


def test_a_rewrite_the_disk_cannot_hold_keeps_the_old_journal(env):
    dev, journal = env
    with small_fs(journal.parent, 4):
        lm = LeaseManager(str(journal), max_per_uid=100)
        for i in range(16):                                   # ~5 KiB of takes: two pages
            make_node(dev, f"n{i}", "c", 1, 20 + i, mode=0o660)
            lm.take(":1.1", UID, f"{dev}/n{i}", node(dev, f"n{i}"), 0o600)
        before = journal.read_bytes()
        assert len(before) > 4096
        fill(journal.parent, leave=4096)                      # one page free: not enough
        with pytest.raises(OSError) as e:
            lm.journal.rewrite(leases_mod.pending(lm.journal.read()))
        assert e.value.errno == errno.ENOSPC
        assert journal.read_bytes() == before
        assert sorted(os.listdir(journal.parent)) == ["filler", journal.name]
        os.unlink(journal.parent / "filler")
        lm.journal.close()
        lines = LeaseManager(str(journal)).replay()
    assert sum("restored" in x for x in lines) == 16
    assert all(owner(dev / f"n{i}")[0] == 0 for i in range(16))


def test_a_garbled_record_is_skipped_and_the_others_replayed(env, caplog):
    dev, journal = env
    LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    good = json.loads(journal.read_text())
    garbled = [{"op": "end", "id": [1]}, {**good, "id": "r", "root": 7},
               {**good, "id": "u", "uid": 2**40}, {**good, "id": "m", "mode": -1},
               {**good, "id": "k", "kind": "p"}, {**good, "id": "x", "acl": "@@"},
               {**good, "id": "b", "uid": True}, ["not", "a", "record"]]
    with open(journal, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in garbled)
    lines = LeaseManager(str(journal)).replay()
    assert owner(dev / "a") == (0, 46, 0o660)
    assert len(lines) == 1 and "restored" in lines[0]
    assert sum("unreadable" in r.message for r in caplog.records) == len(garbled)


def test_a_device_whose_restore_failed_is_not_leased_again_over_it(env, monkeypatch):
    """A failed restore leaves the first holder's ownership on the node: a
    second lease must not journal that as the original.  The restore is
    tried again first; while it fails, the device is Busy."""
    dev, journal = env
    lm = LeaseManager(str(journal))
    real_restore = leases_mod.restore

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")

    first = lm.take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    monkeypatch.setattr(leases_mod, "restore", failing)
    assert lm.release(":1.1", first.lease_id).restored is False
    assert owner(dev / "a") == (UID, 46, 0o600)
    with pytest.raises(DeviceError) as e:
        lm.take(":1.2", UID + 1, f"{dev}/a", node(dev, "a"), 0o600)
    assert e.value.kind == "Busy" and str(UID) not in str(e.value)
    assert owner(dev / "a") == (UID, 46, 0o600)
    monkeypatch.setattr(leases_mod, "restore", real_restore)
    second = lm.take(":1.2", UID + 1, f"{dev}/a", node(dev, "a"), 0o600)
    assert second.orig["uid"] == 0 and second.orig["mode"] == 0o660
    lm.journal.close()                                        # the front dies here
    LeaseManager(str(journal)).replay()
    assert owner(dev / "a") == (0, 46, 0o660)


# -- replay and where the node is now ------------------------------------------------

def test_replay_finds_a_node_moved_beneath_the_root(env):
    dev, journal = env
    LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    (dev / "sub").mkdir()
    os.rename(dev / "a", dev / "sub" / "a-renamed")
    make_node(dev, "a-lookalike", "c", 1, 3, mode=0o666)   # same device, another inode
    lines = LeaseManager(str(journal)).replay()
    assert owner(dev / "sub" / "a-renamed") == (0, 46, 0o660)
    assert owner(dev / "a-lookalike") == (0, 0, 0o666)
    assert len(lines) == 1 and "moved to 'sub/a-renamed'" in lines[0] and "restored" in lines[0]


def _recorded_in_another_boot(journal):
    rec = json.loads(journal.read_text())
    assert rec["boot"] == open(leases_mod.BOOT_ID).read().strip()
    journal.write_text(json.dumps({**rec, "boot": "an-earlier-boot"}) + "\n")


def test_a_take_from_an_earlier_boot_leaves_a_devtmpfs_node_alone(env, tmp_path):
    """After a power cut during a lease: the dev root (tmpfs, as devtmpfs
    is) was made afresh by this boot, and a node with the same numbers has
    this boot's owner and mode, which the old record must not overwrite."""
    _dev, journal = env
    dev = tmp_path / "volatile-dev"
    dev.mkdir()
    with small_fs(dev, 1):
        make_node(dev, "a", "c", 1, 3, mode=0o660, gid=46)
        LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
        _recorded_in_another_boot(journal)
        lines = LeaseManager(str(journal)).replay()
        assert owner(dev / "a") == (UID, 46, 0o600)           # as "this boot" left it
    assert len(lines) == 1 and "before the last reboot" in lines[0], lines
    assert journal.read_text() == ""


def test_a_take_from_an_earlier_boot_is_replayed_on_a_lasting_file_system(env):
    dev, journal = env                                    # tmp_path: not tmpfs
    LeaseManager(str(journal)).take(":1.1", UID, f"{dev}/a", node(dev, "a"), 0o600)
    _recorded_in_another_boot(journal)
    lines = LeaseManager(str(journal)).replay()
    assert owner(dev / "a") == (0, 46, 0o660)
    assert len(lines) == 1 and "restored" in lines[0]


def test_one_process_at_a_time_holds_the_journal(tmp_path):
    first = Journal(str(tmp_path / "state" / "leases.journal"))
    fd = first.hold_exclusively(wait_s=0)
    assert first.lock_fd == fd
    second = Journal(first.path)
    t = time.monotonic()
    with pytest.raises(JournalError, match="another privbrokerd is using the journal"):
        second.hold_exclusively(wait_s=0.2)
    assert time.monotonic() - t >= 0.2                    # it waited for the first to go
    assert second.lock_fd is None
    os.close(fd)                                          # the first run ended
    assert second.hold_exclusively(wait_s=0) >= 0
    os.close(second.lock_fd)
