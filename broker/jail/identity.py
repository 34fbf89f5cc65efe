"""Identity and privilege: supplementary groups, gid, uid, capabilities,
securebits, no_new_privs.

The order inside `drop_privileges`, and why:

 1. bounding set  - needs CAP_SETPCAP, which we still hold before the uid
                    change; dropping it first also means nothing later can
                    regain a capability outside the mask;
 2. securebits    - also needs CAP_SETPCAP; KEEP_CAPS must be on before the
                    uid change or setresuid() clears the permitted set;
 3. groups, gid, uid - groups and gid first: after setresuid() to a non-root
                    uid we would lack CAP_SETGID to change them;
 4. capsets       - permitted/effective/inheritable set to exactly the mask
                    (possible because KEEP_CAPS kept them permitted);
 5. ambient       - needs the caps in permitted *and* inheritable (step 4);
 6. no_new_privs  - last of these: it does not hinder anything above, and
                    once set, exec can never add privilege.
"""
from __future__ import annotations

import os

import prctl

from . import syscalls as sc
from .spec import JailSpec

# linux/securebits.h
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

_ALL_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP
                   | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS
                   | SECBIT_KEEP_CAPS_LOCKED)


def securebits_for(spec: JailSpec, target_uid: int) -> int:
    """The securebits a jail with a capability mask runs with.

    As minijail: NOROOT, NO_SETUID_FIXUP and KEEP_CAPS with their locks, minus
    the -B mask; NO_CAP_AMBIENT_RAISE is never set (the capability sets are
    already exact).  One deliberate difference: a program that runs as uid 0
    without --ambient keeps its mask across exec only through root's exec
    rule (bounding set & all), which NOROOT would defeat - minijail relies on
    its preload library there, which privjail has not.  So NOROOT is left off
    in that one case, and the bounding set is what limits the program.
    """
    bits = _ALL_SECUREBITS
    if spec.ambient:
        # Ambient caps carry across exec; KEEP_CAPS is only needed for the uid change
        # and is cleared by exec anyway, so do not lock it.
        bits &= ~SECBIT_KEEP_CAPS_LOCKED
    if target_uid == 0 and not spec.ambient:
        bits &= ~(SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)
    return bits & ~spec.securebits_skip


def drop_privileges(spec: JailSpec) -> None:

    target_uid = spec.uid if spec.uid is not None else os.getuid()
    mask = spec.capabilities
    if mask is not None:
        drop_bounding_set(mask)
        sc.set_securebits(securebits_for(spec, target_uid))
    change_ids(spec)
    if mask is not None:
        sc.capset(mask, mask, mask)
        sc.cap_ambient_clear_all()
        if spec.ambient:
            for cap in _bits(mask):
                sc.cap_ambient_raise(cap)
    if spec.no_new_privs:
        prctl.set_no_new_privs(1)


def drop_bounding_set(keep_mask: int) -> None:
    for cap in range(sc.last_cap() + 1):
        if not keep_mask & (1 << cap):
            prctl.capbset_drop(cap)


def change_ids(spec: JailSpec) -> None:
    if spec.groups is not None:
        _named(os.setgroups, "setgroups", list(spec.groups))
    if spec.gid is not None:
        _named(os.setresgid, "setresgid", spec.gid, spec.gid, spec.gid)
    if spec.uid is not None:
        _named(os.setresuid, "setresuid", spec.uid, spec.uid, spec.uid)


def _named(fn, name: str, *args) -> None:
    """Call fn; an OSError names the call and the id (EINVAL alone says little)."""
    try:
        fn(*args)
    except OSError as e:
        raise OSError(e.errno, f"{name}({args[0]}): {e.strerror}") from None


def drop_everything_for_init(spec: JailSpec) -> None:
    """pid 1 of the jail needs no privilege at all to reap and forward
    signals: it takes the jail's ids and gives up every capability."""
    change_ids(spec)
    sc.cap_ambient_clear_all()
    sc.capset(0, 0, 0)
    prctl.set_no_new_privs(1)
    # Not dumpable: the program runs as the same uid and could otherwise
    # ptrace init (stopping it hangs the jail) or take its status fd with
    # pidfd_getfd and forge its own exit status.  A uid change clears the
    # flag by itself; a jail that keeps the launcher's uid (root, c=0) needs
    # it said (tests/escape/test_escape.py).
    prctl.set_dumpable(False)


def _bits(mask: int):
    cap = 0
    while mask >> cap:
        if mask & (1 << cap):
            yield cap
        cap += 1
