"""privbrokerd: the broker on the system bus.

    privbrokerd [--bus-address ADDR] [--config FILE] [--log-level LEVEL]

The launcher (a zygote that forks jails) is started first, before any bus
connection exists; then the front connects, owns org.privbroker.Broker1 and
serves it until the bus or the launcher goes away.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

log = logging.getLogger("privbrokerd")


def kernel_features() -> dict:
    from dbus_fast import Variant
    from .jail.landlock import abi_version
    with open("/proc/sys/user/max_user_namespaces") as f:
        userns = int(f.read()) > 0
    with open("/proc/self/status") as f:
        seccomp = any(line.startswith("Seccomp:") for line in f)
    return {
        "landlock_abi": Variant("i", abi_version()),
        "seccomp": Variant("b", seccomp),
        "user_namespaces": Variant("b", userns),
        "cgroup_v2": Variant("b", os.path.exists("/sys/fs/cgroup/cgroup.controllers")),
    }


async def serve(args, pol, launcher_sock) -> int:
    from dbus_fast import BusType, Message, NameFlag, RequestNameReply
    from dbus_fast.aio import MessageBus

    from . import busfix
    from .jails import JailCore
    from .launcher import LauncherClient
    from .service import BUS_NAME, BrokerService

    busfix.install()
    bus = MessageBus(bus_address=args.bus_address, bus_type=BusType.SYSTEM,
                     negotiate_unix_fd=True)
    await bus.connect()
    done = asyncio.get_running_loop().create_future()

    def stop(reason: str) -> None:
        if not done.done():
            log.warning("stopping: %s", reason)
            done.set_result(reason)

    core = JailCore(pol, None, None)
    service = BrokerService(bus, core, kernel_features())
    core.on_exited = lambda jail, code, sig: service.send_exited(jail.owner, jail.jail_id,
                                                                 code, sig)
    core.launcher = LauncherClient(launcher_sock, core.exited,
                                   on_lost=lambda: stop("the launcher exited"))
    bus.add_message_handler(service.handle)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.freedesktop.DBus',"
                                 "member='NameOwnerChanged'"]))
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply != RequestNameReply.PRIMARY_OWNER:
        log.error("could not own %s (%s)", BUS_NAME, reply)
        return 1
    log.info("serving %s", BUS_NAME)
    bus_gone = asyncio.ensure_future(bus.wait_for_disconnect())
    bus_gone.add_done_callback(lambda _: stop("the bus connection closed"))
    await done
    return 0 if done.result() != "the launcher exited" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privbrokerd", description=__doc__.splitlines()[0])
    ap.add_argument("--bus-address", help="a private bus (default: the system bus)")
    ap.add_argument("--config", default="/etc/privbroker/broker.toml")
    ap.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="privbrokerd: %(levelname)s %(message)s")
    from . import launcher, policy
    try:
        pol = policy.load(args.config)   # refuse a broken policy before forking anything
    except policy.PolicyError as e:
        log.error("%s", e)
        return 2
    launcher_pid, sock = launcher.start()   # before any bus connection or thread exists
    try:
        return asyncio.run(serve(args, pol, sock))
    finally:
        sock.close()                    # the launcher ends its jails and exits
        os.waitpid(launcher_pid, 0)


if __name__ == "__main__":
    sys.exit(main())
