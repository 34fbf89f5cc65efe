"""broker/busfix.py own_fds: dbus-fast 5.2.0 gives a message that came
without fds the unmarshaller's working list, and extends that same list
with the fds of a later message.  A handler that kept the first message
(a call still being served) and closed "its" fds closed the later one's:
the front's rare EBADF under load ('launcher unreachable: Bad file
descriptor', then a pidfd closed twice).  Real dbus-fast connections on a
private bus: a signal without fds, then one with an fd."""
from __future__ import annotations

import asyncio
import os

from broker import busfix
from dbus_fixture import PrivateBus


def _receive_two(address: str, own: bool) -> tuple[list, list]:
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    async def main():
        rx = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                              negotiate_unix_fd=True).connect()
        tx = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                              negotiate_unix_fd=True).connect()
        got = []

        def handler(msg):
            if msg.member in ("A", "B"):
                if own:
                    busfix.own_fds(msg)
                got.append(msg)
            return None
        rx.add_message_handler(handler)
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            for member, fds in (("A", []), ("B", [fd])):
                tx.send(Message(message_type=MessageType.SIGNAL, destination=rx.unique_name,
                                path="/t", interface="org.example.T", member=member,
                                signature="h" if fds else "", body=[0] if fds else [],
                                unix_fds=fds))
                deadline = asyncio.get_running_loop().time() + 5
                while len(got) < (1 if member == "A" else 2):
                    assert asyncio.get_running_loop().time() < deadline, "not delivered"
                    await asyncio.sleep(0.01)
            a, b = list(got[0].unix_fds), list(got[1].unix_fds)
            for n in set(a) | set(b):
                os.close(n)
            return a, b
        finally:
            os.close(fd)
            rx.disconnect()
            tx.disconnect()
    return asyncio.run(main())


def test_a_message_keeps_only_its_own_fds():
    busfix.install()
    with PrivateBus() as bus:
        shared_a, shared_b = _receive_two(bus.address, own=False)
        a, b = _receive_two(bus.address, own=True)
    assert len(b) == 1 and len(shared_b) == 1          # B brought one fd, both times
    assert a == []                                     # with own_fds: A has none
    # What own_fds is for (dbus-fast 5.2.0): without it A "has" B's fd too.
    # If a later dbus-fast stops sharing the list, this shows it.
    print(f"\nbusfix: without own_fds the earlier message holds {shared_a} (B's {shared_b})")
