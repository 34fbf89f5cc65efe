"""Classic BPF for seccomp: instructions, a small assembler, a disassembler
and an interpreter.

The assembler takes instructions whose jump targets are labels and lays them
out; a conditional jump reaches at most 255 instructions ahead, so a farther
target gets a trampoline right after the jump (a copy of the target when it
is a ``ret``, else a ``ja``), repeated until every jump fits.  The
interpreter runs a program on a seccomp_data the way the kernel does; tests
use it to check a compiled program against the policy's meaning for many
inputs, and ``privjail compile-policy --disasm`` prints programs with it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# opcodes
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG, \
    BPF_MOD, BPF_XOR = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_A = 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80

LD_ABS = BPF_LD | BPF_W | BPF_ABS
JEQ, JGT, JGE, JSET = (BPF_JMP | op | BPF_K for op in (BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET))
JA = BPF_JMP | BPF_JA
RET = BPF_RET | BPF_K
MAXINSNS = 4096

# seccomp return values
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF

_FMT = "=HBBI"          # struct sock_filter, native byte order (as the kernel reads it)
INSN_SIZE = struct.calcsize(_FMT)


@dataclass(frozen=True)
class Insn:
    code: int
    k: int = 0
    jt: int = 0
    jf: int = 0


def encode(insns) -> bytes:
    return b"".join(struct.pack(_FMT, i.code, i.jt, i.jf, i.k & 0xFFFFFFFF) for i in insns)


def decode(data: bytes) -> list[Insn]:
    if len(data) % INSN_SIZE:
        raise ValueError(f"a BPF program is a multiple of {INSN_SIZE} bytes, not {len(data)}")
    return [Insn(c, k, jt, jf) for c, jt, jf, k in struct.iter_unpack(_FMT, data)]


# -- assembler ---------------------------------------------------------------

class Label:
    __slots__ = ("name",)

    def __init__(self, name: str = ""):
        self.name = name

    def __repr__(self) -> str:
        return f"Label({self.name})"


@dataclass
class _Op:
    code: int
    k: int = 0
    jt: Label | None = None       # for conditional jumps and ja (jt)
    jf: Label | None = None


class Assembler:
    """Collects instructions and labels; `assemble()` lays them out."""

    def __init__(self):
        self.items: list[_Op | Label] = []

    def label(self, lbl: Label) -> None:
        self.items.append(lbl)

    def ld(self, offset: int) -> None:
        self.items.append(_Op(LD_ABS, offset))

    def ret(self, value: int) -> None:
        self.items.append(_Op(RET, value))

    def ja(self, target: Label) -> None:
        self.items.append(_Op(JA, 0, target))

    def jump(self, code: int, k: int, jt: Label, jf: Label) -> None:
        self.items.append(_Op(code, k, jt, jf))

    def assemble(self) -> list[Insn]:
        items = self._drop_empty_jumps(self.items)
        while True:
            pos, where = self._layout(items)
            far = []
            for idx, it in enumerate(items):
                if isinstance(it, _Op) and it.code & 0x07 == BPF_JMP and it.code != JA:
                    here = pos[idx]
                    jt_far = where[id(it.jt)] - here - 1 > 255
                    jf_far = where[id(it.jf)] - here - 1 > 255
                    if jt_far or jf_far:
                        far.append((idx, jt_far, jf_far))
            if not far:
                break
            # Trampolines go right after the jump; a label that followed the jump
            # still names the same instruction, now just a little farther on.
            for idx, jt_far, jf_far in reversed(far):
                op = items[idx]
                extra: list[_Op | Label] = []
                for is_far, attr in ((jt_far, "jt"), (jf_far, "jf")):
                    if is_far:
                        tramp = Label("tramp")
                        extra += [tramp, self._trampoline(items, getattr(op, attr))]
                        setattr(op, attr, tramp)
                items[idx + 1:idx + 1] = extra
        pos, where = self._layout(items)
        out = []
        for idx, it in enumerate(items):
            if isinstance(it, Label):
                continue
            here = pos[idx]
            if it.code == JA:
                out.append(Insn(JA, where[id(it.jt)] - here - 1))
            elif it.code & 0x07 == BPF_JMP:
                jt = where[id(it.jt)] - here - 1
                jf = where[id(it.jf)] - here - 1
                assert 0 <= jt <= 255 and 0 <= jf <= 255, "jump out of range"
                out.append(Insn(it.code, it.k, jt, jf))
            else:
                out.append(Insn(it.code, it.k))
        return out

    @staticmethod
    def _layout(items):
        pos = []          # instruction index of each item (labels: of what follows)
        where = {}
        n = 0
        for it in items:
            pos.append(n)
            if isinstance(it, Label):
                where[id(it)] = n
            else:
                n += 1
        for it in items:
            if isinstance(it, _Op):
                for t in (it.jt, it.jf):
                    if t is not None and id(t) not in where:
                        raise ValueError(f"undefined label {t!r}")
        return pos, where

    @staticmethod
    def _trampoline(items, target: Label) -> _Op:
        i = next(i for i, it in enumerate(items) if it is target)
        for it in items[i + 1:]:
            if isinstance(it, _Op):
                if it.code == RET:
                    return _Op(RET, it.k)        # copy the return: no jump needed
                break
        return _Op(JA, 0, target)

    @staticmethod
    def _drop_empty_jumps(items):
        """Remove `ja L` immediately followed (through labels only) by L."""
        out = []
        for i, it in enumerate(items):
            if isinstance(it, _Op) and it.code == JA:
                j = i + 1
                following = set()
                while j < len(items) and isinstance(items[j], Label):
                    following.add(id(items[j]))
                    j += 1
                if id(it.jt) in following:
                    continue
            out.append(it)
        return out


# -- interpreter -------------------------------------------------------------

def seccomp_data(nr: int, arch: int, args=(0, 0, 0, 0, 0, 0), ip: int = 0,
                 little_endian: bool = True) -> bytes:
    e = "<" if little_endian else ">"
    args = tuple(args) + (0,) * (6 - len(args))
    return struct.pack(e + "iIQ6Q", nr if nr < (1 << 31) else nr - (1 << 32), arch, ip,
                       *(a & 0xFFFFFFFFFFFFFFFF for a in args))


def run(program: bytes | list[Insn], data: bytes, little_endian: bool = True) -> int:
    """Run a seccomp BPF program on seccomp_data; return its 32-bit result."""
    insns = decode(program) if isinstance(program, (bytes, bytearray)) else program
    e = "<" if little_endian else ">"
    a = x = 0
    mem = [0] * 16
    pc = 0
    steps = 0
    while True:
        if pc >= len(insns):
            raise ValueError("ran off the end of the program")
        steps += 1
        if steps > 100000:
            raise ValueError("program does not terminate")
        i = insns[pc]
        pc += 1
        cls = i.code & 0x07
        if cls == BPF_LD:
            mode = i.code & 0xE0
            if mode == BPF_ABS and i.code & 0x18 == BPF_W:
                if i.k % 4 or i.k + 4 > len(data):
                    raise ValueError(f"bad load offset {i.k}")
                a = struct.unpack_from(e + "I", data, i.k)[0]
            elif mode == BPF_IMM:
                a = i.k
            elif mode == BPF_MEM:
                a = mem[i.k]
            elif mode == BPF_LEN:
                a = len(data)
            else:
                raise ValueError(f"unsupported load {i.code:#x}")
        elif cls == BPF_LDX:
            mode = i.code & 0xE0
            x = {BPF_IMM: i.k, BPF_LEN: len(data)}.get(mode, mem[i.k] if mode == BPF_MEM else None)
            if x is None:
                raise ValueError(f"unsupported ldx {i.code:#x}")
        elif cls == BPF_ST:
            mem[i.k] = a
        elif cls == BPF_STX:
            mem[i.k] = x
        elif cls == BPF_ALU:
            op = i.code & 0xF0
            src = x if i.code & BPF_X else i.k
            if op == BPF_NEG:
                a = -a
            elif op in (BPF_DIV, BPF_MOD) and src == 0:
                return 0
            else:
                a = {BPF_ADD: lambda: a + src, BPF_SUB: lambda: a - src,
                     BPF_MUL: lambda: a * src, BPF_DIV: lambda: a // src,
                     BPF_OR: lambda: a | src, BPF_AND: lambda: a & src,
                     BPF_LSH: lambda: a << (src & 31), BPF_RSH: lambda: a >> (src & 31),
                     BPF_MOD: lambda: a % src, BPF_XOR: lambda: a ^ src}[op]()
            a &= 0xFFFFFFFF
        elif cls == BPF_JMP:
            op = i.code & 0xF0
            if op == BPF_JA:
                pc += i.k
                continue
            src = x if i.code & BPF_X else i.k
            cond = {BPF_JEQ: a == src, BPF_JGT: a > src, BPF_JGE: a >= src,
                    BPF_JSET: bool(a & src)}[op]
            pc += i.jt if cond else i.jf
        elif cls == BPF_RET:
            return (a if i.code & 0x18 == BPF_A else i.k) & 0xFFFFFFFF
        elif cls == BPF_MISC:
            if i.code & 0xF8 == BPF_TAX:
                x = a
            else:
                a = x
        else:
            raise ValueError(f"unsupported instruction {i.code:#x}")


def describe_action(ret: int) -> str:
    action, data = ret & RET_ACTION_FULL, ret & RET_DATA
    names = {RET_KILL_PROCESS: "kill-process", RET_KILL_THREAD: "kill-thread",
             RET_TRAP: "trap", RET_USER_NOTIF: "user-notify", RET_TRACE: "trace",
             RET_LOG: "log", RET_ALLOW: "allow"}
    if action == RET_ERRNO:
        return f"errno {data}"
    return names.get(action, f"{ret:#x}") + (f" ({data})" if data and action != RET_ALLOW else "")


def disassemble(program: bytes | list[Insn]) -> str:
    insns = decode(program) if isinstance(program, (bytes, bytearray)) else program
    lines = []
    for n, i in enumerate(insns):
        cls = i.code & 0x07
        if i.code == LD_ABS:
            txt = f"ld  [{i.k}]"
        elif cls == BPF_RET:
            txt = f"ret {describe_action(i.k)}"
        elif i.code == JA:
            txt = f"ja  {n + 1 + i.k}"
        elif cls == BPF_JMP:
            name = {BPF_JEQ: "jeq", BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JSET: "jset"}.get(
                i.code & 0xF0, f"j{i.code:#x}")
            txt = f"{name} #{i.k:#x}, {n + 1 + i.jt}, {n + 1 + i.jf}"
        else:
            txt = f"op {i.code:#06x} k={i.k:#x} jt={i.jt} jf={i.jf}"
        lines.append(f"{n:4d}: {txt}")
    return "\n".join(lines)
