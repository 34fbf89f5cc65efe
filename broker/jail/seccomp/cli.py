"""`privjail compile-policy` and `privjail generate-policy`.

Both take argv without the program and subcommand names and return an exit
status: 0 done, 1 the policy or input was at fault (the message says where
and why), 2 usage error (argparse).
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import PolicyError
from .policy import CALLER_DEFAULTS


def main_compile(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="privjail compile-policy",
        description="Compile a minijail seccomp policy into a BPF program "
                    "(for --seccomp-bpf-binary).")
    ap.add_argument("policy", help="the policy file")
    ap.add_argument("output", help="where to write the BPF program ('-' for stdout)")
    ap.add_argument("--default", choices=CALLER_DEFAULTS, default=None,
                    help="action for syscalls the policy does not allow "
                         "(default: the policy's @default, else kill-process)")
    ap.add_argument("--disasm", action="store_true",
                    help="also print the program, one instruction per line, to stderr")
    args = ap.parse_args(argv)
    from .bpf import disassemble
    from .compiler import compile_policy
    try:
        program = compile_policy(args.policy, args.default)
    except PolicyError as e:
        print(f"privjail compile-policy: error: {e}", file=sys.stderr)
        return 1
    try:
        if args.output == "-":
            sys.stdout.buffer.write(program)
            sys.stdout.buffer.flush()
        else:
            tmp = f"{args.output}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(program)
            os.replace(tmp, args.output)
    except OSError as e:
        print(f"privjail compile-policy: error: cannot write {args.output}: {e.strerror}",
              file=sys.stderr)
        return 1
    if args.disasm:
        print(disassemble(program), file=sys.stderr)
    return 0


def main_generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="privjail generate-policy",
        description="Write a starting seccomp policy from `strace -f -o LOG PROGRAM` logs.")
    ap.add_argument("logs", nargs="+", metavar="strace.log")
    ap.add_argument("-o", "--output", help="write the policy here (default: stdout)")
    args = ap.parse_args(argv)
    from .generate import generate_policy
    texts = []
    for path in args.logs:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except OSError as e:
            print(f"privjail generate-policy: error: cannot read {path}: {e.strerror}",
                  file=sys.stderr)
            return 1
    policy = generate_policy("\n".join(texts))
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(policy)
        except OSError as e:
            print(f"privjail generate-policy: error: cannot write {args.output}: "
                  f"{e.strerror}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(policy)
    return 0
