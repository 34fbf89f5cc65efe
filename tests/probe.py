"""Run inside a jail; print one JSON object describing the jail as seen from inside.

Standard library only, no imports from the project, runs under any python3 >= 3.9:
the jail tests start it under the system interpreter, as other uids, often in a
bare root.

Report keys (one JSON object on the first line of stdout):
  pid, ppid                       os.getpid(), os.getppid()
  uid, euid, suid, gid, egid, sgid    os.getresuid(), os.getresgid()
  groups                          sorted os.getgroups()
  caps                            {"inh", "prm", "eff", "bnd", "amb"}: ints from /proc/self/status
  securebits                      prctl(PR_GET_SECUREBITS) through libc, null if that fails
  session_keyring                 serial of the session keyring (keyctl, never creating one),
                                  null if there is none or keyctl fails
  no_new_privs, seccomp           ints from the NoNewPrivs and Seccomp lines of /proc/self/status
  seccomp_filters                 int from the Seccomp_filters line, only when the kernel has it
  ns                              {user, pid, mnt, net, ipc, uts, cgroup: inode of
                                  /proc/self/ns/NAME, or null}
  ns_links                        {same names: readlink text such as "pid:[4026531836]", or null}
  visible_pids                    sorted numeric entries of /proc
  hostname                        socket.gethostname()
  net_ifaces                      sorted names from /proc/net/dev (else /sys/class/net, else [])
  mounts                          [{id, parent, root, mountpoint, options, fstype, source,
                                  super_options, propagation}] from /proc/self/mountinfo, null if
                                  unreadable; octal escapes (\\040 ...) decoded; propagation is the
                                  optional fields ("shared:1 master:2"), "" if none
  proc_readonly                   whether the topmost mount at /proc has "ro", null if none
  fds                             sorted open fd numbers, without the probe's own listing fds
  fd_targets                      {fd: readlink target} for those fds (fd as a string: JSON)
  rlimits                         {RLIMIT_NAME: [soft, hard]} for every RLIMIT_* in `resource`,
                                  RLIM_INFINITY as -1
  cwd                             os.getcwd(), null on error
  env                             dict(os.environ)
  root_dir_entries, dev_entries   sorted os.listdir("/") and ("/dev"), null on error
  argv                            sys.argv[1:]
  landlock                        null (reserved)

A section that raises records {"error": "Type: message"} under its key instead
of failing the probe.  Without actions the probe exits 0 after the report.

Actions, run in order after the report (stdout is flushed first):
  --sleep SECS          sleep
  --exit N              exit with status N
  --kill-self SIG       os.kill(os.getpid(), SIG); if the probe survives (the signal is
                        ignored, or the probe is a pid namespace's init), it prints
                        {"kill_self": SIG, "survived": true} and goes on
  --spawn-orphans N     fork N children that each fork a grandchild sleeping 0.2 s, then
                        exit at once: N orphans for the jail's pid 1 to reap
  --touch PATH          create PATH (no truncation); prints
                        {"touch": PATH, "ok": bool, "errno": int|null}
  --read PATH           open and read PATH; prints {"read": PATH, "ok": bool, "errno": int|null}
  --wait-signal         on SIGTERM, SIGINT, SIGHUP, SIGUSR1 or SIGUSR2: append the signal
                        number to the --signal-log file, exit 100 + signum; prints
                        {"waiting": true} once the handlers are in place, and
                        {"waiting": false} if nothing came within 30 s
  --signal-log PATH     the log for --wait-signal (wherever it appears on the command line)
A malformed action list prints {"error": "..."} after the report and exits 2.
"""
import json
import os
import re
import resource
import signal
import sys
import time

NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")
CAP_SETS = {"inh": "CapInh", "prm": "CapPrm", "eff": "CapEff", "bnd": "CapBnd", "amb": "CapAmb"}
PR_GET_SECUREBITS = 27
WAITED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
WAIT_SIGNAL_TIMEOUT = 30.0
ORPHAN_LIFETIME = 0.2


class Failed(dict):
    """What a section records in place of its value when computing it raised."""

    def __init__(self, exc):
        super().__init__(error=f"{type(exc).__name__}: {exc}")


def guarded(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # one broken section must not hide the others
        return Failed(e)


def or_none(fn, *args):
    """fn(*args), or None when the thing asked about cannot be read."""
    try:
        return fn(*args)
    except OSError:
        return None


# -- /proc/self/status: credentials the kernel applies ---------------------------

def status():
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":", 1) for line in f if ":" in line)


def caps():
    st = status()
    return {key: int(st[field].strip(), 16) for key, field in CAP_SETS.items()}


def status_int(field):
    return int(status()[field].strip())


def securebits():
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        prctl.restype = ctypes.c_int
        bits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        return None
    return None if bits < 0 else bits


def session_keyring():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, create=0); x86_64 nr 250
        serial = libc.syscall(250, 0, ctypes.c_int(-3), 0)
    except (ImportError, OSError, AttributeError):
        return None
    return None if serial < 0 else serial


# -- namespaces, processes, network ------------------------------------------------

def ns_inodes():
    return {name: or_none(lambda n: os.stat(f"/proc/self/ns/{n}").st_ino, name)
            for name in NAMESPACES}


def ns_links():
    return {name: or_none(os.readlink, f"/proc/self/ns/{name}") for name in NAMESPACES}


def visible_pids():
    return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())


def hostname():
    import socket
    return socket.gethostname()


def net_ifaces():
    # /proc/net/dev follows the reader's network namespace; /sys/class/net
    # follows the namespace of whoever mounted sysfs, so it is only a fallback.
    try:
        with open("/proc/net/dev") as f:
            lines = f.readlines()[2:]             # two header lines
        return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)
    except OSError:
        pass
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return []


# -- mounts --------------------------------------------------------------------------

def unescape(field):
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_line(line):
    # id parent major:minor root mountpoint options [optional...] - fstype source super_options
    fields = line.split()
    sep = fields.index("-", 6)
    fstype, source, super_options = (fields[sep + 1:] + ["", "", ""])[:3]
    return {"id": int(fields[0]), "parent": int(fields[1]),
            "root": unescape(fields[3]), "mountpoint": unescape(fields[4]),
            "options": fields[5], "fstype": fstype, "source": unescape(source),
            "super_options": super_options, "propagation": " ".join(fields[6:sep])}


def mounts():
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return [parse_mountinfo_line(line) for line in lines if line]


def proc_readonly(mount_list):
    """Whether the mount that /proc resolves to is read-only, None if none is there."""
    at_proc = [m for m in mount_list if m["mountpoint"] == "/proc"]
    if not at_proc:
        return None
    # Mounts stacked on one mountpoint: the topmost is the one no other sits on.
    covered = {m["parent"] for m in at_proc}
    top = [m for m in at_proc if m["id"] not in covered] or at_proc
    return "ro" in top[-1]["options"].split(",")


# -- file descriptors -----------------------------------------------------------------

def open_fds():
    """{fd: target} for every open fd except the ones used to list them.

    The directory is opened here, so its fd is known and dropped.  os.listdir(fd)
    reads through a private duplicate of it, closed again by the time it returns:
    an entry whose link no longer exists is that duplicate.
    """
    dir_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        targets = {}
        for name in os.listdir(dir_fd):
            fd = int(name)
            if fd == dir_fd:
                continue
            try:
                targets[fd] = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue                      # closed since the listing
            except OSError:
                targets[fd] = None
        return targets
    finally:
        os.close(dir_fd)


# -- the rest ----------------------------------------------------------------------------

def rlimits():
    def plain(value):
        return -1 if value == resource.RLIM_INFINITY else value

    out = {}
    for name in sorted(dir(resource)):
        if name.startswith("RLIMIT_"):
            soft, hard = resource.getrlimit(getattr(resource, name))
            out[name] = [plain(soft), plain(hard)]
    return out


def sorted_listing(path):
    return or_none(lambda: sorted(os.listdir(path)))


def report():
    r = {}
    r["pid"] = guarded(os.getpid)
    r["ppid"] = guarded(os.getppid)
    for names, getter in ((("uid", "euid", "suid"), os.getresuid),
                          (("gid", "egid", "sgid"), os.getresgid)):
        ids = guarded(getter)
        for i, name in enumerate(names):
            r[name] = ids if isinstance(ids, Failed) else ids[i]
    r["groups"] = guarded(lambda: sorted(os.getgroups()))
    r["caps"] = guarded(caps)
    r["securebits"] = guarded(securebits)
    r["session_keyring"] = guarded(session_keyring)
    r["no_new_privs"] = guarded(status_int, "NoNewPrivs")
    r["seccomp"] = guarded(status_int, "Seccomp")
    if "Seccomp_filters" in guarded(status):
        r["seccomp_filters"] = guarded(status_int, "Seccomp_filters")
    r["ns"] = guarded(ns_inodes)
    r["ns_links"] = guarded(ns_links)
    r["visible_pids"] = guarded(visible_pids)
    r["hostname"] = guarded(hostname)
    r["net_ifaces"] = guarded(net_ifaces)
    r["mounts"] = guarded(mounts)
    if isinstance(r["mounts"], list):
        r["proc_readonly"] = guarded(proc_readonly, r["mounts"])
    else:
        r["proc_readonly"] = r["mounts"]     # null (unreadable) or the same error
    fds = guarded(open_fds)
    r["fds"] = fds if isinstance(fds, Failed) else sorted(fds)
    r["fd_targets"] = fds if isinstance(fds, Failed) else dict(sorted(fds.items()))
    r["rlimits"] = guarded(rlimits)
    r["cwd"] = guarded(or_none, os.getcwd)
    r["env"] = guarded(lambda: dict(os.environ))
    r["root_dir_entries"] = guarded(sorted_listing, "/")
    r["dev_entries"] = guarded(sorted_listing, "/dev")
    r["argv"] = sys.argv[1:]
    r["landlock"] = None
    return r


# -- actions --------------------------------------------------------------------------------

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def kill_self(sig):
    # Undo what Python itself installed at startup (KeyboardInterrupt for
    # SIGINT, SIG_IGN for SIGPIPE and SIGXFSZ) so the signal's default action
    # applies; a disposition inherited from the jail is left as it is.
    if (signal.getsignal(sig) is signal.default_int_handler
            or sig in (signal.SIGPIPE, signal.SIGXFSZ)):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    emit({"kill_self": sig, "survived": True})


def spawn_orphans(count):
    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:                        # child: start the grandchild, then go
            try:
                if os.fork() == 0:          # grandchild: outlive the child a little
                    time.sleep(ORPHAN_LIFETIME)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:                    # reap the children, not the orphans
        os.waitpid(pid, 0)


def file_action(kind, path):
    try:
        if kind == "touch":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if kind == "read":
                os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError as e:
        emit({kind: path, "ok": False, "errno": e.errno})
    else:
        emit({kind: path, "ok": True, "errno": None})


def wait_signal(log_path):
    def handler(signum, _frame):
        if log_path:
            try:
                fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o644)
                try:
                    os.write(fd, f"{signum}\n".encode())
                finally:
                    os.close(fd)
            except OSError:
                pass                        # the exit status still names the signal
        os._exit(100 + signum)

    for sig in WAITED_SIGNALS:
        signal.signal(sig, handler)
    emit({"waiting": True})
    deadline = time.monotonic() + WAIT_SIGNAL_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(max(0.0, deadline - time.monotonic()))
    emit({"waiting": False})


# action name -> how its value is parsed (None: takes no value)
ACTIONS = {"--sleep": float, "--exit": int, "--kill-self": int, "--spawn-orphans": int,
           "--touch": str, "--read": str, "--signal-log": str, "--wait-signal": None}


def parse_actions(args):
    """[(action, value)] in command-line order; ValueError on a malformed list."""
    actions = []
    i = 0
    while i < len(args):
        name = args[i]
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r}")
        parse = ACTIONS[name]
        if parse is None:
            actions.append((name, None))
            i += 1
            continue
        if i + 1 >= len(args):
            raise ValueError(f"{name} needs a value")
        try:
            actions.append((name, parse(args[i + 1])))
        except ValueError:
            raise ValueError(f"bad value for {name}: {args[i + 1]!r}") from None
        i += 2
    return actions


def run_actions(actions):
    log_path = next((value for name, value in actions if name == "--signal-log"), None)
    for name, value in actions:
        if name == "--sleep":
            time.sleep(value)
        elif name == "--exit":
            sys.exit(value)
        elif name == "--kill-self":
            kill_self(value)
        elif name == "--spawn-orphans":
            spawn_orphans(value)
        elif name in ("--touch", "--read"):
            file_action(name[2:], value)
        elif name == "--wait-signal":
            wait_signal(log_path)


def main(args):
    try:
        actions, problem = parse_actions(args), None
    except ValueError as e:
        actions, problem = [], str(e)
    emit(report())
    if problem:
        emit({"error": problem})
        return 2
    run_actions(actions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
