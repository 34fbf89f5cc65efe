"""privbroker: the broker's command-line client.

    privbroker [--bus-address ADDR] run PROFILE [--cwd DIR] [--timeout S] -- CMD [ARGS...]
    privbroker [--bus-address ADDR] jails
    privbroker [--bus-address ADDR] kill JAIL_ID [SIGNAL]
    privbroker audit [--json] [--allowlist FILE]     processes in the forbidden intersection
    privbroker watch [--allowlist FILE] [--exec CMD] processes that become root (JSON lines)
    privbroker explain PROFILE [--uid UID] [--json]  how exposed a profile's jails would be

`run` wires the terminal's stdin/stdout/stderr into the jail, waits for it,
and exits with its status (128+signal when a signal ended it).  audit, watch
and explain run locally, without the bus (client/local.py).
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
    run.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("jails", help="list your live jails")
    kill = sub.add_parser("kill", help="signal one of your jails")
    kill.add_argument("jail_id")
    kill.add_argument("signal", nargs="?", default="TERM")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .local import LOCAL
    if argv and argv[0] in LOCAL:
        return LOCAL[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
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
        jail = b.launch(args.profile, argv, env=_env(), options=options)
        # Ctrl-C and friends go to the jail; the jail decides what they mean.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: jail.signal(s))
        return jail.wait().shell_code
    if args.cmd == "jails":
        for j in b.jails():
            print(f"{j['jail_id']}  pid {j['pid']:<8} {j['profile']:<12} {' '.join(j['argv'])}")
        return 0
    if args.cmd == "kill":
        name = args.signal.upper()
        sig = int(name) if name.isdigit() else signal.Signals[
            name if name.startswith("SIG") else "SIG" + name]
        from .api import JailHandle
        JailHandle(b, args.jail_id, 0).signal(int(sig))
        return 0
    return 2


def _env() -> dict[str, str]:
    # What a command needs to behave in a terminal; nothing the loader acts on.
    return {k: v for k, v in os.environ.items()
            if k in ("PATH", "TERM", "LANG", "LC_ALL", "HOME", "USER", "TZ")}


if __name__ == "__main__":
    sys.exit(main())
