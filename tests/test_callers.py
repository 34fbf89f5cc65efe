"""broker/callers.py against a real dbus-daemon: what is kept about
callers once they are gone."""
from __future__ import annotations

import asyncio

import pytest
from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from broker.callers import CallerGone, Callers
from dbus_fixture import PrivateBus


@pytest.fixture(scope="module")
def bus():
    with PrivateBus() as b:
        yield b


async def _gone_name(address: str) -> str:
    """The unique name of a connection that has come and gone."""
    client = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    name = client.unique_name
    client.disconnect()
    await client.wait_for_disconnect()
    return name


def test_names_that_left_while_being_identified_are_not_kept(bus):
    # NameOwnerChanged (forget) arrives while the name is being looked up,
    # and the lookup fails because the caller is gone: nothing about the
    # name may stay behind, or any client could grow the broker's memory by
    # connecting and leaving
    async def run():
        ours = await MessageBus(bus_address=bus.address, bus_type=BusType.SYSTEM).connect()
        callers = Callers(ours)
        try:
            for _ in range(50):
                name = await _gone_name(bus.address)
                asking = asyncio.ensure_future(callers.identify(name))
                await asyncio.sleep(0)          # the lookup is on its way
                callers.forget(name)
                with pytest.raises(CallerGone):
                    await asking
            return callers
        finally:
            ours.disconnect()

    callers = asyncio.run(run())
    assert callers.cache == {} and callers._asking == {}
    assert callers._gone == set()
