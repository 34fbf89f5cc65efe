"""privbrokerd: the broker on the system bus.

    privbrokerd [--bus-address ADDR] [--config FILE] [--log-level LEVEL]
                [--log-target auto|journal|stderr] [--launcher-mount-namespace NSFILE]
                [--user NAME]

Two processes (DESIGN.md, "Privilege separation"):

  the launcher  this process, root: it reads the policy, replays the device
                lease journal, forks the front, and from then on only
                serves the front's fixed-shape requests (broker/wire.py):
                launch a spec inside the policy's envelope, signal a jail,
                mount a daemon store, open a caller's pidfd;
  the front     its child, pid 1 of a new pid namespace, in its own mount
                namespace, confined (broker/front.py) to the user `privbroker`
                with three capabilities, no_new_privs, seccomp and Landlock
                before it connects to the bus; it owns org.privbroker.Broker1,
                parses everything callers send and decides by the policy.

Each ends when the other does: the front when the launcher's socket closes,
the launcher (killing the jails) when the front's does; systemd restarts
the unit (Restart=on-failure) and the lease journal restores devices.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

import prctl

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
    service = BrokerService(bus, core, kernel_features(), stores, devices=devices,
                            calls_per_second=pol.calls_per_second)
    _register_status_counts(service.status, pol, devices)
    core.on_exited = lambda jail, code, sig, oom=False: service.send_exited(
        jail.owner, jail.jail_id, code, sig, oom)
    core.launcher = stores.launcher = LauncherClient(
        launcher_sock, core.exited, on_lost=lambda: stop("the launcher exited"))
    service.callers.open_pidfd = core.launcher.pidfd    # the bus's pids are not ours
    bus.add_message_handler(service.handle)
    # An orderly stop (systemctl stop: SIGTERM) ends device leases in main();
    # only a crash leaves them to the journal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop, signal.Signals(signum).name)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           # names going away only (new owner ''): a caller that
                           # churns connections sends the front half the signals
                           body=["type='signal',sender='org.freedesktop.DBus',"
                                 "member='NameOwnerChanged',arg2=''"]))
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply != RequestNameReply.PRIMARY_OWNER:
        log.error("could not own %s (%s)", BUS_NAME, reply)
        return 1
    log.info("serving %s", BUS_NAME)
    bus_gone = asyncio.ensure_future(bus.wait_for_disconnect())
    bus_gone.add_done_callback(lambda _: stop("the bus connection closed"))
    await done
    # Only an asked-for stop is a success: a lost bus or launcher must end
    # with a failure, for the unit's Restart=on-failure.
    return 0 if done.result() in ("SIGTERM", "SIGINT") else 1


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
                    help="the launcher serves in this mount namespace (the unit: "
                         "/proc/1/ns/mnt); see broker/hostns.py")
    ap.add_argument("--user", default="privbroker",
                    help="the front's user (default: privbroker); never root")
    args = ap.parse_args(argv)
    from . import front, hostns, launcher, logs, policy
    from .envelope import Envelope
    logs.setup(args.log_level, args.log_target)
    host_ns = None
    if args.launcher_mount_namespace:
        try:
            host_ns = hostns.open_mount_namespace(args.launcher_mount_namespace)
        except hostns.HostNamespaceError as e:
            log.error("%s", e)
            return 2
    # Its only use was that open(): from here on nothing in the broker, and
    # no jail, holds CAP_SYS_PTRACE.
    hostns.drop_ptrace()
    try:
        pol = policy.load(args.config)   # refuse a broken policy before forking anything
        user = front.FrontUser.lookup(args.user)
    except (policy.PolicyError, front.ConfinementError) as e:
        log.error("%s", e)
        return 2
    with hostns.entered(host_ns):       # the host's mount table, not our view
        init_daemon_stores(pol.daemon_store.layout)
    from .devices.core import DeviceCore
    from .devices.leases import JournalError
    devices = DeviceCore(pol.devices, pol)
    try:
        devices.leases.journal.hold_exclusively()            # one broker per journal
        devices.leases.journal.hand_to(user.uid, user.gid)   # the front writes it
    except JournalError as e:
        log.error("device lease journal: %s", e)
        return 2
    devices.replay()    # nodes a crashed run left leased, restored before anyone can ask
    envelope = Envelope(pol)            # what the launcher will start: read now, as root
    # In the host's view too: the unit's ProtectControlGroups= makes our
    # /sys/fs/cgroup read-only, and the leaf could not be made (EROFS): on
    # cgroup v2 every jail with a cgroup then failed (found under systemd in
    # the VM, tests/test_vm_systemd.py). The move into the leaf holds for
    # the front forked below as well (membership is not per namespace).
    with hostns.entered(host_ns):
        cgroup_parent = launcher.claim_cgroup()
    front_sock, launcher_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    front_pid = _fork_front()
    if front_pid == 0:
        code = 1
        try:
            launcher_sock.close()
            if host_ns is not None:
                os.close(host_ns)
            code = run_front(args, pol, front_sock, user, devices)
        except Exception:
            log.exception("the front failed")
        finally:
            logging.shutdown()
            os._exit(code)
    front_sock.close()
    # This process is the launcher from here on: single-threaded, no bus
    # connection; in the host's mount namespace for good, with the umask
    # jails get (the unit's 0077 is the front's).
    prctl.set_name("pb-launcher")
    if host_ns is not None:
        hostns.enter(host_ns)
        os.close(host_ns)
    os.umask(JAIL_UMASK)
    return launcher.run(launcher_sock, envelope, pol.daemon_store.layout, front_pid,
                        cgroup_parent)


def _fork_front() -> int:
    """fork() into a new pid namespace, as its pid 1; the parent's own
    children (jails) are forked in its pid namespace as before."""
    from .jail import syscalls as sc
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.unshare(sc.CLONE_NEWPID)
        pid = os.fork()
        if pid != 0:
            sc.setns(own, sc.CLONE_NEWPID)
        return pid
    finally:
        os.close(own)


def run_front(args, pol, sock, user, devices) -> int:
    """The front: its own mount namespace, confined, then the bus."""
    from . import front, logs
    from .jail import syscalls as sc
    prctl.set_name("pb-front")
    logs.tag_front()
    # Its own mount namespace, a slave of ours: what the front sees cannot
    # be changed from inside, and nothing it does reaches anyone.
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    paths = front.Paths(config=args.config, profiles_dir=pol.profiles_dir,
                        dev_root=pol.devices.dev_root, sysfs=pol.devices.sysfs,
                        udev_data=pol.devices.udev_data,
                        journal_dir=os.path.dirname(os.path.abspath(pol.devices.journal)),
                        extra_read=[pol.daemon_store.layout.templates_dir])
    try:
        facts = front.confine(user, paths, abstract_bus="abstract=" in (args.bus_address or ""))
    except front.ConfinementError as e:
        log.error("%s", e)
        return 2
    log.info("%s", front.describe(facts))
    try:
        return asyncio.run(serve(args, pol, sock, devices))
    finally:
        devices.close()                 # every live lease ends: originals restored
        sock.close()                    # the launcher ends its jails and exits


if __name__ == "__main__":
    sys.exit(main())
