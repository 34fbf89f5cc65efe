"""What a spec needs from this host, checked without launching anything.

`privjail --dry-run` lists these as warnings; a real launch meets the same
problems as errors at the step that needs the thing (and the broker's
profiles are checked when they are loaded).  Only facts about the host are
checked here: that named paths exist, that the seccomp policy compiles and
lets the program start, that the program can be found.  Paths that only make
sense inside the jail (cwd, mount destinations) are not.
"""
from __future__ import annotations

import os
import shutil

from .spec import Bind, JailSpec

MS_BIND = 1 << 12


def host_problems(spec: JailSpec, program_given: bool = True) -> list[str]:
    problems: list[str] = []
    for what, path in (("pivot_root (-P)", spec.pivot_root), ("chroot (-C)", spec.chroot)):
        if path and not os.path.isdir(path):
            problems.append(f"{what}: {path} is not a directory on this host")
    for m in spec.mounts:
        if isinstance(m, Bind) or m.flags & MS_BIND:
            if not os.path.lexists(m.src):
                problems.append(f"bind source {m.src} does not exist on this host")
    if not spec.landlock_best_effort:
        for rule in spec.landlock:
            if not os.path.lexists(rule.path):
                problems.append(f"Landlock path {rule.path} ({rule.access}) does not "
                                f"exist on this host")
    problems += _seccomp_problems(spec)
    if program_given:
        problems += _program_problems(spec)
    return problems


def _seccomp_problems(spec: JailSpec) -> list[str]:
    if not (spec.seccomp_policy or spec.seccomp_bpf):
        return []
    from .launch import LaunchError, seccomp_filter
    try:
        seccomp_filter(spec)      # compile (cached) and check execve, as a launch does
    except LaunchError as e:
        return [f"seccomp: {e.message}"]
    return []


def _program_problems(spec: JailSpec) -> list[str]:
    prog = spec.argv[0]
    if spec.pivot_root or spec.chroot:
        return []                 # found inside the new root, not on the host
    if "/" in prog:
        if not os.access(prog, os.X_OK):
            return [f"program {prog} is not an executable file on this host"]
        return []
    path = dict(spec.env_add).get("PATH") if spec.env_reset or "PATH" in dict(spec.env_add) \
        else os.environ.get("PATH")
    if shutil.which(prog, path=path or os.defpath) is None:
        return [f"program {prog} is not found in PATH on this host"]
    return []
