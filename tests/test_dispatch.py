"""broker/dispatch.py: calls are started in turns between callers, a caller
has a bounded number in service and a bounded rate, a departed connection's
calls are handed back, and a backlog past the limit is refused at once.  The end-to-end effect on a
real bus is measured in tests/test_soak_callers.py."""
from __future__ import annotations

import asyncio
import time

from broker.dispatch import FairDispatch


def _run(coro):
    return asyncio.run(coro)


class Recorder:
    """Start = record the item and finish it when its gate opens (or at once)."""

    def __init__(self):
        self.started: list = []
        self.refused: list = []
        self.gates: dict = {}

    def start(self, item):
        self.started.append(item)
        gate = self.gates.get(item)

        async def serve():
            if gate is not None:
                await gate.wait()
        return asyncio.ensure_future(serve())

    def refuse(self, item):
        self.refused.append(item)


async def _settle(rounds: int = 20):
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_a_late_sender_is_served_before_an_earlier_backlog():
    async def main():
        r = Recorder()
        d = FairDispatch(r.start, r.refuse, in_service=1)
        for i in range(50):
            d.submit(":1.flood", ":1.flood", ("flood", i))
        d.submit(":1.good", ":1.good", ("good", 0))
        await _settle(400)
        return r.started
    started = _run(main())
    assert len(started) == 51
    # FIFO would start it last (position 50); in turns it is among the first two
    assert started.index(("good", 0)) <= 1, started[:5]
    # each sender's own calls still start in the order they came
    assert [i for who, i in started if who == "flood"] == list(range(50))


def test_a_sender_never_has_more_than_in_service_calls_running():
    async def main():
        r = Recorder()
        for i in range(10):
            r.gates[("slow", i)] = asyncio.Event()
        d = FairDispatch(r.start, r.refuse, in_service=3)
        for i in range(10):
            d.submit(":1.slow", ":1.slow", ("slow", i))
        d.submit(":1.other", ":1.other", ("other", 0))
        await _settle()
        first = list(r.started)
        r.gates[("slow", 0)].set()
        await _settle()
        second = list(r.started)
        for g in r.gates.values():
            g.set()
        await _settle(200)
        return first, second, r.started, d.queued()
    first, second, everything, left = _run(main())
    assert [x for x in first if x[0] == "slow"] == [("slow", 0), ("slow", 1), ("slow", 2)]
    assert ("other", 0) in first                   # not held up by the slow sender
    assert [x for x in second if x[0] == "slow"][-1] == ("slow", 3)   # one finished, one more
    assert len(everything) == 11 and left == 0


def test_a_departed_senders_calls_are_handed_back_and_never_started():
    async def main():
        r = Recorder()
        r.gates[("gone", 0)] = asyncio.Event()
        d = FairDispatch(r.start, r.refuse, in_service=1)
        for i in range(5):
            d.submit(":1.gone", ":1.gone", ("gone", i))
        await _settle()
        dropped = d.drop(":1.gone")
        r.gates[("gone", 0)].set()
        await _settle()
        return r.started, dropped, d.drop(":1.gone"), d.queued()
    started, dropped, again, left = _run(main())
    assert started == [("gone", 0)]
    assert dropped == [("gone", i) for i in range(1, 5)]
    assert again == [] and left == 0


def test_a_backlog_past_the_limit_is_refused_at_once():
    async def main():
        r = Recorder()
        d = FairDispatch(r.start, r.refuse, in_service=1, queue_limit=4)
        for i in range(7):                 # nothing starts before the loop turns
            d.submit(":1.x", ":1.x", i)
        refused_before_loop = list(r.refused)
        await _settle()
        return refused_before_loop, r.started
    refused, started = _run(main())
    assert refused == [4, 5, 6]
    assert started == [0, 1, 2, 3]


def test_one_callers_connections_share_one_turn():
    async def main():
        r = Recorder()
        d = FairDispatch(r.start, r.refuse, in_service=1)
        for i in range(20):                 # uid 1000 over four connections
            d.submit(1000, f":1.{10 + i % 4}", ("many", i))
        d.submit(":1.99", ":1.99", ("one", 0))
        await _settle(200)
        return r.started
    started = _run(main())
    assert started.index(("one", 0)) <= 1, started[:4]


def test_a_departed_connection_leaves_its_users_other_connections_alone():
    async def main():
        r = Recorder()
        r.gates[("a", 0)] = asyncio.Event()
        d = FairDispatch(r.start, r.refuse, in_service=1)
        d.submit(1000, ":1.a", ("a", 0))
        d.submit(1000, ":1.a", ("a", 1))
        d.submit(1000, ":1.b", ("b", 0))
        d.submit(1000, ":1.a", ("a", 2))
        await _settle()
        dropped = d.drop(":1.a")
        r.gates[("a", 0)].set()
        await _settle()
        return dropped, r.started
    dropped, started = _run(main())
    assert dropped == [("a", 1), ("a", 2)]
    assert started == [("a", 0), ("b", 0)]


def test_calls_past_the_rate_wait_and_are_started_later():
    rate = 20.0

    async def main():
        r = Recorder()
        d = FairDispatch(r.start, r.refuse, in_service=100, rate=rate)
        t0 = time.monotonic()
        for i in range(30):
            d.submit(1000, ":1.a", i)
        d.submit(2000, ":1.b", "other")
        await asyncio.sleep(0.1)
        early = list(r.started)
        while len(r.started) < 31 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        return early, list(r.started), time.monotonic() - t0, r.refused
    early, everything, took, refused = _run(main())
    # the burst (20), maybe a token or two more after 0.1 s, and the other uid at once
    assert "other" in early
    assert 20 <= len([x for x in early if x != "other"]) <= 23, early
    # the last ten needed ten more tokens: about half a second at 20 per second
    assert len(everything) == 31 and refused == []
    assert 0.4 <= took < 1.5, took
    assert [x for x in everything if x != "other"] == list(range(30))
