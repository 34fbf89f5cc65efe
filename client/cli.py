"""privbroker: the broker's command-line client.

    privbroker [--bus-address ADDR] run PROFILE [--cwd DIR] [--timeout S]
               [--memory-limit SIZE|PCT%] [--pids-limit N] [--cpu-weight W]
               [--cpu-quota PCT%] -- CMD [ARGS...]
    privbroker [--bus-address ADDR] jails      memory, pids and CPU time of each
    privbroker [--bus-address ADDR] kill JAIL_ID [SIGNAL]
    privbroker audit [--json] [--allowlist FILE]     processes in the forbidden intersection
    privbroker watch [--allowlist FILE] [--exec CMD] processes that become root (JSON lines)
    privbroker explain PROFILE [--uid UID] [--json]  how exposed a profile's jails would be
    privbroker [--bus-address ADDR] daemon-store mount|unmount DAEMON USER_HASH
    privbroker daemon-store unmount --lazy [--config FILE] DAEMON USER_HASH
    privbroker daemon-store init [--config FILE]
    privbroker [--bus-address ADDR] open PATH [--fd N] [-- CMD [ARGS...]]
    privbroker [--bus-address ADDR] check PATH
    privbroker [--bus-address ADDR] status [--json]   version, uptime, jails, leases, counters
    privbroker [--bus-address ADDR] chown PATH [-- CMD [ARGS...]]

`run` wires the terminal's stdin/stdout/stderr into the jail, waits for it,
and exits with its status (128+signal when a signal ended it).  audit, watch
and explain run locally, without the bus (client/local.py).

`daemon-store mount` and `unmount` ask the broker over the bus.  `init` and
`unmount --lazy` are the administrator's and run locally as root, with the
paths of the broker's policy file (client/local.py): `init` makes every
template's run dirs shared mount points (privbrokerd does it at start), and
`unmount --lazy` detaches a busy store, which the bus method never does (its
contract is (ss): no lazy flag).

`open`, `check` and `chown` ask for device access (client/devices_cli.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="privbroker", description="privbroker client")
    ap.add_argument("--bus-address", default=os.environ.get("PRIVBROKER_BUS_ADDRESS"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a command in a jail from a profile")
    run.add_argument("profile")
    run.add_argument("--cwd")
    run.add_argument("--timeout", type=int)
    # cgroup limits: each may only tighten the profile's
    run.add_argument("--memory-limit", help="bytes, 512M, or a share of RAM like 25%%")
    run.add_argument("--pids-limit", type=int)
    run.add_argument("--cpu-weight", type=int, help="1..10000 (100 is the default)")
    run.add_argument("--cpu-quota", help="a share of one CPU, like 50%%")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("jails", help="list your live jails")
    kill = sub.add_parser("kill", help="signal one of your jails")
    kill.add_argument("jail_id")
    kill.add_argument("signal", nargs="?", default="TERM")
    ds = sub.add_parser("daemon-store", help="daemon-store mounts").add_subparsers(
        dest="ds_cmd", required=True)
    for name, what in (("mount", "bind a user's store for a daemon (over the bus)"),
                       ("unmount", "undo it (over the bus; with --lazy: locally, as root)")):
        p = ds.add_parser(name, help=what)
        p.add_argument("daemon")
        p.add_argument("user_hash")
        if name == "unmount":
            p.add_argument("--lazy", action="store_true",
                           help="detach even if busy (locally, as root; not over the bus)")
            p.add_argument("--config", default=None, help="the broker's policy file")
    init = ds.add_parser("init", help="make the run dirs shared mount points (locally, root)")
    init.add_argument("--config", default=None, help="the broker's policy file")
    from . import devices_cli, status_cli
    devices_cli.add_parsers(sub)
    status_cli.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .local import LOCAL
    if argv and argv[0] in LOCAL:
        return LOCAL[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    if args.cmd == "daemon-store" and (args.ds_cmd == "init" or getattr(args, "lazy", False)):
        from .local import daemon_store_local
        return daemon_store_local(args)
    from .api import Broker, BrokerCallError
    try:
        with Broker(args.bus_address) as b:
            return _dispatch(b, args)
    except BrokerCallError as e:
        print(f"privbroker: {e.message} [{e.name}]", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"privbroker: {e}", file=sys.stderr)
        return 1


def _dispatch(b, args) -> int:
    from . import devices_cli, status_cli
    if args.cmd in devices_cli.COMMANDS:
        return devices_cli.dispatch(b, args)
    if args.cmd == "status":
        return status_cli.dispatch(b, args)
    if args.cmd == "run":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            print("privbroker: run needs a command after --", file=sys.stderr)
            return 2
        options = {}
        if args.cwd:
            options["cwd"] = args.cwd
        if args.timeout:
            options["timeout_s"] = args.timeout
        for name in ("memory_limit", "pids_limit", "cpu_weight", "cpu_quota"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
        jail = b.launch(args.profile, argv, env=_env(), options=options)
        # Ctrl-C and friends go to the jail; the jail decides what they mean.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: jail.signal(s))
        status = jail.wait()
        if status.oom:
            print("privbroker: the jail was killed by the OOM killer: it hit its memory "
                  "limit", file=sys.stderr)
        return status.shell_code
    if args.cmd == "jails":
        print(f"{'JAIL':<16}  {'PID':>8}  {'PROFILE':<12} {'MEMORY':>9} {'PIDS':>5} "
              f"{'CPU':>9}  COMMAND")
        for j in b.jails():
            print(f"{j['jail_id']:<16}  {j['pid']:>8}  {j['profile']:<12} "
                  f"{_size(j.get('memory_bytes')):>9} {_num(j.get('pids')):>5} "
                  f"{_cpu(j.get('cpu_usec')):>9}  {' '.join(j['argv'])}")
        return 0
    if args.cmd == "daemon-store":
        if args.ds_cmd == "mount":
            b.mount_daemon_store(args.daemon, args.user_hash)
        else:
            b.unmount_daemon_store(args.daemon, args.user_hash)
        return 0
    if args.cmd == "kill":
        name = args.signal.upper()
        sig = int(name) if name.isdigit() else signal.Signals[
            name if name.startswith("SIG") else "SIG" + name]
        from .api import JailHandle
        JailHandle(b, args.jail_id, 0).signal(int(sig))
        return 0
    return 2


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _num(n: int | None) -> str:
    return "-" if n is None else str(n)


def _cpu(usec: int | None) -> str:
    return "-" if usec is None else f"{usec / 1e6:.2f}s"


def _env() -> dict[str, str]:
    # What a command needs to behave in a terminal; nothing the loader acts on.
    return {k: v for k, v in os.environ.items()
            if k in ("PATH", "TERM", "LANG", "LC_ALL", "HOME", "USER", "TZ")}


if __name__ == "__main__":
    sys.exit(main())
