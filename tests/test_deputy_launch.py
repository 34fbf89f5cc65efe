"""Confused-deputy tests of Launch (issue #9): fd-number games, loader
variables in the environment, and a recycled caller pid.

privbrokerd runs on a private system-style bus with the shipped bus policy,
inside a cgroup of its own (soak_kit.BrokerCgroup: its jail cgroups, and only
they, are found there); the callers are real processes of throwaway users in
the group the sample policy grants, talking on raw connections
(tests/deputy_caller.py).  What a jail got is what a probe inside it reports:
each open fd's (st_dev, st_ino) and link, its environment, its uid.  The
broker's own fds are read from /proc/<pid>/fd of the launcher (privbrokerd's
main process) and the front (the bus name's owner)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import PrivateBus, ThrowawayUser, popen_as, start_broker, stop_broker
from soak_kit import BrokerCgroup, bus_owner_pid, fd_count, wait_for
from test_broker import deployment  # noqa: F401 - fixture

CALLER = str(Path(__file__).resolve().parent / "deputy_caller.py")


@pytest.fixture(scope="module")
def cg():
    c = BrokerCgroup(f"deputy-{os.getpid()}-{time.monotonic_ns()}")
    yield c
    c.remove()


@pytest.fixture(scope="module")
def bus():
    with PrivateBus() as b:
        yield b


@pytest.fixture(scope="module")
def broker(bus, deployment, cg):
    proc = start_broker(bus, deployment / "broker.toml", deployment / "deputy.log",
                        wrap=cg.wrap)
    proc.front = bus_owner_pid(bus)
    proc.log_path = deployment / "deputy.log"
    yield proc
    stop_broker(proc)


@pytest.fixture(scope="module")
def mallory():
    with ThrowawayUser(groups=["privbroker"], prefix="pbdep") as u:
        yield u


@pytest.fixture(scope="module")
def bob():
    with ThrowawayUser(groups=["privbroker"], prefix="pbdep") as u:
        yield u


def caller(bus, user, *args, timeout=60) -> dict:
    r = user.run([sys.executable, CALLER, bus.address, *args], env=bus.env(), cwd=ROOT,
                 timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def launch(bus, user, send, fd_map, **req) -> dict:
    return caller(bus, user, "launch", json.dumps({"send": send, "fd_map": fd_map,
                                                   "objects": req.pop("objects", 0), **req}))


def objects_of(pid: int) -> dict[int, tuple[int, int]]:
    """fd number -> (st_dev, st_ino) of what each fd of a process holds."""
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        out[int(n)] = (st.st_dev, st.st_ino)
    return out


class Trace:
    """What a launch could leave behind: fds in the front and the launcher,
    the launcher's children (every jail is one), jail cgroups."""

    def __init__(self, broker, cg):
        self.broker, self.cg = broker, cg
        self.before = self.now()

    def now(self):
        """The launcher's seed for its next launch (broker/jail/launch.py)
        comes and goes with launches: it is left out (its process, its two
        fds in the launcher, its cgroup), and there is never more than one."""
        b = self.broker
        kids = [int(k) for k in Path(f"/proc/{b.pid}/task/{b.pid}/children").read_text().split()]
        seeds = [k for k in kids if _comm(k) == "pb-seed"]
        dirs = [str(d) for d in self.cg.jail_dirs(seeds=True)]
        seed_dirs = {os.path.basename(d) for d in dirs if "privbroker-seed-" in d}
        assert len(seeds) <= 1 and len(seed_dirs) <= 1, (seeds, seed_dirs)
        return (fd_count(b.front), fd_count(b.pid) - 2 * len(seeds),
                sorted(k for k in kids if k not in seeds),
                sorted(d for d in dirs if "privbroker-seed-" not in d))

    def unchanged(self) -> bool:
        return wait_for(lambda: self.now() == self.before, 10)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def jail_fds(got: dict) -> dict[int, tuple[int, int]]:
    assert "reply" in got, got
    return {int(n): (v[0], v[1]) for n, v in got["jail"]["fds"].items()}


# -- fd games ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["sent twice", "one fd, two targets"])
def test_the_same_fd_under_two_target_numbers(bus, broker, cg, mallory, how):
    trace = Trace(broker, cg)
    if how == "sent twice":
        got = launch(bus, mallory, ["out", 0, 0], {1: 0, 5: 1, 9: 2}, objects=1)
    else:
        got = launch(bus, mallory, ["out", 0], {1: 0, 5: 1, 9: 1}, objects=1)
    seen = jail_fds(got)
    obj = tuple(got["objects"][0])
    assert seen == {1: tuple(got["out"]), 5: obj, 9: obj}, got["jail"]["fds"]
    assert trace.unchanged(), (trace.before, trace.now())


def test_targets_that_are_the_brokers_own_fd_numbers_get_only_the_callers(bus, broker, cg,
                                                                          mallory):
    """Every fd number the launcher or the front holds (and 0..20) used as a
    target: the jail sees exactly the caller's objects at exactly those
    numbers, and none of the broker's."""
    launcher, front = objects_of(broker.pid), objects_of(broker.front)
    theirs = set(launcher.values()) | set(front.values())
    numbers = sorted(set(launcher) | set(front) | set(range(21)))
    assert max(numbers) <= 1023, numbers
    tried = 0
    # the system bus takes at most 16 fds per message: 15 objects + the report pipe
    for i in range(0, len(numbers), 15):
        chunk = numbers[i:i + 15]
        out = 1023 - i                   # the report pipe, above them all
        fd_map = {out: 0, **{t: k + 1 for k, t in enumerate(chunk)}}
        trace = Trace(broker, cg)
        got = launch(bus, mallory, ["out", *range(len(chunk))], fd_map, objects=len(chunk))
        seen = jail_fds(got)
        want = {out: tuple(got["out"]),
                **{t: tuple(got["objects"][k]) for k, t in enumerate(chunk)}}
        assert seen == want, (chunk, got["jail"]["fds"])
        assert not set(seen.values()) & theirs
        assert trace.unchanged(), (trace.before, trace.now())
        tried += len(chunk)
    print(f"\ndeputy: {tried} target numbers that are the broker's own fd numbers "
          f"(launcher {sorted(launcher)}, front {sorted(front)}): 0 reached the broker's")


def test_fds_the_caller_closed_after_sending_still_reach_the_jail(bus, broker, cg, mallory):
    trace = Trace(broker, cg)
    got = launch(bus, mallory, ["out", 0, 1], {3: 0, 4: 1, 5: 2}, objects=2, close_early=True)
    assert jail_fds(got) == {3: tuple(got["out"]), 4: tuple(got["objects"][0]),
                             5: tuple(got["objects"][1])}
    assert trace.unchanged(), (trace.before, trace.now())


def test_fds_passed_but_not_mapped_are_closed_and_not_seen(bus, broker, cg, mallory):
    trace = Trace(broker, cg)
    got = launch(bus, mallory, ["out", 0, 1, 2, 0], {1: 0}, objects=3)
    assert jail_fds(got) == {1: tuple(got["out"])}
    assert trace.unchanged(), (trace.before, trace.now())


BAD_FDS = [
    # (send, fd_map, error, says)
    (["out"], {1: 0, 7: 3}, "InvalidArgument", "fd 7 refers to no passed fd"),
    ([], {1: 0}, "InvalidArgument", "fd 1 refers to no passed fd"),
    (["out"], {1024: 0}, "InvalidArgument", "fd number 1024 is out of range 0..1023"),
    (["out"], {4294967295: 0}, "InvalidArgument", "out of range"),
    (["out", 0], {1: 0, 2: 4294967295}, "InvalidArgument", "fd 2 refers to no passed fd"),
]


@pytest.mark.parametrize("send,fd_map,error,says", BAD_FDS)
def test_bad_fd_numbers_are_named_errors_and_leave_nothing(bus, broker, cg, mallory, send,
                                                          fd_map, error, says):
    trace = Trace(broker, cg)
    got = launch(bus, mallory, send, fd_map, objects=1, env={"OUT": "1"})
    assert got.get("error") == f"org.privbroker.Error.{error}", got
    assert says in got["message"], got
    assert trace.unchanged(), (trace.before, trace.now())


def test_more_fds_than_a_message_may_carry_is_refused_by_the_bus(bus, broker, cg, mallory):
    """17 fds: dbus-daemon's max_message_unix_fds (16 on the system bus)
    stops the message before the broker; the broker is untouched."""
    trace = Trace(broker, cg)
    r = mallory.run([sys.executable, CALLER, bus.address, "launch",
                     json.dumps({"send": ["out", *range(16)],
                                 "fd_map": {1: 0, **{10 + k: k + 1 for k in range(16)}},
                                 "objects": 16})],
                    env=bus.env(), cwd=ROOT, timeout=60)
    print(f"\ndeputy: 17 fds in one Launch: exit {r.returncode}, "
          f"{(r.stdout or r.stderr).strip().splitlines()[-1][:200]}")
    assert r.returncode != 0 or "error" in r.stdout, r.stdout
    assert "reply" not in r.stdout
    assert trace.unchanged(), (trace.before, trace.now())
    assert broker.poll() is None and bus_owner_pid(bus) == broker.front


# -- environment -------------------------------------------------------------------

# Names the dynamic loader (ld.so) acts on: refused by name, whatever the profile.
LOADER_VARS = ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_DEBUG", "LD_DEBUG_OUTPUT",
               "LD_PROFILE", "LD_BIND_NOW", "LD_SHOW_AUXV", "LD_ORIGIN_PATH",
               "LD_HWCAP_MASK", "GLIBC_TUNABLES"]


@pytest.mark.parametrize("profile", ["minimal", "filtered"])
@pytest.mark.parametrize("name", LOADER_VARS)
def test_loader_variables_are_refused_and_no_jail_starts(bus, broker, cg, mallory, profile,
                                                        name):
    trace = Trace(broker, cg)
    got = launch(bus, mallory, ["out"], {1: 0}, profile=profile,
                 env={"OUT": "1", name: "/var/tmp/evil.so"})
    assert got.get("error") == "org.privbroker.Error.AccessDenied", got
    assert f"environment name {name!r} is not allowed" in got["message"], got
    assert trace.unchanged(), (trace.before, trace.now())


def test_the_jail_sees_exactly_the_requested_environment(bus, broker, cg, mallory):
    """env_reset is forced: nothing of the broker's or the launcher's own
    environment reaches the jail, and an ordinary variable arrives intact."""
    got = launch(bus, mallory, ["out"], {1: 0}, env={"OUT": "1", "GREETING": "a=b\nc"})
    env = got["jail"]["env"]
    env.pop("LC_CTYPE", None)      # Python's C-locale coercion, inside the jail
    assert env == {"OUT": "1", "GREETING": "a=b\nc"}, env


# -- a recycled pid -----------------------------------------------------------------

def _spawn_with_pid(target: int, uid: int, gid: int, groups) -> subprocess.Popen:
    """A process (`sleep`) of uid whose pid is `target`: ns_last_pid set to
    target - 1 just before the fork (our pid namespace is the bus's).
    Retried: another fork on the machine may take the pid first."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(target - 1))
        p = popen_as(uid, gid, groups, ["/bin/sleep", "60"])
        if p.pid == target:
            return p
        p.kill()
        p.wait()
        if os.path.exists(f"/proc/{target}"):          # someone else holds it now
            time.sleep(0.05)
    pytest.fail(f"could not get pid {target} in 200 tries")


@pytest.mark.parametrize("reuser", ["root", "bob"])
def test_a_recycled_pid_lends_the_new_process_nothing(bus, broker, cg, mallory, bob, reuser):
    """mallory connects, hands the connection to a child and exits; her pid
    goes to a process of another uid (root, or bob) before the broker has
    ever identified the connection.  The launch is attributed to mallory
    (the bus's connect-time credentials), never to the pid's new owner."""
    p = popen_as(mallory.uid, mallory.gid, mallory.groups,
                 [sys.executable, CALLER, bus.address, "pidreuse"], env=bus.env(), cwd=ROOT,
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = json.loads(p.stdout.readline())
    p.wait(timeout=10)                                  # the opener, reaped: its pid is free
    assert p.returncode == 0
    uid, gid, groups = (0, 0, []) if reuser == "root" else (bob.uid, bob.gid, bob.groups)
    squatter = _spawn_with_pid(first["opener"], uid, gid, groups)
    try:
        assert os.stat(f"/proc/{first['opener']}").st_uid == uid
        p.stdin.write("go\n")
        p.stdin.flush()
        got = json.loads(p.stdout.readline())
    finally:
        squatter.kill()
        squatter.wait()
        p.stdin.close()
    assert "reply" in got, got
    assert got["jail"]["uid"] == mallory.uid != uid
    # The decision line: mallory's uid, and no pid: the one the bus recorded
    # at connect time now names the squatter, a process of another uid, so
    # the broker holds no pidfd for it and names no process (callers.py).
    assert wait_for(lambda: f"jail={got['reply'][0]}" in broker.log_path.read_text(), 5)
    line = [x for x in broker.log_path.read_text().splitlines()
            if "decision method=Launch" in x and f"jail={got['reply'][0]}" in x]
    assert f"uid={mallory.uid} pid=gone " in line[0], line
