"""Launch latency through the broker, against bubblewrap, in the same run.

    python bench/broker_latency.py [--runs N]

  broker     Launch("minimal", ["/bin/true"]) -> Exited, from an in-process
             asyncio client on a private system-style bus (pid, mount, net,
             ipc, uts namespaces, no_new_privs, minimalistic mounts)
  bwrap      bwrap --unshare-all --ro-bind / / /bin/true, run in a loop
  noop       a ListJails round trip on the same bus (the floor of any call)
  engine     the same jail (the minimal profile as the broker forces it, with
             its own cgroup) started by broker.jail.launch.launch() in this
             process and waited for: no D-Bus, no front, no launcher hop (this
             process holds dbus-fast and asyncio, more than the launcher does,
             and a bigger process forks slower: the engine's share, not a floor)
Also launches per second, with 8 launches in flight, and the same three
launches one at a time after a gap of quiet each:
  10 ms    no contender pays for another's background work: right after a
           broker launch its launcher makes the next seed (~4 ms of one cpu,
           jail/warm.py), which the back-to-back series lets overlap the
           runs that follow it;
  100 ms   ("after idle") a launcher that sits idle between sporadic
           requests is the common case, and the kernel makes some first
           operations after idleness slower (a cgroup migration can wait
           for an RCU grace period; README.md, "Launch latency").
Prints figures and ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


# (gap before each launch in seconds, that many fewer runs than interleaved)
GAPS = ((0.01, 2), (0.1, 4))


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1000


async def measure(address: str, runs: int) -> dict:
    from client import AsyncBroker
    b = await AsyncBroker(address).connect()
    out = {"broker": [], "noop": [], "bwrap": [], "engine": []}
    out.update({(gap, name): [] for gap, _ in GAPS for name in ("broker", "engine", "bwrap")})
    bwrap = shutil.which("bwrap")
    engine = _engine_launcher()
    try:
        for _ in range(10):                                   # warm up
            jid, _ = await b.launch("minimal", ["/bin/true"], fds={})
            await b.wait(jid)
        for _ in range(runs):
            t = time.perf_counter()
            jid, _ = await b.launch("minimal", ["/bin/true"], fds={})
            await b.wait(jid)
            out["broker"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await b.list_jails()
            out["noop"].append(time.perf_counter() - t)
            t = time.perf_counter()
            engine()
            out["engine"].append(time.perf_counter() - t)
            if bwrap:
                t = time.perf_counter()
                subprocess.run([bwrap, "--unshare-all", "--ro-bind", "/", "/", "/bin/true"],
                               check=True)
                out["bwrap"].append(time.perf_counter() - t)
        for gap, share in GAPS:
            for _ in range(max(1, runs // share)):
                for name in ("broker", "engine", "bwrap"):
                    if name == "bwrap" and not bwrap:
                        continue
                    time.sleep(gap)
                    t = time.perf_counter()
                    if name == "broker":
                        jid, _ = await b.launch("minimal", ["/bin/true"], fds={})
                        await b.wait(jid)
                    elif name == "engine":
                        engine()
                    else:
                        subprocess.run([bwrap, "--unshare-all", "--ro-bind", "/", "/",
                                        "/bin/true"], check=True)
                    out[gap, name].append(time.perf_counter() - t)
        n, t = runs, time.perf_counter()
        for batch in range(0, n, 8):
            launched = await asyncio.gather(*(b.launch("minimal", ["/bin/true"], fds={})
                                              for _ in range(min(8, n - batch))))
            await asyncio.gather(*(b.wait(j) for j, _ in launched))
        out["rate"] = n / (time.perf_counter() - t)
    finally:
        b.close()
    return out


def _engine_launcher():
    """A function that starts the broker's minimal jail in this process
    and waits for it (the engine's share of a broker launch)."""
    from dataclasses import replace

    from broker.envelope import BROKER_FORCED
    from broker.jail import config
    from broker.jail.launch import launch
    spec = config.parse_command_line(["--config", str(ROOT / "examples" / "profiles" /
                                                      "minimal.conf"), "--", "/bin/true"])
    spec = replace(spec, argv=("/bin/true",), uid=os.getuid(), gid=os.getgid(),
                   **BROKER_FORCED)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)

    def run() -> None:
        jail = launch(spec, {0: null, 1: null, 2: null})
        status = jail.wait()
        assert status.code == 0 and jail.leftover is None, status
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    from dbus_fixture import PrivateBus, ensure_front_identity
    ensure_front_identity()
    import tempfile
    deploy = Path(tempfile.mkdtemp(prefix="privbroker-bench-"))
    shutil.copytree(ROOT / "examples" / "profiles", deploy / "profiles")
    (deploy / "broker.toml").write_text(      # the sample, without its rate limit
        (ROOT / "examples" / "broker.toml").read_text()
        .replace("launches_per_second = 20", "launches_per_second = 100000")
        .replace("calls_per_second = 200", "calls_per_second = 100000"))
    with PrivateBus() as bus:
        broker = subprocess.Popen([sys.executable, "-m", "broker", "--bus-address", bus.address,
                                   "--config", str(deploy / "broker.toml"),
                                   "--log-level", "warning"], cwd=ROOT)
        try:
            for _ in range(100):
                if subprocess.run(["busctl", f"--address={bus.address}", "status",
                                   "org.privbroker.Broker1"], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            r = asyncio.run(measure(bus.address, args.runs))
        finally:
            broker.terminate()
            broker.wait()
            shutil.rmtree(deploy, ignore_errors=True)
    print(f"/bin/true, {args.runs} interleaved runs, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f} (other work on this machine shows here)")
    print_series(r, ("bwrap", "broker", "engine", "noop"), p99=True)
    for gap, _ in GAPS:
        print(f"after {gap * 1000:.0f} ms of quiet each, {len(r[gap, 'broker'])} runs each:")
        print_series({name: r[gap, name] for name in ("bwrap", "broker", "engine")},
                     ("bwrap", "broker", "engine"), p99=False)
    print(f"broker launches per second (8 in flight): {r['rate']:.0f}")


def print_series(r: dict, names, p99: bool) -> None:
    """One line per series: p50, p90 (and p99), and its ratio to bwrap's p50."""
    bw = statistics.median(r["bwrap"]) if r["bwrap"] else None
    for name in names:
        if not r[name]:
            continue
        line = f"{name:7s} p50 {pct(r[name], 50):7.2f} ms  p90 {pct(r[name], 90):7.2f} ms"
        if p99:
            line += f"  p99 {pct(r[name], 99):7.2f} ms"
        if bw and name != "bwrap":
            line += f"   x{statistics.median(r[name]) / bw:.2f} of bwrap"
        print(line)


if __name__ == "__main__":
    main()
