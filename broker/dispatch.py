"""Fair dispatch: calls are served in turns between callers, not in arrival order.

The bus delivers one stream of messages.  Served first come, first served, one
caller with hundreds of calls in flight (the bus allows 128 pending replies
per connection, and a caller may hold many connections) puts every other
caller's call behind its backlog.  So each call waits in a queue of its
caller, and each pass starts at most one call per caller; the next pass runs
after the calls just started have had their turn on the loop.

A caller is its uid once the broker knows it, its connection before that
(the first call of a connection is what identifies it), so one user's many
connections share one turn.  Per caller:
  - at most `in_service` calls started and not finished (launches and
    lookups wait on the launcher or the bus): more would fill the loop again;
  - at most `rate` calls started per second, after a burst of as many:
    calls past it wait rather than fail, so a flooder's pending replies pile
    up at the bus, which then refuses its further calls itself;
  - at most `queue_limit` calls waiting: the bus's pending-reply limit
    bounds this already, this is the broker's own bound on top, for a bus
    configured without one.  A call past it is answered at once (`refuse`).

Nothing here decides who may do what: it only orders the work.  It knows no
D-Bus either: an item is whatever `start` takes.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable, Hashable


class _Bucket:
    """Tokens for one caller: `rate` per second, at most `rate` stored."""
    __slots__ = ("tokens", "at")

    def __init__(self, rate: float, now: float):
        self.tokens, self.at = rate, now

    def refill(self, rate: float, now: float) -> None:
        self.tokens = min(rate, self.tokens + (now - self.at) * rate)
        self.at = now


class FairDispatch:
    def __init__(self, start: Callable[[Any], asyncio.Future],
                 refuse: Callable[[Any], None], in_service: int = 4,
                 rate: float = 200.0, queue_limit: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        self._start = start          # item -> the task that serves it
        self._refuse = refuse        # item -> answered at once: over queue_limit
        self.in_service = in_service
        self.rate = rate
        self.queue_limit = queue_limit
        self._clock = clock
        self._queued: dict[Hashable, deque] = {}   # caller -> (sender, item) not started
        self._busy: dict[Hashable, int] = {}       # caller -> started, not finished
        self._buckets: dict[Hashable, _Bucket] = {}
        self._turns: deque = deque()               # callers with queued calls, in turn order
        self._senders: dict[str, dict] = {}        # sender -> {caller: calls queued}
        self._pass_handle: asyncio.Handle | None = None
        self._pass_soon = False

    def submit(self, caller: Hashable, sender: str, item: Any) -> None:
        queue = self._queued.get(caller)
        if queue is None:
            queue = self._queued[caller] = deque()
            self._turns.append(caller)
        if len(queue) >= self.queue_limit:
            self._refuse(item)
            return
        queue.append((sender, item))
        where = self._senders.setdefault(sender, {})
        where[caller] = where.get(caller, 0) + 1
        self._schedule_pass(0.0)

    def drop(self, sender: str) -> list:
        """The connection left: its calls not yet started, for the caller to
        release (they are never started)."""
        dropped = []
        for caller in self._senders.pop(sender, {}):
            queue = self._queued[caller]
            kept = deque(x for x in queue if x[0] != sender)
            dropped += [item for s, item in queue if s == sender]
            if kept:
                self._queued[caller] = kept
            else:
                del self._queued[caller]
                self._turns.remove(caller)
        self._buckets.pop(sender, None)      # a connection-keyed caller is gone for good
        return dropped

    def queued(self) -> int:
        return sum(len(q) for q in self._queued.values())

    # -- passes -------------------------------------------------------------------
    def _schedule_pass(self, delay: float) -> None:
        """A pass after `delay` seconds (0: on the loop's next turn).  One
        pass is pending at a time; a pending timer gives way to a sooner pass."""
        if self._pass_handle is not None:
            if self._pass_soon or delay > 0:
                return
            self._pass_handle.cancel()
        loop = asyncio.get_running_loop()
        self._pass_soon = delay <= 0
        self._pass_handle = (loop.call_soon(self._pass) if self._pass_soon
                             else loop.call_later(delay, self._pass))

    def _pass(self) -> None:
        """One call from each caller with room and a token, in turn order."""
        self._pass_handle = None
        now = self._clock()
        for _ in range(len(self._turns)):
            caller = self._turns.popleft()
            queue = self._queued[caller]
            if self._busy.get(caller, 0) < self.in_service and self._take_token(caller, now):
                self._begin(caller, *queue.popleft())
            if queue:
                self._turns.append(caller)
            else:
                del self._queued[caller]
        self._schedule_next(now)

    def _take_token(self, caller: Hashable, now: float) -> bool:
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = _Bucket(self.rate, now)
        bucket.refill(self.rate, now)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _schedule_next(self, now: float) -> None:
        """Soon if a caller can start a call now; at the first token due if
        all that wait do so for tokens; not at all if all wait for calls in
        service to finish (_finished schedules then)."""
        token_wait = None
        for caller in self._turns:
            if self._busy.get(caller, 0) >= self.in_service:
                continue
            missing = 1.0 - self._buckets[caller].tokens if caller in self._buckets else 0.0
            if missing <= 0:
                self._schedule_pass(0.0)
                return
            wait = missing / self.rate
            token_wait = wait if token_wait is None else min(token_wait, wait)
        if token_wait is not None:
            self._schedule_pass(token_wait)
        self._forget_full_buckets(now)

    def _forget_full_buckets(self, now: float) -> None:
        """A full bucket is the same as none; keep the table to callers that
        are spending (connection-keyed callers come and go)."""
        if len(self._buckets) <= 2 * len(self._turns) + 64:
            return
        for caller in [c for c, b in self._buckets.items()
                       if c not in self._queued and b.tokens + (now - b.at) * self.rate >= self.rate]:
            del self._buckets[caller]

    def _begin(self, caller: Hashable, sender: str, item: Any) -> None:
        where = self._senders[sender]
        if where[caller] == 1:
            del where[caller]
            if not where:
                del self._senders[sender]
        else:
            where[caller] -= 1
        self._busy[caller] = self._busy.get(caller, 0) + 1
        task = self._start(item)
        task.add_done_callback(lambda _t: self._finished(caller))

    def _finished(self, caller: Hashable) -> None:
        left = self._busy[caller] - 1
        if left:
            self._busy[caller] = left
        else:
            del self._busy[caller]
        if caller in self._queued:
            self._schedule_pass(0.0)
