"""The VM's init after switch_root (tests/vm/initramfs_init.sh): pid 1 on an
overlay of the host's root file system (read-only lower, tmpfs upper).

The job directory (9p tag "vmjob", writable, the host's temporary directory)
is mounted at /vmjob; job.json there says what to do:

  {"mode": "run", "argv": [...], "cwd": "..."}
      cgroup v2 mode: this process stays pid 1, mounts the API file systems
      and the unified hierarchy alone on /sys/fs/cgroup, enables the memory,
      pids and cpu controllers for the root's children (as systemd does),
      runs argv with its output in /vmjob/output.log, reaps every orphan
      meanwhile, writes the exit status to /vmjob/rc and powers off.

  {"mode": "systemd", "unit": "..."}
      installs the job's unit files (job.json "units": {name: text}) in
      /etc/systemd/system (the overlay's, the host's is untouched) and
      becomes /lib/systemd/system/systemd: the units do the rest and power
      the machine off (SuccessAction=/FailureAction=).

Standard library only: this runs on /usr/bin/python3 before anything else.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

JOB = "/vmjob"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def mount(fstype: str, target: str, options: str = "", source: str | None = None) -> None:
    os.makedirs(target, exist_ok=True)
    argv = ["mount", "-t", fstype] + (["-o", options] if options else [])
    sh(*argv, source or fstype, target)


def fresh_tmp(keep: list[str]) -> None:
    """A fresh tmpfs on /tmp, as a booted machine has, but with the paths in
    `keep` that lie under the host's /tmp still there (a checkout cloned
    into /tmp, as a CI may do, and its ../shared): directories bound back
    at their place, symlinks made again."""
    held = []
    for i, path in enumerate(p for p in keep if p.startswith("/tmp/") and os.path.lexists(p)):
        if os.path.islink(path):
            held.append((path, "link", os.readlink(path)))
        elif os.path.isdir(path):
            hold = f"/.vm-keep-{i}"          # on the overlay's writable root
            os.makedirs(hold, exist_ok=True)
            sh("mount", "--bind", path, hold)
            held.append((path, "dir", hold))
    mount("tmpfs", "/tmp", "mode=1777")
    for path, kind, what in held:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "link":
            os.symlink(what, path)
        else:
            os.makedirs(path, exist_ok=True)
            sh("mount", "--move", what, path)


def mount_job() -> dict:
    # cache=none: every write reaches the host at once, nothing to flush at power-off
    mount("9p", JOB, "trans=virtio,version=9p2000.L,cache=none,msize=512000", "vmjob")
    with open(f"{JOB}/job.json") as f:
        return json.load(f)


def power_off() -> None:
    os.sync()
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("o")
    time.sleep(60)


def api_filesystems(keep: list[str]) -> None:
    """What systemd would mount, for the run mode (it has no systemd)."""
    mount("sysfs", "/sys")
    mount("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "mode=1777")
    mount("tmpfs", "/run", "mode=0755")
    fresh_tmp(keep)
    # The unified hierarchy alone, like systemd.unified_cgroup_hierarchy=1
    mount("cgroup2", "/sys/fs/cgroup", "nsdelegate", "cgroup2")
    with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids +cpu")
    sh("ip", "link", "set", "lo", "up")
    sh("hostname", "privbroker-vm")


def run(job: dict) -> None:
    api_filesystems(job.get("keep", []))
    env = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               HOME="/root", LANG="C.UTF-8", **job.get("env", {}))
    started = time.monotonic()
    with open(f"{JOB}/output.log", "w") as out:
        child = subprocess.Popen(job["argv"], cwd=job.get("cwd", "/"), env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        # pid 1 reaps every orphan until the job itself has exited
        while True:
            pid, status = os.wait()
            if pid == child.pid:
                rc = os.waitstatus_to_exitcode(status)
                break
    with open(f"{JOB}/rc", "w") as f:
        f.write(f"{rc} {time.monotonic() - started:.1f}\n")


def systemd(job: dict) -> None:
    # The host is a container image: its /.dockerenv would make systemd
    # believe it runs in a container (no kernel command line, so no
    # systemd.unit=; units conditioned on virtualization skipped). Gone
    # from the overlay only.
    for marker in ("/.dockerenv", "/run/.containerenv"):
        if os.path.exists(marker):
            os.unlink(marker)
    # A fresh /tmp, as a booted machine has: otherwise systemd-tmpfiles
    # (tmp.conf "D /tmp") empties the host's /tmp through the overlay at
    # boot, which over 9p takes minutes.
    fresh_tmp(job.get("keep", []))
    for name, text in job["units"].items():
        with open(f"/etc/systemd/system/{name}", "w") as f:
            f.write(text)
    os.execv("/lib/systemd/systemd", ["/lib/systemd/systemd"])


def main() -> None:
    mount("proc", "/proc")
    job = mount_job()
    print(f"vm: guest init: mode {job['mode']}, up {open('/proc/uptime').read().split()[0]} s",
          flush=True)
    if job["mode"] == "systemd":
        systemd(job)
    try:
        run(job)
    finally:
        power_off()


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:       # pid 1 must not just exit: say why, then power off
        print(f"vm: guest init failed: {e!r}", file=sys.stderr, flush=True)
        with open(f"{JOB}/error", "w") if os.path.isdir(JOB) else open(os.devnull, "w") as f:
            f.write(repr(e))
        power_off()
