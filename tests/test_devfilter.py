"""The cgroup v2 device program (broker/jail/devfilter.py), instruction by
instruction: a small interpreter of the opcodes it emits runs it against
accesses, and must agree with the v1 devices controller's meaning of the
same rules.  The kernel enforcing it is tested in test_cgroups.py
(test_a_v2_device_program_refuses_what_no_rule_allows; and the privjail
test in the cgroup v2 VM)."""
from __future__ import annotations

import itertools
import struct

import pytest

from broker.jail import devfilter
from broker.jail.spec import DeviceRule

BLOCK, CHAR = 1, 2
MKNOD, READ, WRITE = 1, 2, 4


def run(prog: bytes, dev_type: int, access: int, major: int, minor: int) -> int:
    """Execute the program on one bpf_cgroup_dev_ctx; refuses any opcode it
    does not know (so a change in what devfilter emits is noticed here)."""
    ctx = struct.pack("<III", access << 16 | dev_type, major, minor)
    reg = [0] * 11
    insns = [struct.unpack("<BBhi", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc, steps = 0, 0
    while True:
        steps += 1
        assert steps < 10_000 and 0 <= pc < len(insns)
        code, regs, off, imm = insns[pc]
        dst, src = regs & 0xF, regs >> 4
        pc += 1
        if code == 0x61:                                 # dst = *(u32 *)(r1 + off)
            assert src == 1 and off in (0, 4, 8)
            reg[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == 0xBF:
            reg[dst] = reg[src]
        elif code == 0xB7:
            reg[dst] = imm & 0xFFFFFFFFFFFFFFFF
        elif code == 0x57:
            reg[dst] &= imm & 0xFFFFFFFFFFFFFFFF
        elif code == 0x77:
            reg[dst] >>= imm
        elif code == 0x56:                               # 32-bit compare
            if reg[dst] & 0xFFFFFFFF != imm & 0xFFFFFFFF:
                pc += off
        elif code == 0x95:
            return reg[0]
        else:
            raise AssertionError(f"unknown opcode {code:#x}")


def v1_allows(rules, dev_type: int, access: int, major: int, minor: int) -> bool:
    """devices.deny a + devices.allow per rule, as the v1 controller reads them."""
    letters = {MKNOD: "m", READ: "r", WRITE: "w"}
    wanted = {letters[b] for b in (MKNOD, READ, WRITE) if access & b}
    for r in rules:
        if r.type != "a" and {"b": BLOCK, "c": CHAR}[r.type] != dev_type:
            continue
        if r.major is not None and r.major != major:
            continue
        if r.minor is not None and r.minor != minor:
            continue
        if wanted <= set(r.access):
            return True
    return False


RULE_SETS = [
    (),
    (DeviceRule("c", 1, 3, "rwm"), DeviceRule("c", 1, 5, "r")),
    (DeviceRule("a", None, None, "rwm"),),
    (DeviceRule("b", None, None, "m"), DeviceRule("c", 136, None, "rw")),
    (DeviceRule("c", None, 7, "w"), DeviceRule("b", 8, 0, "rm")),
    (DeviceRule("c", 4294967295, None, "r"), DeviceRule("c", 1, 3, "m")),   # u32 bounds
]
ACCESSES = [a for a in range(1, 8)]
DEVICES = [(t, maj, mi) for t in (BLOCK, CHAR) for maj, mi in
           ((1, 3), (1, 5), (1, 7), (8, 0), (136, 4), (136, 7), (4294967295, 0))]


@pytest.mark.parametrize("rules", RULE_SETS, ids=lambda r: ",".join(
    f"{x.type}{x.major}:{x.minor}{x.access}" for x in r) or "empty")
def test_the_program_means_what_the_v1_rules_mean(rules):
    prog = devfilter.program(rules)
    for (t, maj, mi), access in itertools.product(DEVICES, ACCESSES):
        assert bool(run(prog, t, access, maj, mi)) == v1_allows(rules, t, access, maj, mi), \
            (t, maj, mi, access)


def test_an_empty_list_refuses_everything_and_a_rwm_rule_has_no_access_check():
    assert run(devfilter.program(()), CHAR, READ, 1, 3) == 0
    # 6 loads, 2 to allow, 2 to refuse: a rule that allows r, w and m tests no access
    assert len(devfilter.program((DeviceRule("c", 1, 3, "rwm"),))) // 8 == 6 + 3 + 2 + 2
