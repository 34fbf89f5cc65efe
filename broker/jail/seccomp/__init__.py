"""minijail's seccomp policy language: parse, compile to BPF, cache, load.

    parse_policy(path) -> Policy                   the policy as plain frozen data
    compile_policy(path, default=None) -> bytes    BPF program (sock_filter array)
    compiled_filter(path, default=None) -> bytes   the same, cached on disk
    load_filter(bpf)                               install it (no_new_privs first)
    generate_policy(strace_log_text) -> str        a starting policy from strace -f
    ensure_constants()                             build the header constants table
    main_compile(argv), main_generate(argv)        the privjail subcommands
    PolicyError                                    file, line, column, reason

Submodules are imported when first used, so importing this package is cheap;
`load` (for the child, just before exec) has no lazy imports of its own.
"""
from __future__ import annotations

import importlib

from .errors import PolicyError

_EXPORTS = {
    "parse_policy": "parser",
    "Policy": "policy", "Rule": "policy", "Atom": "policy", "Action": "policy",
    "SyscallRules": "policy",
    "compile_policy": "compiler", "compiled_filter": "filter_cache",
    "compile_parsed": "compiler", "evaluate": "compiler",
    "load_filter": "load", "prepare_filter": "load", "load_filter_file": "load",
    "PreparedFilter": "load",
    "generate_policy": "generate",
    "ensure_constants": "constants",
    "main_compile": "cli", "main_generate": "cli",
}

__all__ = ["PolicyError", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
