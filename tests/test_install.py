"""Installing and operating privbroker as a system service: `make install`
into a temporary DESTDIR and `make uninstall`, the Debian package installed
and removed with dpkg on this machine, the systemd unit (verify and its
exposure score), man pages and bash completions.

The package test changes this machine while it runs (dpkg -i): it is skipped
when a privbroker package is installed already, and purges its package and
removes the user and group it created whatever happens.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from dbus_fixture import PrivateBus, stop_broker

UNIT = ROOT / "systemd" / "privbrokerd.service"
PREFIX = "/usr/local"
VENV = f"{PREFIX}/lib/privbroker/venv"


def make(*args, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def files_under(root: Path) -> set[str]:
    return {"/" + str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() or p.is_symlink()}


# -- make install / make uninstall ---------------------------------------------------

@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    dest = tmp_path_factory.mktemp("destdir")
    make("install", f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    return dest


EXPECTED = {
    f"{PREFIX}/bin/privjail", f"{PREFIX}/bin/privbroker", f"{PREFIX}/sbin/privbrokerd",
    f"{VENV}/bin/privjail", f"{VENV}/bin/privbroker", f"{VENV}/bin/privbrokerd",
    f"{VENV}/pyvenv.cfg",
    "/etc/dbus-1/system.d/org.privbroker.Broker1.conf",     # where dbus-daemon looks
    f"{PREFIX}/share/dbus-1/interfaces/org.privbroker.Broker1.xml",
    f"{PREFIX}/share/dbus-1/system-services/org.privbroker.Broker1.service",
    f"{PREFIX}/lib/systemd/system/privbrokerd.service",
    f"{PREFIX}/lib/sysusers.d/privbroker.conf",
    f"{PREFIX}/share/man/man8/privbrokerd.8", f"{PREFIX}/share/man/man1/privbroker.1",
    f"{PREFIX}/share/man/man1/privjail.1", f"{PREFIX}/share/man/man5/privbroker.toml.5",
    f"{PREFIX}/share/bash-completion/completions/privbroker",
    f"{PREFIX}/share/bash-completion/completions/privjail",
    f"{PREFIX}/share/bash-completion/completions/privbrokerd",
    "/etc/privbroker/broker.toml", "/etc/privbroker/profiles/minimal.conf",
}


def test_install_stages_the_whole_tree(staged):
    got = files_under(staged)
    assert EXPECTED <= got, EXPECTED - got
    # the package itself is in the venv, with its dependencies
    site = next((staged / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    for mod in ("broker/service.py", "broker/jail/launch.py", "client/cli.py",
                "dbus_fast", "prctl.py", "pyudev", "pyseccomp.py"):
        assert (site / mod).exists(), mod
    assert not (site / "pip").exists() and not (site / "setuptools").exists()
    # nothing names the staging directory: the tree works once copied to /
    for f in got:
        p = staged / f.lstrip("/")
        if p.is_file() and not p.is_symlink():
            assert str(staged).encode() not in p.read_bytes(), f
    assert os.readlink(staged / PREFIX.lstrip("/") / "sbin/privbrokerd") == \
        f"{VENV}/bin/privbrokerd"
    script = (staged / VENV.lstrip("/") / "bin/privjail").read_text()
    assert script.startswith(f"#!{VENV}/bin/python\n")
    # config from examples/, the unit pointing at the installed daemon
    assert (staged / "etc/privbroker/broker.toml").read_text() == \
        (ROOT / "examples/broker.toml").read_text()
    unit = (staged / PREFIX.lstrip("/") / "lib/systemd/system/privbrokerd.service").read_text()
    assert re.search(rf"(?m)^ExecStart={PREFIX}/sbin/privbrokerd --launcher-mount-namespace="
                     r"/proc/1/ns/mnt", unit)
    for page in ("man8/privbrokerd.8", "man1/privjail.1", "man5/privbroker.toml.5"):
        text = (staged / PREFIX.lstrip("/") / "share/man" / page).read_text()
        assert text.startswith(".\\\"") or ".TH" in text, page


def test_the_installed_python_runs_from_the_staged_tree(staged):
    """The venv's interpreter is the system's: run the staged package with it
    (its paths point at PREFIX, not at DESTDIR, so use it directly)."""
    site = next((staged / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    r = subprocess.run(["/usr/bin/python3", "-I", "-c",
                        f"import sys; sys.path.insert(0, {str(site)!r}); "
                        "import broker.service, broker.__main__, client.cli, dbus_fast, prctl; "
                        "print(broker.service.VERSION)"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "0.1.0", r.stderr


def test_reinstall_keeps_a_changed_config_and_uninstall_leaves_only_it(tmp_path):
    dest = tmp_path / "d"
    make("install", f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    mine = dest / "etc/privbroker/profiles/minimal.conf"
    mine.write_text(mine.read_text() + "# the administrator's change\n")
    r = make("install", f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    assert "kept your" in r.stderr
    assert mine.read_text().endswith("# the administrator's change\n")
    assert (dest / "etc/privbroker/profiles/minimal.conf.new").read_text() == \
        (ROOT / "examples/profiles/minimal.conf").read_text()
    # an unchanged file is replaced by the shipped one
    assert (dest / "etc/privbroker/broker.toml").read_text() == \
        (ROOT / "examples/broker.toml").read_text()
    make("uninstall", f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    assert files_under(dest) == {"/etc/privbroker/profiles/minimal.conf"}


def test_conffile_helper_never_loses_a_change(tmp_path):
    helper = ROOT / "packaging" / "conffile.sh"
    shipped, pristine, target = tmp_path / "s", tmp_path / "p/pristine", tmp_path / "etc/t"
    shipped.write_text("v1\n")
    subprocess.run(["sh", helper, "install", shipped, pristine, target], check=True)
    assert target.read_text() == "v1\n"
    shipped.write_text("v2\n")           # an upgrade, the file untouched: replaced
    subprocess.run(["sh", helper, "install", shipped, pristine, target], check=True)
    assert target.read_text() == "v2\n"
    target.write_text("mine\n")          # changed, then an upgrade: kept
    shipped.write_text("v3\n")
    subprocess.run(["sh", helper, "install", shipped, pristine, target], check=True)
    assert target.read_text() == "mine\n" and Path(f"{target}.new").read_text() == "v3\n"
    subprocess.run(["sh", helper, "remove", pristine, target], check=True)
    assert target.read_text() == "mine\n" and not Path(f"{target}.new").exists()
    assert not pristine.exists()


# -- man pages and completions ---------------------------------------------------------

def test_privjail_completion_offers_exactly_the_accepted_options():
    from broker.jail.config import OPTIONS
    text = (ROOT / "packaging/bash-completion/privjail").read_text()
    block = re.search(r'local opts="(.*?)"', text, re.S).group(1)
    offered = set(block.split())
    accepted = {("-" if len(k) == 1 else "--") + k for k, o in OPTIONS.items()
                if not o.refused}
    assert offered == accepted


def test_completions_load_in_bash():
    for name in ("privjail", "privbroker", "privbrokerd"):
        path = ROOT / "packaging/bash-completion" / name
        r = subprocess.run(["bash", "-c", f"source {path} && complete -p {name}"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and f"_{name}" in r.stdout, r.stderr
    # privbrokerd's completion offers every option privbrokerd accepts
    from broker.__main__ import main  # noqa: F401
    helptext = subprocess.run([sys.executable, "-m", "broker", "--help"], capture_output=True,
                              text=True, cwd=ROOT).stdout
    accepted = set(re.findall(r"(--[a-z-]+)", helptext))
    text = (ROOT / "packaging/bash-completion/privbrokerd").read_text()
    assert accepted <= set(re.findall(r"(--[a-z-]+)", text))


# -- the systemd unit --------------------------------------------------------------------

def _exposure(unit: Path) -> tuple[float, str]:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, (r.stdout, r.stderr)
    return float(m.group(1)), r.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_exposure_is_under_5_and_is_the_readme_figure(tmp_path):
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text()))
    v = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                       text=True, timeout=60)
    assert v.returncode == 0 and not v.stderr.strip(), v.stderr
    score, report = _exposure(UNIT)
    assert score < 5.0, report
    readme = (ROOT / "README.md").read_text()
    assert f"systemd-analyze security --offline=true systemd/privbrokerd.service`: {score}" \
        in readme, f"README must report {score}"
    assert f"({score} with this file" in UNIT.read_text()


def test_every_capability_the_unit_keeps_has_its_comment():
    text = UNIT.read_text()
    caps = re.search(r"(?m)^CapabilityBoundingSet=(.*)$", text).group(1).split()
    comments = "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
    for cap in caps:
        assert re.search(rf"#\s+{cap}\s+\S", comments), f"{cap} has no comment saying why"


# -- the Debian package --------------------------------------------------------------------

def _installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                       text=True)
    return r.stdout.startswith("install ok installed") or "config-files" in r.stdout


def _exists(kind, name) -> bool:
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
        return True
    except KeyError:
        return False


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a dpkg system")
def test_debian_package_installs_runs_and_removes_cleanly():
    if _installed("privbroker"):
        pytest.skip("a privbroker package is installed on this machine; not touching it")
    had_user, had_group = _exists("user", "privbroker"), _exists("group", "privbroker")
    make("deb")
    debs = sorted((ROOT / "build/deb").glob("privbroker_*.deb"))
    assert len(debs) == 1, debs
    try:
        r = subprocess.run(["dpkg", "-i", str(debs[0])], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert _exists("user", "privbroker") and _exists("group", "privbroker")
        listed = subprocess.run(["dpkg", "-L", "privbroker"], capture_output=True,
                                text=True).stdout.split()
        for path in ("/usr/sbin/privbrokerd", "/usr/bin/privjail",
                     "/usr/share/dbus-1/system.d/org.privbroker.Broker1.conf",
                     "/usr/share/dbus-1/system-services/org.privbroker.Broker1.service",
                     "/usr/share/dbus-1/interfaces/org.privbroker.Broker1.xml",
                     "/usr/lib/sysusers.d/privbroker.conf", "/etc/privbroker/broker.toml",
                     "/usr/share/man/man8/privbrokerd.8.gz"):
            assert path in listed, path
        assert any(p.endswith("systemd/system/privbrokerd.service") for p in listed)
        # nothing was started by the package
        assert subprocess.run(["pgrep", "-f", "/usr/sbin/privbrokerd"]).returncode == 1
        # the installed programs work: a jail, and the broker on a bus loaded
        # with the installed policy, its installed config and interface XML
        r = subprocess.run(["/usr/bin/privjail", "-u", "nobody", "-g", "nogroup", "-n", "--",
                            "/bin/echo", "jailed"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == "jailed\n", r.stderr
        _installed_broker_serves()
        r = subprocess.run(["dpkg", "-r", "privbroker"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        for path in listed:
            if not path.startswith("/etc/") and path not in ("/.",) and \
                    not os.path.isdir(path):
                assert not os.path.lexists(path), f"{path} left after dpkg -r"
        assert not os.path.exists("/usr/lib/privbroker")
        assert os.path.exists("/etc/privbroker/broker.toml")     # conffiles stay until purge
    finally:
        subprocess.run(["dpkg", "--purge", "privbroker"], capture_output=True, timeout=300)
        if not had_user and _exists("user", "privbroker"):
            subprocess.run(["userdel", "privbroker"], capture_output=True)
        if not had_group and _exists("group", "privbroker"):
            subprocess.run(["groupdel", "privbroker"], capture_output=True)
    assert not _installed("privbroker")
    assert not os.path.exists("/etc/privbroker")


def _installed_broker_serves() -> None:
    import tempfile
    installed = tempfile.mkdtemp(prefix="pbpolicy-")
    # the installed bus policy file, not the checkout's
    shutil.copy("/usr/share/dbus-1/system.d/org.privbroker.Broker1.conf", installed)
    with PrivateBus(policy_dir=installed) as bus:
        shutil.rmtree(installed)
        proc = subprocess.Popen(["/usr/sbin/privbrokerd", "--bus-address", bus.address,
                                 "--log-target", "stderr"], cwd="/",
                                stderr=subprocess.PIPE, text=True)
        try:
            env = bus.env(PRIVBROKER_BUS_ADDRESS=bus.address)
            deadline = time.monotonic() + 20
            while True:
                r = subprocess.run(["/usr/bin/privbroker", "status"], capture_output=True,
                                   text=True, env=env, timeout=30)
                if r.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                    break
                time.sleep(0.2)
            if proc.poll() is not None:
                pytest.fail(f"the installed privbrokerd exited {proc.returncode}: "
                            f"{proc.stderr.read()}")
            assert r.returncode == 0, (r.stderr, proc.poll())
            assert "version:    0.1.0" in r.stdout
            r = subprocess.run(["busctl", f"--address={bus.address}", "introspect",
                                "org.privbroker.Broker1", "/org/privbroker/Broker1"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and ".Launch" in r.stdout and ".LiveJails" in r.stdout
            r = subprocess.run(["/usr/bin/privbroker", "run", "minimal", "--", "/bin/echo",
                                "via the installed broker"], capture_output=True, text=True,
                               env=env, timeout=60)
            assert r.returncode == 0 and r.stdout == "via the installed broker\n", r.stderr
        finally:
            stop_broker(proc)
