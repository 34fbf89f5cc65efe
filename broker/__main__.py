"""privbrokerd: the broker on the system bus.

    privbrokerd [--bus-address ADDR] [--config FILE] [--log-level LEVEL]
                [--log-target auto|journal|stderr] [--launcher-mount-namespace NSFILE]

The launcher (a zygote that forks jails) is started first, before any bus
connection exists; then the front connects, owns org.privbroker.Broker1 and
serves it until the bus or the launcher goes away.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

log = logging.getLogger("privbrokerd")

# Jails get the umask a login session has; the broker's own (the unit's
# UMask=0077) keeps its state files private.
JAIL_UMASK = 0o022


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
        # what jail cgroups use here: "v1", "v2" or "none" (broker/jail/cgroups.py)
        "cgroup": Variant("s", _cgroup_version()),
    }


def _cgroup_version() -> str:
    from .jail.cgroups import System
    return System.probe().version or "none"


async def serve(args, pol, launcher_sock, devices=None) -> int:
    from dbus_fast import BusType, Message, NameFlag, RequestNameReply
    from dbus_fast.aio import MessageBus

    from . import busfix
    from .daemon_store import DaemonStoreFront
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
    stores = DaemonStoreFront(pol.daemon_store)
    service = BrokerService(bus, core, kernel_features(), stores, devices=devices)
    _register_status_counts(service.status, pol, devices)
    core.on_exited = lambda jail, code, sig, oom=False: service.send_exited(
        jail.owner, jail.jail_id, code, sig, oom)
    core.launcher = stores.launcher = LauncherClient(
        launcher_sock, core.exited, on_lost=lambda: stop("the launcher exited"))
    bus.add_message_handler(service.handle)
    # An orderly stop (systemctl stop: SIGTERM) ends device leases in main();
    # only a crash leaves them to the journal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop, signal.Signals(signum).name)
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


def _register_status_counts(status, pol, devices) -> None:
    """What `privbroker status` counts beyond jails (broker/status.py)."""
    from .status import store_mounts_held
    if devices is not None:
        status.counts["LeasesHeld"] = lambda: len(devices.leases.by_id)
    layout = pol.daemon_store.layout
    status.counts["MountsHeld"] = lambda: store_mounts_held((layout.run_dir,
                                                             layout.cache_run_dir))


def init_daemon_stores(layout) -> None:
    """Every daemon-store template's run dirs as shared mount points, before
    any jail exists (a daemon started later with -Kslave and a recursive
    bind then sees users' stores come and go).  A failure is logged, never
    fatal: the broker's other services do not depend on it."""
    from .daemon_store import init
    for r in init(layout):
        if r.error:
            log.error("daemon store %s (%s): %s", r.daemon, r.variant, r.error)
        else:
            log.info("daemon store %s (%s): %s is a shared mount point", r.daemon, r.variant,
                     r.path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privbrokerd", description=__doc__.splitlines()[0])
    ap.add_argument("--bus-address", help="a private bus (default: the system bus)")
    ap.add_argument("--config", default="/etc/privbroker/broker.toml")
    ap.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    ap.add_argument("--log-target", default="auto", choices=["auto", "journal", "stderr"],
                    help="auto: the journal (/dev/log) when systemd started us, else stderr")
    ap.add_argument("--launcher-mount-namespace", metavar="NSFILE",
                    help="fork the launcher in this mount namespace (the unit: "
                         "/proc/1/ns/mnt); see broker/hostns.py")
    args = ap.parse_args(argv)
    from . import hostns, launcher, logs, policy
    logs.setup(args.log_level, args.log_target)
    host_ns = None
    if args.launcher_mount_namespace:
        try:
            host_ns = hostns.open_mount_namespace(args.launcher_mount_namespace)
        except hostns.HostNamespaceError as e:
            log.error("%s", e)
            return 2
    # Its only use was that open(): from here on nothing in the broker, and
    # no jail (the launcher is forked below), holds CAP_SYS_PTRACE.
    hostns.drop_ptrace()
    try:
        pol = policy.load(args.config)   # refuse a broken policy before forking anything
    except policy.PolicyError as e:
        log.error("%s", e)
        return 2
    with hostns.entered(host_ns):       # the host's mount table, not our view
        init_daemon_stores(pol.daemon_store.layout)
    from .devices.core import DeviceCore
    devices = DeviceCore(pol.devices, pol)
    devices.replay()    # nodes a crashed run left leased, restored before anyone can ask
    # before any bus connection or thread exists; in the host's mount
    # namespace for good, with the umask jails get (the unit's 0077 is ours)
    with hostns.entered(host_ns):
        umask = os.umask(JAIL_UMASK)
        try:
            launcher_pid, sock = launcher.start(pol.daemon_store.layout)
        finally:
            os.umask(umask)
    if host_ns is not None:
        os.close(host_ns)
    try:
        return asyncio.run(serve(args, pol, sock, devices))
    finally:
        devices.close()                 # every live lease ends: originals restored
        sock.close()                    # the launcher ends its jails and exits
        os.waitpid(launcher_pid, 0)


if __name__ == "__main__":
    sys.exit(main())
