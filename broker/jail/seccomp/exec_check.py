"""Does a compiled program let the jail start its program?

privjail installs the filter in the child just before execve, so the filter
judges that execve too (minijail does the same for static programs; for
dynamic ones it preloads a library that installs the filter after exec,
which privjail never does).  Most ChromeOS policies are written for the
preload path and do not list execve: without this check such a jail would
die of SIGSYS at exec with nothing said.  Checking here, in the launcher,
before anything is created, turns that into an error that says what to add.
"""
from __future__ import annotations

from . import bpf, syscall_names
from .errors import PolicyError

# What lets execve proceed: allowed, or logged and allowed (-L).
_PROCEEDS = (bpf.RET_ALLOW, bpf.RET_LOG)


def execve_verdict(program: bytes) -> int:
    """The program's return value for execve(0, 0, 0) on this architecture.

    The pointer arguments of the real call are not known here; a policy that
    filters execve on pointer values cannot be judged and is judged on
    zeros, which no reasonable policy conditions on."""
    nr = syscall_names.number("execve")
    arch, little_endian = syscall_names.audit_arch()
    return bpf.run(program, bpf.seccomp_data(nr, arch, little_endian=little_endian),
                   little_endian)


def check_allows_execve(program: bytes, source: str) -> None:
    """PolicyError unless the program lets execve through."""
    ret = execve_verdict(program)
    if ret & bpf.RET_ACTION_FULL in _PROCEEDS:
        return
    raise PolicyError(
        f"the filter does not allow execve ({bpf.describe_action(ret)}), and privjail "
        f"installs it just before exec'ing the program (it never preloads a library to "
        f"install it afterwards, as minijail does for dynamic programs): add "
        f"'execve: 1' to the policy", source)
