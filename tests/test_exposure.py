"""The forbidden intersection and the exposure score, decided from a JailSpec.

Pure: no processes, no syscalls.  Each test names the side of the boundary
it is on."""
from __future__ import annotations

import dataclasses

import pytest

from broker.jail.exposure import (ALL_CAPS, CAP_SYS_ADMIN, MAX_WEIGHT, WEAKNESSES, cap_names,
                                  check_forbidden_intersection, escapes, explain, explain_data,
                                  privilege)
from broker.jail.spec import Bind, FsRule, IdMap, JailSpec

SYS_ADMIN = 1 << CAP_SYS_ADMIN
NET_ADMIN = 1 << 12
LL = (FsRule("/usr", "rx"), FsRule("/tmp", "rw"))

BARE = JailSpec(argv=("/bin/true",))                     # root launcher, nothing else
NON_ROOT = dataclasses.replace(BARE, uid=1000, gid=1000)             # escape (1) alone
NAMESPACED = dataclasses.replace(BARE, namespaces=frozenset({"pid", "mount"}))  # (2) alone
FILTERED = dataclasses.replace(BARE, seccomp_policy="read: 1\n", landlock=LL)   # (3) alone
ALL_THREE = dataclasses.replace(
    BARE, uid=1000, gid=1000, capabilities=0, no_new_privs=True,
    namespaces=frozenset({"pid", "mount", "net", "ipc", "uts", "cgroup"}),
    seccomp_policy="read: 1\n", landlock=LL, mount_dev=True, tmpfs_tmp_size=0,
    remount_proc_ro=True, pivot_root="/var/empty", mounts=(Bind("/", "/"),))


def spec(**kw) -> JailSpec:
    return dataclasses.replace(BARE, **kw)


# -- the rule itself ----------------------------------------------------------

def test_bare_root_jail_is_forbidden():
    v = check_forbidden_intersection(BARE)
    assert v.forbidden
    assert not (v.non_root.present or v.namespaces.present or v.filters.present)
    assert v.host_uid == 0 and v.cap_sys_admin
    m = v.missing()
    assert "-u" in m and "-v -p" in m and "-S" in m and "--fs-path" in m


@pytest.mark.parametrize("name,s,which", [
    ("non-root", NON_ROOT, "non_root"),
    ("mount+pid namespaces", NAMESPACED, "namespaces"),
    ("seccomp+landlock", FILTERED, "filters"),
])
def test_each_escape_alone_is_enough(name, s, which):
    v = check_forbidden_intersection(s)
    assert not v.forbidden, name
    assert v.missing() == ""
    present = {k for k in ("non_root", "namespaces", "filters") if getattr(v, k).present}
    assert present == {which}


def test_all_three_escapes():
    v = check_forbidden_intersection(ALL_THREE)
    assert not v.forbidden
    assert v.non_root.present and v.namespaces.present and v.filters.present


def test_launcher_uid_counts_when_spec_sets_none():
    assert not check_forbidden_intersection(BARE, launcher_uid=1000).forbidden
    assert check_forbidden_intersection(spec(uid=0), launcher_uid=1000).forbidden


# -- capabilities -------------------------------------------------------------

def test_root_with_mask_without_sys_admin_is_still_root():
    # Dropping CAP_SYS_ADMIN is not enough while the uid is 0: "root OR CAP_SYS_ADMIN".
    v = check_forbidden_intersection(spec(capabilities=NET_ADMIN))
    assert v.forbidden and not v.cap_sys_admin
    assert "host root" in v.non_root.reason


def test_non_root_with_sys_admin_in_mask_but_no_ambient_keeps_nothing():
    s = spec(uid=1000, capabilities=SYS_ADMIN | NET_ADMIN)
    assert privilege(s).caps == 0
    v = check_forbidden_intersection(s)
    assert not v.forbidden and not v.cap_sys_admin


def test_non_root_with_ambient_cap_sys_admin_is_forbidden():
    v = check_forbidden_intersection(spec(uid=1000, capabilities=SYS_ADMIN, ambient=True))
    assert v.forbidden and v.cap_sys_admin
    assert "CAP_SYS_ADMIN" in v.non_root.reason
    assert "capability mask without CAP_SYS_ADMIN" in v.missing()


def test_non_root_with_ambient_mask_without_sys_admin_escapes():
    v = check_forbidden_intersection(spec(uid=1000, capabilities=NET_ADMIN, ambient=True))
    assert not v.forbidden and v.non_root.present


def test_root_unchanged_caps_means_all():
    p = privilege(BARE)
    assert p.caps == ALL_CAPS and p.host_cap_sys_admin


# -- namespaces ---------------------------------------------------------------

def test_pid_namespace_alone_is_not_enough():
    v = check_forbidden_intersection(spec(namespaces=frozenset({"pid"})))
    assert v.forbidden
    assert "mount namespace (-v)" in v.missing()


def test_mount_namespace_alone_is_not_enough():
    assert check_forbidden_intersection(spec(namespaces=frozenset({"mount"}))).forbidden


def test_pid_namespace_with_landlock_escapes():
    v = check_forbidden_intersection(spec(namespaces=frozenset({"pid"}), landlock=LL))
    assert not v.forbidden and v.namespaces.present and not v.filters.present


def test_seccomp_alone_or_landlock_alone_is_not_enough():
    assert check_forbidden_intersection(spec(seccomp_policy="read: 1\n")).forbidden
    v = check_forbidden_intersection(spec(landlock=LL))
    assert v.forbidden and "seccomp policy (-S)" in v.missing()


def test_compiled_seccomp_counts_as_policy():
    assert not check_forbidden_intersection(spec(seccomp_bpf="/x.bpf", landlock=LL)).forbidden


def test_seccomp_log_mode_enforces_nothing():
    v = check_forbidden_intersection(spec(seccomp_policy="read: 1\n", seccomp_default="log",
                                          landlock=LL))
    assert v.forbidden and "log mode" in v.filters.reason


def test_best_effort_landlock_on_kernel_without_landlock_does_not_count():
    s = spec(seccomp_policy="read: 1\n", landlock=LL, landlock_best_effort=True)
    assert not check_forbidden_intersection(s).forbidden
    assert check_forbidden_intersection(s, landlock_abi=0).forbidden
    assert not check_forbidden_intersection(s, landlock_abi=7).forbidden


# -- user namespaces: host privilege is what counts ----------------------------

def test_uid0_in_user_namespace_mapped_to_non_root_is_not_host_root():
    s = spec(namespaces=frozenset({"user"}), uid=0, uid_map=(IdMap(0, 100000, 1),))
    p = privilege(s)
    assert p.host_uid == 100000 and p.ns_uid == 0
    assert p.caps == ALL_CAPS and p.caps_scope == "user namespace" and p.host_caps == 0
    assert not check_forbidden_intersection(s).forbidden


def test_uid0_in_user_namespace_mapped_to_host_root_is_root():
    s = spec(namespaces=frozenset({"user"}), uid=0, uid_map=(IdMap(0, 0, 1),))
    v = check_forbidden_intersection(s)
    assert v.forbidden and v.host_uid == 0 and not v.cap_sys_admin


def test_user_namespace_without_setresuid_keeps_launcher_uid():
    s = spec(namespaces=frozenset({"user"}), uid_map=(IdMap(0, 1000, 1),))
    assert privilege(s, launcher_uid=0).host_uid == 0
    assert check_forbidden_intersection(s, launcher_uid=0).forbidden
    assert not check_forbidden_intersection(s, launcher_uid=1000).forbidden


def test_unmapped_uid_is_judged_as_the_launcher():
    s = spec(namespaces=frozenset({"user"}), uid=5, uid_map=(IdMap(0, 100000, 1),))
    p = privilege(s, launcher_uid=0)
    assert p.host_uid == 0 and "not in the uid map" in p.uid_note


# -- three-valued rule (shared with the audit) ----------------------------------

def test_escapes_three_valued():
    # Unknown Landlock with a seccomp filter: cannot be decided.
    *_, f = escapes(privileged=True, new_pid_ns=False, new_mount_ns=False,
                    seccomp=True, landlock=None)
    assert f is None
    # Unknown Landlock without seccomp: decided, forbidden.
    *_, f = escapes(privileged=True, new_pid_ns=False, new_mount_ns=False,
                    seccomp=False, landlock=None)
    assert f is True
    # Unknown namespaces, but non-root: decided, allowed.
    *_, f = escapes(privileged=False, new_pid_ns=None, new_mount_ns=None,
                    seccomp=None, landlock=None)
    assert f is False
    # Enforcing SELinux domain is escape (3) by itself.
    *_, f = escapes(privileged=True, new_pid_ns=False, new_mount_ns=False,
                    seccomp=False, landlock=False, selinux_enforcing=True)
    assert f is False


# -- explain ------------------------------------------------------------------

def test_explain_lists_weights_and_verdict():
    text = explain(BARE)
    assert "forbidden intersection: YES" in text
    for w in WEAKNESSES:                       # a bare root jail has every weakness
        assert f"{w.weight:>3}  {w.what}" in text
    assert "exposure: 10.0 / 10.0" in text
    assert "add first: run as a non-root uid (-u)" in text
    assert "capabilities:  all" in text


def test_explain_data_total_in_range_and_sandbox_scores_lower():
    specs = [BARE, NON_ROOT, NAMESPACED, FILTERED, ALL_THREE,
             spec(uid=1000, capabilities=SYS_ADMIN, ambient=True)]
    scores = []
    for s in specs:
        d = explain_data(s)
        assert 0.0 <= d["exposure"] <= 10.0
        assert d["exposure"] == round(10 * sum(w["weight"] for w in d["weaknesses"]) / MAX_WEIGHT, 1)
        scores.append(d["exposure"])
    assert scores[0] == 10.0
    assert scores[4] < min(scores[:4])
    assert explain_data(ALL_THREE)["exposure"] == 0.0
    assert explain_data(ALL_THREE)["add_first"] is None
    assert "forbidden intersection: no" in explain(ALL_THREE)


def test_explain_add_first_is_highest_weight_weakness():
    d = explain_data(NON_ROOT)                 # not root, no caps: seccomp is the heaviest left
    assert d["weaknesses"][0]["key"] == "no_seccomp"
    assert d["add_first"] == "add a seccomp policy (-S)"


def test_explain_names_capabilities():
    d = explain_data(spec(capabilities=SYS_ADMIN | NET_ADMIN))
    assert d["capabilities"]["names"] == ["cap_net_admin", "cap_sys_admin"]
    assert "cap_net_admin, cap_sys_admin" in explain(spec(capabilities=SYS_ADMIN | NET_ADMIN))
    assert cap_names(1 << 45) == ["cap_45"]


def test_explain_data_is_json_serialisable():
    import json
    for s in (BARE, ALL_THREE):
        json.loads(json.dumps(explain_data(s)))
