"""The broker under a flood of calls (DESIGN.md: dbus-fast's writer used to
drop the connection on EAGAIN; 4 clients x 100 concurrent calls knocked a
dbus-fast service off the bus)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from test_broker import broker, bus, busctl, deployment  # noqa: F401 - fixtures
from test_broker import BUS_NAME

FLOODER = textwrap.dedent("""
    import asyncio, sys
    from dbus_fast import Message, BusType
    from dbus_fast.aio import MessageBus

    async def one(address, n):
        # A plain dbus-fast client: no bound on calls in flight, no EAGAIN fix.
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        msgs = [Message(destination="org.privbroker.Broker1", path="/org/privbroker/Broker1",
                        interface="org.freedesktop.DBus.Introspectable", member="Introspect")
                for _ in range(n)]
        results = await asyncio.gather(*(bus.call(m) for m in msgs), return_exceptions=True)
        return sum(1 for r in results if not isinstance(r, Exception))

    async def main(address, clients, n):
        done = await asyncio.gather(*(one(address, n) for _ in range(clients)),
                                    return_exceptions=True)
        print(sum(d for d in done if isinstance(d, int)))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


def test_broker_survives_unbounded_flooders_and_keeps_serving(bus, broker):
    flood = subprocess.run([sys.executable, "-c", FLOODER, bus.address, "4", "1000"],
                           capture_output=True, text=True, timeout=120)
    assert flood.returncode == 0, flood.stderr
    assert broker.poll() is None                                  # still running
    assert busctl(bus, "status", BUS_NAME).returncode == 0        # still owns its name
    from client import Broker
    with Broker(bus.address) as b:                                # and still serves
        jail = b.launch("minimal", ["/bin/sh", "-c", "exit 9"], stdin=None)
        assert jail.wait(timeout=20).code == 9


def test_bounded_client_burst_of_3000_calls(bus, broker):
    from client import AsyncBroker

    async def main():
        b = await AsyncBroker(bus.address).connect()
        try:
            results = await asyncio.gather(*(b.list_jails() for _ in range(3000)))
        finally:
            b.close()
        return results
    results = asyncio.run(main())
    assert len(results) == 3000 and all(r == [] for r in results)


def test_no_exited_signal_lost_under_a_burst_of_launches(bus, broker):
    from client import AsyncBroker

    async def main():
        b = await AsyncBroker(bus.address).connect()
        try:
            launched = []
            for batch in range(0, 200, 8):     # 8 at a time: under the live-jail limit
                launched += await asyncio.gather(*(
                    b.launch("minimal", ["/bin/sh", "-c", f"exit {i % 50}"], fds={})
                    for i in range(batch, batch + 8)))
            return await asyncio.wait_for(
                asyncio.gather(*(b.wait(jail_id) for jail_id, _ in launched)), 60)
        finally:
            b.close()
    statuses = asyncio.run(main())
    assert [s.code for s in statuses] == [i % 50 for i in range(200)]
