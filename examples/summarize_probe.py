"""Print a probe report (tests/probe.py's JSON on stdin) as a short summary."""
import json
import os
import sys

CAP_SETS = ("eff", "prm", "inh", "bnd", "amb")


def host_ns(name):
    try:
        return os.stat(f"/proc/self/ns/{name}").st_ino
    except OSError:
        return None


def main():
    r = json.loads(sys.stdin.readline())
    print("Inside the jail:")
    print(f"  uid/gid          {r['uid']}/{r['gid']}  groups {r['groups']}")
    caps = r.get("caps") or {}
    print("  capabilities     " + "  ".join(f"{k}={caps.get(k, 0):#x}" for k in CAP_SETS))
    print(f"  no_new_privs     {r['no_new_privs']}   seccomp mode {r['seccomp']}")
    own = [n for n, ino in (r.get("ns") or {}).items() if ino and ino != host_ns(n)]
    print(f"  own namespaces   {', '.join(sorted(own)) or 'none'}")
    print(f"  pid / sees pids  {r['pid']} / {r['visible_pids']}")
    print(f"  hostname         {r['hostname']}")
    print(f"  net interfaces   {r['net_ifaces']}")
    mounts = r.get("mounts") or []
    print(f"  mounts           {len(mounts)}: " + ", ".join(
        f"{m['mountpoint']}({m['fstype']},{m['options'].split(',')[0]})" for m in mounts))
    print(f"  /dev             {r['dev_entries']}")
    print(f"  open fds         {r['fds']}")


if __name__ == "__main__":
    main()
