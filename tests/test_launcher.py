"""The launcher zygote and its wire format, without the bus."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import pytest

from broker import launcher, policy, wire
from broker.envelope import BROKER_FORCED, Envelope
from broker.jail.spec import Bind
from conftest import JAIL_PYTHON, PROBE, ROOT, processes_with

# The launcher starts only what the policy and its profiles could produce
# (broker/envelope.py): here the sample deployment's, whose grant names root.
SAMPLE = policy.load(str(ROOT / "examples" / "broker.toml"))


def spec(*argv: str, **kw):
    """The sample `minimal` profile as the front builds it for root."""
    from dataclasses import replace
    base = Envelope(SAMPLE).profiles.spec("minimal")
    return replace(base, argv=argv, **{"uid": 0, "gid": 0, **BROKER_FORCED, **kw})


def launch_msg(jail: str, s, profile: str = "minimal") -> dict:
    return {"op": "launch", "jail": jail, "profile": profile, "fd_targets": [],
            "spec": wire.spec_to_wire(s)}


class Harness:
    """A launcher process and an asyncio client of it, collecting exit events."""

    def __init__(self, pol=SAMPLE):
        self.pid, sock = launcher.start(Envelope(pol))
        self.exits: dict[str, tuple] = {}
        self.exit_events: dict[str, int] = {}
        self.exited = asyncio.Event()
        self.client = launcher.LauncherClient(sock, self._on_exit)

    def _on_exit(self, jail_id, code, sig, oom=False):
        self.exits[jail_id] = (code, sig)
        self.exit_events[jail_id] = self.exit_events.get(jail_id, 0) + 1
        self.exited.set()

    async def wait_exit(self, jail_id, timeout=10):
        deadline = time.monotonic() + timeout
        while jail_id not in self.exits:
            self.exited.clear()
            await asyncio.wait_for(self.exited.wait(), deadline - time.monotonic())
        return self.exits[jail_id]

    def close(self):
        self.client.sock.close()
        os.waitpid(self.pid, 0)


def run(coro):
    return asyncio.run(coro)


def test_launch_passes_exactly_the_given_fds_and_reports_exit():
    async def main():
        h = Harness()
        r, w = os.pipe()
        reply = await h.client.request(
            {**launch_msg("j1", spec(JAIL_PYTHON, PROBE, "--exit", "3")), "fd_targets": [1, 2]},
            [w, w])
        os.close(w)
        assert reply["pid"] > 0
        assert await h.wait_exit("j1") == (3, None)
        with os.fdopen(r) as f:
            out = f.readline()
        h.close()
        return json.loads(out)
    report = run(main())
    assert report["fds"] == [1, 2]        # exactly what was passed: no 0, nothing else
    assert report["visible_pids"] == [1, 2]


def _exit_once(profile: str, argv: tuple[str, ...], marker: str):
    # Ballast: 512 MiB of written pages, which the launcher and every jail
    # init fork share.  An init's exit must tear that down before the kernel
    # empties its pid namespace, so an init that reported the end before
    # killing the rest would leave them running for milliseconds: long
    # enough for this test to see them.
    ballast = b"\x01" * (512 << 20)

    async def main():
        h = Harness()
        base = Envelope(SAMPLE).profiles.spec(profile)
        from dataclasses import replace
        s = replace(base, argv=argv, uid=0, gid=0, **BROKER_FORCED)
        reply = await h.client.request(launch_msg("jearly", s, profile))
        status = await h.wait_exit("jearly")
        left = processes_with(marker)           # at once, as a caller would look
        init_reaped = not os.path.exists(f"/proc/{reply['pid']}")
        await asyncio.sleep(0.5)                 # room for a second Exited
        events = h.exit_events["jearly"]
        h.close()
        return status, left, events, init_reaped
    try:
        return run(main())
    finally:
        del ballast


def test_exited_comes_once_when_nothing_of_the_jail_runs_before_init_is_reaped():
    """The program exits leaving a daemonized grandchild.  minimal's program
    runs with init's own credentials, so init kills and reaps the rest and
    then reports: Exited may come before init's own exit is reaped.  When
    it comes the grandchild is already gone (no polling here), and it comes
    exactly once."""
    marker = f"early-{time.monotonic_ns()}"
    # the daemon's shell stays (two commands) with the marker as its $0
    script = (f"setsid /bin/sh -c 'sleep 60; true' {marker} </dev/null >/dev/null 2>&1 & "
              f"sleep 0.2; exit 5")
    status, left, events, _ = _exit_once("minimal", ("/bin/sh", "-c", script), marker)
    assert status == (5, None)
    assert left == []
    assert events == 1


def test_exited_comes_once_from_the_reap_when_init_cannot_end_it_all():
    """filtered's program has a seccomp filter, which init cannot share: the
    program is forked, init does not claim the end, and Exited comes with
    init's reap, once."""
    status, left, events, init_reaped = _exit_once(
        "filtered", ("/bin/sleep", "0.1"), "no-marker-needed")
    assert status == (0, None)
    assert events == 1
    assert init_reaped


def test_signal_reaches_every_process_in_the_jail():
    marker = f"sigall-{time.monotonic_ns()}"

    async def main():
        h = Harness()
        script = f"sleep 30 & sleep 30 & wait"
        await h.client.request(launch_msg("j2", spec("/bin/sh", "-c", script, marker)))
        for _ in range(100):
            if len(processes_with("sleep\x0030")) >= 2:
                break
            await asyncio.sleep(0.02)
        await h.client.request({"op": "signal", "jail": "j2", "signal": signal.SIGTERM})
        status = await h.wait_exit("j2")
        h.close()
        return status
    code, sig = run(main())
    assert sig == signal.SIGTERM or code == 128 + signal.SIGTERM
    assert processes_with(marker) == []


def test_failed_launch_is_a_named_error_and_leaves_no_process():
    async def main():
        h = Harness()
        with pytest.raises(launcher.LauncherFailed) as e:
            await h.client.request(launch_msg("j3", spec("/no/such/program")))
        h.close()
        return e.value
    err = run(main())
    assert err.kind == "launch-failed" and "exec" in str(err)


@pytest.mark.parametrize("msg,expect", [
    ({"op": "launch", "jail": "BAD ID", "fd_targets": [], "spec": {}}, "bad jail id"),
    ({"op": "frobnicate", "jail": "j4"}, "unknown op"),
    ({"op": "launch", "jail": "j4", "profile": "minimal", "fd_targets": [0],
      "spec": {"argv": ["x"]}}, "fd_targets"),
    ({"op": "launch", "jail": "j4", "fd_targets": [], "spec": {"argv": ["x"]}},
     "names its profile"),
    ({"op": "launch", "jail": "j4", "profile": "minimal", "fd_targets": [],
      "spec": {"argv": ["x"], "uid": "0"}}, "wrong type"),
    ({"op": "launch", "jail": "j4", "profile": "minimal", "fd_targets": [],
      "spec": {"argv": ["x"], "evil": 1}}, "unexpected keyword"),
    ({"op": "pidfd", "pid": -1}, "pidfd request"),
    ({"op": "pidfd", "pid": 1, "extra": 0}, "pidfd request"),
    ({"op": "signal", "jail": "j4", "signal": 999}, "bad signal"),
])
def test_malformed_requests_are_refused(msg, expect):
    async def main():
        h = Harness()
        with pytest.raises(launcher.LauncherFailed) as e:
            await h.client.request(msg)
        h.close()
        return e.value
    err = run(main())
    assert err.kind == "malformed" and expect in str(err)


def test_wrong_version_and_oversized_messages_are_refused():
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(wire.WireError, match="protocol version"):
        wire.decode(b'{"v": 2, "op": "launch"}')
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(b" " * (wire.MAX_MESSAGE + 1))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.encode({"op": "launch", "spec": {"argv": ["x" * wire.MAX_MESSAGE]}})
    front.close()
    back.close()


def test_launcher_kills_its_jails_when_the_front_goes_away():
    marker = f"orphaned-{time.monotonic_ns()}"

    async def main():
        h = Harness()
        await h.client.request(launch_msg("j5", spec("/bin/sh", "-c", "sleep 30", marker)))
        assert processes_with(marker)
        h.close()          # closes the socket and waits for the launcher to exit
    run(main())
    assert processes_with(marker) == []


def test_spec_round_trips_through_the_wire():
    s = spec("/bin/x", "a", mounts=(Bind("/", "/"),), groups=(1, 2), uid=5, gid=6)
    assert wire.spec_from_wire(wire.decode(wire.encode({"spec": wire.spec_to_wire(s)}))["spec"]) == s


def test_a_burst_of_requests_past_the_sockets_queue_all_get_replies():
    """More requests at once than the launcher's socket queues (SEQPACKET:
    net.unix.max_dgram_qlen, 10 here), launches among them so that the
    launcher falls behind: each request is sent once and answered.
    (asyncio's sock_sendall lets a second waiting sender replace the first
    one's wakeup, whose request then never went out: calls hung under load.)"""
    async def main():
        h = Harness()
        try:
            async def one(i):
                try:
                    if i % 3 == 0:
                        r, w = os.pipe()
                        try:
                            return await h.client.request(
                                {**launch_msg(f"x{i}", spec("/bin/true")), "fd_targets": [1]},
                                [w])
                        finally:
                            os.close(r)
                            os.close(w)
                    return await h.client.request({"op": "stats", "jail": f"nosuch{i}"})
                except launcher.LauncherFailed as e:
                    return e.kind
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), 60)
        finally:
            h.close()
    results = run(main())
    launched = [r for r in results if isinstance(r, dict)]
    assert len(launched) == 100 and all(r["pid"] > 0 for r in launched)
    assert results.count("not-found") == 200


def test_a_request_whose_fd_was_closed_before_its_turn_fails_alone_and_says_which():
    """An fd passed with a request must stay open until it is sent; if it
    was closed meanwhile, that request fails with the fd named, and the next
    one goes through."""
    async def main():
        h = Harness()
        try:
            r, w = os.pipe()
            os.close(w)                            # closed before the request is sent
            try:
                with pytest.raises(launcher.LauncherFailed) as e:
                    await h.client.request(
                        {**launch_msg("gone-fd", spec("/bin/true")), "fd_targets": [1]}, [w])
            finally:
                os.close(r)
            after = await h.client.request(launch_msg("next", spec("/bin/true")))
            return e.value, after
        finally:
            h.close()
    err, after = run(main())
    assert err.kind == "lost" and "Bad file descriptor" in str(err)
    assert "not open: fd" in str(err) and "the socket" not in str(err)
    assert after["pid"] > 0
