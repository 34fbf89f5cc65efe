"""`privbroker audit`, `watch` and `explain`: commands that run here, without
the bus.  audit and watch look at this machine's processes (they need root
to see every process); explain reads a profile the way the broker would.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main_audit(argv: list[str]) -> int:
    from broker.audit import main_audit as audit
    return audit(argv)


def main_watch(argv: list[str]) -> int:
    from broker.watch import main_watch as watch
    return watch(argv)


def main_explain(argv: list[str]) -> int:
    """0 printed; 1 the profile is in the forbidden intersection; 2 usage or
    a profile that cannot be read."""
    ap = argparse.ArgumentParser(
        prog="privbroker explain",
        description="how exposed a jail from this profile would be, and what to add first")
    ap.add_argument("profile", help="a profile name (from the broker's profiles directory) "
                                    "or a path to a minijail config file")
    ap.add_argument("--config", default=None,
                    help="the broker's policy file (default /etc/privbroker/broker.toml)")
    ap.add_argument("--uid", type=int, default=None,
                    help="the uid the broker would run it as (default: the profile's own, "
                         "i.e. root's when it sets none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from broker.jail.config import ConfigError, parse_command_line
    from broker.jail.exposure import explain, explain_data
    from broker.jail.landlock import abi_version
    path = args.profile if "/" in args.profile else _profile_path(args.profile, args.config)
    if path is None:
        return 2
    try:
        spec = parse_command_line(["--config", path, "--", os.path.basename(path)])
    except ConfigError as e:
        print(f"privbroker explain: {e}", file=sys.stderr)
        return 2
    if args.uid is not None:
        from dataclasses import replace
        spec = replace(spec, uid=args.uid)
    abi = abi_version()
    if args.json:
        data = explain_data(spec, 0, landlock_abi=abi)
        print(json.dumps(data, indent=2, sort_keys=True))
        forbidden = data["forbidden_intersection"]["forbidden"]
    else:
        text = explain(spec, 0, landlock_abi=abi)
        print(text)
        forbidden = "forbidden intersection: YES" in text
    return 1 if forbidden else 0


def _profile_path(name: str, config: str | None) -> str | None:
    from broker import policy
    try:
        pol = policy.load(config or policy.DEFAULT_CONFIG)
    except (OSError, policy.PolicyError) as e:
        print(f"privbroker explain: cannot read the broker's policy: {e}", file=sys.stderr)
        return None
    if not name.replace("-", "").replace("_", "").isalnum():
        print(f"privbroker explain: {name!r} is not a profile name", file=sys.stderr)
        return None
    return os.path.join(pol.profiles_dir, name + ".conf")


def daemon_store_local(args) -> int:
    """`privbroker daemon-store init` and `unmount --lazy`: the broker's own
    daemon-store core, run in this process (root, the host's mount namespace)."""
    from broker import daemon_store, policy
    try:
        layout = policy.load(args.config or policy.DEFAULT_CONFIG).daemon_store.layout
    except policy.PolicyError as e:
        print(f"privbroker daemon-store: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"privbroker daemon-store {args.ds_cmd}: runs here, not through the broker, "
              f"and needs root", file=sys.stderr)
        return 1
    if args.ds_cmd == "init":
        results = daemon_store.init(layout)
        for r in results:
            print(f"{r.daemon} ({r.variant}): {r.error or r.path + ' is a shared mount point'}")
        return 1 if any(r.error for r in results) else 0
    try:
        changed = daemon_store.unmount(
            layout, daemon_store.Request(args.daemon, args.user_hash, lazy=True))
    except daemon_store.DaemonStoreError as e:
        print(f"privbroker daemon-store: {e} [{e.kind}]", file=sys.stderr)
        return 1
    print("detached " + " and ".join(changed) if changed else "was not mounted")
    return 0


LOCAL = {"audit": main_audit, "watch": main_watch, "explain": main_explain}
