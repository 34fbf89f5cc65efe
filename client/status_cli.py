"""`privbroker status`: the broker's status properties, for people.

Everything comes from D-Bus properties anyone may read (so `busctl
introspect org.privbroker.Broker1 /org/privbroker/Broker1` shows the same):
nothing here needs a grant.
"""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="what the broker is doing (version, uptime, jails, "
                                      "leases, mounts, counters)")
    p.add_argument("--json", action="store_true", help="one JSON object")


def dispatch(b, args) -> int:
    props = b.properties()
    if args.json:
        print(json.dumps(props, sort_keys=True))
    else:
        print(render(props), end="")
    return 0


def _uptime(seconds: int) -> str:
    d, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _pairs(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def render(props: dict) -> str:
    live = props.get("LiveJails", {})
    features = props.get("Features", {})
    lines = [
        f"version:    {props.get('Version', '?')}",
        f"uptime:     {_uptime(props.get('Uptime', 0))}",
        f"features:   " + (", ".join(f"{k}={v}" for k, v in sorted(features.items()))
                           or "none"),
        f"live jails: {sum(live.values())}"
        + (f" (per uid: {_pairs(live)})" if live else ""),
        f"leases:     {props.get('LeasesHeld', 0)}",
        f"mounts:     {props.get('MountsHeld', 0)}",
        f"calls:      {sum(props.get('Calls', {}).values())} ({_pairs(props.get('Calls', {}))})",
        f"refusals:   {sum(props.get('Refusals', {}).values())} "
        f"({_pairs(props.get('Refusals', {}))})",
    ]
    return "\n".join(lines) + "\n"
