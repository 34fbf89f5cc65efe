"""privjail: run a program in a jail, with minijail0's flags and config files.

    privjail [OPTIONS] [--] PROGRAM [ARGS...]
    privjail compile-policy POLICY OUT.bpf    compile a seccomp policy
    privjail generate-policy STRACE.LOG...    a starting policy from strace -f
    (`privjail -- compile-policy` runs a program of that name)

Exit status: the program's exit code, or 128+signal if a signal ended it;
1 for a usage or config error; 126/127 when the program cannot be executed;
251 when a mount step failed, 252 another jail step (seccomp among them:
a policy that does not compile is refused before anything is created),
254 the jail's init.  A syscall the seccomp policy kills ends the program
with SIGSYS: status 128+31 = 159.
"""
from __future__ import annotations

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
    from .config import ConfigError, parse_command_line
    try:
        spec = parse_command_line(args)
    except ConfigError as e:
        _err(str(e))
        return EXIT_USAGE
    return run(spec)


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
    return jail.wait().shell_code


if __name__ == "__main__":
    sys.exit(main())
