"""What the escape suite needs on the host: the attack program (attacks.c,
built static), setuid-root and file-capability copies of it, secrets the
jail must not read, victim processes it must not see, listeners it must not
reach; and how to run an attack in a jail and read what it reported.

The programs live under /var/tmp/privbroker-escape-*/bin, which jails see
through minimalistic-mountns's read-only bind of /.  filtered.conf's
Landlock rules do not cover it, so attacks under filtered.conf add one
--fs-path-rx rule for that bin directory (and nothing else): the program
must be executable for the attack to run at all.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROFILES = ROOT / "examples" / "profiles"
PRIVJAIL = [sys.executable, "-m", "broker.jail.cli"]
NOBODY, NOGROUP = 65534, 65534
SIGSYS_STATUS = 128 + signal.SIGSYS     # a seccomp kill, as privjail reports it


@dataclass
class Report:
    """What one attack printed: the line before its decisive syscall, the
    outcome line (None if it was killed), and how the jail ended."""
    rc: int
    trying: dict | None
    outcome: dict | None
    stdout: str
    stderr: str

    @classmethod
    def parse(cls, rc: int, stdout: str, stderr: str) -> "Report":
        lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
        trying = next((x for x in lines if x.get("stage") == "trying"), None)
        outcome = next((x for x in lines if "escaped" in x), None)
        return cls(rc, trying, outcome, stdout, stderr)

    def __str__(self):
        return f"rc={self.rc} stdout={self.stdout!r} stderr={self.stderr[-800:]!r}"


@dataclass
class Kit:
    dir: Path
    bin: Path            # the attack program
    suid: Path           # a setuid-root copy
    fcap: Path           # a copy with file capabilities (dac_override, sys_admin)
    outside: Path        # world-readable and world-writable, outside Landlock's rules
    outside_secret: str
    tmp_secret_path: Path   # in the host's /tmp, which jails cover with a tmpfs
    tmp_secret: str
    victim: subprocess.Popen   # a host process of the jail's own uid
    victim_marker: str
    abstract_name: str   # a host abstract unix socket: "@name"
    abstract: socket.socket
    tmp_unix_path: Path  # a host unix socket under /tmp
    tmp_unix: socket.socket
    tcp: socket.socket   # a host TCP listener on 0.0.0.0
    host_ip: str         # a non-loopback address of the host, or 127.0.0.1
    cleanup: list = field(default_factory=list)

    @property
    def tcp_port(self) -> int:
        return self.tcp.getsockname()[1]

    def nothing_accepted(self) -> bool:
        """No jail ever connected to any of the host listeners."""
        for s in (self.abstract, self.tmp_unix, self.tcp):
            s.setblocking(False)
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                continue
            conn.close()
            return False
        return True


def _as_nobody():
    os.setgroups([])
    os.setgid(NOGROUP)
    os.setuid(NOBODY)


def _host_ip() -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout.split()
    return next((w.split("/")[0] for i, w in enumerate(out) if out[i - 1] == "inet"),
                "127.0.0.1") if out else "127.0.0.1"


def build_kit() -> Kit:
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to build the attack program (make test installs it)")
    d = Path(tempfile.mkdtemp(prefix="privbroker-escape-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    (d / "bin").mkdir(mode=0o755)
    exe = d / "bin" / "attacks"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(HERE / "attacks.c")],
                   check=True, capture_output=True)
    suid = d / "bin" / "attacks-suid"
    shutil.copy(exe, suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    fcap = d / "bin" / "attacks-fcap"
    shutil.copy(exe, fcap)
    subprocess.run(["setcap", "cap_dac_override,cap_sys_admin+ep", str(fcap)], check=True)
    outside = d / "outside"
    outside.mkdir()
    os.chmod(outside, 0o777)
    outside_secret = secrets.token_hex(8)
    (outside / "secret").write_text(outside_secret)
    os.chmod(outside / "secret", 0o644)
    tmp_secret = secrets.token_hex(8)
    fd, tmp_secret_path = tempfile.mkstemp(prefix="privbroker-escape-secret-", dir="/tmp")
    os.write(fd, tmp_secret.encode())
    os.close(fd)
    os.chmod(tmp_secret_path, 0o644)
    marker = f"victim-{secrets.token_hex(6)}"
    victim = subprocess.Popen([str(exe), "sleeper", marker], preexec_fn=_as_nobody)
    abstract_name = f"privbroker-escape-{secrets.token_hex(6)}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen(8)
    tmp_unix_path = Path(tempfile.mkdtemp(prefix="pbesc-", dir="/tmp")) / "sock"
    os.chmod(tmp_unix_path.parent, 0o755)
    tmp_unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp_unix.bind(str(tmp_unix_path))
    os.chmod(tmp_unix_path, 0o777)
    tmp_unix.listen(8)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 0))
    tcp.listen(8)
    return Kit(d, exe, suid, fcap, outside, outside_secret, Path(tmp_secret_path), tmp_secret,
               victim, marker, "@" + abstract_name, abstract, tmp_unix_path, tmp_unix, tcp,
               _host_ip())


def destroy_kit(kit: Kit) -> None:
    kit.victim.kill()
    kit.victim.wait()
    for s in (kit.abstract, kit.tmp_unix, kit.tcp):
        s.close()
    kit.tmp_secret_path.unlink(missing_ok=True)
    shutil.rmtree(kit.tmp_unix_path.parent, ignore_errors=True)
    shutil.rmtree(kit.dir, ignore_errors=True)


def privjail_argv(kit: Kit, profile: str, attack: list[str], flags=()) -> list[str]:
    """privjail --config PROFILE -u nobody -g nogroup [FLAGS] -- attacks ATTACK..."""
    extra = ["--fs-path-rx", str(kit.bin.parent)] if profile == "filtered" else []
    return [*PRIVJAIL, "--config", str(PROFILES / f"{profile}.conf"), *extra, *flags,
            "-u", "nobody", "-g", "nogroup", "--", str(kit.bin), *attack]


def run_in_jail(kit: Kit, profile: str, attack: list[str], flags=(), timeout=60,
                **popen_kw) -> Report:
    popen_kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.run(privjail_argv(kit, profile, attack, flags), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, **popen_kw)
    return Report.parse(p.returncode, p.stdout, p.stderr)


def run_on_host_as_nobody(kit: Kit, attack: list[str]) -> Report:
    """The same program outside any jail (no no_new_privs): the control that
    shows an attack would work where the jail's defence is missing."""
    p = subprocess.run([str(kit.bin), *attack], capture_output=True, text=True, timeout=30,
                       preexec_fn=_as_nobody)
    return Report.parse(p.returncode, p.stdout, p.stderr)


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def gone_within(marker: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
