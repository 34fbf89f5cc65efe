"""Shared test helpers: run privjail on the probe and read what it saw."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"          # the project's shared/ sits beside the checkout


def _install_probe() -> Path:
    """Copy the probe where every uid can read it and no jail's tmpfs /tmp
    covers it (the checkout may be under /tmp, or under a 0700 home)."""
    import atexit
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="privbroker-probe-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    shutil.copy(ROOT / "tests" / "probe.py", d / "probe.py")
    os.chmod(d / "probe.py", 0o644)
    atexit.register(shutil.rmtree, d, True)
    return d


PROBE_DIR = _install_probe()
PROBE = str(PROBE_DIR / "probe.py")
# The probe runs as other uids inside jails: use the system interpreter,
# which every uid can execute (a pyenv or venv under /root may not be).
JAIL_PYTHON = "/usr/bin/python3"
PRIVJAIL = [sys.executable, "-m", "broker.jail.cli"]


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str

    @property
    def reports(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    @property
    def report(self) -> dict:
        assert self.reports, f"no probe report; rc={self.rc} stderr={self.stderr!r}"
        return self.reports[0]


def privjail(*flags: str, program: list[str] | None = None, probe_args=(), timeout=60,
             allow_forbidden: bool = True, **popen_kw) -> Run:
    """Run privjail FLAGS -- PROGRAM (the probe by default).

    Most tests study one flag at a time, as root, and so build jails in the
    forbidden intersection: they pass --allow-forbidden-intersection unless
    asked not to (test_exposure_cli.py tests the refusal itself)."""
    if program is None:
        program = [JAIL_PYTHON, PROBE, *probe_args]
    if allow_forbidden:
        flags = ("--allow-forbidden-intersection", *flags)
    p = subprocess.run([*PRIVJAIL, *flags, "--", *program], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, **popen_kw)
    return Run(p.returncode, p.stdout, p.stderr)


def host_ns(name: str) -> int:
    return os.stat(f"/proc/self/ns/{name}").st_ino


def mount_table() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f)


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.fixture
def world_tmp():
    """A directory every uid can reach (pytest's tmp_path is under a 0700
    directory) and outside /tmp (which jails often cover with a tmpfs)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="privbroker-test-", dir="/var/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _require_root():
    if os.geteuid() != 0:
        pytest.skip("the jail tests need root", allow_module_level=True)


@pytest.fixture(scope="session", autouse=True)
def privbroker_group(_require_root):
    """The group the sample policy grants (examples/broker.toml), for the whole
    session: module fixtures that would add and remove it then leave it be,
    so no test depends on which module ran before it."""
    from dbus_fixture import ensure_group, ensure_front_user
    gid, created = ensure_group("privbroker")
    user_created = ensure_front_user("privbroker", gid)   # privbrokerd's front runs as it
    yield gid
    if user_created:
        subprocess.run(["userdel", "privbroker"], capture_output=True)
    if created:
        subprocess.run(["groupdel", "privbroker"], capture_output=True)


@pytest.fixture(scope="session")
def throwaway_user():
    """A real user with a supplementary group, created for the session and
    removed after it: (name, uid, primary gid, supplementary gid)."""
    import grp
    import pwd
    tag = f"pbt{os.getpid()}"
    subprocess.run(["groupadd", f"{tag}x"], check=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", "--groups", f"{tag}x", tag], check=True)
    try:
        pw = pwd.getpwnam(tag)
        yield tag, pw.pw_uid, pw.pw_gid, grp.getgrnam(f"{tag}x").gr_gid
    finally:
        subprocess.run(["userdel", tag], check=False)
        subprocess.run(["groupdel", f"{tag}x"], check=False)
