"""Confused-deputy tests of the device operations (issue #9): what the
caller's own view of a path holds does not matter, and nothing the caller
made itself is handed back.

  - bind-mount tricks: the caller, in a user and mount namespace of its own,
    binds something else onto a device path (its own file onto an allowed
    node's path; an allowed node onto a denied node's path) and asks for
    that path from inside.  The broker resolves paths in its own view: the
    fd it hands back is the real node's, and the denied node stays denied.
  - a node the caller made itself: an unprivileged caller cannot mknod a
    device anywhere (not even in a namespace of its own), and what it can
    make in a directory it may write under the device root (a file, a FIFO,
    a symlink, a hard link) is refused, its target untouched.

The broker and deployment are tests/test_devices_broker.py's; the caller is
a real unprivileged user (alice) on the private bus."""
from __future__ import annotations

import json
import os
import stat
import sys

from conftest import ROOT
from test_devices_broker import alice, broker, bus, cli, owner, world  # noqa: F401 - fixtures

# Run as alice: a user and mount namespace of her own (her uid mapped to
# itself, so the bus still sees her), a private bind of argv[2] onto argv[3],
# then OpenPath(argv[3]) from inside; prints what the fd is.
IN_OWN_NAMESPACE = r"""
import json, os, stat, sys
sys.path.insert(0, sys.argv[1])
from broker.jail import syscalls as sc
source, target, address = sys.argv[2], sys.argv[3], sys.argv[4]
uid, gid = os.getuid(), os.getgid()
sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                   ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
sc.mount(source, target, None, sc.MS_BIND)
seen = os.stat(target)
from client import Broker, BrokerCallError
out = {"seen_here": [stat.S_ISCHR(seen.st_mode), seen.st_rdev]}
with Broker(address) as b:
    try:
        fd = b.open_path(target)
    except BrokerCallError as e:
        out["error"] = [e.name, e.message]
    else:
        st = os.fstat(fd)
        out["fd"] = [stat.S_ISCHR(st.st_mode), st.st_rdev, st.st_ino]
        os.close(fd)
print(json.dumps(out))
"""


def _in_own_namespace(bus, alice, source, target) -> dict:
    r = alice.run([sys.executable, "-c", IN_OWN_NAMESPACE, str(ROOT), str(source), str(target),
                   bus.address], env=bus.env(), cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_a_file_bound_onto_an_allowed_path_gets_the_real_node(bus, broker, world, alice):
    mine = world / "alice-file"
    mine.write_text("alice's own bytes\n")
    os.chown(mine, alice.uid, alice.gid)
    real = os.stat(world / "dev" / "hidraw0")
    got = _in_own_namespace(bus, alice, mine, world / "dev" / "hidraw0")
    assert got["seen_here"][0] is False           # in her view, the path is her file
    assert got["fd"] == [True, real.st_rdev, real.st_ino]     # the broker's: the real node


def test_an_allowed_node_bound_onto_a_denied_path_stays_denied(bus, broker, world, alice):
    allowed = os.stat(world / "dev" / "hidraw0")
    got = _in_own_namespace(bus, alice, world / "dev" / "hidraw0", world / "dev" / "hidraw1")
    assert got["seen_here"] == [True, allowed.st_rdev]     # in her view: the allowed node
    assert "fd" not in got
    name, message = got["error"]
    assert name == "org.privbroker.Error.AccessDenied" and "deny_unsafe_hidraw" in message


def test_a_caller_cannot_make_a_device_node_even_in_its_own_namespace(world, alice):
    scratch = world / "alice-scratch"
    scratch.mkdir()
    os.chown(scratch, alice.uid, alice.gid)
    code = (f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
            "from broker.jail import syscalls as sc\n"
            "def mk(p):\n"
            "    try:\n"
            "        os.mknod(p, 0o666 | 0o020000, os.makedev(1, 5)); return 'made'\n"
            "    except PermissionError: return 'EPERM'\n"
            f"plain = mk({str(scratch / 'plain')!r})\n"
            "uid, gid = os.getuid(), os.getgid()\n"
            "sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)\n"
            "open('/proc/self/setgroups', 'w').write('deny')\n"
            "open('/proc/self/uid_map', 'w').write(f'0 {uid} 1')\n"
            "open('/proc/self/gid_map', 'w').write(f'0 {gid} 1')\n"
            f"print(plain, mk({str(scratch / 'ns')!r}))\n")
    r = alice.run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["EPERM", "EPERM"]
    assert sorted(os.listdir(scratch)) == []


def test_what_a_caller_makes_in_a_writable_dir_under_the_dev_root_is_refused(bus, broker,
                                                                           world, alice):
    """A sticky world-writable directory under the device root, like /dev/shm."""
    shm = world / "dev" / "shm"
    shm.mkdir(exist_ok=True)
    os.chmod(shm, 0o1777)
    made = alice.run([sys.executable, "-c",
                      "import os, sys\nd = sys.argv[1]\n"
                      "open(d + '/file', 'w').write('x')\n"
                      "os.mkfifo(d + '/fifo')\n"
                      "os.symlink('../hidraw0', d + '/link')\n"
                      "try:\n    os.link(d + '/../hidraw0', d + '/hard')\n"
                      "except OSError as e:\n    print('link', e.errno)\n", str(shm)],
                     timeout=30)
    assert made.returncode == 0, made.stderr
    # A hard link to root's node needs fs.protected_hardlinks off (a race of
    # that kind, with a link to her own file, is in test_deputy_races.py).
    if open("/proc/sys/fs/protected_hardlinks").read().strip() == "1":
        assert made.stdout.split() == ["link", "1"]         # EPERM
    node = world / "dev" / "hidraw0"
    before = owner(node)
    expect = {"file": "a regular file", "fifo": "a FIFO", "link": "symlink"}
    for name, says in expect.items():
        for op in ("open", "chown"):
            r = cli(bus, alice, op, str(shm / name), "--", "true")
            assert r.returncode == 1, (name, op, r.stdout, r.stderr)
            assert says in r.stderr, (name, op, r.stderr)
    assert owner(node) == before
    assert owner(shm / "file")[0] == alice.uid and stat.S_ISFIFO(os.lstat(shm / "fifo").st_mode)
