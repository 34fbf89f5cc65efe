"""Operating the broker: `privbroker status` (D-Bus properties), one log line
per decision, and the launcher in the host's mount namespace while the front
stays in a private one (what systemd/privbrokerd.service sets up).

The broker here is started the way the unit runs it, minus systemd: in a new
mount namespace whose mounts are slaves of ours (systemd's ProtectSystem=
and friends make one like it), with a tmpfs that hides a directory of ours,
and --launcher-mount-namespace naming *our* namespace (the unit names pid
1's).  A jail must see the hidden directory's content; the front must not.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import granted_bus, sample_deployment

BUS_NAME = "org.privbroker.Broker1"
OBJ = "/org/privbroker/Broker1"
CAP_SYS_PTRACE = 19


@pytest.fixture(scope="module")
def deployment():
    d = Path(tempfile.mkdtemp(prefix="privbroker-operate-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    sample_deployment(d)
    hidden = d / "hidden"               # covered by a tmpfs in the front's namespace
    hidden.mkdir()
    (hidden / "marker").write_text("host view\n")
    os.chmod(hidden / "marker", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bus():
    with granted_bus() as b:
        yield b


@pytest.fixture(scope="module")
def broker(bus, deployment):
    log = deployment / "broker.log"
    script = (f"mount -t tmpfs -o size=1m none {deployment / 'hidden'} && "
              f"exec {sys.executable} -m broker --bus-address {bus.address} "
              f"--config {deployment / 'broker.toml'} --log-target stderr "
              f"--launcher-mount-namespace /proc/{os.getpid()}/ns/mnt")
    with open(log, "w") as err:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "slave",
                                 "sh", "-c", script], cwd=ROOT, stderr=err)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if busctl(bus, "status", BUS_NAME).returncode == 0:
            break
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    else:
        pytest.fail(f"privbrokerd did not own its name: {log.read_text()}")
    proc.log = log
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


def busctl(bus, *args):
    return subprocess.run(["busctl", f"--address={bus.address}", *args],
                          capture_output=True, text=True, timeout=30)


def client(bus, *args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "client.cli", "--bus-address", bus.address,
                           *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def _ns(pid) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def _capbnd(pid) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd")


def _front_pid(launcher: int) -> int:
    """privbrokerd's main process is the launcher; the front its one child."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


# -- the launcher in the host's mount namespace ---------------------------------------

def test_launcher_lives_in_the_host_namespace_and_the_front_does_not(broker):
    launcher, front = broker.pid, _front_pid(broker.pid)
    assert _ns(launcher) == _ns("self")
    assert _ns(front) != _ns("self")
    # The front's view is its own: the tmpfs hides the marker there only.
    assert not os.path.exists(f"/proc/{front}/root{broker.log.parent}/hidden/marker")
    assert os.path.exists(f"/proc/{launcher}/root{broker.log.parent}/hidden/marker")


def test_no_broker_process_keeps_cap_sys_ptrace(broker):
    for pid in (broker.pid, _front_pid(broker.pid)):
        assert not _capbnd(pid) & (1 << CAP_SYS_PTRACE), pid


def test_jails_are_built_from_the_host_view_with_umask_0022(bus, broker, deployment):
    r = client(bus, "run", "minimal", "--", "/bin/sh", "-c",
               f"cat {deployment}/hidden/marker; umask")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["host", "view", "0022"]


def test_a_namespace_file_that_is_not_one_is_refused_at_start(bus, deployment):
    r = subprocess.run([sys.executable, "-m", "broker", "--bus-address", bus.address,
                        "--config", str(deployment / "broker.toml"), "--log-target", "stderr",
                        "--launcher-mount-namespace", "/proc/self/ns/net"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2
    assert "/proc/self/ns/net is not a mount namespace file" in r.stderr


# -- status ---------------------------------------------------------------------------

def test_status_counts_calls_refusals_and_live_jails(bus, broker):
    before = json.loads(client(bus, "status", "--json").stdout)
    r = client(bus, "run", "nosuchprofile", "--", "/bin/true")
    assert r.returncode == 1 and "AccessDenied" in r.stderr
    sleeper = subprocess.Popen([sys.executable, "-m", "client.cli", "--bus-address",
                                bus.address, "run", "minimal", "--", "/bin/sleep", "30"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = json.loads(client(bus, "status", "--json").stdout)
            if now["LiveJails"]:
                break
            time.sleep(0.1)
        if sleeper.poll() is not None:      # say why the sleeper's jail is not there
            pytest.fail(f"the sleeper's run ended ({sleeper.returncode}): "
                        f"{sleeper.stderr.read()[-2000:]}; broker log: "
                        f"{broker.log.read_text()[-3000:]}")
        assert now["LiveJails"] == {"0": 1} or now["LiveJails"] == {0: 1}, now
        assert now["Calls"]["Launch"] == before["Calls"].get("Launch", 0) + 2
        assert now["Refusals"]["AccessDenied"] == before["Refusals"].get("AccessDenied", 0) + 1
        assert now["Version"] == "0.1.0" and "landlock_abi" in now["Features"]
        assert now["Uptime"] >= before["Uptime"]
        assert now["LeasesHeld"] == 0 and now["MountsHeld"] == 0
        human = client(bus, "status")
        assert human.returncode == 0
        assert "live jails: 1 (per uid: 0 1)" in human.stdout, human.stdout
        assert "refusals:" in human.stdout and "AccessDenied" in human.stdout
    finally:
        sleeper.kill()
        sleeper.wait()
    # busctl shows the same properties, to anyone
    p = busctl(bus, "get-property", BUS_NAME, OBJ, BUS_NAME, "Refusals")
    assert p.returncode == 0 and "AccessDenied" in p.stdout


def test_mounts_held_counts_store_mount_points(tmp_path):
    from broker.status import store_mounts_held
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 1 0:25 / /run rw shared:5 - tmpfs tmpfs rw\n"
        "40 30 0:25 /ds /run/daemon-store/foo rw shared:9 - tmpfs tmpfs rw\n"
        "41 40 8:1 /h/a /run/daemon-store/foo/" + "a" * 40 + " rw shared:9 - ext4 x rw\n"
        "42 30 8:1 /h/b /run/daemon-store-cache/foo/" + "b" * 40 + " rw - ext4 x rw\n"
        "43 30 8:1 /h/c /run/other/foo/" + "c" * 40 + " rw - ext4 x rw\n")
    assert store_mounts_held(("/run/daemon-store", "/run/daemon-store-cache"), str(info)) == 2


# -- logging ----------------------------------------------------------------------------

def test_one_decision_line_per_call_without_secrets(bus, broker):
    env = dict(os.environ, PRIVBROKER_TEST_SECRET="hunter2-do-not-log")
    r = client(bus, "run", "minimal", "--", "/bin/true", "arg-one", env=env)
    assert r.returncode == 0, r.stderr
    r = client(bus, "run", "ungranted-xyz", "--", "/bin/echo\nfake decision line")
    assert r.returncode == 1
    time.sleep(0.2)
    lines = broker.log.read_text().splitlines()
    allowed = [ln for ln in lines if "method=Launch verdict=allowed" in ln
               and "argv0=/bin/true" in ln]
    assert len(allowed) == 1, lines
    line = allowed[0]
    for part in ("uid=0", "pid=", "sender=:", "profile=minimal", "argc=2", "jail=",
                 "jail_pid="):
        assert part in line, line
    assert re.search(r" pid=[1-9][0-9]* ", line), line    # the caller's process, named
    refused = [ln for ln in lines if "verdict=refused" in ln and "ungranted-xyz" in ln]
    assert len(refused) == 1, lines
    assert "error=AccessDenied" in refused[0] and "reason=" in refused[0]
    assert 'argv0="/bin/echo\\nfake decision line"' in refused[0]
    assert not any(ln.startswith("fake decision line") for ln in lines)
    text = broker.log.read_text()
    assert "hunter2" not in text and "arg-one" not in text


def test_quote_escapes_what_could_forge_a_line():
    from broker.logs import quote
    assert quote("minimal") == "minimal"
    assert quote("a b") == '"a b"'
    assert quote('x" verdict=allowed') == '"x\\" verdict=allowed"'
    assert quote("x\ny") == '"x\\ny"'
    assert quote("é") == '"\\xe9"'
    assert len(quote("z" * 1000)) < 220


def test_journal_target_writes_syslog_datagrams(tmp_path):
    """--log-target journal: RFC 3164-style datagrams on /dev/log (here a
    socket of the test's, at the path the module is told)."""
    import socket
    path = tmp_path / "log"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    code = ("import logging, broker.logs as L; L.SYSLOG_SOCKET = %r; "
            "print(L.setup('info', 'journal')); "
            "L.decision(logging.INFO, 'Launch', 'refused', kind='AccessDenied', reason='no grant')"
            % str(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "journal", r.stderr
    s.settimeout(5)
    data = s.recv(4096).decode()
    s.close()
    # <30> = facility daemon (3) * 8 + priority info (6)
    assert data.startswith("<30>privbrokerd[") and "decision method=Launch" in data, data
