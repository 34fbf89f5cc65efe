"""Seeds (broker/jail/launch.py): a jail's first process made ahead of its
request.  A seeded jail must be the jail a plain launch makes, as its probe
sees it; whatever a seed cannot serve is refused before it is touched; a
seed that is discarded, dies, or fails at its launch leaves nothing behind.
The launcher's use of seeds is tested through privbrokerd (test_broker.py,
and below)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from broker.jail import cgroups
from conftest import JAIL_PYTHON, PROBE, ROOT

pytestmark = pytest.mark.skipif(cgroups.System.probe().version is None,
                                reason="no cgroup file system")

HARNESS = r"""
import json, os, sys
from broker.jail import cgroups, config, launch as L
args = json.loads(sys.argv[1])
spec = config.parse_command_line([*args["flags"], "--own-cgroup", "--", *args["argv"]])
null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
tag = f"pbt-seed-{os.getpid()}"

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def children():
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return f.read().split()
    except OSError:
        return []

def cgroup_dirs():
    found = []
    for h in cgroups.System.current().hierarchies:
        d = h.dir_of(h.own)
        found += [e for e in os.listdir(d) if e.startswith(tag)]
    return found

def run(how, n):
    r, w = os.pipe()
    name = f"{tag}-jail-{how}-{n}"
    try:
        if how == "seeded":
            seed = L.make_seed(spec, f"{tag}-seed-{n}")
            jail = L.launch_seeded(seed, spec, {0: null, 1: w, 2: w}, cgroup_name=name)
        else:
            jail = L.launch(spec, {0: null, 1: w, 2: w}, cgroup_name=name)
    except L.LaunchError as e:
        os.close(r); os.close(w)
        return {"error": [e.step, e.message]}
    os.close(w)
    out = b""
    while chunk := os.read(r, 1 << 16):
        out += chunk
    os.close(r)
    status = jail.wait()
    return {"out": out.decode(), "code": status.code, "signal": status.signal,
            "left": jail.leftover is not None}

base_fds = None
results = {}
for how in args["hows"]:
    first = run(how, 0)
    if base_fds is None:
        base_fds = fds()
    results[how] = [first] + [run(how, n) for n in range(1, args["repeat"])]
print(json.dumps({"results": results, "fds_before": base_fds, "fds_after": fds(),
                  "children": children(), "cgroups": cgroup_dirs()}))
"""


def harness(flags, argv, hows=("plain", "seeded"), repeat=1) -> dict:
    p = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(
        {"flags": flags, "argv": argv, "hows": list(hows), "repeat": repeat})],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def report(result: dict) -> dict:
    assert "error" not in result and result["code"] == 0, result
    return json.loads(result["out"].splitlines()[0])


def comparable(rep: dict) -> dict:
    """A probe report without what legitimately differs between two jails:
    their namespaces (each has its own), mount ids, and the inode numbers of
    the harness's pipes."""
    out = {k: v for k, v in rep.items() if k not in ("ns", "ns_links")}
    out["mounts"] = [{k: v for k, v in m.items() if k not in ("id", "parent")}
                     for m in rep["mounts"]]
    out["fd_targets"] = {fd: re.sub(r"\[\d+\]", "[]", t) for fd, t in rep["fd_targets"].items()}
    return out


@pytest.mark.parametrize("flags", [
    ["-p", "-v", "-e", "-l", "--uts=seedbox", "-n", "--profile", "minimalistic-mountns",
     "-u", "nobody", "-g", "nogroup"],
    ["-p", "-I", "-v", "-r", "-n", "-c", "0x3000"],           # the program is pid 1
], ids=["minimal-as-nobody", "program-is-pid-1"])
def test_a_seeded_jail_is_the_jail_a_plain_launch_makes(flags):
    r = harness(flags, [JAIL_PYTHON, PROBE])
    plain, seeded = report(r["results"]["plain"][0]), report(r["results"]["seeded"][0])
    assert comparable(seeded) == comparable(plain)
    assert all(seeded["ns"][n] != plain["ns"][n] for n in ("pid", "mnt")), (seeded, plain)
    assert r["children"] == [] and r["cgroups"] == [], r


def test_a_seeded_jail_gets_its_seccomp_filter():
    """The filter L compiled reaches the seed with its order: cat runs under
    coreutils.policy, and a probe (Python, which the policy does not allow)
    dies of SIGSYS, as in a plain launch."""
    flags = ["-p", "-v", "-l", "-n", "-S", str(ROOT / "examples" / "profiles" /
                                               "coreutils.policy")]
    r = harness(flags, ["/bin/cat", "/proc/self/status"])
    lines = {how: [l for l in r["results"][how][0]["out"].splitlines()
                   if l.startswith(("Seccomp", "NoNewPrivs", "Cap"))] for how in r["results"]}
    assert lines["seeded"] == lines["plain"] and "Seccomp:\t2" in lines["seeded"], lines
    r = harness(flags, [JAIL_PYTHON, PROBE])
    assert [x[0]["signal"] for x in r["results"].values()] == [31, 31], r


def test_a_seeded_launch_that_fails_leaves_nothing():
    """A missing program: the seed (the jail's first process) reports the
    exec's error; no process, fd or cgroup is left, launch after launch."""
    r = harness(["-p", "-v", "-n"], ["/nonexistent/program"], hows=("seeded",), repeat=10)
    for result in r["results"]["seeded"]:
        assert result["error"][0] == "exec" and "No such file" in result["error"][1], result
    assert r["fds_after"] == r["fds_before"], r
    assert r["children"] == [] and r["cgroups"] == [], r


def test_seeded_launches_repeat_cleanly():
    r = harness(["-p", "-v", "-e", "-n"], ["/bin/true"], hows=("seeded",), repeat=20)
    assert all(x.get("code") == 0 and not x["left"] for x in r["results"]["seeded"]), r
    assert r["fds_after"] == r["fds_before"], r
    assert r["children"] == [] and r["cgroups"] == [], r


def test_what_a_seed_cannot_serve_is_refused_before_it_is_touched():
    from dataclasses import replace

    from broker.jail import config
    from broker.jail import launch as L
    base = config.parse_command_line(["-p", "-v", "-n", "--own-cgroup", "--", "/bin/true"])
    assert L.seed_shape(base) is not None
    # what needs L between the namespaces, or has no cgroup of its own
    for flags in (["-v", "-n", "--own-cgroup"],                            # no pid namespace
                  ["-p", "-v", "-n", "-U", "-m0 100000 1", "-M0 100000 1", "--own-cgroup"],
                  ["-p", "-V", "/proc/1/ns/mnt", "-n", "--own-cgroup"],
                  ["-p", "-v", "-n"],                                       # no cgroup
                  ["-p", "-v", "-n", "--own-cgroup", "-f", "/run/x.pid"]):
        assert L.seed_shape(config.parse_command_line([*flags, "--", "/bin/true"])) is None, flags
    # another shape: other namespaces, another parent, other kinds of limits
    assert L.seed_shape(replace(base, namespaces=base.namespaces | {"net"})) != L.seed_shape(base)
    assert L.seed_shape(base, "/elsewhere") != L.seed_shape(base)
    assert L.seed_shape(replace(base, pids_limit=10)) != L.seed_shape(base)
    assert L.seed_shape(replace(base, pids_limit=10)) == L.seed_shape(replace(base, pids_limit=20))
    # the same shape with another program, uid, environment: the same seed
    assert L.seed_shape(replace(base, argv=("/bin/false",), uid=65534)) == L.seed_shape(base)


SEED_LIFE = r"""
import json, os, signal, sys, time
from dataclasses import replace
from broker.jail import cgroups, config, launch as L
spec = config.parse_command_line(["-p", "-v", "-e", "-n", "--own-cgroup", "--", "/bin/true"])
tag = f"pbt-seedlife-{os.getpid()}"
def cgroup_dirs():
    return [e for h in cgroups.System.current().hierarchies
            for e in os.listdir(h.dir_of(h.own)) if e.startswith(tag)]
before = sorted(os.listdir("/proc/self/fd"))
out = {}
seed = L.make_seed(spec, tag + "-a")
with open(f"/proc/{seed.pid}/comm") as f:
    out["comm"] = f.read().strip()
out["own_pid_ns"] = os.readlink(f"/proc/{seed.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
out["own_net_ns"] = os.readlink(f"/proc/{seed.pid}/ns/net") != os.readlink("/proc/self/ns/net")
with open(f"/proc/{seed.pid}/cgroup") as f:
    out["in_its_cgroup"] = (tag + "-a") in f.read() or cgroups.System.current().version != "v1"
out["alive"] = seed.alive()
seed.discard()
out["discarded_left"] = [os.path.exists(f"/proc/{seed.pid}"), cgroup_dirs()]
seed = L.make_seed(spec, tag + "-b")             # one that dies before its launch
os.kill(seed.pid, signal.SIGKILL)
time.sleep(0.2)
out["dead_alive"] = seed.alive()
seed.discard()
seed = L.make_seed(spec, tag + "-c")             # another shape is refused, untouched
try:
    L.launch_seeded(seed, replace(spec, namespaces=spec.namespaces - {"net"}), {},
                    cgroup_name=tag + "-x")
    out["misfit"] = "launched"
except ValueError as e:
    out["misfit"] = str(e)
out["misfit_alive"] = seed.alive()
seed.discard()
seed = L.make_seed(spec, tag + "-d")             # the right shape, an invalid spec
pid = seed.pid
try:
    L.launch_seeded(seed, replace(spec, hostname="no-uts-namespace"), {}, cgroup_name=tag + "-y")
    out["invalid"] = "launched"
except Exception as e:
    out["invalid"] = type(e).__name__
out["invalid_left"] = os.path.exists(f"/proc/{pid}")
out["left"] = [cgroup_dirs(), sorted(os.listdir("/proc/self/fd")) == before]
print(json.dumps(out))
"""


def test_a_seed_is_made_ahead_waits_and_leaves_nothing_when_discarded():
    p = subprocess.run([sys.executable, "-c", SEED_LIFE], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["comm"] == "pb-seed" and r["own_pid_ns"] and r["own_net_ns"], r
    assert r["in_its_cgroup"] and r["alive"], r
    assert r["discarded_left"] == [False, []], r
    assert r["dead_alive"] is False, r
    assert r["misfit"] == "this seed cannot serve this spec" and r["misfit_alive"], r
    assert r["invalid"] == "SpecError" and r["invalid_left"] is False, r
    assert r["left"] == [[], True], r


def test_a_seeded_jail_runs_in_its_own_cgroup_under_the_jails_name():
    """On v1 the seed's cgroup, made and joined ahead, is renamed to the
    jail's name at its launch; on v2 (no renames) it is made and joined
    then.  Either way the program is born inside."""
    r = harness(["-p", "-v", "-n"], ["/bin/cat", "/proc/self/cgroup"], hows=("seeded",))
    lines = r["results"]["seeded"][0]["out"].splitlines()
    mine = [line for line in lines if "-jail-seeded-0" in line]
    assert mine and not any("-seed-0" in line for line in lines), lines
    if cgroups.System.probe().version == "v1":
        assert any(":pids:" in line or ":freezer:" in line for line in mine), lines


FRESH_VIEW = r"""
import json, os, sys, tempfile
from broker.jail import config, launch as L, syscalls as sc
# a mount namespace of our own, every mount private: nothing mounted from now
# on propagates anywhere (the worst case for a copy made too early)
sc.unshare(sc.CLONE_NEWNS)
sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
d = tempfile.mkdtemp(prefix="pbt-seedview-", dir="/var/tmp")
spec = config.parse_command_line(["-p", "-v", "-n", "--uts=before", "--own-cgroup", "--",
                                  "/bin/sh", "-c", f"ls {d}; hostname"])
seed = L.make_seed(spec, f"pbt-seedview-{os.getpid()}")
sc.mount("tmpfs", d, "tmpfs", 0, "size=64k")          # after the seed was made
open(os.path.join(d, "made-after-the-seed"), "w").close()
r, w = os.pipe()
null = os.open("/dev/null", os.O_RDWR)
jail = L.launch_seeded(seed, spec, {0: null, 1: w, 2: w}, cgroup_name=f"pbt-seedview-j-{os.getpid()}")
os.close(w)
out = b""
while chunk := os.read(r, 4096):
    out += chunk
print(json.dumps({"out": out.decode(), "code": jail.wait().code}))
sc.umount2(d, 0)
os.rmdir(d)
"""


def test_a_seeded_jail_sees_the_host_as_it_is_at_its_launch():
    """The mount namespace (a copy of the host's mount table) is made when
    the order comes, not when the seed is: a mount made in between, on a
    private mount that propagates nothing, is in the jail."""
    p = subprocess.run([sys.executable, "-c", FRESH_VIEW], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["code"] == 0 and r["out"].split() == ["made-after-the-seed", "before"], r


STALE = r"""
import json, os, subprocess, sys, time
from broker import launcher
from broker.jail import cgroups
system = cgroups.System.current()
names = {"stale": f"{launcher.SEED_CGROUP_PREFIX}pbt{os.getpid()}-stale",
         "live": f"{launcher.SEED_CGROUP_PREFIX}pbt{os.getpid()}-live",
         "jail": f"{launcher.JAIL_CGROUP_PREFIX}pbt{os.getpid()}",       # a jail id
         "other": f"{launcher.JAIL_CGROUP_PREFIX}pbt-{os.getpid()}"}     # no jail id
made = {kind: [] for kind in names}
sleeper = subprocess.Popen(["sleep", "30"])
try:
    for kind, name in names.items():
        for h in system.plan(cgroups.Limits()):      # where a seed's cgroup is made
            d = os.path.join(h.dir_of(h.own), name)
            os.mkdir(d)
            made[kind].append(d)
    for d in made["live"]:
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
    removed = launcher.remove_stale_cgroups(None)
    out = {"removed_ours": sorted(d for d in removed if f"pbt{os.getpid()}" in d
                                  or f"pbt-{os.getpid()}" in d),
           "left": {kind: sorted(d for d in made[kind] if os.path.exists(d)) for kind in made},
           "made": {kind: sorted(made[kind]) for kind in made}}
finally:
    sleeper.kill()
    sleeper.wait()
    time.sleep(0.1)
    for d in sum(made.values(), []):
        if os.path.exists(d):
            os.rmdir(d)
print(json.dumps(out))
"""


def test_stale_seed_and_jail_cgroups_go_and_a_live_seeds_and_others_stay():
    """What a killed launcher left (an empty privbroker-seed-* cgroup, an
    empty privbroker-JAILID one) is removed; a cgroup with a process in it
    (another launcher's live seed) and one whose name no launcher gives
    are not touched."""
    p = subprocess.run([sys.executable, "-c", STALE], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    made, left = r["made"], r["left"]
    assert r["removed_ours"] == sorted(made["stale"] + made["jail"]), r
    assert left["stale"] == left["jail"] == [], r
    assert left["live"] == made["live"] and left["other"] == made["other"], r
