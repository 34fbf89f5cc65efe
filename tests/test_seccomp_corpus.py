"""Every real ChromeOS policy in the corpus compiles (and the program is sane),
and what compiling and loading cost."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from broker.jail.seccomp import PolicyError, bpf, compile_policy, parse_policy
from broker.jail.seccomp.compiler import evaluate
from test_seccomp_support import CORPUS, ROOT, seccomp_cache

__all__ = ["seccomp_cache"]
ARCH = 0xC000003E

# Policies that may not compile here, each with the reason.  This list can only
# shrink.  It is empty: every corpus policy compiles on this machine.
EXPECTED_FAILURES: dict[str, str] = {}

# MADV_GUARD_INSTALL (used by 31 corpus policies) is newer than the installed
# kernel headers; it resolves from the supplement on kernels >= 6.13 only.  On
# an older kernel it genuinely does not exist, and those files may fail on it.
_KERNEL = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
_OLD_KERNEL_REASON = "unknown constant 'MADV_GUARD_INSTALL'" if _KERNEL < (6, 13) else None

POLICIES = sorted(CORPUS.glob("*.policy")) if CORPUS.is_dir() else []


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
def test_corpus_compiles(capsys):
    failures = {}
    for path in POLICIES:
        try:
            program = compile_policy(path)
        except PolicyError as e:
            failures[path.name] = e
            continue
        insns = bpf.decode(program)
        assert 0 < len(insns) <= bpf.MAXINSNS
        assert bpf.run(program, bpf.seccomp_data(0x40000000 + 1, ARCH)) == bpf.RET_KILL_PROCESS
    unexpected = {}
    for name, e in failures.items():
        why = EXPECTED_FAILURES.get(name) or _OLD_KERNEL_REASON
        if not why or why not in str(e):
            unexpected[name] = str(e)
        assert e.line > 0 and e.file.endswith(".policy")   # names file and line
    compiled = len(POLICIES) - len(failures)
    with capsys.disabled():
        print(f"\n[seccomp corpus] {compiled}/{len(POLICIES)} policies compile "
              f"({100 * compiled / len(POLICIES):.1f}%)")
    assert not unexpected, unexpected
    assert compiled / len(POLICIES) >= 0.95 or _OLD_KERNEL_REASON
    stale = set(EXPECTED_FAILURES) - set(failures)
    assert not stale, f"these now compile: remove them from EXPECTED_FAILURES: {stale}"


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
def test_corpus_programs_mean_what_the_policies_say():
    # Each corpus program, run on each listed syscall with assorted arguments,
    # returns what the policy means.
    samples = [(0,) * 6, (1, 2, 3, 4, 5, 6), (0x5401, 0x5401, 0x5401, 0, 0, 0),
               (1, 0x5401, 4, 0x22, 0, 0), (16, 15, 2, 0, 0, 0), (3, 7, 0, 0, 1, 0)]
    for path in POLICIES:
        try:
            policy = parse_policy(path)
        except PolicyError:
            continue
        program = compile_policy(path)
        for s in policy.syscalls:
            consts = [a.value for r in s.rules if r.condition for c in r.condition for a in c]
            args_list = samples + [(v,) * 6 for v in consts[:20]]
            for args in args_list:
                sd = bpf.seccomp_data(s.number, ARCH, args)
                assert bpf.run(program, sd) == evaluate(policy, s.number, args, None, ARCH), \
                    (path.name, s.name, args)


_TIMED = r"""
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from broker.jail.seccomp import compiled_filter
from broker.jail.seccomp.load import prepare_filter
t1 = time.perf_counter()
program = compiled_filter(sys.argv[1])
t2 = time.perf_counter()
prepare_filter(program)
print(json.dumps({{"import": t1 - t0, "get": t2 - t1, "insns": len(program) // 8}}))
"""


def _timed(policy, env) -> tuple[dict, float]:
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _TIMED.format(root=str(ROOT)), str(policy)],
                       capture_output=True, text=True, env=env, timeout=120)
    wall = time.perf_counter() - start
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), wall


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
def test_timings(tmp_path, capsys):
    # a ~100-rule real policy
    sizes = {p: len(parse_policy(p).syscalls) for p in POLICIES}
    policy = min(sizes, key=lambda p: abs(sizes[p] - 100))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = dict(os.environ, PRIVBROKER_CACHE_DIR=str(cache))

    from broker.jail.seccomp import constants
    t = time.perf_counter()
    code = ("import sys; sys.path.insert(0, %r); from broker.jail.seccomp import "
            "ensure_constants; print(len(ensure_constants()))" % str(ROOT))
    gen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    t_constants = time.perf_counter() - t
    assert gen.returncode == 0, gen.stderr

    cold, cold_wall = _timed(policy, env)          # constants cached, filter not
    warm, warm_wall = _timed(policy, env)          # filter cached
    shutil.rmtree(cache / "filters")
    t = time.perf_counter()
    for _ in range(5):
        compile_policy(policy)
    in_process = (time.perf_counter() - t) / 5
    with capsys.disabled():
        print(f"\n[seccomp timings] policy {policy.name}: {sizes[policy]} syscalls, "
              f"{cold['insns']} instructions\n"
              f"  constants table generated from headers ({gen.stdout.strip()} names): "
              f"{t_constants * 1000:.0f} ms (once per header change)\n"
              f"  cold compile in a fresh process: {cold['get'] * 1000:.1f} ms "
              f"(+ {cold['import'] * 1000:.1f} ms imports; {cold_wall * 1000:.0f} ms wall)\n"
              f"  cached filter in a fresh process: {warm['get'] * 1000:.2f} ms "
              f"(+ {warm['import'] * 1000:.1f} ms imports; {warm_wall * 1000:.0f} ms wall)\n"
              f"  compile in a warm process: {in_process * 1000:.1f} ms")
    assert t_constants < 30
    assert cold["get"] < 5
    assert warm["get"] < 0.5 and warm["get"] < cold["get"]
    assert constants.table_digest() != "unavailable"


@pytest.mark.skipif(not POLICIES, reason="the shared corpus is not beside the checkout")
def test_the_kernel_accepts_every_corpus_program():
    import prctl
    from broker.jail.seccomp.load import prepare_filter
    refused = {}
    for path in POLICIES:
        try:
            prepared = prepare_filter(compile_policy(path))
        except PolicyError:
            continue
        pid = os.fork()
        if pid == 0:                    # load, then leave (allowed or killed: loaded)
            try:
                prctl.set_no_new_privs(True)
                prepared.load()
            except OSError:
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3:
            refused[path.name] = status
    assert not refused
