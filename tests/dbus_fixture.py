"""A private, system-style D-Bus daemon for tests, and helpers to act as
other users against it.

    with PrivateBus() as bus:           # loads dbus-policy/*.conf from this checkout
        run_as(65534, 65534, [], ["busctl", f"--address={bus.address}", "introspect", ...])

The bus mirrors the well-known system bus (Debian's
/usr/share/dbus-1/system.conf): <type>system</type>, EXTERNAL authentication
only, the same default policy (everyone may connect; nobody may own a name or
send a method call unless a policy file punches a hole; signals and requested
replies allowed), and an <includedir> with a *copy* of the project's
dbus-policy/ directory, so the tests exercise exactly the file that ships.
The default-context and root policies are copied from the installed
system.conf when there is one (so the tests follow what the machine's system
bus would do), otherwise from a built-in copy of Debian 12's.

The daemon runs as root (the real one runs as messagebus; policy evaluation
does not depend on it) and listens on a unix socket in a 0755 temporary
directory; dbus-daemon makes the socket 0777 itself, so every uid can
connect.

Group membership, as dbus-daemon 1.14 sees it: the groups of the connecting
process (gid + supplementary groups, read from the kernel with SO_PEERCRED /
SO_PEERGROUPS at connect time), not the user database. So run_as(...,
groups=[gid]) alone makes a process a member for the bus's purposes, and a
user listed in /etc/group whose process dropped the group is not one.

Not a conftest: the tests import what they use from here.
"""
from __future__ import annotations

import contextlib

import grp
import pwd
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
POLICY_DIR = ROOT / "dbus-policy"
SYSTEMD_DIR = ROOT / "systemd"
SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")

BUS_NAME = "org.privbroker.Broker1"
OBJECT_PATH = "/org/privbroker/Broker1"
INTERFACE = "org.privbroker.Broker1"

_DOCTYPE = ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n')

# Debian 12 (dbus 1.14) system.conf, policies only: used when the machine has
# no system.conf to copy them from.
_DEBIAN12_POLICIES = """
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Containers1"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
"""


def system_conf_policies(path: Path = SYSTEM_CONF) -> str:
    """The <policy> and <limit> elements of the installed system.conf, as XML
    text; the built-in Debian 12 copy when there is no such file. Everything
    else in system.conf (user, fork, pidfile, listen, service helper,
    includes) is what PrivateBus replaces with its own."""
    if not path.exists():
        return _DEBIAN12_POLICIES
    tree = ET.parse(path)
    parts = [ET.tostring(el, encoding="unicode")
             for el in tree.getroot() if el.tag in ("policy", "limit")]
    return "\n".join(parts)


class BusError(RuntimeError):
    pass


class PrivateBus:
    """A system-style dbus-daemon in a temporary directory (context manager).

    policy_dir:   directory whose *.conf files are copied into the bus's
                  <includedir> (default: this checkout's dbus-policy/)
    extra_policy: {file name: busconfig XML} added to that includedir, as a
                  deployment's drop-ins in /etc/dbus-1/system.d would be
    service_dir:  optional directory of D-Bus activation (.service) files

    Attributes once entered: address, socket_path, config_path, tmpdir, pid.
    """

    def __init__(self, policy_dir: Path | str = POLICY_DIR,
                 extra_policy: Mapping[str, str] | None = None,
                 service_dir: Path | str | None = None,
                 timeout: float = 10.0):
        self.policy_dir = Path(policy_dir)
        self.extra_policy = dict(extra_policy or {})
        self.service_dir = Path(service_dir) if service_dir else None
        self.timeout = timeout
        self.tmpdir: Path | None = None
        self.address: str | None = None
        self.proc: subprocess.Popen | None = None

    # -- configuration ---------------------------------------------------
    def _write_config(self) -> Path:
        assert self.tmpdir is not None
        confd = self.tmpdir / "system.d"
        confd.mkdir()
        for f in sorted(self.policy_dir.glob("*.conf")):
            shutil.copy(f, confd / f.name)
        for name, text in self.extra_policy.items():
            if "/" in name or not name.endswith(".conf"):
                raise ValueError(f"drop-in name {name!r}: a plain file name ending in .conf")
            (confd / name).write_text(text)
        servicedir = ""
        if self.service_dir is not None:
            sd = self.tmpdir / "system-services"
            shutil.copytree(self.service_dir, sd)
            servicedir = f"  <servicedir>{sd}</servicedir>\n"
        self.socket_path = self.tmpdir / "system_bus_socket"
        config = (
            '<?xml version="1.0" encoding="UTF-8"?>\n' + _DOCTYPE +
            "<busconfig>\n"
            "  <type>system</type>\n"
            "  <auth>EXTERNAL</auth>\n"
            f"  <listen>unix:path={self.socket_path}</listen>\n"
            f"{servicedir}"
            f"{system_conf_policies()}\n"
            f"  <includedir>{confd}</includedir>\n"
            "</busconfig>\n")
        path = self.tmpdir / "system.conf"
        path.write_text(config)
        return path

    # -- lifetime ----------------------------------------------------------
    def __enter__(self) -> "PrivateBus":
        dbus_daemon = shutil.which("dbus-daemon")
        if dbus_daemon is None:
            raise BusError("dbus-daemon is not installed (Debian: apt-get install dbus)")
        # Short path (sun_path is 108 bytes), reachable by every uid.
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pbbus-", dir="/tmp"))
        try:
            os.chmod(self.tmpdir, 0o755)
            self.config_path = self._write_config()
            self.log_path = self.tmpdir / "dbus-daemon.log"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [dbus_daemon, f"--config-file={self.config_path}", "--nofork",
                     "--nopidfile", "--nosyslog", "--print-address=1"],
                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                    close_fds=True)
            self.pid = self.proc.pid
            self.address = self._read_address()
        except BaseException:
            self._stop()
            raise
        return self

    def _read_address(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(f"dbus-daemon printed no address in {self.timeout}s; "
                               f"log: {self.log()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise BusError(f"dbus-daemon exited with {self.proc.returncode}: "
                                   f"{self.log()}")
                buf += chunk
        return buf.split(b"\n", 1)[0].decode().strip()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def env(self, **extra: str) -> dict[str, str]:
        """A minimal environment for a client of this bus (any uid)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/",
               "LANG": "C.UTF-8", "DBUS_SYSTEM_BUS_ADDRESS": self.address or "",
               "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "NO_COLOR": "1"}
        env.update(extra)
        return env


# -- acting as another user ----------------------------------------------

def run_as(uid: int, gid: int, groups: Sequence[int], argv: Sequence[str],
           env: Mapping[str, str] | None = None, timeout: float = 30,
           **kw) -> subprocess.CompletedProcess:
    """Run argv as uid/gid with exactly these supplementary groups (an empty
    list drops them all). The child does setgroups(groups), setregid(gid,
    gid), setreuid(uid, uid) before exec: subprocess's user=/group=/
    extra_groups= do that in C, which unlike a preexec_fn is safe in a
    threaded process. Returns the CompletedProcess (text mode, output
    captured); never raises on a non-zero exit."""
    return subprocess.run(list(argv), env=dict(env) if env is not None else None,
                          capture_output=True, text=True, timeout=timeout,
                          **_identity(uid, gid, groups), **kw)


def popen_as(uid: int, gid: int, groups: Sequence[int], argv: Sequence[str],
             env: Mapping[str, str] | None = None, **kw) -> subprocess.Popen:
    """Like run_as, but returns the Popen (for long-running clients)."""
    kw.setdefault("text", True)
    return subprocess.Popen(list(argv), env=dict(env) if env is not None else None,
                            **_identity(uid, gid, groups), **kw)


def _identity(uid: int, gid: int, groups: Sequence[int]) -> dict:
    # extra_groups must be a list, never None: None would leave the child
    # with root's supplementary groups.
    return {"user": uid, "group": gid, "extra_groups": list(groups)}


# -- users and groups ----------------------------------------------------

def ensure_group(name: str = "privbroker") -> tuple[int, bool]:
    """Make sure the system group exists (groupadd --system NAME).
    Returns (gid, created): created is True only if this call added it, so
    the caller knows whether to remove it again (remove_group)."""
    try:
        return grp.getgrnam(name).gr_gid, False
    except KeyError:
        pass
    p = subprocess.run(["groupadd", "--system", name], capture_output=True, text=True)
    if p.returncode == 9:            # created concurrently by someone else
        return grp.getgrnam(name).gr_gid, False
    if p.returncode != 0:
        raise RuntimeError(f"groupadd --system {name}: {p.stderr.strip()}")
    return grp.getgrnam(name).gr_gid, True


def ensure_front_user(name: str, gid: int) -> bool:
    """Make sure the system user privbrokerd's front drops to exists (the
    install step's job on a real system).  True if this call created it."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    p = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--gid", str(gid), name],
                       capture_output=True, text=True)
    if p.returncode == 9:            # created concurrently by someone else
        return False
    if p.returncode != 0:
        raise RuntimeError(f"useradd --system {name}: {p.stderr.strip()}")
    return True


def ensure_front_identity(name: str = "privbroker") -> None:
    """The group and system user privbrokerd needs before it starts (its
    front drops to the user; the sample config grants the group).  For the
    benches, which start a broker on a machine the tests may not have
    touched yet; they are left in place, as an install would."""
    gid, _ = ensure_group(name)
    ensure_front_user(name, gid)


def remove_group(name: str) -> None:
    subprocess.run(["groupdel", name], capture_output=True)


@contextlib.contextmanager
def granted_bus(group: str = "privbroker"):
    """A private bus, and the group the sample policy grants (added for the
    while if it was missing): the broker tests' `bus` fixture."""
    _, created = ensure_group(group)
    try:
        with PrivateBus() as b:
            yield b
    finally:
        if created:
            remove_group(group)


_counter = 0


class ThrowawayUser:
    """A real user in the user database, removed on exit (context manager).

        with ThrowawayUser(groups=["privbroker"]) as u:
            u.name, u.uid, u.gid, u.groups   # groups: supplementary gids

    The user has its own primary group (useradd --user-group), no home and
    no login shell; `groups` are supplementary groups in /etc/group.
    """

    def __init__(self, groups: Sequence[str] = (), prefix: str = "pbbus"):
        global _counter
        _counter += 1
        self.name = f"{prefix}{os.getpid()}x{_counter}"[:32]
        self.group_names = list(groups)

    def __enter__(self) -> "ThrowawayUser":
        import pwd
        argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                "--user-group"]
        if self.group_names:
            argv += ["--groups", ",".join(self.group_names)]
        p = subprocess.run([*argv, self.name], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"useradd {self.name}: {p.stderr.strip()}")
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.groups = [grp.getgrnam(g).gr_gid for g in self.group_names]
        return self

    def __exit__(self, *exc) -> None:
        # userdel also removes the user's own group (USERGROUPS_ENAB).
        subprocess.run(["userdel", self.name], capture_output=True)
        try:
            grp.getgrnam(self.name)
        except KeyError:
            pass
        else:
            remove_group(self.name)

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            groups: Sequence[int] | None = None, **kw) -> subprocess.CompletedProcess:
        """Run as this user with its database groups (or the given ones)."""
        return run_as(self.uid, self.gid, self.groups if groups is None else groups,
                      argv, env, **kw)


NOBODY_UID = 65534
NOGROUP_GID = 65534


def extract_dropin_example(conf_text: str) -> str:
    """The drop-in example shown in the policy file's leading comment: the
    first complete '<!DOCTYPE busconfig ... </busconfig>' inside a comment."""
    for comment in re.findall(r"<!--(.*?)-->", conf_text, flags=re.S):
        m = re.search(r"<!DOCTYPE busconfig.*?</busconfig>", comment, flags=re.S)
        if m:
            return m.group(0)
    raise ValueError("no drop-in example found in the policy file's comments")


BROKER_NAME = "org.privbroker.Broker1"


SAMPLE_JOURNAL = 'journal = "/var/lib/privbroker/device-leases.journal"'


def sample_policy(d: Path) -> str:
    """examples/broker.toml with its lease journal under d: one broker per
    journal (a second one exits), and a test's broker must neither wait for
    nor replay an installed privbrokerd's journal."""
    toml = (ROOT / "examples" / "broker.toml").read_text()
    assert SAMPLE_JOURNAL in toml, "examples/broker.toml's journal line changed"
    return toml.replace(SAMPLE_JOURNAL, f'journal = "{d}/state/device-leases.journal"')


def sample_deployment(d: Path) -> Path:
    """The sample deployment (examples/broker.toml and its profiles) in d,
    with a journal of its own (sample_policy); returns the config's path."""
    shutil.copytree(ROOT / "examples" / "profiles", d / "profiles")
    (d / "broker.toml").write_text(sample_policy(d))
    return d / "broker.toml"


def start_broker(bus: "PrivateBus", config, log, wrap=None, args: Sequence[str] = (),
                 timeout: float = 15) -> subprocess.Popen:
    """privbrokerd on `bus` with `config`, its log appended to the file `log`
    (a pipe nobody drains would stop it once full, ~64 KiB of lines), once it
    owns its name.  `wrap(argv)`: the command that runs argv (unshare, a
    cgroup); `args`: more privbrokerd options."""
    argv = [sys.executable, "-m", "broker", "--bus-address", bus.address,
            "--config", str(config), *args]
    root = Path(__file__).resolve().parent.parent
    with open(log, "ab") as f:
        proc = subprocess.Popen(wrap(argv) if wrap else argv, cwd=root, stderr=f)
    deadline = time.monotonic() + timeout
    while subprocess.run(["busctl", f"--address={bus.address}", "status", BROKER_NAME],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_broker(proc)
            raise AssertionError(f"privbrokerd did not own its name: "
                                 f"{Path(log).read_text()[-3000:]}")
        time.sleep(0.1)
    return proc


def stop_broker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
