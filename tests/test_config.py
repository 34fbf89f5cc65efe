"""Unit tests for broker/jail/config.py: minijail0 flags and config files -> JailSpec.

Nothing here launches a jail."""
from __future__ import annotations

import collections
import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from broker.jail import config as C
from broker.jail.config import ConfigError, parse_command_line, parse_config_file
from broker.jail.spec import RLIM_INFINITY, Bind, IdMap, JailSpec, Mount, Rlimit

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared/corpus/chromeos/minijail-conf"
HEADER = "% minijail-config-file v0\n"
PROG = ["/bin/true"]
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384

# An existing user and group on any Debian-like host (and most others).
NOBODY = pwd.getpwnam("nobody")
ROOT_GROUP = grp.getgrgid(0).gr_name


def parse(*flags: str) -> JailSpec:
    return parse_command_line([*flags, *PROG])


def error(*flags: str, program=PROG) -> str:
    with pytest.raises(ConfigError) as e:
        parse_command_line([*flags, *program])
    return str(e.value)


@pytest.fixture
def conf(tmp_path):
    """conf("u = nobody", "n") -> path of a config file with the header."""
    count = iter(range(1000))

    def write(*lines: str, header: str = HEADER) -> str:
        p = tmp_path / f"c{next(count)}.conf"
        p.write_text(header + "".join(line + "\n" for line in lines))
        return str(p)
    return write


def conf_error(path: str, *extra: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_command_line(["--config", path, *extra, *PROG])
    return str(e.value)


# ===========================================================================
# Good paths: command line
# ===========================================================================

def test_program_only_gives_default_spec():
    s = parse()
    assert s == JailSpec(argv=tuple(PROG))
    assert s.groups is None and s.uid is None and s.propagation == "slave"


def test_program_arguments_and_separator():
    assert parse_command_line(["-v", "--", "/bin/echo", "-p", "x"]).argv == ("/bin/echo", "-p", "x")
    # options stop at the first non-option: the later -p belongs to the program
    s = parse_command_line(["-v", "/bin/echo", "-p"])
    assert s.argv == ("/bin/echo", "-p") and not s.has("pid")
    # after --, even an option-looking program name is the program
    assert parse_command_line(["--", "-weird"]).argv == ("-weird",)
    assert parse_command_line(["-"]).argv == ("-",)


def test_short_options_cluster_and_take_attached_arguments():
    s = parse("-vlN", f"-u{NOBODY.pw_uid}", "-nf", "/run/x.pid")
    assert s.namespaces == {"mount", "ipc", "cgroup"}
    assert s.uid == NOBODY.pw_uid and s.no_new_privs and s.pidfile == "/run/x.pid"


@pytest.mark.parametrize("flags, namespaces", [
    (["-v"], {"mount"}),
    (["--ns-mount"], {"mount"}),
    (["-e"], {"net"}),
    (["-l"], {"ipc"}),
    (["-N"], {"cgroup"}),
    (["--uts"], {"uts"}),
    (["-p"], {"pid", "mount"}),
    (["-I"], {"pid", "mount"}),
    (["-U"], {"user", "pid", "mount"}),
    (["-m"], {"user", "pid", "mount"}),
    (["-M"], {"user", "pid", "mount"}),
])
def test_namespace_flags(flags, namespaces):
    assert parse(*flags).namespaces == namespaces


def test_p_implies_mount_ns_and_readonly_proc():
    s = parse("-p")
    assert s.has("mount") and s.has("pid") and s.remount_proc_ro and s.pid_init


def test_I_implies_p_and_runs_program_as_init():
    s = parse("-I")
    assert s.has("pid") and s.has("mount") and s.remount_proc_ro and not s.pid_init


def test_U_implies_p():
    s = parse("-U")
    assert s.has("user") and s.has("pid") and s.remount_proc_ro


def test_uts_hostname():
    assert parse("--uts=jailhost").hostname == "jailhost"
    assert parse("--uts").hostname is None
    # an optional long argument must be attached: the next word is the program
    assert parse_command_line(["--uts", "/bin/true"]).argv == ("/bin/true",)


def test_bare_m_and_M_map_current_ids_to_root():
    s = parse("-m", "-M")
    assert s.uid_map == (IdMap(0, os.getuid(), 1),)
    assert s.gid_map == (IdMap(0, os.getgid(), 1),)


def test_bare_m_maps_current_uid_to_the_chosen_uid():
    s = parse("-m", "-M", "-u", "1000", "-g", "1001")
    assert s.uid_map == (IdMap(1000, os.getuid(), 1),)
    assert s.gid_map == (IdMap(1001, os.getgid(), 1),)


def test_explicit_id_maps():
    s = parse("-m0 1000 1,1 100000 65536", "-M0 1000 1")
    assert s.uid_map == (IdMap(0, 1000, 1), IdMap(1, 100000, 65536))
    assert s.gid_map == (IdMap(0, 1000, 1),)
    assert s.has("user") and s.has("pid")


def test_last_m_wins():
    assert parse("-m0 5 1", "-m0 6 1").uid_map == (IdMap(0, 6, 1),)


@pytest.mark.parametrize("flag, mode", [
    ("-K", "unchanged"), ("-Kslave", "slave"), ("-Kprivate", "private"),
    ("-Kshared", "shared"), ("-Kunbindable", "unbindable"),
])
def test_K_propagation(flag, mode):
    assert parse("-v", flag).propagation == mode


def test_K_mode_must_be_attached():
    s = parse_command_line(["-v", "-K", "/bin/true"])
    assert s.propagation == "unchanged" and s.argv == ("/bin/true",)


@pytest.mark.parametrize("arg, bind", [
    ("/a", Bind("/a", "/a", False)),
    ("/a,/b", Bind("/a", "/b", False)),
    ("/a,,1", Bind("/a", "/a", True)),
    ("/a,/b,0", Bind("/a", "/b", False)),
    ("/a,/b,1", Bind("/a", "/b", True)),
])
def test_bind_forms(arg, bind):
    assert parse("-v", "-b", arg).mounts == (bind,)
    assert parse("-v", f"--bind-mount={arg}").mounts == (bind,)


def test_mount_defaults_flags_and_tmpfs_data():
    s = parse("-v", "-k", "tmpfs,/run,tmpfs")
    assert s.mounts == (Mount("tmpfs", "/run", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC,
                              "mode=0755,size=10M"),)
    # the default data is only for tmpfs
    s = parse("-v", "-k", "proc,/proc,proc")
    assert s.mounts == (Mount("proc", "/proc", "proc", MS_NODEV | MS_NOSUID | MS_NOEXEC, ""),)


def test_mount_flags_and_data_with_commas():
    s = parse("-v", "--mount", "/run,/run,tmpfs,MS_NODEV|MS_NOEXEC|MS_NOSUID,mode=755,size=10M")
    assert s.mounts == (Mount("/run", "/run", "tmpfs", MS_NODEV | MS_NOEXEC | MS_NOSUID,
                              "mode=755,size=10M"),)
    s = parse("-v", "--mount=/x,/y,none,MS_BIND|MS_REC")
    assert s.mounts[0].flags == MS_BIND | MS_REC and s.mounts[0].data == ""
    assert parse("-v", "-k", "a,/b,ext4,0x1|MS_NODEV").mounts[0].flags == 1 | MS_NODEV
    assert parse("-v", "-k", "a,/b,ext4,32768").mounts[0].flags == 32768


def test_mounts_keep_their_order():
    s = parse("-v", "-b", "/a", "-k", "t,/t,tmpfs", "-b", "/c")
    assert [m.dest for m in s.mounts] == ["/a", "/t", "/c"]


def test_filesystem_flags_imply_mount_ns():
    for flags in (["-d"], ["--mount-dev"], ["-r"], ["-t"], ["-P", "/var/empty"]):
        assert parse(*flags).has("mount"), flags
    assert parse("-d").mount_dev
    assert parse("-r").remount_proc_ro
    assert parse("-P", "/srv/root").pivot_root == "/srv/root"
    assert parse("-v", "-C", "/srv/root").chroot == "/srv/root"


@pytest.mark.parametrize("flags, size", [
    (["-t"], 64 << 20),
    (["-t128M"], 128 << 20),
    (["-t1G"], 1 << 30),
    (["-t4096"], 4096),
    (["-t10K"], 10 << 10),
    (["-t128M", "-t"], 128 << 20),      # a bare -t keeps an earlier size
    (["-t", "-t2M"], 2 << 20),
])
def test_tmpfs_size(flags, size):
    assert parse(*flags).tmpfs_tmp_size == size


def test_profile_minimalistic_mountns(monkeypatch):
    real_exists = os.path.exists
    for dev_log in (True, False):
        monkeypatch.setattr(C.os.path, "exists",
                            lambda p: dev_log if p == "/dev/log" else real_exists(p))
        s = parse("--profile", "minimalistic-mountns")
        binds = [Bind("/", "/"), Bind("/proc", "/proc")]
        if dev_log:
            binds.append(Bind("/dev/log", "/dev/log"))
        assert s.mounts == tuple(binds)
        assert s.namespaces == {"mount"}
        assert s.pivot_root == "/var/empty" and s.mount_dev and s.remount_proc_ro
        assert s.tmpfs_tmp_size == 64 << 20


def test_profile_minimalistic_mountns_nodev():
    s = parse("--profile=minimalistic-mountns-nodev")
    assert s.mounts == (Bind("/", "/"), Bind("/proc", "/proc"))
    assert s.pivot_root == "/var/empty" and not s.mount_dev
    assert s.remount_proc_ro and s.tmpfs_tmp_size == 64 << 20


def test_profile_keeps_an_earlier_tmp_size():
    assert parse("-t1M", "--profile", "minimalistic-mountns").tmpfs_tmp_size == 1 << 20


@pytest.mark.parametrize("arg, rlimit", [
    ("RLIMIT_NOFILE,64,128", Rlimit(7, 64, 128)),
    ("7,64,128", Rlimit(7, 64, 128)),
    ("RLIMIT_MEMLOCK,unlimited,unlimited", Rlimit(8, RLIM_INFINITY, RLIM_INFINITY)),
    ("RLIMIT_AS,0x1000,unlimited", Rlimit(9, 0x1000, RLIM_INFINITY)),
    ("13,40,40", Rlimit(13, 40, 40)),
    (" RLIMIT_CORE , 0 , 0 ", Rlimit(4, 0, 0)),
])
def test_rlimits(arg, rlimit):
    assert parse("-R", arg).rlimits == (rlimit,)
    assert parse(f"-R{arg}").rlimits == (rlimit,)


def test_several_rlimits_in_order():
    s = parse("-R", "RLIMIT_NOFILE,1,2", "-R", "RLIMIT_CORE,0,0")
    assert [r.resource for r in s.rlimits] == [7, 4]


def test_user_by_name_and_number():
    s = parse("-u", "nobody")
    assert s.uid == NOBODY.pw_uid and s.gid is None
    assert s.groups == ()          # changing uid drops the supplementary groups
    assert parse("-u", "4321").uid == 4321


def test_group_by_name_and_number():
    s = parse("-g", ROOT_GROUP)
    assert s.gid == 0 and s.uid is None and s.groups == ()
    assert parse("-g", "4321").gid == 4321


def test_no_identity_options_leave_groups_unchanged():
    assert parse("-v", "-n").groups is None


def test_G_inherits_the_users_groups():
    s = parse("-u", "nobody", "-G")
    assert s.groups == tuple(os.getgrouplist("nobody", NOBODY.pw_gid))
    # order does not matter
    assert parse("-G", "-u", "nobody").groups == s.groups


def test_add_suppl_group():
    s = parse("--add-suppl-group", ROOT_GROUP, "--add-suppl-group", "4321",
              "--add-suppl-group", "0")
    assert s.groups == (0, 4321)
    assert s.uid is None


@pytest.mark.parametrize("text, mask", [
    ("0", 0),
    ("0x300b", 0x300b),
    ("300b", 0x300b),                     # a hex constant, as minijail0(1) says
    ("0x800000000", 0x800000000),
    ("cap_chown+e", 1 << 0),
    ("cap_chown,cap_fowner+eip", (1 << 0) | (1 << 3)),
    ("CAP_CHOWN=e", 1 << 0),
    ("cap_sys_admin+ip", 0),              # only the effective set counts
    ("cap_sys_ptrace=e cap_dac_override=e", (1 << 19) | (1 << 1)),
    ("cap_dac_read_search,cap_sys_resource,cap_perfmon,cap_bpf,cap_sys_ptrace=e",
     (1 << 2) | (1 << 24) | (1 << 38) | (1 << 39) | (1 << 19)),
    ("cap_checkpoint_restore=e", 1 << 40),
    ("=e", (1 << 41) - 1),
    ("all=e cap_sys_admin-e", ((1 << 41) - 1) & ~(1 << 21)),
    ("cap_chown=e cap_chown=", 0),
    ("cap_chown+e-e", 0),
    ("12=e", 1 << 12),
])
def test_capabilities(text, mask):
    assert parse("-c", text).capabilities == mask


def test_ambient_and_securebits():
    s = parse("-c", "0x3000", "--ambient", "-B", "0x20")
    assert s.capabilities == 0x3000 and s.ambient and s.securebits_skip == 0x20
    assert parse("-c", "0", "-B", "3").securebits_skip == 3


def test_process_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = parse("-n", "-i", "-f", "jail.pid", "--die-with-parent", "--cwd", "/srv")
    assert s.no_new_privs and s.detach and s.die_with_parent and s.cwd == "/srv"
    assert s.pidfile == str(tmp_path / "jail.pid")     # relative to privjail's cwd


def test_environment():
    s = parse("--env-reset", "--env-add", "A=1", "--env-add=B=x=y", "--env-add", "A=2")
    assert s.env_reset and s.env_add == (("A", "2"), ("B", "x=y"))
    assert parse("--env-add", "E=").env_add == (("E", ""),)
    # as in minijail0, --env-reset discards the --env-add options before it
    s = parse("--env-add", "A=1", "--env-reset", "--env-add", "C=3")
    assert s.env_reset and s.env_add == (("C", "3"),)


def test_long_option_prefixes():
    s = parse("--ns-m", "--env-r", "--die")
    assert s.has("mount") and s.env_reset and s.die_with_parent


# ===========================================================================
# Good paths: config files
# ===========================================================================

def test_config_file_entries(conf):
    p = conf("# a comment", "", "   # indented comment", "u = nobody", "G", "n",
             "bind-mount = /var/lib/metrics,,1", "  v  ", "t=32M", "K = private")
    assert parse_config_file(p) == [
        (p, 5, "u", "nobody"), (p, 6, "G", None), (p, 7, "n", None),
        (p, 8, "bind-mount", "/var/lib/metrics,,1"), (p, 9, "v", None),
        (p, 10, "t", "32M"), (p, 11, "K", "private")]
    s = parse_command_line(["--config", p, *PROG])
    assert s.uid == NOBODY.pw_uid and s.no_new_privs and s.propagation == "private"
    assert s.mounts == (Bind("/var/lib/metrics", "/var/lib/metrics", True),)
    assert s.tmpfs_tmp_size == 32 << 20


def test_config_line_continuation(conf):
    p = conf("v", "mount = /run,/run,tmpfs,\\", "MS_NODEV|MS_NOSUID,\\", "mode=700", "u = nobody",
             "n")
    entries = parse_config_file(p)
    assert entries[1] == (p, 3, "mount", "/run,/run,tmpfs,MS_NODEV|MS_NOSUID,mode=700")
    assert entries[2].line == 6 and entries[3].line == 7
    s = parse_command_line(["--config", p, *PROG])
    assert s.mounts == (Mount("/run", "/run", "tmpfs", MS_NODEV | MS_NOSUID, "mode=700"),)


def test_config_crlf_line_endings(tmp_path):
    p = tmp_path / "crlf.conf"
    p.write_bytes(b"% minijail-config-file v0\r\nv\r\nmount = t,/t,\\\r\ntmpfs\r\n")
    s = parse_command_line(["--config", str(p), *PROG])
    assert s.mounts == (Mount("t", "/t", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC,
                              "mode=0755,size=10M"),)


def test_config_combines_with_flags_in_order(conf):
    p = conf("v", "t = 8M", "b = /a")
    s = parse_command_line(["-b", "/first", "--config", p, "-t16M", "-b", "/last", "-n", *PROG])
    assert [m.src for m in s.mounts] == ["/first", "/a", "/last"]
    assert s.tmpfs_tmp_size == 16 << 20 and s.no_new_privs and s.has("mount")
    s = parse_command_line(["-t16M", "--config", p, *PROG])
    assert s.tmpfs_tmp_size == 8 << 20


def test_config_via_long_option_forms(conf):
    p = conf("n")
    assert parse_command_line([f"--config={p}", *PROG]).no_new_privs


def test_chromeos_sandboxing_guide_example(conf, monkeypatch):
    monkeypatch.setattr(C.os.path, "exists", lambda p: p == "/dev/log")
    p = conf("e", "l", "N", "p", "uts", "profile=minimalistic-mountns", "n", "u = nobody",
             "mount = /run,/run,tmpfs,MS_NODEV|MS_NOEXEC|MS_NOSUID,mode=755,size=10M",
             "bind-mount = /run/dbus", "bind-mount = /var/lib/metrics,,1")
    s = parse_command_line(["--config", p, "/usr/bin/daemon", "--flag"])
    assert s.argv == ("/usr/bin/daemon", "--flag")
    assert s.namespaces == {"net", "ipc", "cgroup", "pid", "uts", "mount"}
    assert s.pivot_root == "/var/empty" and s.mount_dev and s.remount_proc_ro
    assert s.tmpfs_tmp_size == 64 << 20 and s.no_new_privs and s.pid_init
    assert s.uid == NOBODY.pw_uid and s.gid is None and s.groups == ()
    assert s.mounts == (
        Bind("/", "/"), Bind("/proc", "/proc"), Bind("/dev/log", "/dev/log"),
        Mount("/run", "/run", "tmpfs", MS_NODEV | MS_NOEXEC | MS_NOSUID, "mode=755,size=10M"),
        Bind("/run/dbus", "/run/dbus"), Bind("/var/lib/metrics", "/var/lib/metrics", True))


# ===========================================================================
# Bad input: the command line
# ===========================================================================

def test_unknown_options():
    assert error("-j") == "option -j: unknown option"
    assert error("-vj") == "option -j: unknown option"
    assert error("--frobnicate") == "option --frobnicate: unknown option"
    assert error("--frob=1") == "option --frob: unknown option"


def test_ambiguous_long_prefix():
    msg = error("--env")
    assert msg.startswith("option --env: ambiguous") and "--env-add" in msg


def test_missing_required_argument():
    assert error("-u", program=[]) == "option -u: expected a user name or uid, got nothing"
    assert "option --mount: expected SRC,DEST,TYPE" in error("--mount", program=[])


def test_value_given_to_option_without_argument():
    assert error("--ambient=1") == "option --ambient: takes no value, got '1'"


def test_no_program():
    assert error(program=[]) == "no program given"
    assert error("-v", "--", program=[]) == "no program given"


@pytest.mark.parametrize("arg, expect", [
    ("x", "option -R: expected TYPE,CUR,MAX, got 'x'"),
    ("RLIMIT_NOFILE,1", "option -R: expected TYPE,CUR,MAX, got 'RLIMIT_NOFILE,1'"),
    ("RLIMIT_NOFILE,1,2,3", "option -R: expected TYPE,CUR,MAX"),
    ("RLIMIT_NOFILE,,2", "option -R: expected TYPE,CUR,MAX"),
    ("RLIMIT_FOO,1,1", "option -R: unknown rlimit type 'RLIMIT_FOO'"),
    ("99,1,1", "option -R: unknown rlimit type '99'"),
    ("RLIMIT_NOFILE,a,1", "option -R: expected a number or 'unlimited', got 'a'"),
    ("RLIMIT_NOFILE,-1,1", "option -R: expected a number or 'unlimited', got '-1'"),
    ("RLIMIT_NOFILE,1_0,1", "option -R: expected a number or 'unlimited', got '1_0'"),
    ("RLIMIT_NOFILE,1,0x1" + "0" * 16, "option -R: '0x1" + "0" * 16 + "' is out of range"),
])
def test_bad_rlimit(arg, expect):
    assert error("-R", arg).startswith(expect)


def test_rlimit_given_twice():
    assert error("-R", "RLIMIT_NOFILE,1,1", "-R", "7,2,2") == \
        "option -R: rlimit 7 is given more than once"


def test_rlimit_soft_above_hard_is_caught_by_validate():
    assert error("-R", "RLIMIT_NOFILE,10,5") == "rlimit 7: soft limit 10 exceeds hard limit 5"


@pytest.mark.parametrize("arg, expect", [
    (",/x", "option -b: expected SRC[,[DEST][,WRITABLE]], got ',/x'"),
    ("", "option -b: expected SRC[,[DEST][,WRITABLE]], got ''"),
    ("/a,/b,1,x", "option -b: expected SRC[,[DEST][,WRITABLE]], got '/a,/b,1,x'"),
    ("/a,/b,2", "option -b: expected WRITABLE to be 0 or 1, got '2'"),
    ("/a,/b,yes", "option -b: expected WRITABLE to be 0 or 1, got 'yes'"),
])
def test_bad_bind(arg, expect):
    assert error("-v", "-b", arg).startswith(expect)


def test_relative_bind_paths_are_caught_by_validate():
    assert error("-v", "-b", "rel,/x") == "bind source must be an absolute path, not 'rel'"
    assert error("-v", "-b", "/a,rel") == "mount destination must be an absolute path, not 'rel'"


@pytest.mark.parametrize("arg, expect", [
    ("a,/b", "option -k: expected SRC,DEST,TYPE[,FLAGS[,DATA]], got 'a,/b'"),
    ("a,,tmpfs", "option -k: expected SRC,DEST,TYPE[,FLAGS[,DATA]], got 'a,,tmpfs'"),
    ("a,/b,tmpfs,MS_FOO", "option -k: expected MS_* names or numbers separated by '|', "
                          "got 'MS_FOO'"),
    ("a,/b,tmpfs,MS_NODEV||MS_NOEXEC", "option -k: expected MS_* names or numbers"),
])
def test_bad_mount(arg, expect):
    assert error("-v", "-k", arg).startswith(expect)


def test_mounts_without_mount_ns_are_caught_by_validate():
    assert error("-b", "/a") == "mounts (-b/-k) need a mount namespace (-v)"
    assert error("-C", "/srv") == "chroot (-C) need a mount namespace (-v)"


@pytest.mark.parametrize("flag, expect", [
    ("-tabc", "option -t: expected a size like 64M"),
    ("-t12X", "option -t: expected a size like 64M"),
    ("-tM", "option -t: expected a size like 64M"),
    ("-t0", "option -t: the /tmp size must be positive, got '0'"),
    ("-t99999999999E", "option -t: size '99999999999E' does not fit in 64 bits"),
])
def test_bad_tmp_size(flag, expect):
    assert error(flag).startswith(expect)


def test_bad_propagation_mode():
    assert error("-v", "-Kslavish") == ("option -K: expected -K alone or -K<mode> with mode one "
                                        "of slave, private, shared, unbindable, got 'slavish'")


def test_K_without_mount_ns():
    assert error("-Kprivate") == "option -K: only applies with a mount namespace (-v)"
    assert parse("-p", "-K").propagation == "unchanged"     # -p implies -v


@pytest.mark.parametrize("flag, expect", [
    ("-m0 1000", "option -m: expected 'INSIDE OUTSIDE COUNT' triples separated by ',', "
                 "got '0 1000'"),
    ("-mfoo", "option -m: expected 'INSIDE OUTSIDE COUNT' triples"),
    ("-M0 0 1,", "option -M: expected 'INSIDE OUTSIDE COUNT' triples"),
    ("-m0 0 0", "option -m: id map '0 0 0' is out of range"),
    ("-m0 4294967296 1", "option -m: id map '0 4294967296 1' is out of range"),
])
def test_bad_id_map(flag, expect):
    assert error(flag).startswith(expect)


@pytest.mark.parametrize("arg, expect", [
    ("cap_frobnicate+e", "option -c: unknown capability 'cap_frobnicate'"),
    ("chown+e", "option -c: unknown capability 'chown'"),
    ("cap_chown", "option -c: capability clause 'cap_chown' has no operator"),
    ("cap_chown+x", "option -c: capability clause 'cap_chown+x': flags must be among e, i, p"),
    ("cap_chown+", "option -c: capability clause 'cap_chown+': '+' needs flags"),
    ("+e", "option -c: capability clause '+e': an empty capability list is only allowed "
           "with '='"),
    ("0x1" + "0" * 16, "option -c: '0x1" + "0" * 16 + "' does not fit in 64 bits"),
])
def test_bad_capabilities(arg, expect):
    assert error("-c", arg).startswith(expect)


def test_bad_securebits():
    assert error("-c", "0", "-B", "xyz") == \
        "option -B: expected a hex securebits mask like 0x3, got 'xyz'"


def test_ambient_and_securebits_need_caps():
    assert error("--ambient") == \
        "ambient capabilities (--ambient) need a capability mask (-c)"
    assert error("-B", "0x3") == \
        "skipping securebits (-B) only applies with a capability mask (-c)"


def test_bad_env_add():
    assert error("--env-add", "NOVALUE") == "option --env-add: expected NAME=VALUE, got 'NOVALUE'"
    assert error("--env-add", "=x") == "option --env-add: expected NAME=VALUE, got '=x'"


def test_bad_hostname():
    assert error("--uts=").startswith("option --uts: expected a hostname of 1 to 64 bytes")
    assert error("--uts=" + "h" * 65).startswith("option --uts: expected a hostname")


def test_unknown_profile():
    assert error("--profile", "maximalistic") == (
        "option --profile: expected one of minimalistic-mountns, minimalistic-mountns-nodev, "
        "got 'maximalistic'")


def test_unknown_user_and_group():
    assert error("-u", "no-such-user-xyz") == "option -u: unknown user 'no-such-user-xyz'"
    assert error("-g", "no-such-group-xyz") == "option -g: unknown group 'no-such-group-xyz'"
    assert error("--add-suppl-group", "no-such-group-xyz") == \
        "option --add-suppl-group: unknown group 'no-such-group-xyz'"
    assert error("-u", "4294967295") == "option -u: uid 4294967295 is out of range"
    assert error("-u", "") == "option -u: unknown user ''"


def test_user_and_group_given_twice():
    assert error("-u", "nobody", "-u", "0") == "option -u: given more than once"
    assert error("-g", "0", "-g", "0") == "option -g: given more than once"


def test_G_needs_a_user_name():
    assert error("-G") == "option -G: needs a user name given to -u (got no -u)"
    assert error("-G", "-u", "1000") == \
        "option -G: needs a user name given to -u (got numeric uid 1000)"
    assert error("-u", "nobody", "-G", "--add-suppl-group", "0") == \
        "option -G: cannot be combined with --add-suppl-group"


def test_root_set_twice():
    assert error("-P", "/a", "-P", "/b") == "option -P: pivot_root is already set (by -P)"
    assert error("--profile", "minimalistic-mountns", "-P", "/b") == \
        "option -P: pivot_root is already set (by --profile minimalistic-mountns)"
    assert error("-v", "-C", "/a", "-C", "/b") == "option -C: chroot is already set (by -C)"


def test_pivot_root_and_chroot_conflict_is_caught_by_validate():
    assert error("-P", "/a", "-C", "/b") == "pivot_root (-P) and chroot (-C) cannot both be set"


def test_spec_errors_become_config_errors_with_the_same_text():
    from broker.jail.spec import SpecError, validate
    bad = JailSpec(argv=("/bin/true",), pivot_root="rel", namespaces=frozenset({"mount"}))
    with pytest.raises(SpecError) as spec_err:
        validate(bad)
    assert error("-P", "rel") == str(spec_err.value)
    assert isinstance(ConfigError("x"), ValueError)


def test_enter_existing_net_ns_is_refused():
    assert error("-e/proc/1/ns/net") == \
        "option -e (enter an existing network namespace): not supported yet"


REFUSED = sorted(k for k, o in C.OPTIONS.items() if o.refused)


@pytest.mark.parametrize("key", REFUSED)
def test_refused_options_on_the_command_line(key):
    opt = C.OPTIONS[key]
    flag = f"-{key}" if len(key) == 1 else f"--{key}"
    args = [flag, "value"] if opt.arg == C.REQUIRED else [flag]
    what, why = opt.refused
    assert error(*args) == f"option {flag} ({what}): {why}"
    if opt.arg == C.REQUIRED:      # even without its argument
        assert error(flag, program=[]) == f"option {flag} ({what}): {why}"


@pytest.mark.parametrize("key", REFUSED)
def test_refused_options_in_a_config_file(key, conf):
    opt = C.OPTIONS[key]
    p = conf("v", f"{key} = /x" if opt.arg == C.REQUIRED else key)
    flag = f"-{key}" if len(key) == 1 else f"--{key}"
    what, why = opt.refused
    assert conf_error(p) == f"{p}:3: option {flag} ({what}): {why}"


def test_every_minijail_option_is_known():
    # minijail0's getopt string and long options (minijail0_cli.c), plus
    # --no-fs-restrictions from newer releases: each must be handled or refused.
    shorts = "abcdefghiklmnprstuvwyzBCGHIKLMNPRSTUVY"
    longs = ["help", "mount-dev", "ambient", "uts", "logging", "profile", "preload-library",
             "seccomp-bpf-binary", "add-suppl-group", "allow-speculative-execution", "config",
             "env-add", "env-reset", "mount", "bind-mount", "ns-mount",
             "enable-profile-fs-restrictions", "fs-default-paths", "fs-path-rx", "fs-path-ro",
             "fs-path-rw", "fs-path-advanced-rw", "no-default-runtime-environment",
             "no-fs-restrictions"]
    assert set(shorts) <= set(C.SHORT)
    assert set(longs) <= set(C.LONG)
    assert "not supported yet" in error("-y")
    refused_short = {"a", "h", "H", "s", "y", "z"}
    assert {k for k in C.SHORT if C.SHORT[k].refused} == refused_short


# ===========================================================================
# Bad input: config files
# ===========================================================================

def test_config_missing_header(conf):
    p = conf("u = nobody", header="")
    assert conf_error(p) == (f"{p}:1: expected '% minijail-config-file v0' as the first line, "
                             f"got 'u = nobody'")


def test_config_header_must_be_the_first_line(conf):
    p = conf("% minijail-config-file v0", header="# comment first\n")
    assert conf_error(p).startswith(f"{p}:1: expected '% minijail-config-file v0'")
    p = conf("v", header="% minijail-config-file v1\n")
    assert conf_error(p).startswith(f"{p}:1: expected '% minijail-config-file v0'")


def test_config_empty_file(conf):
    p = conf(header="")
    assert conf_error(p) == (f"{p}:1: expected '% minijail-config-file v0' as the first line, "
                             f"got an empty file")


def test_config_unreadable(tmp_path):
    p = tmp_path / "missing.conf"
    assert conf_error(str(p)) == f"option --config: cannot read {p}: No such file or directory"


def test_config_unknown_key(conf):
    p = conf("v", "frobnicate = 1")
    assert conf_error(p) == f"{p}:3: unknown option 'frobnicate'"
    p = conf("j")
    assert conf_error(p) == f"{p}:2: unknown option 'j'"


def test_config_keys_are_exact_not_prefixes(conf):
    p = conf("ns-m")
    assert conf_error(p) == f"{p}:2: unknown option 'ns-m'"


def test_config_key_with_dashes(conf):
    p = conf("--bind-mount = /a")
    assert conf_error(p) == (f"{p}:2: write option names without leading dashes "
                             f"(got '--bind-mount', expected 'bind-mount')")


def test_config_malformed_lines(conf):
    p = conf("= value")
    assert conf_error(p) == f"{p}:2: expected KEY = VALUE or KEY, got '= value'"
    p = conf("u_ser = nobody")
    assert conf_error(p) == f"{p}:2: option names contain only letters and '-', got 'u_ser'"
    p = conf("u nobody")
    assert conf_error(p) == f"{p}:2: expected KEY = VALUE or KEY, got 'u nobody'"


def test_config_may_not_name_a_program(conf):
    p = conf("v", "/bin/true")
    assert conf_error(p) == (f"{p}:3: a config file may not name the program to run "
                             f"(got '/bin/true'); give it on the command line")
    p = conf("-- /bin/true --flag")
    assert "a config file may not name the program" in conf_error(p)
    p = conf("--")
    assert "a config file may not name the program" in conf_error(p)
    p = conf("./run.sh")
    assert "a config file may not name the program" in conf_error(p)


def test_config_may_not_include_a_config(conf):
    inner = conf("n")
    p = conf("v", f"config = {inner}")
    assert conf_error(p) == (f"{p}:3: option --config: a config file may not include "
                             f"another config file")


def test_config_argument_presence(conf):
    p = conf("u")
    assert conf_error(p) == f"{p}:2: option -u: expected 'u = a user name or uid'"
    p = conf("bind-mount")
    assert conf_error(p).startswith(f"{p}:2: option --bind-mount: expected 'bind-mount = ")
    p = conf("n = 1")
    assert conf_error(p) == f"{p}:2: option -n: takes no value, got '1'"
    p = conf("u =")
    assert conf_error(p) == f"{p}:2: option -u: expected a user name or uid after '=', got nothing"


def test_config_value_errors_name_file_and_line(conf):
    p = conf("v", "", "# comment", "R = x")
    assert conf_error(p) == f"{p}:5: option -R: expected TYPE,CUR,MAX, got 'x'"
    p = conf("v", "mount = a,\\", "/b,tmpfs", "mount = a,/b,tmpfs,MS_BOGUS")
    assert conf_error(p).startswith(f"{p}:5: option --mount: expected MS_* names")
    p = conf("v", "mount = a,\\", "/b")
    assert conf_error(p) == (f"{p}:3: option --mount: expected SRC,DEST,TYPE[,FLAGS[,DATA]], "
                             f"got 'a,/b'")
    p = conf("u = no-such-user-xyz")
    assert conf_error(p) == f"{p}:2: option -u: unknown user 'no-such-user-xyz'"
    p = conf("g = no-such-group-xyz")
    assert conf_error(p) == f"{p}:2: option -g: unknown group 'no-such-group-xyz'"
    p = conf("e = /proc/1/ns/net")
    assert conf_error(p) == \
        f"{p}:2: option -e (enter an existing network namespace): not supported yet"
    p = conf("G")
    assert conf_error(p) == f"{p}:2: option -G: needs a user name given to -u (got no -u)"
    p = conf("Kprivate")
    assert conf_error(p) == f"{p}:2: unknown option 'Kprivate'"
    p = conf("K = private")
    assert conf_error(p) == f"{p}:2: option -K: only applies with a mount namespace (-v)"


def test_config_root_set_twice(conf):
    p = conf("profile = minimalistic-mountns", "P = /x")
    assert conf_error(p) == (f"{p}:3: option -P: pivot_root is already set "
                             f"(by --profile minimalistic-mountns at {p}:2)")


def test_config_options_combine_with_flags_for_duplicate_checks(conf):
    p = conf("u = nobody")
    assert error("--config", p, "-u", "0") == "option -u: given more than once"
    assert error("-u", "0", "--config", p) == f"{p}:2: option -u: given more than once"


def test_config_conflicts_caught_by_validate(conf):
    p = conf("P = /a", "C = /b")
    assert conf_error(p) == "pivot_root (-P) and chroot (-C) cannot both be set"
    p = conf("ambient")
    assert conf_error(p) == "ambient capabilities (--ambient) need a capability mask (-c)"


# ===========================================================================
# The ChromeOS corpus
# ===========================================================================

CORPUS_FILES = sorted(CORPUS.glob("*.conf"))


def classify(path: Path) -> tuple[str, str]:
    """'ok', 'refused' or 'unknown-id', with the message; anything else fails."""
    try:
        parse_command_line(["--config", str(path), "/bin/true"])
        return "ok", ""
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(f"{path}:"), msg      # every error names the file and line
        if "): not supported yet" in msg or "): privjail never" in msg:
            return "refused", msg
        if ": unknown user '" in msg or ": unknown group '" in msg:
            return "unknown-id", msg
        return "other", msg


@pytest.fixture
def any_user_exists(monkeypatch):
    """Pretend every user and group exists, so the outcome is host-independent."""
    monkeypatch.setattr(C, "lookup_user", lambda t: (int(t), None, None) if t.isdigit()
                        else (10000 + len(t), t, 20000))
    monkeypatch.setattr(C, "lookup_group", lambda t: int(t) if t.isdigit() else 20000 + len(t))
    monkeypatch.setattr(C, "user_groups", lambda name, gid: (gid, 30000))


def test_corpus_with_every_user_present(any_user_exists):
    outcomes = {p.name: classify(p) for p in CORPUS_FILES}
    counts = collections.Counter(kind for kind, _ in outcomes.values())
    assert len(CORPUS_FILES) == 67
    assert counts == {"ok": 67}, [o for o in outcomes.values() if o[0] != "ok"]
    refused = collections.Counter(msg.split(": ", 1)[1].split(" (")[0]
                                  for kind, msg in outcomes.values() if kind == "refused")
    assert refused == {}


def _line_of(path: Path, msg: str) -> int:
    return int(msg[len(f"{path}:"):].split(":", 1)[0])


def test_corpus_syntax():
    """Every corpus file is well-formed and uses only known keys."""
    entries = [e for p in CORPUS_FILES for e in parse_config_file(str(p))]
    assert len(entries) == 1125
    assert collections.Counter(e.key for e in entries)["bind-mount"] == 287


def test_corpus_on_this_host(monkeypatch):
    """With the real user database, a file either gives the same outcome as
    with every user present, or stops earlier at a user or group that this
    host really lacks."""
    real = {p: classify(p) for p in CORPUS_FILES}
    with monkeypatch.context() as m:
        m.setattr(C, "lookup_user", lambda t: (int(t), None, None) if t.isdigit()
                  else (10000 + len(t), t, 20000))
        m.setattr(C, "lookup_group", lambda t: int(t) if t.isdigit() else 20000 + len(t))
        m.setattr(C, "user_groups", lambda name, gid: (gid, 30000))
        fake = {p: classify(p) for p in CORPUS_FILES}
    counts = collections.Counter(kind for kind, _ in real.values())
    assert counts["other"] == 0, [o for o in real.values() if o[0] == "other"]
    assert sum(counts.values()) == 67
    for p in CORPUS_FILES:
        kind, msg = real[p]
        if kind != "unknown-id":
            assert real[p] == fake[p], p
            continue
        name = msg.rsplit("'", 2)[1]
        db = pwd.getpwnam if ": unknown user '" in msg else grp.getgrnam
        with pytest.raises(KeyError):
            db(name)
        if fake[p][0] == "refused":
            assert _line_of(p, msg) < _line_of(p, fake[p][1]), p
    # Files with neither -u/-g nor a refused option parse on any host.
    assert counts["ok"] >= 6, counts


def test_corpus_example_u2fd(any_user_exists):
    s = parse_command_line(["--config", str(CORPUS / "u2fd_minijail_u2fd.conf"), "/bin/true"])
    assert s.namespaces == {"net", "pid", "cgroup", "ipc", "mount", "uts"}
    assert not s.pid_init and s.propagation == "slave" and s.capabilities == 0
    assert s.pivot_root == "/var/empty" and s.groups == (20000, 30000)
    assert Mount("/run/daemon-store/u2f", "/run/daemon-store/u2f", "none", MS_BIND | MS_REC,
                 "") in s.mounts
    assert Bind("/var/lib/metrics", "/var/lib/metrics", True) in s.mounts


# ===========================================================================
# Start-up cost
# ===========================================================================

def test_import_is_lean():
    """Importing config.py adds no module beyond what spec.py already loads
    (pwd, grp, resource and prctl are imported only when an option needs them)."""
    code = ("import sys; import broker.jail.spec; before = set(sys.modules); "
            "import broker.jail.config; "
            "print(sorted(set(sys.modules) - before - {'broker.jail.config'}))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", out


# ===========================================================================
# Robustness: any input gives a JailSpec or a ConfigError, nothing else
# ===========================================================================

try:
    from hypothesis import given, settings, strategies as st
except ImportError:            # the test venv should have it (pyproject's test extra)
    st = None

if st is None:
    def test_robustness_needs_hypothesis():
        pytest.skip("hypothesis is not installed")
else:
    _TOKENS = ([f"-{k}" for k in C.SHORT] + [f"--{k}" for k in C.LONG]
               + ["--", "-", "/bin/true", "nobody", "0", "0x3", "/a,/b,1",
                  "t,/t,tmpfs,MS_NODEV,x=1", "RLIMIT_NOFILE,1,2", "cap_chown+e", "=e", "64M",
                  "0 0 1", "A=b", "-Kprivate", "--uts=h", "-m0 0 1", "-t1K",
                  "minimalistic-mountns", ""])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=12)), max_size=8))
    def test_any_command_line_gives_a_spec_or_a_config_error(args):
        try:
            spec = parse_command_line(args)
        except ConfigError as e:
            assert str(e)
        else:
            assert spec.argv

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(
        st.sampled_from(["v", "n", "u = 0", "K = private", "b = /a,,1", "t", "R = 7,1,1", "# c",
                         "", "mount = t,/t,tmpfs", "profile = minimalistic-mountns", "G", "x",
                         "c = cap_chown+e", "\\", "= x", "config = /x"]),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)), max_size=8))
    def test_any_config_file_gives_a_spec_or_a_config_error(tmp_path_factory, lines):
        p = tmp_path_factory.mktemp("h") / "h.conf"
        p.write_text(HEADER + "\n".join(lines) + "\n")
        try:
            parse_command_line(["--config", str(p), "/bin/true"])
        except ConfigError as e:
            assert str(e)


# ===========================================================================
# Landlock options
# ===========================================================================

def test_fs_path_options_become_landlock_rules():
    from broker.jail.landlock import DEFAULT_PATHS
    from broker.jail.spec import FsRule
    s = parse_command_line(["--fs-default-paths", "--fs-path-ro", "/etc", "--fs-path-rx", "/opt",
                            "--fs-path-rw", "/run/dbus", "--fs-path-advanced-rw", "/var", "true"])
    assert s.landlock == DEFAULT_PATHS + (FsRule("/etc", "ro"), FsRule("/opt", "rx"),
                                          FsRule("/run/dbus", "rw"), FsRule("/var", "advanced-rw"))
    assert not s.landlock_best_effort
    assert parse_command_line(["--landlock-best-effort", "--fs-path-ro", "/", "x"]).landlock_best_effort


def test_fs_path_must_be_absolute():
    with pytest.raises(ConfigError, match="option --fs-path-rw: expected an absolute path"):
        parse_command_line(["--fs-path-rw", "relative", "true"])


def test_no_fs_restrictions_is_accepted_and_adds_nothing():
    assert parse_command_line(["--no-fs-restrictions", "true"]).landlock == ()
