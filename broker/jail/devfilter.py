"""A device allow list as a cgroup v2 device program (eBPF).

cgroup v1 has a devices controller (devices.deny "a", then devices.allow
per rule); cgroup v2 has none: the kernel asks the BPF_PROG_TYPE_CGROUP_DEVICE
programs attached to the cgroup and its ancestors, and any that returns 0
refuses the access.  This module turns privjail's rules (spec.DeviceRule,
the v1 syntax "c 1:3 rwm") into such a program, with the same meaning: what
no rule allows is refused, mknod included, even to root.

The program, for the context the kernel passes (struct bpf_cgroup_dev_ctx:
u32 access_type = access << 16 | type, u32 major, u32 minor):

    r2 = type (access_type & 0xffff); r3 = access (access_type >> 16)
    r4 = major; r5 = minor
    for each rule:                         (a block; a mismatch jumps past it)
        type != rule's          -> next    (not for type "a": every device)
        access & ~rule's != 0   -> next    (not when the rule allows r, w and m)
        major != rule's         -> next    (not for "*")
        minor != rule's         -> next    (not for "*")
        return 1
    return 0

Only the standard library; building the bytes needs no privilege (tests
check them), loading and attaching need CAP_BPF or CAP_SYS_ADMIN.
"""
from __future__ import annotations

import os
import struct

from . import syscalls as sc
from .spec import DeviceRule

# linux/bpf.h
_DEV_TYPE = {"b": 1, "c": 2}                      # BPF_DEVCG_DEV_BLOCK / _CHAR
_ACCESS = {"m": 1, "r": 2, "w": 4}                # BPF_DEVCG_ACC_MKNOD / _READ / _WRITE
_ALL_ACCESS = 7
# opcodes: class | op | source
_LDX_W = 0x61          # BPF_LDX | BPF_MEM | BPF_W:   dst = *(u32 *)(src + off)
_MOV_X = 0xBF          # BPF_ALU64 | BPF_MOV | BPF_X: dst = src
_MOV_K = 0xB7          # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
_AND_K = 0x57          # BPF_ALU64 | BPF_AND | BPF_K: dst &= imm
_RSH_K = 0x77          # BPF_ALU64 | BPF_RSH | BPF_K: dst >>= imm
_JNE_K = 0x56          # BPF_JMP32 | BPF_JNE | BPF_K: if (u32)dst != (u32)imm: pc += off
_EXIT = 0x95           # BPF_JMP | BPF_EXIT:          return r0
LICENSE = b"BSD-3-Clause"      # the project's; the program calls no GPL-only helper


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One instruction; imm is 32 bits (a u32 major or minor is stored as
    the same bits, and the 32-bit jump compares them as such)."""
    return struct.pack("<BBhI", code, (src << 4) | dst, off, imm & 0xFFFFFFFF)


def _rule_block(rule: DeviceRule) -> list[bytes]:
    """The checks of one rule, then `return 1`.  Each check's jump skips the
    rest of the block, so it is built from the end."""
    checks: list[tuple[int, int | None]] = []      # (register, value it must hold)
    if rule.type != "a":
        checks.append((2, _DEV_TYPE[rule.type]))
    access = sum(_ACCESS[c] for c in set(rule.access))
    if access != _ALL_ACCESS:
        checks.append((1, None))                   # r1 = r3 & ~access, must be 0
    if rule.major is not None:
        checks.append((4, rule.major))
    if rule.minor is not None:
        checks.append((5, rule.minor))
    block = [_insn(_MOV_K, dst=0, imm=1), _insn(_EXIT)]
    for reg, value in reversed(checks):
        if value is None:
            test = [_insn(_MOV_X, dst=1, src=3),
                    _insn(_AND_K, dst=1, imm=_ALL_ACCESS & ~access),
                    _insn(_JNE_K, dst=1, off=len(block), imm=0)]
        else:
            test = [_insn(_JNE_K, dst=reg, off=len(block), imm=value)]
        block = test + block
    return block


def program(rules: tuple[DeviceRule, ...]) -> bytes:
    """The device program for an allow list (empty: every device refused)."""
    code = [_insn(_LDX_W, dst=2, src=1, off=0),          # access_type
            _insn(_MOV_X, dst=3, src=2),
            _insn(_AND_K, dst=2, imm=0xFFFF),            # r2 = type
            _insn(_RSH_K, dst=3, imm=16),                # r3 = access
            _insn(_LDX_W, dst=4, src=1, off=4),          # r4 = major
            _insn(_LDX_W, dst=5, src=1, off=8)]          # r5 = minor
    for rule in rules:
        code += _rule_block(rule)
    code += [_insn(_MOV_K, dst=0, imm=0), _insn(_EXIT)]
    return b"".join(code)


def attach(cgroup_dir: str, rules: tuple[DeviceRule, ...]) -> None:
    """Load the program and attach it to the cgroup at `cgroup_dir` (before
    any process of the jail is in it).  ALLOW_MULTI: it runs beside the
    ancestors' programs (systemd's DevicePolicy=, for one), each able to
    refuse; a program attached below can only refuse more, never allow what
    ours refuses.  The attachment holds the program: our fd is closed."""
    prog = sc.bpf_prog_load_cgroup_device(program(rules), b"privjail_dev", LICENSE)
    try:
        target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sc.bpf_prog_attach(prog, target, sc.BPF_CGROUP_DEVICE, sc.BPF_F_ALLOW_MULTI)
        finally:
            os.close(target)
    finally:
        os.close(prog)
