"""privbroker client library: asyncio (`AsyncBroker`) and blocking (`Broker`).

    from client import Broker
    with Broker() as b:
        jail = b.launch("minimal", ["/bin/echo", "hi"])
        status = jail.wait()          # ExitStatus(code=0, signal=None)
"""
from .api import AsyncBroker, Broker, BrokerCallError, ExitStatus, JailHandle

__all__ = ["AsyncBroker", "Broker", "BrokerCallError", "ExitStatus", "JailHandle"]
