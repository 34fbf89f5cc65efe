"""One process of callers for tests/test_soak.py's concurrency test, run as
a uid of its own: N connections of one kind, active between two
CLOCK_MONOTONIC instants, printing one JSON line of what it saw.

    soak_caller.py ADDRESS KIND CONNECTIONS START_AT STOP_AT MARKER

Kinds:
  good       a well-behaved caller: ListJails at a modest pace, and every
             tenth round a Launch of /bin/true waited for; latencies kept
  vanish     sends Launch (a long sleep carrying MARKER) or ListJails and
             closes the connection without reading the reply
  garbage    wrong signatures, unknown members, an fd index that names no
             fd, an oversized argv, and bytes that are no D-Bus at all
  flood      hundreds of calls in flight at once, round after round
  hog_live   launches long sleeps (MARKER) as fast as it can: max_live_jails
  hog_rate   launches /bin/true as fast as it can, 8 at a time per
             connection: launches_per_second
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from soak_kit import BUS_NAME, OBJ, RawBus  # noqa: E402

ADDRESS, KIND, CONNECTIONS, START_AT, STOP_AT, MARKER = (
    sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]),
    sys.argv[6])
LAUNCH_SIG = "sasa{ss}a{uh}a{sv}"
CALL_TIMEOUT = 30.0


def count(d: dict, key: str) -> None:
    d[key] = d.get(key, 0) + 1


async def until_start() -> None:
    await asyncio.sleep(max(0.0, START_AT - time.monotonic()))


async def good(out: dict) -> None:
    from client import AsyncBroker, BrokerCallError
    b = await AsyncBroker(ADDRESS).connect()
    await until_start()
    n = 0
    try:
        while time.monotonic() < STOP_AT:
            n += 1
            step = "ListJails"
            try:
                # every wait bounded: a call never answered is counted, not
                # waited for until the test's own timeout
                t = time.monotonic()
                await asyncio.wait_for(b.list_jails(), CALL_TIMEOUT)
                out["list"].append(time.monotonic() - t)
                if n % 10 == 0:
                    t = time.monotonic()
                    step = "Launch"
                    jail_id, _ = await asyncio.wait_for(
                        b.launch("minimal", ["/bin/true"], fds={}), CALL_TIMEOUT)
                    step = "Exited"
                    status = await asyncio.wait_for(b.wait(jail_id), CALL_TIMEOUT)
                    out["launch"].append(time.monotonic() - t)
                    if status.code != 0:
                        count(out["errors"], f"exit {status}")
            except BrokerCallError as e:
                count(out["errors"], e.name)
            except asyncio.TimeoutError:
                count(out["errors"], f"no answer in {CALL_TIMEOUT}s: {step}")
            await asyncio.sleep(0.05)
    finally:
        b.close()


async def flood(out: dict) -> None:
    from dbus_fast import BusType, Message
    from dbus_fast.aio import MessageBus
    from broker import busfix
    busfix.install()
    bus = await MessageBus(bus_address=ADDRESS, bus_type=BusType.SYSTEM).connect()
    await until_start()
    try:
        while time.monotonic() < STOP_AT:
            msgs = [Message(destination=BUS_NAME, path=OBJ,
                            interface=BUS_NAME if i % 2 else "org.freedesktop.DBus.Introspectable",
                            member="ListJails" if i % 2 else "Introspect") for i in range(300)]
            replies = await asyncio.gather(*(asyncio.wait_for(bus.call(m), CALL_TIMEOUT)
                                             for m in msgs), return_exceptions=True)
            for r in replies:
                count(out["replies"], type(r).__name__ if isinstance(r, Exception)
                      else (r.error_name or "ok"))
    finally:
        bus.disconnect()


async def hog(out: dict, argv: list[str], workers: int = 1) -> None:
    """`workers` launches in flight on the connection at once."""
    from client import AsyncBroker, BrokerCallError
    b = await AsyncBroker(ADDRESS).connect()
    await until_start()
    started = time.monotonic()

    async def worker():
        while time.monotonic() < STOP_AT:
            try:
                await asyncio.wait_for(b.launch("minimal", argv, fds={}), CALL_TIMEOUT)
                count(out["replies"], "ok")
            except asyncio.TimeoutError:
                count(out["replies"], f"no answer in {CALL_TIMEOUT}s")
            except BrokerCallError as e:
                key = e.name
                if "faster than" in e.message:
                    key += " (rate)"
                elif "live jails" in e.message:
                    key += " (live)"
                count(out["replies"], key)
                await asyncio.sleep(0.005)
    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
        out["seconds"] = time.monotonic() - started
        await asyncio.sleep(0.5)   # stay connected: the test counts our live jails
    finally:
        b.close()


def vanish(out: dict) -> None:
    time.sleep(max(0.0, START_AT - time.monotonic()))
    i = 0
    while time.monotonic() < STOP_AT:
        i += 1
        raw = RawBus(ADDRESS)
        if i % 2:
            raw.broker("Launch", LAUNCH_SIG,
                       ["minimal", ["/bin/sh", "-c", "sleep 300", MARKER], {}, {}, {}])
        else:
            raw.broker("ListJails")
        raw.close()                         # mid-call: the reply has nowhere to go
        count(out["replies"], "sent and vanished")


def garbage(out: dict) -> None:
    time.sleep(max(0.0, START_AT - time.monotonic()))
    bad = [
        ("Launch", "s", ["minimal"]),
        ("Frobnicate", "", []),
        ("Signal", "si", ["no-such-jail", 9]),
        ("Launch", LAUNCH_SIG, ["minimal", ["x" * 70000], {}, {}, {}]),
        ("Launch", LAUNCH_SIG, ["minimal", ["/bin/true"], {"LD_PRELOAD": "/x.so"}, {}, {}]),
        ("ChownDevice", "s", ["/dev/../etc/shadow"]),
    ]
    raw = RawBus(ADDRESS)
    i = 0
    while time.monotonic() < STOP_AT:
        i += 1
        try:
            if i % 25 == 0:
                # not D-Bus at all: the bus drops the connection
                raw.send_raw(os.urandom(64))
                raw.close()
                raw = RawBus(ADDRESS)
                count(out["replies"], "garbage bytes")
                continue
            member, sig, body = bad[i % len(bad)]
            reply = raw.reply_to(raw.broker(member, sig, body), timeout=10)
            count(out["replies"], reply.error_name or "ok")
        except (OSError, ConnectionError) as e:
            count(out["replies"], f"disconnected: {type(e).__name__}")
            raw.close()
            raw = RawBus(ADDRESS)
        except TypeError:
            # dbus-fast's unmarshaller turns the socket's timeout into a
            # TypeError: no reply within 10 s.  Counted; a fresh connection.
            count(out["replies"], "no reply in 10s")
            raw.close()
            raw = RawBus(ADDRESS)
    raw.close()


async def main() -> dict:
    out: dict = {"kind": KIND, "uid": os.getuid(), "list": [], "launch": [], "errors": {},
                 "replies": {}}
    if KIND in ("vanish", "garbage"):
        fn = vanish if KIND == "vanish" else garbage
        await asyncio.gather(*(asyncio.to_thread(fn, out) for _ in range(CONNECTIONS)))
        return out
    one = {"good": lambda: good(out), "flood": lambda: flood(out),
           "hog_live": lambda: hog(out, ["/bin/sh", "-c", "sleep 300", MARKER]),
           # pipelined: faster than the rate limit even when a launch takes a second
           "hog_rate": lambda: hog(out, ["/bin/true"], workers=8)}[KIND]
    await asyncio.gather(*(one() for _ in range(CONNECTIONS)))
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
