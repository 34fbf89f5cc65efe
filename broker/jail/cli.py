"""privjail: run a program in a jail, with minijail0's flags and config files.

    privjail [OPTIONS] [--] PROGRAM [ARGS...]
    privjail --dry-run [OPTIONS] [PROGRAM...]  print the spec as JSON, launch nothing
    privjail --explain [OPTIONS] [PROGRAM...]  how exposed the jail would be
    privjail compile-policy POLICY OUT.bpf    compile a seccomp policy
    privjail generate-policy STRACE.LOG...    a starting policy from strace -f
    (`privjail -- compile-policy` runs a program of that name)

Exit status: the program's exit code, or 128+signal if a signal ended it;
1 for a usage or config error; 126/127 when the program cannot be executed;
251 when a mount step failed, 252 another jail step (seccomp among them:
a policy that does not compile is refused before anything is created),
254 the jail's init.  A syscall the seccomp policy kills ends the program
with SIGSYS: status 128+31 = 159.
A jail over its --memory-limit is ended by the OOM killer: status
128+9 = 137, and privjail says so on stderr.

A jail in the forbidden intersection (root or CAP_SYS_ADMIN, in the init
pid and mount namespaces, without seccomp plus Landlock) is refused unless
--allow-forbidden-intersection is given.
"""
from __future__ import annotations

import os
import signal
import sys

EXIT_USAGE = 1
SUBCOMMANDS = {"compile-policy": "main_compile", "generate-policy": "main_generate"}


def _err(msg: str) -> None:
    print(f"privjail: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else EXIT_USAGE
    subcommand = SUBCOMMANDS.get(args[0])
    if subcommand is not None:
        from . import seccomp
        return getattr(seccomp, subcommand)(args[1:])
    from .config import ConfigError, parse_invocation
    try:
        inv = parse_invocation(args)
    except ConfigError as e:
        _err(str(e))
        return EXIT_USAGE
    if "dry-run" in inv.modes:
        return dry_run(inv)
    if "explain" in inv.modes:
        from .exposure import explain
        print(explain(inv.spec, os.getuid(), landlock_abi=_landlock_abi()))
        return 0
    if not inv.program_given:
        _err("no program to run (give one after the options, or use --dry-run/--explain)")
        return EXIT_USAGE
    if not _exposure_allowed(inv):
        return EXIT_USAGE
    return run(inv.spec)


def _landlock_abi() -> int:
    from .landlock import abi_version
    return abi_version()


def _exposure_allowed(inv) -> bool:
    """The forbidden intersection: refused unless explicitly allowed, and then
    said out loud.  The decision itself is exposure.py's."""
    from .exposure import check_forbidden_intersection
    verdict = check_forbidden_intersection(inv.spec, os.getuid(), landlock_abi=_landlock_abi())
    if not verdict.forbidden:
        return True
    why = "; ".join(f"{name}: {e.reason}" for name, e in verdict.escapes())
    if "allow-forbidden-intersection" in inv.modes:
        _err(f"warning: this jail is in the forbidden intersection ({why}); running it "
             f"because --allow-forbidden-intersection was given")
        return True
    _err(f"refusing a jail in the forbidden intersection ({why}); {verdict.missing()}. "
         f"--explain shows the whole picture; --allow-forbidden-intersection runs it anyway")
    return False


def dry_run(inv) -> int:
    """Print the spec as JSON, with what this host could not resolve; launch nothing."""
    import json
    from .hostcheck import host_problems
    from .spec import to_dict
    warnings = list(inv.host_problems) + host_problems(inv.spec, inv.program_given)
    spec = to_dict(inv.spec)
    if not inv.program_given:
        spec["argv"] = []
    print(json.dumps({"spec": spec, "warnings": warnings}, indent=2, sort_keys=True))
    for w in warnings:
        _err(f"warning: {w}")
    return 0


def run(spec) -> int:
    from .init import FORWARDED
    from .launch import LaunchError, launch
    jail = None

    def forward(signum, _frame):
        if jail is not None:
            jail.signal(signum)

    # Block the forwarded signals while launching, so one that arrives before
    # the jail exists is delivered (and forwarded) once it does, instead of
    # killing privjail and orphaning the jail.  The jail's processes reset
    # their mask before exec.
    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        jail = launch(spec)
    except LaunchError as e:
        _err(str(e))
        return e.exit_code
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    if spec.detach:
        jail.close()
        return 0
    status = jail.wait()
    if status.oom:
        _err(f"the jail was killed by the OOM killer: it hit its memory limit "
             f"({spec.memory_limit} bytes)")
    if jail.leftover is not None:
        _err(f"could not remove the jail's cgroup {jail.leftover!r}: processes in it "
             f"did not exit")
    _reap_orphans()
    return status.shell_code


def _reap_orphans() -> None:
    """Processes of the jail that outlived its program were re-parented to
    us (a child subreaper) and killed with its cgroup: reap them, so none is
    left even as a zombie."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


if __name__ == "__main__":
    sys.exit(main())
