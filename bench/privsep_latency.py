"""Launch latency before and after the privilege split, in the same run.

    python bench/privsep_latency.py [--runs N] [--before REV]

  before   privbrokerd from git revision REV (default 1eca095, the last
           commit before issue #11: a root front, the launcher its child,
           no launch envelope), unpacked with `git archive` into a temporary
           directory
  after    privbrokerd from this tree: the launcher is the main process, the
           front its child as user privbroker under seccomp and Landlock, and
           every launch checked against the envelope
Each on its own private bus with the same sample deployment; the same
in-process client (this tree's) calls Launch("minimal", ["/bin/true"]) and
waits for Exited, alternating between the two brokers run by run.  Prints
p50/p99 and the ratio after/before (issue #11: the split may cost < 10%).
Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
PRE_SPLIT = "1eca095"


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1000


def unpack(rev: str, into: Path) -> Path:
    tree = into / f"privbroker-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def start(bus, tree: Path, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.Popen([sys.executable, "-m", "broker", "--bus-address", bus.address,
                          "--config", str(config), "--log-level", "warning"], cwd=tree, env=env)
    for _ in range(150):
        if subprocess.run(["busctl", f"--address={bus.address}", "status",
                           "org.privbroker.Broker1"], capture_output=True).returncode == 0:
            return p
        time.sleep(0.1)
    p.kill()
    raise SystemExit(f"the broker from {tree} did not start")


async def measure(addresses: dict[str, str], runs: int) -> dict[str, list[float]]:
    from client import AsyncBroker
    clients = {k: await AsyncBroker(a).connect() for k, a in addresses.items()}
    out = {k: [] for k in clients}
    try:
        for b in clients.values():
            for _ in range(10):                                   # warm up
                jid, _ = await b.launch("minimal", ["/bin/true"], fds={})
                await b.wait(jid)
        for i in range(runs):
            order = list(clients.items()) if i % 2 == 0 else list(clients.items())[::-1]
            for name, b in order:
                t = time.perf_counter()
                jid, _ = await b.launch("minimal", ["/bin/true"], fds={})
                await b.wait(jid)
                out[name].append(time.perf_counter() - t)
    finally:
        for b in clients.values():
            b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--before", default=PRE_SPLIT)
    args = ap.parse_args()
    from dbus_fixture import PrivateBus, ensure_front_identity
    ensure_front_identity()
    work = Path(tempfile.mkdtemp(prefix="privbroker-privsep-"))
    os.chmod(work, 0o755)
    try:
        shutil.copytree(ROOT / "examples" / "profiles", work / "profiles")
        for name in ("before", "after"):   # the sample, without its rate limit
            (work / f"{name}.toml").write_text(
                (ROOT / "examples" / "broker.toml").read_text()
                .replace("launches_per_second = 20", "launches_per_second = 100000")
                .replace("calls_per_second = 200", "calls_per_second = 100000")
                .replace("/var/lib/privbroker/", f"{work}/state-{name}/"))
        trees = {"before": unpack(args.before, work), "after": ROOT}
        with PrivateBus() as bus_a, PrivateBus() as bus_b:
            buses = {"before": bus_a, "after": bus_b}
            procs = {k: start(buses[k], trees[k], work / f"{k}.toml") for k in trees}
            try:
                r = asyncio.run(measure({k: b.address for k, b in buses.items()}, args.runs))
            finally:
                for p in procs.values():
                    p.terminate()
                    p.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Launch(minimal, /bin/true) -> Exited, {args.runs} alternating runs, "
          f"{os.cpu_count()} cpus; before = {args.before}")
    for name in ("before", "after"):
        print(f"{name:6s} p50 {pct(r[name], 50):7.2f} ms  p99 {pct(r[name], 99):7.2f} ms")
    ratio = statistics.median(r["after"]) / statistics.median(r["before"])
    print(f"after/before (p50): x{ratio:.3f}  ({(ratio - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
