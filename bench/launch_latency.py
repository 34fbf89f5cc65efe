"""Launch latency: privjail against bubblewrap, measured in the same run.

    python bench/launch_latency.py [--runs N]

Times, for /bin/true:
  privjail   privjail -p -v -e -l --uts -n --profile minimalistic-mountns -- /bin/true
  bwrap      bwrap --unshare-all --ro-bind / / /bin/true          (the peer)
  python     the same interpreter running `pass` (start-up floor of privjail)
  imports    the interpreter importing what privjail imports, then exiting
  library    broker.jail.launch() called in-process (what the broker will pay)
  fork-exec  a plain fork/exec of /bin/true (the floor of any launcher)
Runs are interleaved so that machine noise hits every contender alike.
Benchmarks are not tests: this prints figures and ratios, it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRIVJAIL_FLAGS = ["-p", "-v", "-e", "-l", "--uts", "-n", "--profile", "minimalistic-mountns"]


# Measure privjail as installed: with its bytecode cached, whatever this
# shell says (PYTHONDONTWRITEBYTECODE would make every start compile).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - t


def library_launcher():
    from broker.jail.config import parse_command_line
    from broker.jail.launch import launch
    spec = parse_command_line(PRIVJAIL_FLAGS + ["--", "/bin/true"])

    def once() -> float:
        t = time.perf_counter()
        status = launch(spec).wait()
        assert status.code == 0, status
        return time.perf_counter() - t
    return once


def summarize(name: str, samples: list[float], peer: list[float] | None) -> str:
    ms = sorted(s * 1000 for s in samples)
    p50 = statistics.median(ms)
    p90 = ms[int(len(ms) * 0.9) - 1]
    line = f"{name:10s} p50 {p50:7.2f} ms   p90 {p90:7.2f} ms"
    if peer:
        line += f"   x{p50 / (statistics.median(peer) * 1000):.2f} of bwrap"
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    bwrap = shutil.which("bwrap")
    privjail = [sys.executable, "-m", "broker.jail.cli"]
    venv_privjail = Path(sys.executable).parent / "privjail"
    if venv_privjail.exists():
        privjail = [str(venv_privjail)]
    imports = ("import broker.jail.cli, broker.jail.config, broker.jail.launch")
    contenders = {
        "privjail": lambda: timed(privjail + PRIVJAIL_FLAGS + ["--", "/bin/true"]),
        "python": lambda: timed([sys.executable, "-c", "pass"]),
        "imports": lambda: timed([sys.executable, "-c", imports]),
        "library": library_launcher(),
        "fork-exec": lambda: timed(["/bin/true"]),
    }
    if bwrap:
        contenders["bwrap"] = lambda: timed([bwrap, "--unshare-all", "--ro-bind", "/", "/",
                                             "/bin/true"])
    else:
        print("bwrap not found: install bubblewrap for the peer figure")
    import compileall
    compileall.compile_dir(str(ROOT / "broker"), quiet=1)
    results = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()   # warm caches once
    for _ in range(args.runs):
        for name, fn in contenders.items():
            results[name].append(fn())
    peer = results.get("bwrap")
    print(f"launch latency of /bin/true, {args.runs} interleaved runs each, "
          f"{os.cpu_count()} cpus")
    for name in ("bwrap", "privjail", "library", "python", "imports", "fork-exec"):
        if name in results:
            print(summarize(name, results[name], peer if name != "bwrap" else None))
    pj = statistics.median(results["privjail"])
    startup = statistics.median(results["imports"])
    print(f"interpreter start-up + imports: {startup * 1000:.2f} ms "
          f"= {100 * startup / pj:.0f}% of privjail's wall time")


if __name__ == "__main__":
    main()
