"""The front's confinement: what privbrokerd's D-Bus process gives up before
it reads a byte from the bus (DESIGN.md, "Privilege separation").

privbrokerd forks the front as pid 1 of a new pid namespace (so it sees no
other process) and the front moves into a mount namespace of its own.  Then,
still single-threaded and before any bus connection, `confine()` applies, in
this fixed order (each step needs the privilege the next one removes):

  1. identity   the dedicated user (default `privbroker`): its own group only,
                then uid; permitted = effective = KEEP_CAPS, inheritable and
                ambient empty, the bounding set cut to KEEP_CAPS, and the
                securebits locked so uid 0 never means privilege again;
  2. no_new_privs;
  3. Landlock   read only where the front reads (Python, its packages, the
                policy, profiles, device records, /proc); write only the
                lease journal's directory; under the device root open nodes
                read-write and ioctl them, but create, remove or rename
                nothing; execute nothing anywhere; no TCP bind or connect;
                no signal and no abstract-socket connection out of the domain;
  4. seccomp    broker/front.policy, compiled by the project's own engine:
                an allow list of what the front's code really calls;
  5. verify     read back what the kernel reports (uid, CapEff, NoNewPrivs,
                Seccomp) and try one write Landlock must refuse.  If any of it
                is not as intended the front refuses to run.

What the three capabilities are for (nothing else in the front needs one):
  CAP_CHOWN         ChownDevice: fchown a node to the caller, and back
  CAP_FOWNER        fchmod of a leased node the caller owns meanwhile, and
                    its restore; ACLs on it
  CAP_DAC_OVERRIDE  OpenPath of nodes whose mode bits exclude the front's
                    uid (root:root 0600 nodes), and the lease journal's
                    directory whatever its mode; Landlock bounds where
"""
from __future__ import annotations

import errno
import os
import pwd
import secrets
import sys
from dataclasses import dataclass, field

import prctl

from .jail import identity, landlock
from .jail import syscalls as sc
from .jail.spec import FsRule

CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER = 0, 1, 3
KEEP_CAPS = (1 << CAP_CHOWN) | (1 << CAP_DAC_OVERRIDE) | (1 << CAP_FOWNER)
DEFAULT_USER = "privbroker"
POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "front.policy")
# NOROOT, NO_SETUID_FIXUP and KEEP_CAPS, each locked: nothing this process
# executes or becomes gets root's capabilities back.
SECUREBITS = (identity.SECBIT_NOROOT | identity.SECBIT_NOROOT_LOCKED
              | identity.SECBIT_NO_SETUID_FIXUP | identity.SECBIT_NO_SETUID_FIXUP_LOCKED
              | identity.SECBIT_KEEP_CAPS_LOCKED)
# The Landlock probe of step 5: a file the front has no business creating.
PROBE_DIR = "/tmp"


class ConfinementError(Exception):
    """The front could not be confined as intended; it must not run."""


@dataclass(frozen=True)
class FrontUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> "FrontUser":
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise ConfinementError(
                f"user {name!r} does not exist; the front runs as it (create it with "
                f"`systemd-sysusers` from packaging/, `make install`, or "
                f"`adduser --system --group --no-create-home {name}`)") from None
        if pw.pw_uid == 0:
            raise ConfinementError(f"user {name!r} is root: the front must not run as root")
        return cls(name, pw.pw_uid, pw.pw_gid)


@dataclass
class Paths:
    """Where the front reads and writes (from the broker's configuration)."""
    config: str                     # broker.toml
    profiles_dir: str
    dev_root: str
    sysfs: str
    udev_data: str
    journal_dir: str
    extra_read: list[str] = field(default_factory=list)   # daemon-store templates, ...


def landlock_rules(paths: Paths) -> list[FsRule]:
    """The front's Landlock rules.  No rule grants EXECUTE."""
    read = ["/usr", "/lib", "/lib64", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
            "/etc/ld.so.cache", "/etc/localtime", "/proc", paths.sysfs, paths.udev_data,
            os.path.dirname(os.path.abspath(paths.config)), paths.profiles_dir,
            *paths.extra_read, *_python_paths()]
    rules = [FsRule(p, "ro") for p in dict.fromkeys(read)]
    rules.append(FsRule(paths.dev_root, "dev-rw"))
    rules += [FsRule(p, "dev-rw") for p in ("/dev/null", "/dev/urandom")]
    rules.append(FsRule(paths.journal_dir, "rw"))
    return rules


def _python_paths() -> list[str]:
    """The interpreter's own tree and every import path (a venv, an
    editable checkout): lazy imports keep working after confinement."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p)
    return sorted(p for p in paths if os.path.isabs(p))


def optional_paths(rules: list[FsRule]) -> set[FsRule]:
    """Read rules whose path may be missing on a given system (skipped,
    reported); the device root and the journal directory must exist."""
    return {r for r in rules if r.access == "ro"}


def confine(user: FrontUser, paths: Paths, *, abstract_bus: bool = False) -> dict:
    """Steps 1-5 (module doc).  Returns what was verified, for the log."""
    ruleset = _build_landlock(paths, abstract_bus)    # opens paths: before the uid change
    bpf = _compile_policy()                           # the cache is root's: likewise
    try:
        _become(user)
        prctl.set_no_new_privs(1)
        ruleset.restrict_self()
    finally:
        ruleset.close()
    from .jail.seccomp.load import load_filter
    load_filter(bpf)
    return verify(user, ruleset)


def _build_landlock(paths: Paths, abstract_bus: bool) -> landlock.Ruleset:
    rules = landlock_rules(paths)
    # A bus reached by an abstract socket address would be out of reach
    # once the abstract-socket scope is set; the system bus is a path.
    scopes = ["SIGNAL"] if abstract_bus else ["SIGNAL", "ABSTRACT_UNIX_SOCKET"]
    try:
        return landlock.build_ruleset(rules, optional=optional_paths(rules),
                                      deny_tcp=True, scopes=scopes)
    except landlock.LandlockError as e:
        raise ConfinementError(f"Landlock: {e}") from None


def _compile_policy() -> bytes:
    from .jail.seccomp.errors import PolicyError
    from .jail.seccomp.filter_cache import compiled_filter
    try:
        return compiled_filter(POLICY)
    except (PolicyError, OSError) as e:
        raise ConfinementError(f"the front's seccomp policy {POLICY}: {e}") from None


def _become(user: FrontUser) -> None:
    """Step 1.  The bounding set and securebits need CAP_SETPCAP, so they
    come first; NO_SETUID_FIXUP keeps the capabilities through setresuid,
    and capset then keeps exactly KEEP_CAPS."""
    identity.drop_bounding_set(KEEP_CAPS)
    sc.set_securebits(SECUREBITS)
    os.setgroups([user.gid])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    sc.cap_ambient_clear_all()
    sc.capset(KEEP_CAPS, KEEP_CAPS, 0)


def verify(user: FrontUser, ruleset: landlock.Ruleset) -> dict:
    """Step 5: what the kernel says this process is now."""
    status = _status()
    facts = {
        "uid": status["Uid"].split(),
        "gid": status["Gid"].split(),
        "groups": status.get("Groups", "").split(),
        "cap_eff": int(status["CapEff"], 16),
        "cap_prm": int(status["CapPrm"], 16),
        "cap_bnd": int(status["CapBnd"], 16),
        "cap_amb": int(status["CapAmb"], 16),
        "no_new_privs": status["NoNewPrivs"] == "1",
        "seccomp": int(status["Seccomp"]),
        "landlock": ruleset.enforced,
    }
    wrong = []
    if facts["uid"] != [str(user.uid)] * 4 or facts["gid"] != [str(user.gid)] * 4:
        wrong.append(f"ids are uid {facts['uid']} gid {facts['gid']}")
    if facts["groups"] != [str(user.gid)]:
        wrong.append(f"supplementary groups are {facts['groups']}")
    for name in ("cap_eff", "cap_prm", "cap_bnd"):
        if facts[name] != KEEP_CAPS:
            wrong.append(f"{name} is {facts[name]:#x}, not {KEEP_CAPS:#x}")
    if facts["cap_amb"]:
        wrong.append(f"ambient capabilities {facts['cap_amb']:#x}")
    if not facts["no_new_privs"]:
        wrong.append("no_new_privs is not set")
    if facts["seccomp"] != 2:
        wrong.append(f"seccomp mode is {facts['seccomp']}, not 2 (filter)")
    facts["landlock_probe"] = _landlock_probe()
    if facts["landlock_probe"] != "EACCES":
        wrong.append(f"creating a file in {PROBE_DIR} gave {facts['landlock_probe']}, "
                     f"not EACCES (Landlock)")
    if wrong:
        raise ConfinementError("the front is not confined as intended: " + "; ".join(wrong))
    return facts


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _landlock_probe() -> str:
    """Create a file where DAC (root's group, CAP_DAC_OVERRIDE) would allow it
    and only Landlock forbids it.  Removed again if it was created."""
    # a fresh random name: a file someone placed there cannot make it fail
    path = os.path.join(PROBE_DIR, f".privbroker-front-probe-{secrets.token_hex(8)}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    os.close(fd)
    os.unlink(path)
    return "created"


def describe(facts: dict) -> str:
    ll = facts["landlock"]
    return (f"front confined: uid {facts['uid'][0]} gid {facts['gid'][0]}, "
            f"CapEff {facts['cap_eff']:#x}, NoNewPrivs {int(facts['no_new_privs'])}, "
            f"Seccomp {facts['seccomp']} (filter), "
            f"Landlock ABI {ll['abi']} ({len(ll['rules'])} rules, TCP "
            f"{'denied' if ll['handled_access_net'] else 'not restricted'}, scoped "
            f"{'+'.join(ll['scoped']) or 'none'}); a write to {PROBE_DIR} was refused "
            f"({facts['landlock_probe']})")
