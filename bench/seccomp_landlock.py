"""Seccomp and Landlock costs (issue #3), measured in one run.

    python bench/seccomp_landlock.py [--runs N]

  compile    a 100-syscall ChromeOS policy (system-proxy), cold: a fresh
             process with an empty cache, and warm: in this process
  cached     a fresh process fetching the compiled filter from the cache
  load       loading the prepared program in a forked child (seccomp(2))
  launch     broker.jail.launch() of /bin/true in the minimal profile:
             plain, + Landlock, + seccomp, + both (interleaved runs); the
             peer is the same jail without either, and bwrap with and
             without the same BPF program (--seccomp FD)
Benchmarks are not tests: this prints figures and ratios, it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
POLICY = ROOT.parent / "shared" / "corpus" / "chromeos" / "seccomp" / \
    "system-proxy_seccomp_system-proxy-seccomp-amd64.policy"
BASE = ["-p", "-v", "-e", "-l", "--uts", "-n", "--profile", "minimalistic-mountns", "-c", "0"]
LANDLOCK = ["--fs-default-paths", "--fs-path-ro", "/proc"]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def fresh_process(code: str, cache: str) -> float:
    """Wall time of `code` as measured inside a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**ENV, "PRIVBROKER_CACHE_DIR": cache})
    return float(out.stdout)


def compile_figures(runs: int) -> None:
    from broker.jail.seccomp import compile_policy, compiled_filter, ensure_constants
    from broker.jail.seccomp.load import prepare_filter
    ensure_constants()
    timed = ("import time; t = time.perf_counter(); "
             "from broker.jail.seccomp import compiled_filter; "
             f"compiled_filter({str(POLICY)!r}); print(time.perf_counter() - t)")
    cold, cached = [], []
    with tempfile.TemporaryDirectory() as shared:
        # the constants table is per machine, not per policy: keep it warm
        os.environ["PRIVBROKER_CACHE_DIR"] = shared
        ensure_constants()
        for _ in range(runs):
            shutil.rmtree(Path(shared) / "filters", ignore_errors=True)
            cold.append(fresh_process(timed, shared))
            cached.append(fresh_process(timed, shared))
    warm = []
    for _ in range(runs):
        t = time.perf_counter()
        compile_policy(POLICY)
        warm.append(time.perf_counter() - t)
    program = compiled_filter(POLICY)
    loads = []
    for _ in range(runs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            import prctl
            prctl.set_no_new_privs(1)
            f = prepare_filter(program)
            t = time.perf_counter()
            f.load()
            os.write(w, repr(time.perf_counter() - t).encode())
            os._exit(0)
        os.close(w)
        loads.append(float(os.read(r, 64)))
        os.close(r)
        os.waitpid(pid, 0)
    n = sum(1 for line in POLICY.read_text().splitlines() if line[:1].isalpha())
    print(f"policy {POLICY.name}: {n} rules, {len(program) // 8} BPF instructions")
    print(f"  compile, fresh process, empty cache  p50 {ms(cold):7.2f} ms (in-process time)")
    print(f"  compile, warm process                p50 {ms(warm):7.2f} ms")
    print(f"  cached, fresh process                p50 {ms(cached):7.2f} ms (in-process time)")
    print(f"  load (seccomp(2)) in a child         p50 {ms(loads) * 1000:7.1f} us")


def launch_figures(runs: int) -> None:
    from broker.jail.config import parse_command_line
    from broker.jail.launch import launch
    from broker.jail.seccomp import compiled_filter
    specs = {
        "plain": parse_command_line(BASE + ["/bin/true"]),
        "landlock": parse_command_line(BASE + LANDLOCK + ["/bin/true"]),
        "seccomp": parse_command_line(BASE + ["-S", str(POLICY), "/bin/true"]),
        "both": parse_command_line(BASE + LANDLOCK + ["-S", str(POLICY), "/bin/true"]),
    }

    def lib(spec):
        def once() -> float:
            t = time.perf_counter()
            st = launch(spec).wait()
            assert st.code == 0, st
            return time.perf_counter() - t
        return once

    contenders = {name: lib(spec) for name, spec in specs.items()}
    bwrap = shutil.which("bwrap")
    bpf_file = None
    if bwrap:
        bpf_file = tempfile.NamedTemporaryFile(suffix=".bpf")
        bpf_file.write(compiled_filter(POLICY))
        bpf_file.flush()
        cmd = [bwrap, "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc",
               "--dev", "/dev", "--tmpfs", "/tmp"]

        def bw(extra):
            def once() -> float:
                fd = os.open(bpf_file.name, os.O_RDONLY) if extra else None
                argv = cmd + (["--seccomp", str(fd)] if extra else []) + ["/bin/true"]
                t = time.perf_counter()
                subprocess.run(argv, check=True, pass_fds=(fd,) if extra else ())
                dt = time.perf_counter() - t
                if fd is not None:
                    os.close(fd)
                return dt
            return once
        contenders["bwrap"] = bw(False)
        contenders["bwrap+seccomp"] = bw(True)
    results = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(runs):
        for k, fn in contenders.items():
            results[k].append(fn())
    plain = ms(results["plain"])
    print(f"launch of /bin/true, minimal profile, {runs} interleaved runs")
    for k in ("plain", "landlock", "seccomp", "both"):
        v = ms(results[k])
        print(f"  {k:14s} p50 {v:6.2f} ms   +{v - plain:5.2f} ms over plain (x{v / plain:.2f})")
    if bwrap:
        b, bs = ms(results["bwrap"]), ms(results["bwrap+seccomp"])
        print(f"  {'bwrap':14s} p50 {b:6.2f} ms")
        print(f"  {'bwrap+seccomp':14s} p50 {bs:6.2f} ms   +{bs - b:5.2f} ms over bwrap")
        print(f"  privjail library 'both' is x{ms(results['both']) / bs:.2f} of bwrap+seccomp")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    compile_figures(max(5, args.runs // 3))
    launch_figures(args.runs)


if __name__ == "__main__":
    main()
