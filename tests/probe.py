"""Run inside a jail; print one JSON object describing what the jail really is.

Standard library only (it runs as other uids, under the system python3).
Keys: pid ppid uid euid suid gid egid sgid groups caps{inh,prm,eff,bnd,amb}
securebits no_new_privs seccomp ns{NAME: inode} visible_pids hostname
net_ifaces mounts[...] proc_readonly fds fd_targets rlimits cwd env
root_dir_entries dev_entries argv landlock.  A section that fails records
{"error": "..."} instead of failing the probe.

Actions after the report, in order (each may print one JSON line):
  --sleep SECS | --exit N | --kill-self SIG | --touch PATH | --read PATH
  --signal-log PATH --wait-signal   (log the first forwarded signal, exit 100+sig)
"""
import ctypes
import json
import os
import resource
import signal
import socket
import sys
import time

NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")
PR_GET_SECUREBITS = 27


def status_fields():
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def caps():
    st = status_fields()
    return {k.lower()[3:]: int(st[k].strip(), 16)
            for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def securebits():
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    return None if r < 0 else r


def namespaces():
    out = {}
    for n in NAMESPACES:
        try:
            out[n] = os.stat(f"/proc/self/ns/{n}").st_ino
        except OSError:
            out[n] = None
    return out


def visible_pids():
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def net_ifaces():
    # /proc/net/dev reflects the reader's network namespace; /sys/class/net
    # reflects the namespace of whoever mounted sysfs.
    with open("/proc/net/dev") as f:
        return sorted(line.split(":", 1)[0].strip() for line in f.readlines()[2:])


def mounts():
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.rstrip("\n").split(" - ", 1)
            a = pre.split(" ")
            fstype, source, super_opts = (post.split(" ") + ["", ""])[:3]
            out.append({"id": int(a[0]), "parent": int(a[1]), "root": a[3],
                        "mountpoint": a[4], "options": a[5], "propagation": " ".join(a[6:]),
                        "fstype": fstype, "source": source, "super_options": super_opts})
    return out


def proc_readonly(mount_list):
    for m in reversed(mount_list):        # the topmost mount at /proc
        if m["mountpoint"] == "/proc":
            return "ro" in m["options"].split(",")
    return None


def fds():
    # Listing /proc/self/fd opens one fd of its own, closed again by the time
    # listdir returns: an fd we can no longer readlink was that one.
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass
    return sorted(targets), targets


def rlimits():
    out = {}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            soft, hard = resource.getrlimit(getattr(resource, name))
            inf = resource.RLIM_INFINITY
            out[name] = [-1 if soft == inf else soft, -1 if hard == inf else hard]
    return out


def safe(fn, *a):
    try:
        return fn(*a)
    except Exception as e:   # one broken section must not hide the rest
        return {"error": f"{type(e).__name__}: {e}"}


def report():
    r = {"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:], "landlock": None}
    ruid, euid, suid = os.getresuid()
    rgid, egid, sgid = os.getresgid()
    r.update(uid=ruid, euid=euid, suid=suid, gid=rgid, egid=egid, sgid=sgid,
             groups=sorted(os.getgroups()))
    r["caps"] = safe(caps)
    r["securebits"] = safe(securebits)
    st = safe(status_fields)
    if "error" not in st:
        r["no_new_privs"] = int(st.get("NoNewPrivs", "0"))
        r["seccomp"] = int(st.get("Seccomp", "0"))
        if "Seccomp_filters" in st:
            r["seccomp_filters"] = int(st["Seccomp_filters"])
    r["ns"] = namespaces()
    r["visible_pids"] = safe(visible_pids)
    r["hostname"] = socket.gethostname()
    r["net_ifaces"] = safe(net_ifaces)
    r["mounts"] = safe(mounts)
    r["proc_readonly"] = proc_readonly(r["mounts"]) if isinstance(r["mounts"], list) else None
    numbers = safe(fds)
    r["fds"], r["fd_targets"] = numbers if isinstance(numbers, tuple) else (numbers, None)
    r["rlimits"] = safe(rlimits)
    r["cwd"] = safe(os.getcwd)
    r["env"] = dict(os.environ)
    r["root_dir_entries"] = safe(lambda: sorted(os.listdir("/")))
    r["dev_entries"] = safe(lambda: sorted(os.listdir("/dev")))
    return r


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def file_action(kind, path):
    try:
        if kind == "touch":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        else:
            with open(path, "rb") as f:
                f.read(1)
        emit({kind: path, "ok": True, "errno": None})
    except OSError as e:
        emit({kind: path, "ok": False, "errno": e.errno})


def wait_signal(log_path):
    def handler(signum, _frame):
        if log_path:
            with open(log_path, "a") as f:
                f.write(f"{signum}\n")
        os._exit(100 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, handler)
    emit({"waiting": True})
    time.sleep(30)


def main(args):
    emit(report())
    log_path = None
    i = 0
    while i < len(args):
        a = args[i]
        val = args[i + 1] if i + 1 < len(args) else None
        if a == "--sleep":
            time.sleep(float(val))
        elif a == "--exit":
            sys.exit(int(val))
        elif a == "--kill-self":
            os.kill(os.getpid(), int(val))
            time.sleep(5)
        elif a in ("--touch", "--read"):
            file_action(a[2:], val)
        elif a == "--signal-log":
            log_path = val
        elif a == "--wait-signal":
            wait_signal(log_path)
            i -= 1               # takes no value
        else:
            emit({"error": f"unknown action {a}"})
            sys.exit(2)
        i += 2


if __name__ == "__main__":
    main(sys.argv[1:])
