"""Boot a throwaway qemu VM on this machine's own root file system.

The VM runs Debian's kernel (apt: linux-image-amd64; its 9p, virtio and
overlay modules) with a small initramfs built here from busybox-static
(tests/vm/initramfs_init.sh): the host's / is shared read-only over 9p and
covered by an overlay with a tmpfs upper layer, so the guest sees the
checkout, its .venv and every installed package, may write anywhere, and
leaves no trace on the host. tests/vm/guest_init.py then either runs one
command as pid 1 on a pure cgroup v2 hierarchy, or becomes systemd.

The host talks to the guest through one writable 9p directory (the job
directory): job.json in, results out. The serial console goes to
console.log there too.

    vm = Vm()                                  # kernel, initramfs (cached)
    res = vm.run_job(job, timeout=600)         # -> Result(dir, console, ...)

Accelerator: PRIVBROKER_VM_ACCEL=kvm|tcg (default tcg: on the project's
machines /dev/kvm is nested KVM that stalls while a Debian kernel boots, see
tests/vm/README.md; TCG boots it in about 4 s).

Nothing is downloaded: the kernel, qemu and busybox are apt packages
(Makefile VM_APT).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
QEMU = "/usr/bin/qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
# The modules the initramfs needs, by name (their dependencies are found by
# modprobe --show-depends): virtio PCI transport, 9p over virtio, overlay.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
CACHE = Path(os.environ.get("PRIVBROKER_VM_CACHE", "/var/tmp/privbroker-vm"))


class VmUnavailable(Exception):
    """This machine lacks what the VM needs (a package, a kernel)."""


def vm_or_skip() -> "Vm":
    """A Vm, or the test skipped where this machine cannot boot one; in CI
    (CI set, `make test` having installed vm-deps) that is a failure, so
    the VM tests cannot silently stop running."""
    import pytest
    try:
        return Vm()
    except VmUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"no VM in CI: {e}")
        pytest.skip(f"no VM here: {e}")


@dataclass
class Result:
    dir: Path              # the job directory: whatever the guest wrote
    console: str           # the serial console (kernel, init, systemd)
    seconds: float         # wall time from qemu start to its exit
    qemu_rc: int | None    # None: killed at the timeout

    def file(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text()
        except FileNotFoundError:
            return None


def _kernel_release(vmlinuz: str) -> str:
    return os.path.basename(vmlinuz)[len("vmlinuz-"):]


def find_kernel() -> tuple[str, str]:
    """(vmlinuz, release) of the newest installed Debian kernel whose modules
    include 9p (Debian's cloud kernels do not build it)."""
    found = []
    for vmlinuz in glob.glob("/boot/vmlinuz-*"):
        rel = _kernel_release(vmlinuz)
        if glob.glob(f"/lib/modules/{rel}/kernel/fs/9p/9p.ko*"):
            found.append((vmlinuz, rel))
    if not found:
        raise VmUnavailable("no kernel with 9p modules in /boot (apt install linux-image-amd64)")
    return max(found, key=lambda k: [int(x) if x.isdigit() else 0
                                     for x in re.split(r"[.-]", k[1])])


def missing_tools() -> list[str]:
    return [p for p in (QEMU, BUSYBOX, "/usr/bin/cpio", "/usr/sbin/modprobe")
            if not os.access(p, os.X_OK)]


def _module_files(release: str) -> list[str]:
    """Module files in load order, dependencies first."""
    out: list[str] = []
    for name in MODULES:
        r = subprocess.run(["modprobe", "-S", release, "--show-depends", name],
                           capture_output=True, text=True, check=True)
        for line in r.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and parts[1] not in out:
                out.append(parts[1])
    return out


def build_initramfs(release: str) -> Path:
    """The initramfs for this kernel, built once per (kernel, init script)
    into CACHE; gzip'd newc cpio of busybox, the modules and the init."""
    init = (HERE / "initramfs_init.sh").read_bytes()
    modules = _module_files(release)
    key = hashlib.sha256(init + release.encode() + "\n".join(modules).encode()).hexdigest()[:16]
    out = CACHE / f"initramfs-{release}-{key}.gz"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        (root / "bin").mkdir(parents=True)
        (root / "modules").mkdir()
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        (root / "init").write_bytes(init)
        os.chmod(root / "init", 0o755)
        for m in modules:
            shutil.copy(m, root / "modules" / os.path.basename(m))
        (root / "modules.order").write_text("".join(os.path.basename(m) + "\n"
                                                    for m in modules))
        part = Path(tmp) / "initramfs.gz"
        with open(part, "wb") as f:
            files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
            cpio.stdout.close()
            cpio.communicate(files)
            if gz.wait() != 0 or cpio.returncode != 0:
                raise VmUnavailable("building the initramfs failed (cpio, gzip)")
        os.replace(part, out)
    return out


class Vm:
    def __init__(self, memory_mb: int = 2048, cpus: int = 2, accel: str | None = None):
        missing = missing_tools()
        if missing:
            raise VmUnavailable(f"missing {', '.join(missing)} (make vm-deps)")
        self.kernel, self.release = find_kernel()
        self.initramfs = build_initramfs(self.release)
        self.memory_mb, self.cpus = memory_mb, cpus
        self.accel = accel or os.environ.get("PRIVBROKER_VM_ACCEL", "tcg")

    def qemu_argv(self, jobdir: Path, cmdline: str) -> list[str]:
        accel = (["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else
                 ["-accel", "tcg,thread=multi", "-cpu", "max"])
        return [QEMU, *accel, "-m", str(self.memory_mb), "-smp", str(self.cpus),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{jobdir}/console.log",
                "-kernel", self.kernel, "-initrd", str(self.initramfs),
                # the host's /, read-only; multidevs=remap: / spans several
                # file systems (/dev/shm, ...), keep their inode numbers apart
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                           "readonly=on,multidevs=remap",
                "-virtfs", f"local,path={jobdir},mount_tag=vmjob,security_model=passthrough",
                "-append", cmdline]

    def run_job(self, job: dict, timeout: float, kernel_args: str = "",
                jobdir: Path | None = None) -> Result:
        """Boot, let the guest do `job` (guest_init.py), wait for it to power
        off (or kill it at `timeout`)."""
        jobdir = Path(jobdir or tempfile.mkdtemp(prefix="privbroker-vm-"))
        jobdir.mkdir(parents=True, exist_ok=True)
        # the checkout (and its ../shared) stay visible where the guest
        # gives itself a fresh /tmp (guest_init.fresh_tmp)
        job = {**job, "keep": [str(REPO), str(REPO.parent / "shared")]}
        (jobdir / "job.json").write_text(json.dumps(job))
        cmdline = (f"console=ttyS0 panic=-1 quiet loglevel=4 "
                   f"vm.init={HERE / 'guest_init.py'} {kernel_args}").strip()
        started = time.monotonic()
        p = subprocess.Popen(self.qemu_argv(jobdir, cmdline), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = p.communicate(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            rc = None
        seconds = time.monotonic() - started
        if out:
            (jobdir / "qemu.log").write_bytes(out)
        console = (jobdir / "console.log").read_text(errors="replace") \
            if (jobdir / "console.log").exists() else ""
        return Result(jobdir, console, seconds, rc)


def main() -> None:
    """python3 tests/vm/harness.py -- ARGV...: run ARGV in the cgroup v2 VM
    (from the checkout), print its output and exit with its status."""
    import sys
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    res = Vm().run_job({"mode": "run", "argv": argv, "cwd": str(REPO)}, timeout=1800)
    print(res.file("output.log") or res.console[-5000:])
    rc = (res.file("rc") or "1").split()[0]
    print(f"vm: {res.seconds:.1f} s, guest exit status {rc}, job dir {res.dir}")
    raise SystemExit(int(rc))


if __name__ == "__main__":
    main()
