"""minijail0's command line and config files -> a validated JailSpec.

    parse_command_line(["-v", "-u", "nobody", "--", "/bin/true"]) -> JailSpec

The option meanings follow minijail0(1); the config file format follows
minijail0(5):

    % minijail-config-file v0        <- must be the very first line
    # a comment                      <- whole-line comments only
    u = nobody                       <- long option name or single letter
    bind-mount = /var/lib/metrics,,1
    n                                <- an option without argument
    mount = /run,/run,tmpfs,\\        <- a trailing backslash joins the next line
            MS_NODEV|MS_NOSUID,mode=755

`--config FILE` is expanded in place, so options from the file and from the
command line combine in the order they appear.

Every minijail0 option is recognised.  The ones privjail cannot honour yet
are refused with an error naming the option; nothing is silently ignored.
Errors are ConfigError, and always say where: "FILE:LINE: ..." for a config
file entry, "option -X: ..." for a command-line flag.

Where minijail0(1) is silent or loose, privjail decides (see also the tests):
  * -u alone does not change the gid (only -g does); changing uid or gid
    without -G/--add-suppl-group drops all supplementary groups.
  * -G needs -u given as a user *name*; -u, -g, -P, -C and one rlimit type
    may each be given once (as minijail0); -K needs a mount namespace.
  * A bare -m/-M maps the current uid/gid to the -u/-g id (root if none).
  * -c: a bare number is hex (the page says "hex constant").
  * -t0 is an error (minijail0 would silently skip the /tmp mount).
  * -f's path is made absolute against privjail's working directory.
  * --env-reset discards the --env-add options before it (as minijail0).
  * -b/-k/-C do not imply -v: spec.validate asks for it.
  * Long options may be abbreviated on the command line (getopt_long), never
    in a config file; optional arguments must be attached (-Kslave, --uts=h).

Start-up time matters (privjail is measured), so only `os` is imported at
module level; pwd, grp, resource and prctl are imported when first needed.
"""
from __future__ import annotations

import os
from collections import namedtuple
from dataclasses import dataclass

from .spec import (RLIM_INFINITY, SECCOMP_DEFAULTS, Bind, FsRule, IdMap, JailSpec, Mount,
                   Rlimit, SpecError, validate)
from .spec import (CPU_WEIGHT_RANGE, MAX_CPU_QUOTA, MAX_PIDS_LIMIT, MIN_MEMORY_LIMIT,
                   DeviceRule)

CONFIG_HEADER = "% minijail-config-file v0"

DEFAULT_TMP_SIZE = 64 << 20                   # -t without a size: "64M"
DEFAULT_MOUNT_FLAGS = 0x2 | 0x4 | 0x8         # -k without flags: MS_NOSUID|MS_NODEV|MS_NOEXEC
DEFAULT_TMPFS_DATA = "mode=0755,size=10M"     # -k ... tmpfs without data
PROPAGATION_MODES = ("slave", "private", "shared", "unbindable")
HOST_NAME_MAX = 64


class ConfigError(ValueError):
    """A flag or config entry is malformed, unknown, refused or inconsistent.
    The message names where: "FILE:LINE: ..." or "option -X: ..."."""


# ---------------------------------------------------------------------------
# The option table: every minijail0 option, plus privjail's own.
# ---------------------------------------------------------------------------

NO_ARG, REQUIRED, OPTIONAL = 0, 1, 2

NOT_YET = "not supported yet"


# key: the dispatch name (the short letter, or the long name); arg: NO_ARG,
# REQUIRED or OPTIONAL; metavar: what the argument should look like (for
# errors); refused: None, or (what the option does, why privjail refuses it).
# cli_only: a mode of the privjail command itself (not part of the jail), so
# never allowed in a config file.
Opt = namedtuple("Opt", "key arg metavar refused cli_only", defaults=("", None, False))


_OPTIONS = [
    # -- implemented ------------------------------------------------------
    Opt("b", REQUIRED, "SRC[,[DEST][,WRITABLE]]"),
    Opt("B", REQUIRED, "a hex securebits mask"),
    Opt("c", REQUIRED, "a hex capability mask or cap_from_text(3) text"),
    Opt("C", REQUIRED, "a directory"),
    Opt("d", NO_ARG),
    Opt("e", OPTIONAL, "nothing (entering an existing namespace is not supported)"),
    Opt("f", REQUIRED, "a pid file path"),
    Opt("g", REQUIRED, "a group name or gid"),
    Opt("G", NO_ARG),
    Opt("i", NO_ARG),
    Opt("I", NO_ARG),
    Opt("k", REQUIRED, "SRC,DEST,TYPE[,FLAGS[,DATA]]"),
    Opt("K", OPTIONAL, "one of " + ", ".join(PROPAGATION_MODES)),
    Opt("l", NO_ARG),
    Opt("m", OPTIONAL, "'INSIDE OUTSIDE COUNT[,INSIDE OUTSIDE COUNT...]'"),
    Opt("M", OPTIONAL, "'INSIDE OUTSIDE COUNT[,INSIDE OUTSIDE COUNT...]'"),
    Opt("n", NO_ARG),
    Opt("L", NO_ARG),
    Opt("V", REQUIRED, "a mount namespace file like /proc/PID/ns/mnt"),
    Opt("w", NO_ARG),
    Opt("no-default-runtime-environment", NO_ARG),
    Opt("S", REQUIRED, "a seccomp policy file"),
    Opt("T", REQUIRED, "static or dynamic"),
    Opt("Y", NO_ARG),
    Opt("seccomp-bpf-binary", REQUIRED, "a compiled seccomp filter"),
    Opt("N", NO_ARG),
    Opt("p", NO_ARG),
    Opt("P", REQUIRED, "a directory"),
    Opt("r", NO_ARG),
    Opt("R", REQUIRED, "TYPE,CUR,MAX"),
    Opt("t", OPTIONAL, "a size like 64M"),
    Opt("u", REQUIRED, "a user name or uid"),
    Opt("U", NO_ARG),
    Opt("v", NO_ARG),
    Opt("add-suppl-group", REQUIRED, "a group name or gid"),
    Opt("ambient", NO_ARG),
    Opt("config", REQUIRED, "a config file path"),
    Opt("env-add", REQUIRED, "NAME=VALUE"),
    Opt("env-reset", NO_ARG),
    Opt("profile", REQUIRED, "minimalistic-mountns or minimalistic-mountns-nodev"),
    Opt("uts", OPTIONAL, "a hostname"),
    Opt("fs-default-paths", NO_ARG),
    Opt("fs-path-advanced-rw", REQUIRED, "an absolute path"),
    Opt("fs-path-ro", REQUIRED, "an absolute path"),
    Opt("fs-path-rw", REQUIRED, "an absolute path"),
    Opt("fs-path-rx", REQUIRED, "an absolute path"),
    Opt("no-fs-restrictions", NO_ARG),
    # privjail's own
    Opt("cwd", REQUIRED, "a directory inside the jail"),
    Opt("landlock-best-effort", NO_ARG),
    Opt("die-with-parent", NO_ARG),
    Opt("seccomp-default", REQUIRED, "one of " + ", ".join(SECCOMP_DEFAULTS)),
    # the jail's cgroup (minijail0 has no flags for these)
    Opt("memory-limit", REQUIRED, "a size like 512M or a share of RAM like 25%"),
    Opt("pids-limit", REQUIRED, "a number of tasks"),
    Opt("cpu-weight", REQUIRED, "a weight from 1 to 10000 (100 is the default)"),
    Opt("cpu-quota", REQUIRED, "a share of one CPU like 50%"),
    Opt("device-allow", REQUIRED, "a device rule like 'c 1:3 rwm'"),
    Opt("own-cgroup", NO_ARG),
    Opt("cgroup-parent", REQUIRED, "a cgroup path like /privjail"),
    # privjail's modes: what to do with the spec, not what the jail is
    Opt("dry-run", NO_ARG, cli_only=True),
    Opt("explain", NO_ARG, cli_only=True),
    Opt("allow-forbidden-intersection", NO_ARG, cli_only=True),
    # -- recognised, refused --------------------------------------------------
    Opt("a", REQUIRED, "a table name",
        refused=("alternate syscall table", "needs PR_ALT_SYSCALL, a ChromeOS-only "
                 "kernel feature; not supported")),
    Opt("h", NO_ARG, refused=("help", "only available as 'privjail --help' on its own")),
    Opt("H", NO_ARG, refused=("seccomp syscall list", NOT_YET)),
    Opt("s", NO_ARG, refused=("seccomp strict mode", "strict mode allows only read, "
                                "write, exit and sigreturn, so no program could be exec'd "
                                "under it; use -S with a policy")),
    Opt("y", NO_ARG, refused=("keep the current supplementary groups", NOT_YET)),
    Opt("z", NO_ARG, refused=("do not forward signals", NOT_YET)),
    Opt("allow-speculative-execution", NO_ARG,
        refused=("seccomp speculation mitigations", NOT_YET)),
    Opt("enable-profile-fs-restrictions", NO_ARG,
        refused=("Landlock rules derived from the profile's mounts", NOT_YET)),
    Opt("logging", REQUIRED, "auto, syslog or stderr", refused=("logging system", NOT_YET)),
    Opt("preload-library", REQUIRED, "a library path",
        refused=("preload library", "privjail never preloads a library into the program")),
]

OPTIONS: dict[str, Opt] = {o.key: o for o in _OPTIONS}
SHORT: dict[str, Opt] = {k: o for k, o in OPTIONS.items() if len(k) == 1}
# Long names: the long-only options, plus the long spellings of short ones.
LONG: dict[str, Opt] = {k: o for k, o in OPTIONS.items() if len(k) > 1}
LONG.update({"bind-mount": OPTIONS["b"], "mount": OPTIONS["k"], "mount-dev": OPTIONS["d"],
             "ns-mount": OPTIONS["v"], "help": OPTIONS["h"]})

PROFILES = ("minimalistic-mountns", "minimalistic-mountns-nodev")


def _display(name: str) -> str:
    """How an option is named in messages: -X or --long-name."""
    return f"-{name}" if len(name) == 1 else f"--{name}"


# ---------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------

class Entry(namedtuple("Entry", "path line key value")):
    """One option from a config file: path, line (the entry's first physical
    line), key (as written: a long option name or a single letter) and value
    (None for a bare key)."""
    __slots__ = ()

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}: "


def _key_chars_ok(key: str) -> bool:
    return key != "" and all(c == "-" or ("a" <= c.lower() <= "z") for c in key)


def parse_config_file(path: str) -> list[Entry]:
    """Read a minijail0(5) config file into entries, in order.

    Checks the syntax, that every key names a minijail0 option (or one of
    privjail's), that arguments are present exactly where the option takes
    one, and that the file neither names a program nor includes another
    config file.  What the values mean is checked by parse_command_line."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"option --config: cannot read {path}: {e.strerror}") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].rstrip() != CONFIG_HEADER:
        got = repr(lines[0]) if lines else "an empty file"
        raise ConfigError(f"{path}:1: expected {CONFIG_HEADER!r} as the first line, got {got}")

    entries: list[Entry] = []
    i = 1
    while i < len(lines):
        lineno = i + 1
        logical = lines[i]
        i += 1
        while logical.endswith("\\"):           # line continuation
            logical = logical[:-1] + (lines[i] if i < len(lines) else "")
            i += 1
        stripped = logical.strip()
        if not stripped or stripped.startswith("#"):
            continue
        entries.append(_parse_config_line(path, lineno, stripped))
    return entries


def _parse_config_line(path: str, lineno: int, line: str) -> Entry:
    where = f"{path}:{lineno}: "
    if "=" in line:
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not key:
            raise ConfigError(f"{where}expected KEY = VALUE or KEY, got {line!r}")
    else:
        key, value = line, None
    first_word = key.split()[0]
    if value is None and ("/" in first_word or first_word == "--"):
        raise ConfigError(f"{where}a config file may not name the program to run "
                          f"(got {line!r}); give it on the command line")
    if not _key_chars_ok(key):
        if len(key.split()) > 1:
            raise ConfigError(f"{where}expected KEY = VALUE or KEY, got {line!r}")
        raise ConfigError(f"{where}option names contain only letters and '-', got {key!r}")
    if key.startswith("-"):
        raise ConfigError(f"{where}write option names without leading dashes "
                          f"(got {key!r}, expected {key.lstrip('-')!r})")
    opt = LONG.get(key) if len(key) > 1 else SHORT.get(key)
    if opt is None:
        raise ConfigError(f"{where}unknown option {key!r}")
    disp = _display(key)
    if opt.key == "config":
        raise ConfigError(f"{where}option {disp}: a config file may not include "
                          f"another config file")
    if opt.cli_only:
        raise ConfigError(f"{where}option {disp}: a mode of the privjail command, only "
                          f"allowed on its command line")
    if opt.refused is None:       # refused options are reported when processed
        if opt.arg == NO_ARG and value is not None:
            raise ConfigError(f"{where}option {disp}: takes no value, got {value!r}")
        if opt.arg == REQUIRED and value is None:
            raise ConfigError(f"{where}option {disp}: expected '{key} = {opt.metavar}'")
        if value == "":
            raise ConfigError(f"{where}option {disp}: expected {opt.metavar or 'a value'} "
                              f"after '=', got nothing")
    return Entry(path, lineno, key, value)


# ---------------------------------------------------------------------------
# Value parsers: each raises ValueError with "expected ..., got ..." text.
# ---------------------------------------------------------------------------

def _bad(expected: str, got: str) -> ValueError:
    return ValueError(f"expected {expected}, got {got!r}")


def _is_decimal(s: str) -> bool:
    return s.isascii() and s.isdigit()


def _is_hex(s: str) -> bool:
    return s != "" and all(c in "0123456789abcdefABCDEF" for c in s)


def _parse_uint(text: str, expected: str, limit: int) -> int:
    """A decimal or 0x-hex unsigned number no larger than limit."""
    t = text.strip()
    if t[:2].lower() == "0x" and _is_hex(t[2:]):
        n = int(t[2:], 16)
    elif _is_decimal(t):
        n = int(t, 10)
    else:
        raise _bad(expected, text)
    if n > limit:
        raise ValueError(f"{text!r} is out of range (at most {limit})")
    return n


def _parse_hex(text: str, expected: str) -> int:
    """A hex number, with or without 0x (minijail's -c and -B masks)."""
    t = text.strip()
    digits = t[2:] if t[:2].lower() == "0x" else t
    if not _is_hex(digits):
        raise _bad(expected, text)
    n = int(digits, 16)
    if n >= 1 << 64:
        raise ValueError(f"{text!r} does not fit in 64 bits")
    return n


_cap_table: dict[str, int] | None = None


def _capability_names() -> dict[str, int]:
    """cap_from_text names ('cap_chown') -> bit numbers, from python-prctl."""
    global _cap_table
    if _cap_table is None:
        import prctl
        table = {}
        for name in prctl.ALL_CAP_NAMES:
            if name != "last_cap":
                table["cap_" + name] = getattr(prctl, "CAP_" + name.upper())
        # python-prctl knows cap 40 (CAP_LAST_CAP) but has no name for it.
        if "cap_checkpoint_restore" not in table and prctl.CAP_LAST_CAP >= 40:
            table["cap_checkpoint_restore"] = 40
        _cap_table = table
    return _cap_table


def parse_caps(text: str) -> int:
    """-c: a hex mask (with or without 0x), or cap_from_text(3) text of which
    only the effective set counts: 'cap_chown,cap_fowner+eip', '=e',
    'cap_sys_ptrace=e cap_dac_override=e', 'all=e cap_sys_admin-e'."""
    t = text.strip()
    if _is_hex(t[2:] if t[:2].lower() == "0x" else t):
        return _parse_hex(t, "a hex capability mask")
    if not t:
        raise _bad("a hex mask or capability text", text)
    names = _capability_names()
    all_caps = 0
    for bit in names.values():
        all_caps |= 1 << bit
    effective = 0
    for clause in t.split():
        op_at = min((clause.find(op) for op in "=+-" if op in clause), default=-1)
        if op_at < 0:
            raise ValueError(f"capability clause {clause!r} has no operator "
                             f"(expected CAPS=FLAGS, CAPS+FLAGS or CAPS-FLAGS)")
        caplist, actions = clause[:op_at], clause[op_at:]
        if caplist == "":
            if actions[0] != "=":
                raise ValueError(f"capability clause {clause!r}: an empty capability "
                                 f"list is only allowed with '='")
            mask = all_caps
        elif caplist.lower() == "all":
            mask = all_caps
        else:
            mask = 0
            for name in caplist.split(","):
                low = name.lower()
                if _is_decimal(low) and int(low) < 64:
                    mask |= 1 << int(low)
                elif low in names:
                    mask |= 1 << names[low]
                else:
                    raise ValueError(f"unknown capability {name!r} "
                                     f"(expected names like cap_chown)")
        pos = 0
        while pos < len(actions):
            op = actions[pos]
            pos += 1
            end = pos
            while end < len(actions) and actions[end] not in "=+-":
                end += 1
            flags = actions[pos:end]
            pos = end
            if any(c not in "eip" for c in flags.lower()):
                raise ValueError(f"capability clause {clause!r}: flags must be "
                                 f"among e, i, p, got {flags!r}")
            if op != "=" and not flags:
                raise ValueError(f"capability clause {clause!r}: {op!r} needs flags "
                                 f"(e, i, p)")
            raise_e = "e" in flags.lower()
            if op == "=":
                effective = (effective & ~mask) | (mask if raise_e else 0)
            elif raise_e:
                effective = effective | mask if op == "+" else effective & ~mask
    return effective


_MOUNT_FLAGS = {
    "MS_RDONLY": 1 << 0, "MS_NOSUID": 1 << 1, "MS_NODEV": 1 << 2, "MS_NOEXEC": 1 << 3,
    "MS_SYNCHRONOUS": 1 << 4, "MS_REMOUNT": 1 << 5, "MS_MANDLOCK": 1 << 6,
    "MS_DIRSYNC": 1 << 7, "MS_NOSYMFOLLOW": 1 << 8, "MS_NOATIME": 1 << 10,
    "MS_NODIRATIME": 1 << 11, "MS_BIND": 1 << 12, "MS_MOVE": 1 << 13, "MS_REC": 1 << 14,
    "MS_SILENT": 1 << 15, "MS_POSIXACL": 1 << 16, "MS_UNBINDABLE": 1 << 17,
    "MS_PRIVATE": 1 << 18, "MS_SLAVE": 1 << 19, "MS_SHARED": 1 << 20,
    "MS_RELATIME": 1 << 21, "MS_KERNMOUNT": 1 << 22, "MS_I_VERSION": 1 << 23,
    "MS_STRICTATIME": 1 << 24, "MS_LAZYTIME": 1 << 25,
}


def parse_mount_flags(text: str) -> int:
    """'MS_NODEV|MS_NOEXEC|0x100' -> int."""
    flags = 0
    for part in text.split("|"):
        part = part.strip()
        if part in _MOUNT_FLAGS:
            flags |= _MOUNT_FLAGS[part]
        else:
            flags |= _parse_uint(part, "MS_* names or numbers separated by '|'",
                                 (1 << 64) - 1)
    return flags


def parse_mount(text: str) -> Mount:
    """-k SRC,DEST,TYPE[,FLAGS[,DATA]]; DATA may itself contain commas."""
    fields = text.split(",", 4)
    if len(fields) < 3 or not all(f.strip() for f in fields[:3]):
        raise _bad("SRC,DEST,TYPE[,FLAGS[,DATA]]", text)
    src, dest, fstype = (f.strip() for f in fields[:3])
    flags_text = fields[3].strip() if len(fields) > 3 else ""
    data = fields[4].strip() if len(fields) > 4 else ""
    flags = parse_mount_flags(flags_text) if flags_text else DEFAULT_MOUNT_FLAGS
    if fstype == "tmpfs" and not data:
        data = DEFAULT_TMPFS_DATA
    return Mount(src, dest, fstype, flags, data)


def parse_bind(text: str) -> Bind:
    """-b SRC[,[DEST][,WRITABLE]]; an empty DEST means SRC."""
    fields = text.split(",")
    if len(fields) > 3 or not fields[0].strip():
        raise _bad("SRC[,[DEST][,WRITABLE]]", text)
    src = fields[0].strip()
    dest = fields[1].strip() if len(fields) > 1 and fields[1].strip() else src
    writable = fields[2].strip() if len(fields) > 2 else "0"
    if writable not in ("0", "1"):
        raise ValueError(f"expected WRITABLE to be 0 or 1, got {writable!r} in {text!r}")
    return Bind(src, dest, writable == "1")


def parse_size(text: str) -> int:
    """-t: '64M' -> bytes.  Suffixes K, M, G, T, P, E are powers of 1024."""
    t = text.strip()
    shift = 0
    if t and t[-1].upper() in "KMGTPE":
        shift = 10 * ("KMGTPE".index(t[-1].upper()) + 1)
        t = t[:-1]
    if not _is_decimal(t):
        raise _bad("a size like 64M (a number with an optional K, M, G suffix)", text)
    size = int(t) << shift
    if size == 0:
        raise ValueError(f"the /tmp size must be positive, got {text!r}")
    if size >= 1 << 64:
        raise ValueError(f"size {text!r} does not fit in 64 bits")
    return size


# -- cgroup limits ------------------------------------------------------------

_SIZE_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _parse_percent(text: str, what: str) -> float:
    """'25%' or '12.5%' -> 25.0; what names the quantity in errors."""
    number = text.strip()[:-1].strip()
    whole, dot, frac = number.partition(".")
    if not _is_decimal(whole) or (dot and not _is_decimal(frac)):
        raise _bad(f"a percentage like 25% ({what})", text)
    return float(number)


def parse_memory_limit(text: str) -> int:
    """--memory-limit: bytes ('1073741824'), with a K, M, G or T suffix
    (powers of 1024: '512M'), or a share of this machine's RAM ('25%',
    resolved now, rounded down to a page)."""
    t = text.strip()
    if t.endswith("%"):
        pct = _parse_percent(t, "of RAM")
        if not 0 < pct <= 100:
            raise ValueError(f"a share of RAM must be above 0% and at most 100%, got {text!r}")
        page = os.sysconf("SC_PAGE_SIZE")
        return int(_total_ram() * pct / 100) // page * page
    unit = t[-1:].upper() if t[-1:].isalpha() else ""
    digits = t[:-1] if unit else t
    if unit not in _SIZE_UNITS or not _is_decimal(digits):
        raise _bad("a size like 512M (a whole number with an optional K, M, G or T "
                   "suffix) or a share of RAM like 25%", text)
    size = int(digits) << _SIZE_UNITS[unit]
    if size < MIN_MEMORY_LIMIT:
        raise ValueError(f"{text!r} is below the smallest memory limit, "
                         f"{MIN_MEMORY_LIMIT >> 20}M (the jail's own setup is charged to it)")
    if size >= 1 << 62:
        raise ValueError(f"{text!r} is out of range")
    return size


def _parse_count(text: str, expected: str, limit: int) -> int:
    """A whole number from 1 to limit."""
    t = text.strip()
    if not _is_decimal(t):
        raise _bad(expected, text)
    n = int(t)
    if not 1 <= n <= limit:
        raise ValueError(f"{text!r} is out of range (1 to {limit})")
    return n


def parse_cpu_quota(text: str) -> int:
    """--cpu-quota: a share of one CPU in whole percent, '50%' (or '50');
    '200%' is two CPUs' worth."""
    t = text.strip()
    number = t[:-1].strip() if t.endswith("%") else t
    if not _is_decimal(number):
        raise _bad("a share of one CPU in whole percent, like 50%", text)
    pct = int(number)
    if not 1 <= pct <= MAX_CPU_QUOTA:
        raise ValueError(f"{text!r} is out of range (1% to {MAX_CPU_QUOTA}% of one CPU)")
    return pct


def parse_device_rule(text: str) -> DeviceRule:
    """--device-allow: 'TYPE MAJOR:MINOR ACCESS' as in cgroup v1's
    devices.allow: TYPE a, b or c; MAJOR and MINOR numbers or '*'; ACCESS
    some of r, w, m.  'a' alone is every device."""
    fields = text.split()
    expected = "a device rule like 'c 1:3 rwm' (TYPE MAJOR:MINOR ACCESS, TYPE a, b or c)"
    if fields == ["a"]:
        return DeviceRule("a", None, None, "rwm")
    if len(fields) != 3 or fields[0] not in ("a", "b", "c"):
        raise _bad(expected, text)
    major, colon, minor = fields[1].partition(":")

    def number(n: str) -> int | None:
        if n == "*":
            return None
        if not _is_decimal(n) or int(n) >= 1 << 32:
            raise _bad(expected, text)
        return int(n)

    if not colon:
        raise _bad(expected, text)
    access = fields[2]
    if any(c not in "rwm" for c in access) or len(set(access)) != len(access):
        raise ValueError(f"device rule {text!r}: access must be some of r, w, m")
    return DeviceRule(fields[0], number(major), number(minor), access)


def parse_id_maps(text: str) -> tuple[IdMap, ...]:
    """-m/-M: 'INSIDE OUTSIDE COUNT[,INSIDE OUTSIDE COUNT...]'."""
    maps = []
    for part in text.split(","):
        fields = part.split()
        if len(fields) != 3 or not all(_is_decimal(f) for f in fields):
            raise _bad("'INSIDE OUTSIDE COUNT' triples separated by ','", text)
        inside, outside, count = (int(f) for f in fields)
        if max(inside, outside, count) >= 1 << 32 or count == 0:
            raise ValueError(f"id map {part.strip()!r} is out of range")
        maps.append(IdMap(inside, outside, count))
    return tuple(maps)


def _rlimit_types() -> dict[str, int]:
    import resource
    return {n: getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")}


def parse_rlimit(text: str) -> Rlimit:
    """-R TYPE,CUR,MAX: TYPE a RLIMIT_* name or number; CUR and MAX decimal,
    0x-hex or 'unlimited'."""
    fields = [f.strip() for f in text.split(",")]
    if len(fields) != 3 or not all(fields):
        raise _bad("TYPE,CUR,MAX", text)
    types = _rlimit_types()
    name = fields[0]
    if name in types:
        kind = types[name]
    elif _is_decimal(name) and int(name) in types.values():
        kind = int(name)
    else:
        raise ValueError(f"unknown rlimit type {name!r} (expected a name like "
                         f"RLIMIT_NOFILE or its number)")
    cur, lim = (RLIM_INFINITY if v == "unlimited" else
                _parse_uint(v, "a number or 'unlimited'", RLIM_INFINITY) for v in fields[1:])
    return Rlimit(kind, cur, lim)


class HostLookupError(ValueError):
    """A name this host does not know (a user, a group).  The spec is fine;
    the host is not the one it was written for: an error for a launch, a
    warning for --dry-run."""


# Identity lookups: module-level so tests can substitute a fake user database.

def lookup_user(text: str) -> tuple[int, str | None, int | None]:
    """-u: (uid, user name or None if numeric, the user's primary gid or None)."""
    if _is_decimal(text):
        uid = int(text)
        if uid >= (1 << 32) - 1:
            raise ValueError(f"uid {text} is out of range")
        return uid, None, None
    import pwd
    try:
        pw = pwd.getpwnam(text)
    except KeyError:
        raise HostLookupError(f"unknown user {text!r}") from None
    return pw.pw_uid, pw.pw_name, pw.pw_gid


def lookup_group(text: str) -> int:
    """-g, --add-suppl-group: a group name or a gid."""
    if _is_decimal(text):
        gid = int(text)
        if gid >= (1 << 32) - 1:
            raise ValueError(f"gid {text} is out of range")
        return gid
    import grp
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise HostLookupError(f"unknown group {text!r}") from None


def user_groups(name: str, gid: int) -> tuple[int, ...]:
    """-G: the groups the user belongs to (what initgroups(3) would set)."""
    return tuple(os.getgrouplist(name, gid))


# ---------------------------------------------------------------------------
# Building the spec
# ---------------------------------------------------------------------------

class _Builder:
    """Accumulates options in order; finish() makes the JailSpec."""

    def __init__(self) -> None:
        self.ns: set[str] = set()
        self.f: dict = {}                 # JailSpec fields set directly
        self.mounts: list = []
        self.landlock: list[FsRule] = []
        self.rlimits: dict[int, Rlimit] = {}
        self.env: dict[str, str] = {}
        self.uid: int | None = None
        self.user: tuple[str | None, int | None] = (None, None)   # name, primary gid
        self.gid: int | None = None
        self.suppl: list[int] = []
        self.suppl_where: tuple[str, str] | None = None
        self.inherit_where: tuple[str, str] | None = None   # (where, as written)
        # -m/-M: "default" for a bare flag, else the maps given; None if absent
        self.uidmap: tuple[IdMap, ...] | str | None = None
        self.gidmap: tuple[IdMap, ...] | str | None = None
        self.propagation_where: str | None = None
        self.root_source: dict[str, str] = {}   # "pivot_root"/"chroot" -> who set it
        self.seccomp_source: str | None = None  # who gave -S/--seccomp-bpf-binary
        self.modes: set[str] = set()            # --dry-run, --explain, ...
        self.host_problems: list[str] = []      # unknown users/groups, as messages

    # -- helpers -----------------------------------------------------------
    def mount_ns(self) -> None:
        self.ns.add("mount")

    def pid_ns(self) -> None:             # -p: implies -v and -r
        self.ns.add("pid")
        self.mount_ns()
        self.f["remount_proc_ro"] = True

    def user_ns(self) -> None:            # -U: implies -p
        self.ns.add("user")
        self.pid_ns()

    def tmp(self, size: int | None) -> None:
        self.mount_ns()
        if size is not None:
            self.f["tmpfs_tmp_size"] = size
        elif self.f.get("tmpfs_tmp_size") is None:
            self.f["tmpfs_tmp_size"] = DEFAULT_TMP_SIZE

    def set_seccomp(self, field: str, path: str, source: str) -> None:
        if self.seccomp_source is not None:
            raise ValueError(f"a seccomp filter is already given (by "
                             f"{self.seccomp_source}); a jail has one")
        self.seccomp_source = source
        self.f[field] = os.path.abspath(path)

    def set_root(self, field: str, path: str, source: str) -> None:
        if field in self.root_source:
            raise ValueError(f"{field} is already set (by {self.root_source[field]})")
        self.root_source[field] = source
        self.f[field] = path

    # -- one option ----------------------------------------------------------
    def apply(self, opt: Opt, value: str | None, disp: str, where: str) -> None:
        """Apply one option; ValueError text is wrapped by the caller."""
        k = opt.key
        if opt.cli_only:
            self.modes.add(k)
        elif k == "v":
            self.mount_ns()
        elif k == "p":
            self.pid_ns()
        elif k == "I":
            self.pid_ns()
            self.f["pid_init"] = False
        elif k == "U":
            self.user_ns()
        elif k == "e":
            if value is not None:
                raise _Refusal("enter an existing network namespace", NOT_YET)
            self.ns.add("net")
        elif k == "l":
            self.ns.add("ipc")
        elif k == "N":
            self.ns.add("cgroup")
        elif k == "uts":
            self.ns.add("uts")
            if value is not None:
                if not value or len(os.fsencode(value)) > HOST_NAME_MAX or "\0" in value:
                    raise _bad(f"a hostname of 1 to {HOST_NAME_MAX} bytes", value)
                self.f["hostname"] = value
        elif k in ("m", "M"):
            maps = parse_id_maps(value) if value is not None else "default"
            if k == "m":
                self.uidmap = maps
            else:
                self.gidmap = maps
            self.user_ns()
        elif k == "K":
            if value is None:
                self.f["propagation"] = "unchanged"
            elif value in PROPAGATION_MODES:
                self.f["propagation"] = value
            else:
                raise _bad("-K alone or -K<mode> with mode one of "
                           + ", ".join(PROPAGATION_MODES), value)
            self.propagation_where = where
        elif k == "b":
            self.mounts.append(parse_bind(value))
        elif k == "k":
            self.mounts.append(parse_mount(value))
        elif k == "P":
            self.set_root("pivot_root", value, _source(disp, where))
            self.mount_ns()
        elif k == "C":
            self.set_root("chroot", value, _source(disp, where))
        elif k == "d":
            self.mount_ns()
            self.f["mount_dev"] = True
        elif k == "r":
            self.mount_ns()
            self.f["remount_proc_ro"] = True
        elif k == "t":
            self.tmp(parse_size(value) if value is not None else None)
        elif k == "profile":
            self.profile(value, _source(f"{disp} {value}", where))
        elif k == "R":
            r = parse_rlimit(value)
            if r.resource in self.rlimits:
                raise ValueError(f"rlimit {value.split(',')[0].strip()} is given more than once")
            self.rlimits[r.resource] = r
        elif k == "u":
            if self.uid is not None:
                raise ValueError("given more than once")
            uid, name, primary = lookup_user(value)
            self.uid = uid
            self.user = (name, primary)
        elif k == "g":
            if self.gid is not None:
                raise ValueError("given more than once")
            self.gid = lookup_group(value)
        elif k == "G":
            self.inherit_where = self.inherit_where or (where, disp)
        elif k == "add-suppl-group":
            gid = lookup_group(value)
            if gid not in self.suppl:
                self.suppl.append(gid)
            self.suppl_where = self.suppl_where or (where, disp)
        elif k == "c":
            self.f["capabilities"] = parse_caps(value)
        elif k == "ambient":
            self.f["ambient"] = True
        elif k == "B":
            self.f["securebits_skip"] = _parse_hex(value, "a hex securebits mask like 0x3")
        elif k == "n":
            self.f["no_new_privs"] = True
        elif k == "S":
            self.set_seccomp("seccomp_policy", value, _source(disp, where))
        elif k == "seccomp-bpf-binary":
            self.set_seccomp("seccomp_bpf", value, _source(disp, where))
        elif k == "L":
            self.f["seccomp_default"] = "log"
        elif k == "seccomp-default":
            if value not in SECCOMP_DEFAULTS:
                raise _bad("one of " + ", ".join(SECCOMP_DEFAULTS), value)
            self.f["seccomp_default"] = value
        elif k == "T":
            # minijail: 'dynamic' installs the filter after exec through a
            # preloaded library, 'static' before exec.  privjail never
            # preloads: it always installs before exec, which filters the
            # dynamic loader too, so either value is honoured as "at least
            # as strict" and the policy must allow execve (checked at launch).
            if value not in ("static", "dynamic"):
                raise _bad("static or dynamic", value)
        elif k == "Y":
            pass    # thread sync: every filter privjail loads uses TSYNC already
        elif k == "V":
            self.f["enter_mount_ns"] = os.path.abspath(value)
        elif k == "w":
            self.f["new_session_keyring"] = True
        elif k == "no-default-runtime-environment":
            # minijail: do not apply its default seccomp policy and
            # no_new_privs.  privjail has no default runtime environment: a
            # jail gets a filter and no_new_privs only when asked (-S, -n),
            # so the option's request is what privjail always does.
            pass
        elif k == "env-reset":
            self.f["env_reset"] = True
            self.env.clear()          # minijail: --env-reset discards earlier --env-add
        elif k == "env-add":
            name, eq, val = value.partition("=")
            if not eq or not name:
                raise _bad("NAME=VALUE", value)
            self.env[name] = val
        elif k == "f":
            self.f["pidfile"] = os.path.abspath(value)
        elif k == "i":
            self.f["detach"] = True
        elif k == "die-with-parent":
            self.f["die_with_parent"] = True
        elif k == "cwd":
            self.f["cwd"] = value
        elif k == "fs-default-paths":
            from .landlock import DEFAULT_PATHS
            self.landlock.extend(DEFAULT_PATHS)
        elif k.startswith("fs-path-"):
            if not value.startswith("/"):
                raise _bad("an absolute path", value)
            self.landlock.append(FsRule(value, k[len("fs-path-"):]))
        elif k == "no-fs-restrictions":
            # minijail: opt out of the Landlock rules it derives from the
            # profile's mounts.  privjail's profiles derive none, so the
            # jail is exactly what the other options say.
            pass
        elif k == "landlock-best-effort":
            self.f["landlock_best_effort"] = True
        elif k == "memory-limit":
            self.f["memory_limit"] = parse_memory_limit(value)
        elif k == "pids-limit":
            self.f["pids_limit"] = _parse_count(value, "a number of tasks like 64",
                                                MAX_PIDS_LIMIT)
        elif k == "cpu-weight":
            self.f["cpu_weight"] = _parse_count(value, "a weight from 1 to 10000",
                                                CPU_WEIGHT_RANGE[1])
        elif k == "cpu-quota":
            self.f["cpu_quota"] = parse_cpu_quota(value)
        elif k == "device-allow":
            self.f["device_allow"] = (*(self.f.get("device_allow") or ()),
                                      parse_device_rule(value))
        elif k == "own-cgroup":
            self.f["own_cgroup"] = True
        elif k == "cgroup-parent":
            self.f["cgroup_parent"] = value
        else:  # pragma: no cover - every table entry is handled above
            raise AssertionError(f"option {disp} has no handler")

    def profile(self, name: str, source: str) -> None:
        """--profile: minijail0(1)'s SANDBOXING PROFILES."""
        if name not in PROFILES:
            raise _bad("one of " + ", ".join(PROFILES), name)
        self.mount_ns()                                  # -v
        self.set_root("pivot_root", "/var/empty", source)  # -P /var/empty
        self.mounts.append(Bind("/", "/"))               # -b /
        self.mounts.append(Bind("/proc", "/proc"))       # -b /proc
        if name == "minimalistic-mountns":
            if os.path.exists("/dev/log"):
                self.mounts.append(Bind("/dev/log", "/dev/log"))   # -b /dev/log
            self.f["mount_dev"] = True                   # --mount-dev
        self.tmp(None)                                   # -t
        self.f["remount_proc_ro"] = True                 # -r

    # -- the end -----------------------------------------------------------
    def finish(self, argv: list[str]) -> JailSpec:
        f = dict(self.f)
        if self.propagation_where is not None and "mount" not in self.ns:
            raise ConfigError(f"{self.propagation_where}option -K: only applies with a "
                              f"mount namespace (-v)")
        # A bare -m/-M maps the current uid/gid to the -u/-g one (root if none).
        if self.uidmap == "default":
            f["uid_map"] = (IdMap(self.uid if self.uid is not None else 0, os.getuid(), 1),)
        elif self.uidmap is not None:
            f["uid_map"] = self.uidmap
        if self.gidmap == "default":
            f["gid_map"] = (IdMap(self.gid if self.gid is not None else 0, os.getgid(), 1),)
        elif self.gidmap is not None:
            f["gid_map"] = self.gidmap
        if self.inherit_where is not None:
            where, disp = self.inherit_where
            if self.suppl_where is not None:
                raise ConfigError(f"{where}option {disp}: cannot be combined with "
                                  f"--add-suppl-group")
            name, primary = self.user
            if name is None and self.host_problems:
                pass          # -u named a user this host lacks: already reported
            elif name is None:
                got = "no -u" if self.uid is None else f"numeric uid {self.uid}"
                raise ConfigError(f"{where}option {disp}: needs a user name given to -u "
                                  f"(got {got})")
            else:
                f["groups"] = user_groups(name, primary)
        elif self.suppl:
            f["groups"] = tuple(self.suppl)
        elif self.uid is not None or self.gid is not None:
            f["groups"] = ()          # changing identity drops supplementary groups
        f["uid"], f["gid"] = self.uid, self.gid
        spec = JailSpec(argv=tuple(argv), namespaces=frozenset(self.ns),
                        landlock=tuple(dict.fromkeys(self.landlock)),
                        mounts=tuple(self.mounts), rlimits=tuple(self.rlimits.values()),
                        env_add=tuple(self.env.items()), **f)
        try:
            return validate(spec)
        except SpecError as e:
            raise ConfigError(str(e)) from None


def _source(what: str, where: str) -> str:
    """'-P' or '-P at FILE:LINE', for messages about an earlier option."""
    return f"{what} at {where[:-2]}" if where else what


class _Refusal(Exception):
    def __init__(self, what: str, why: str):
        super().__init__(what, why)
        self.what, self.why = what, why


def _apply(b: _Builder, opt: Opt, name: str, value: str | None, where: str) -> None:
    disp = _display(name)
    try:
        if opt.refused is not None:
            raise _Refusal(*opt.refused)
        b.apply(opt, value, disp, where)
    except _Refusal as r:
        raise ConfigError(f"{where}option {disp} ({r.what}): {r.why}") from None
    except HostLookupError as e:
        # Kept, not raised: whether it is an error depends on --dry-run,
        # which may come later on the command line (see Builder.finish).
        b.host_problems.append(f"{where}option {disp}: {e}")
    except ValueError as e:
        raise ConfigError(f"{where}option {disp}: {e}") from None


def _lookup_long(name: str) -> tuple[str, Opt]:
    """Exact long name, or an unambiguous prefix of one (as getopt_long)."""
    if name in LONG:
        return name, LONG[name]
    matches = [n for n in LONG if n.startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0], LONG[matches[0]]
    if len(matches) > 1:
        raise ConfigError(f"option --{name}: ambiguous, could be "
                          + ", ".join("--" + m for m in sorted(matches)))
    raise ConfigError(f"option --{name}: unknown option")


def parse_command_line(args: list[str]) -> JailSpec:
    """minijail0-style argv (options, then PROGRAM ARGS...) -> validated JailSpec.

    Options stop at '--' or at the first argument that is not an option.
    Short options cluster (-pvr) and take their argument attached or as the
    next word (-unobody, -u nobody); optional arguments must be attached
    (-Kprivate, -t128M, --uts=name), as with getopt(3).  A user or group
    this host does not know is an error."""
    b, program = _parse(args)
    if b.host_problems:
        raise ConfigError(b.host_problems[0])
    return b.finish(program)


@dataclass(frozen=True)
class Invocation:
    """What privjail was asked: the spec, its modes, and (in --dry-run only)
    what this host could not resolve."""
    spec: JailSpec
    modes: frozenset[str]
    host_problems: tuple[str, ...] = ()
    program_given: bool = True


DRY_RUN_PLACEHOLDER = ("<no program>",)


def parse_invocation(args: list[str]) -> Invocation:
    """parse_command_line, plus privjail's modes.  With --dry-run, a user or
    group this host does not know is listed instead of raised (the spec then
    leaves that id unchanged), and the program may be left out."""
    b, program = _parse(args)
    dry = "dry-run" in b.modes
    if b.host_problems and not dry:
        raise ConfigError(b.host_problems[0])
    given = bool(program)
    if not given and b.modes & {"dry-run", "explain"}:
        program = list(DRY_RUN_PLACEHOLDER)
    return Invocation(b.finish(program), frozenset(b.modes), tuple(b.host_problems), given)


def _parse(args: list[str]) -> tuple["_Builder", list[str]]:
    """Apply every option in order; return the builder and the program argv."""
    b = _Builder()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            name, opt = _lookup_long(name)
            if opt.refused is not None:
                _apply(b, opt, name, None, "")
            if opt.arg == NO_ARG and eq:
                raise ConfigError(f"option --{name}: takes no value, got {value!r}")
            if opt.arg == REQUIRED and not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"option --{name}: expected {opt.metavar}, got nothing")
                i += 1
                value = args[i]
            elif opt.arg == OPTIONAL and not eq:
                value = None
            elif opt.arg == NO_ARG:
                value = None
            if opt.key == "config":
                _include(b, value)
            else:
                _apply(b, opt, name, value, "")
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break                               # the program
        j = 1
        while j < len(arg):
            c = arg[j]
            opt = SHORT.get(c)
            if opt is None:
                raise ConfigError(f"option -{c}: unknown option")
            if opt.arg == NO_ARG:
                _apply(b, opt, c, None, "")
                j += 1
                continue
            rest = arg[j + 1:]
            if opt.arg == OPTIONAL:
                _apply(b, opt, c, rest or None, "")
            elif rest:
                _apply(b, opt, c, rest, "")
            else:
                if opt.refused is not None:
                    _apply(b, opt, c, None, "")
                if i + 1 >= len(args):
                    raise ConfigError(f"option -{c}: expected {opt.metavar}, got nothing")
                i += 1
                _apply(b, opt, c, args[i], "")
            break
        i += 1
    return b, args[i:]


# Options naming a file that travels with the config file: a relative path
# in a config file is relative to the file's directory (a privjail extension;
# minijail would take it relative to its working directory, so the corpus
# only uses absolute paths), so a profile and its policy can move together.
_BESIDE_THE_FILE = ("S", "seccomp-bpf-binary")


def _include(b: _Builder, path: str) -> None:
    """--config FILE: apply the file's entries where the option stands."""
    for e in parse_config_file(path):
        opt = LONG[e.key] if len(e.key) > 1 else SHORT[e.key]
        value = e.value
        if opt.key in _BESIDE_THE_FILE and value and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        _apply(b, opt, e.key, value, e.where)
