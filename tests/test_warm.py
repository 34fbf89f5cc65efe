"""jail/warm.py: learning which pages a fork wrote (its real pagemap), and
copying pages ahead (real MADV_POPULATE_WRITE), so that a seed's launch
does not fault them in.  Every test runs in forked children of a fresh
interpreter, so pytest's own memory is not what is measured."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker.jail import cgroups
from conftest import ROOT

PRELUDE = r"""
import ctypes, json, mmap, os, resource, sys, time
from broker.jail import warm
PAGE = warm.PAGE

def region(npages):
    # a private anonymous mapping, every page present (written) before any fork
    m = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(b"x" * (npages * PAGE))
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))

def covered(runs, addr, npages):
    # how many of the npages pages from addr the runs cover
    return sum(1 for i in range(npages)
               if any(a <= addr + i * PAGE < a + n for a, n in runs))

def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def child(fn):
    # fork; the child runs fn(write end), then waits for a line on stdin's pipe
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r); os.close(go_w)
        fn(w)
        os.close(w)
        os.read(go_r, 1)
        os._exit(0)
    os.close(w); os.close(go_r)
    return pid, r, go_w

def learnt_from(fn):
    # warm.written_pages of a child once fn has run in it
    pid, r, go = child(fn)
    os.read(r, 1)
    runs = warm.written_pages(pid)
    os.write(go, b"g"); os.waitpid(pid, 0)
    return runs
"""


def run(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PRELUDE + body], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_pages_a_fork_wrote_are_learnt_and_no_others():
    r = run(r"""
a, a_addr = region(16)          # the child writes these
b, b_addr = region(16)          # nobody writes these after the fork
def write_a(w):
    for i in range(16):
        a[i * PAGE] = ord("y")
    os.write(w, b"k")
runs = learnt_from(write_a)
print(json.dumps({"a": covered(runs, a_addr, 16), "b": covered(runs, b_addr, 16),
                  "pages": warm.pages(runs)}))
""")
    assert r["a"] == 16, r
    assert r["b"] == 0, r


def test_the_launcher_reads_a_jail_inits_pages_without_cap_sys_ptrace():
    # As in privbrokerd: the launcher holds no CAP_SYS_PTRACE (hostns.drop_ptrace),
    # and a jail's init runs under another uid, not dumpable (identity.py).  The
    # launcher opens its Watch while the seed is root and dumpable, as it is
    # before its order; Debian 12's kernel refuses the open after that.
    r = run(r"""
import prctl
from broker import hostns
a, a_addr = region(16)
order_r, order_w = os.pipe()
def become_a_jail_init(w):
    os.read(order_r, 1)
    os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
    prctl.set_dumpable(False)
    for i in range(16):
        a[i * PAGE] = ord("y")
    os.write(w, b"k")
hostns.drop_ptrace()
pid, r, go = child(become_a_jail_init)
watch = warm.Watch(pid)             # the seed, before its order
os.write(order_w, b"o")
os.read(r, 1)
runs = watch.written_pages()
watch.close()
os.write(go, b"g"); os.waitpid(pid, 0)
print(json.dumps({"ptrace": prctl.cap_effective.sys_ptrace, "a": covered(runs, a_addr, 16)}))
""")
    assert r == {"ptrace": False, "a": 16}


def test_copying_ahead_takes_the_faults_out_of_the_writes():
    r = run(r"""
N = 512
b, b_addr = region(N)           # shared copy-on-write with the child
def measure(ahead):
    def fn(w):
        if ahead:
            warm.copy_ahead([(b_addr, N * PAGE)])
        before = minflt()
        for i in range(N):
            b[i * PAGE] = ord("z")
        os.write(w, json.dumps([minflt() - before]).encode())
    pid, r, go = child(fn)
    faults = json.loads(os.read(r, 100))[0]
    os.write(go, b"g"); os.waitpid(pid, 0)
    return faults
print(json.dumps({"cold": measure(False), "ahead": measure(True)}))
""")
    assert r["cold"] >= 512, r        # each write copied its page
    assert r["ahead"] < 64, r         # the copies were made ahead (the rest: Python's own)


def test_copying_ahead_changes_no_byte_and_skips_what_is_not_private_writable():
    r = run(r"""
b, b_addr = region(4)
b[0:5] = b"hello"
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
ro = libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
gone = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
libc.munmap(gone, PAGE)         # unmapped again: a stale range
def fn(w):
    done = warm.copy_ahead([(ro, PAGE), (gone, PAGE), (b_addr, 4 * PAGE)])
    os.write(w, json.dumps([done, bytes(b[0:5]).decode(), bytes(b[PAGE:PAGE + 3]).decode()]).encode())
pid, r, go = child(fn)
done, head, second = json.loads(os.read(r, 200))
os.write(go, b"g"); os.waitpid(pid, 0)
print(json.dumps({"done": done, "head": head, "second": second}))
""")
    assert r["done"] == 1, r          # only the private writable run
    assert r["head"] == "hello" and r["second"] == "xxx", r


def test_a_process_that_is_gone_teaches_nothing():
    r = run(r"""
pid = os.fork()
if pid == 0:
    os._exit(0)
time.sleep(0.2)                         # a zombie: its memory is gone
zombie = warm.written_pages(pid)
os.waitpid(pid, 0)
print(json.dumps({"zombie": list(zombie), "reaped": list(warm.written_pages(pid))}))
""")
    assert r == {"zombie": [], "reaped": []}


def test_what_is_learnt_is_capped():
    r = run(r"""
warm.MAX_PAGES = 8
a, a_addr = region(20)
def write_a(w):
    for i in range(0, 20, 2):           # ten runs of one page
        a[i * PAGE] = ord("y")
    os.write(w, b"k")
runs = learnt_from(write_a)
print(json.dumps({"pages": warm.pages(runs)}))
""")
    assert r["pages"] == 8, r


SEEDED = r"""
import json, os, statistics, sys, time
from dataclasses import replace
from broker.envelope import BROKER_FORCED
from broker.jail import config, launch as L, warm
spec = config.parse_command_line(["--config", "examples/profiles/minimal.conf", "--",
                                  "/bin/sleep", "0.3"])
spec = replace(spec, argv=("/bin/sleep", "0.3"), uid=65534, gid=65534, **BROKER_FORCED)
null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
tag = f"pbt-warm-{os.getpid()}"

def minflt(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])

def seeded(n, runs):
    seed = L.make_seed(spec, f"{tag}-seed-{n}", warm_runs=runs)
    time.sleep(0.1)                       # its pages copied, waiting for its order
    before = minflt(seed.pid)
    watch = warm.Watch(seed.pid)          # as the launcher does: before the order
    jail = L.launch_seeded(seed, spec, {0: null, 1: null, 2: null}, cgroup_name=f"{tag}-{n}")
    faults = minflt(jail.pid) - before    # from its order to its program's start
    learnt = watch.written_pages()
    watch.close()
    assert jail.wait().code == 0
    return faults, learnt

_, runs = seeded(0, ())
cold = [seeded(n, ())[0] for n in range(1, 4)]
warmed = [seeded(n, runs)[0] for n in range(4, 7)]
print(json.dumps({"learnt": warm.pages(runs), "cold": statistics.median(cold),
                  "warm": statistics.median(warmed)}))
"""


@pytest.mark.skipif(cgroups.System.probe().version is None, reason="no cgroup file system")
def test_a_seed_warmed_by_a_seeded_launch_faults_far_less_in_its_own():
    out = subprocess.run([sys.executable, "-c", SEEDED], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["learnt"] >= 32, r
    assert r["warm"] < r["cold"] / 3, r
