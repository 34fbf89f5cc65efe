"""privjail's modes: the forbidden-intersection refusal, --explain, --dry-run;
and `privbroker explain`.  Each is run as the real command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PRIVJAIL, ROOT, SHARED, privjail

CORPUS_CONF = sorted((SHARED / "corpus" / "chromeos" / "minijail-conf").glob("*.conf"))


def pj(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PRIVJAIL, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


# -- the forbidden intersection ----------------------------------------------------

def test_a_root_jail_without_escapes_is_refused_and_nothing_runs(world_tmp):
    marker = world_tmp / "ran"
    r = privjail("-n", program=["/bin/touch", str(marker)], allow_forbidden=False)
    assert r.rc == 1 and not marker.exists()
    assert "forbidden intersection" in r.stderr
    for needed in ("a non-root uid (-u)", "a mount and a pid namespace (-v -p)",
                   "a seccomp policy (-S) and Landlock rules"):
        assert needed in r.stderr, r.stderr


def test_allowing_it_runs_the_jail_with_a_warning(world_tmp):
    marker = world_tmp / "ran"
    r = privjail("-n", program=["/bin/touch", str(marker)], allow_forbidden=True)
    assert r.rc == 0 and marker.exists()
    assert "warning: this jail is in the forbidden intersection" in r.stderr


@pytest.mark.parametrize("escape", [["-u", "nobody"], ["-p"],
                                    ["-S", str(ROOT / "examples" / "profiles" /
                                               "coreutils.policy"),
                                     "--fs-default-paths"]])
def test_any_one_escape_is_enough(escape):
    r = privjail("-n", *escape, program=["/bin/true"], allow_forbidden=False)
    assert r.rc == 0, r.stderr
    assert "forbidden" not in r.stderr


def test_explain_reports_and_launches_nothing(world_tmp):
    r = pj("--explain", "-n", "--", "/bin/touch", str(world_tmp / "ran"))
    assert r.returncode == 0 and not (world_tmp / "ran").exists()
    assert "forbidden intersection: YES" in r.stdout
    assert "exposure:" in r.stdout and "add first:" in r.stdout
    ok = pj("--explain", "--config", str(ROOT / "examples" / "profiles" / "filtered.conf"),
            "-u", "nobody")
    assert ok.returncode == 0
    assert "forbidden intersection: no" in ok.stdout
    assert ok.stdout.count(" yes  ") == 3            # all three escapes


# -- --dry-run -----------------------------------------------------------------------

def test_dry_run_prints_the_spec_and_launches_nothing(world_tmp):
    r = pj("--dry-run", "-p", "-n", "-u", "nobody", "--", "/bin/touch", str(world_tmp / "x"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["warnings"] == []
    spec = out["spec"]
    assert spec["uid"] == 65534 and spec["no_new_privs"] is True
    assert set(spec["namespaces"]) == {"pid", "mount"}
    assert spec["argv"] == ["/bin/touch", str(world_tmp / "x")]
    assert not (world_tmp / "x").exists()


def test_dry_run_lists_host_problems_that_a_launch_refuses(world_tmp):
    bad_policy = world_tmp / "bad.policy"
    bad_policy.write_text("read: 1\nfrobnicate: 1\n")
    args = ["-v", "-u", "no-such-user-here", "-g", "no-such-group-here",
            "-b", "/no/such/source,/x", "-P", "/no/such/root", "-S", str(bad_policy)]
    r = pj("--dry-run", *args)
    assert r.returncode == 0, r.stderr
    warnings = "\n".join(json.loads(r.stdout)["warnings"])
    for what in ("unknown user 'no-such-user-here'", "unknown group 'no-such-group-here'",
                 "/no/such/source", "/no/such/root", "frobnicate"):
        assert what in warnings and what in r.stderr, what
    launch = pj(*args, "--", "/bin/true")
    assert launch.returncode == 1 and "unknown user 'no-such-user-here'" in launch.stderr


def test_modes_are_refused_in_config_files(world_tmp):
    conf = world_tmp / "x.conf"
    conf.write_text("% minijail-config-file v0\nallow-forbidden-intersection\n")
    r = pj("--config", str(conf), "--", "/bin/true")
    assert r.returncode == 1
    assert f"{conf}:2: option --allow-forbidden-intersection: a mode of the privjail " \
           f"command" in r.stderr


def test_no_program_is_an_error_outside_dry_run_and_explain():
    r = pj("-p")
    assert r.returncode == 1 and "no program" in r.stderr


def test_the_whole_corpus_dry_runs_or_is_refused_by_name():
    """Every corpus config file, unchanged: a spec, with host problems as
    warnings.  (A refusal would name the option; none is left.)"""
    assert len(CORPUS_CONF) == 67
    refused = {}
    for conf in CORPUS_CONF:
        r = pj("--dry-run", "--config", str(conf))
        if r.returncode == 0:
            out = json.loads(r.stdout)
            assert out["spec"]["argv"] == [], conf.name
        else:
            assert r.returncode == 1 and "Traceback" not in r.stderr, (conf.name, r.stderr)
            refused[conf.name] = r.stderr.split(": option ", 1)[1].split(" (")[0]
    assert refused == {}


# -- privbroker explain ------------------------------------------------------------------

def test_privbroker_explain_profiles():
    # The sample policy names group privbroker; test_install's package purge
    # removes the privbroker user, and with it a group of that name.
    from dbus_fixture import ensure_group
    ensure_group("privbroker")
    cmd = [sys.executable, "-m", "client.cli", "explain", "--config",
           str(ROOT / "examples" / "broker.toml")]
    ok = subprocess.run([*cmd, "filtered", "--uid", "1000", "--json"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["forbidden_intersection"]["forbidden"] is False
    assert data["seccomp"]["enforcing"] and data["landlock"]["enforced"]
    missing = subprocess.run([*cmd, "no-such-profile"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "no-such-profile" in missing.stderr
    bad = subprocess.run([*cmd, "../../etc/passwd"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
