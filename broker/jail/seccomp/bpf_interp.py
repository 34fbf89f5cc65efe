"""A classic-BPF interpreter for seccomp programs, written from the kernel's
rules and independent of bpf.py (the compiler's assembler): it reads the raw
``struct sock_filter`` bytes itself and shares no code with the compiler.

    check(program)                    -> None, or InvalidFilter: what the kernel
                                         refuses with EINVAL at load time
    Program(program).run(nr, arch, args, ip) -> the 32-bit return value
    verdict(ret)                      -> what the kernel then does, as a string:
                                         "allow", "log", "errno N", "trap",
                                         "trap N", "trace", "trace N",
                                         "user-notify", "kill-thread",
                                         "kill-process"

What it follows (Linux, net/core/filter.c and kernel/seccomp.c):

* check(): bpf_check_classic() (1..4096 instructions, known opcodes, no
  division by a constant 0, constant shifts < 32, scratch cells 0..15,
  jumps inside the program, a RET last, no scratch cell read before it is
  written on every path) and then seccomp_check_filter() (only the opcodes
  seccomp allows: no MOD, no byte/half-word or indirect loads, no RET X;
  word loads 4-aligned and inside the 64-byte seccomp_data).
* run(): A and X start at 0; seccomp_data is nr (int), arch, the 64-bit
  instruction pointer and six 64-bit arguments in native byte order, so on a
  little-endian machine word 4+2i is argument i's low half; ``LD|W|LEN``
  loads 64; division by an X of 0 returns 0 (the converted program's guard),
  shifts by X use the low 5 bits (x86-64's shl/shr, as the JIT emits them);
  all arithmetic is 32-bit.
* verdict(): the action is ``ret & 0xffff0000``; ERRNO data is capped at
  4095 (MAX_ERRNO); an unknown action kills the process.

tests/test_seccomp_conformance.py checks all of this against the running
kernel (programs loaded in real threads, syscalls made with chosen numbers
and arguments through `syscall` and `int 0x80`).
"""
from __future__ import annotations

import struct
import sys

MAXINSNS = 4096
MEMWORDS = 16
SECCOMP_DATA_SIZE = 64
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

# instruction classes and fields (linux/filter.h, linux/bpf_common.h)
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0)
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
RVAL_A = 0x10
TAX, TXA = 0x00, 0x80

# seccomp return values (linux/seccomp.h)
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
ACTION_FULL = 0xFFFF0000
DATA = 0x0000FFFF
MAX_ERRNO = 4095

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003

_FMT = "=HBBI"
_SIZE = struct.calcsize(_FMT)

_COND = {JMP | op | src for op in (JEQ, JGT, JGE, JSET) for src in (K, X)}

# Opcodes bpf_check_classic() knows (its codes[] table) ...
_CLASSIC = (
    {ALU | op | src for op in (ADD, SUB, MUL, DIV, MOD, AND, OR, XOR, LSH, RSH)
     for src in (K, X)} | {ALU | NEG}
    | {LD | sz | mode for sz in (W, H, B) for mode in (ABS, IND)}
    | {LD | W | LEN, LDX | W | LEN, LD | IMM, LD | MEM, LDX | IMM, LDX | MEM,
       LDX | B | MSH, MISC | TAX, MISC | TXA, RET | K, RET | RVAL_A, ST, STX, JMP | JA}
    | _COND
)
# ... and the subset seccomp_check_filter() lets through.
_SECCOMP = (
    {ALU | op | src for op in (ADD, SUB, MUL, DIV, AND, OR, XOR, LSH, RSH) for src in (K, X)}
    | {ALU | NEG, LD | W | ABS, LD | W | LEN, LDX | W | LEN, LD | IMM, LDX | IMM, LD | MEM,
       LDX | MEM, ST, STX, MISC | TAX, MISC | TXA, RET | K, RET | RVAL_A, JMP | JA}
    | _COND
)


class InvalidFilter(ValueError):
    """The kernel would refuse this program (seccomp(2) fails with EINVAL)."""

    def __init__(self, reason: str, pc: int | None = None):
        super().__init__(reason if pc is None else f"instruction {pc}: {reason}")
        self.pc = pc


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    """Raw sock_filter bytes -> [(code, jt, jf, k)]."""
    if len(program) % _SIZE:
        raise InvalidFilter(f"{len(program)} bytes is not a whole number of "
                            f"{_SIZE}-byte instructions")
    return list(struct.iter_unpack(_FMT, program))


def check(program: bytes) -> None:
    """Raise InvalidFilter if the kernel would refuse to load `program`."""
    insns = decode(program)
    n = len(insns)
    if not 0 < n <= MAXINSNS:
        raise InvalidFilter(f"{n} instructions: a program has 1..{MAXINSNS}")
    for pc, (code, jt, jf, k) in enumerate(insns):
        if code not in _CLASSIC:
            raise InvalidFilter(f"unknown opcode {code:#06x}", pc)
        if code in (ALU | DIV | K, ALU | MOD | K) and k == 0:
            raise InvalidFilter("division by a constant 0", pc)
        if code in (ALU | LSH | K, ALU | RSH | K) and k >= 32:
            raise InvalidFilter(f"constant shift by {k}", pc)
        if code in (LD | MEM, LDX | MEM, ST, STX) and k >= MEMWORDS:
            raise InvalidFilter(f"scratch cell {k} (there are {MEMWORDS})", pc)
        if code == JMP | JA and k >= n - 1 - pc:
            raise InvalidFilter("jump past the end", pc)
        if code in _COND and (pc + jt + 1 >= n or pc + jf + 1 >= n):
            raise InvalidFilter("jump past the end", pc)
    if insns[-1][0] not in (RET | K, RET | RVAL_A):
        raise InvalidFilter("the last instruction is not a return", n - 1)
    _check_scratch(insns)
    for pc, (code, _jt, _jf, k) in enumerate(insns):
        if code not in _SECCOMP:
            raise InvalidFilter(f"opcode {code:#06x} is not allowed in seccomp", pc)
        if code == LD | W | ABS and (k >= SECCOMP_DATA_SIZE or k & 3):
            raise InvalidFilter(f"load at offset {k}: seccomp_data words are at "
                                f"0, 4, ... 60", pc)


def _check_scratch(insns) -> None:
    """check_load_and_stores(): a cell is read only after a write on every path."""
    n = len(insns)
    masks = [0xFFFF] * n
    valid = 0
    for pc, (code, jt, jf, k) in enumerate(insns):
        valid &= masks[pc]
        if code in (ST, STX):
            valid |= 1 << k
        elif code in (LD | MEM, LDX | MEM):
            if not valid & (1 << k):
                raise InvalidFilter(f"scratch cell {k} read before it is written", pc)
        elif code == JMP | JA:
            masks[pc + 1 + k] &= valid
            valid = 0xFFFF
        elif code in _COND:
            masks[pc + 1 + jt] &= valid
            masks[pc + 1 + jf] &= valid
            valid = 0xFFFF


def data_words(nr: int, arch: int, args=(), ip: int = 0,
               little_endian: bool = sys.byteorder == "little") -> list[int]:
    """seccomp_data as the 16 32-bit words a program's loads see."""
    args = tuple(args) + (0,) * (6 - len(args))
    words = [nr & U32, arch & U32]
    for v in (ip, *args):
        v &= U64
        lo, hi = v & U32, v >> 32
        words += [lo, hi] if little_endian else [hi, lo]
    return words


class Program:
    """A decoded program, ready to run many times."""

    def __init__(self, program: bytes, validate: bool = True):
        if validate:
            check(program)
        self.insns = decode(program)

    def run(self, nr: int, arch: int = AUDIT_ARCH_X86_64, args=(), ip: int = 0) -> int:
        return self.run_words(data_words(nr, arch, args, ip))

    def run_words(self, data: list[int], trace: list | None = None) -> int:
        """Run on seccomp_data words; `trace`, if given, collects the pc of
        each instruction executed."""
        insns = self.insns
        a = x = 0
        mem = [0] * MEMWORDS
        pc = 0
        while True:
            if trace is not None:
                trace.append(pc)
            code, jt, jf, k = insns[pc]
            pc += 1
            # the compiler's instructions first: they are nearly all that runs
            if code == 0x20:                        # LD|W|ABS
                a = data[k >> 2]
            elif code == 0x15:                      # JEQ K
                pc += jt if a == k else jf
            elif code == 0x35:                      # JGE K
                pc += jt if a >= k else jf
            elif code == 0x25:                      # JGT K
                pc += jt if a > k else jf
            elif code == 0x45:                      # JSET K
                pc += jt if a & k else jf
            elif code == 0x06:                      # RET K
                return k
            elif code == 0x05:                      # JA
                pc += k
            else:
                cls = code & 0x07
                if cls == RET:
                    return a
                if cls == JMP:
                    op = code & 0xF0
                    src = x if code & X else k
                    if op == JEQ:
                        cond = a == src
                    elif op == JGT:
                        cond = a > src
                    elif op == JGE:
                        cond = a >= src
                    else:
                        cond = a & src
                    pc += jt if cond else jf
                elif cls == ALU:
                    op = code & 0xF0
                    src = x if code & X else k
                    if op == ADD:
                        a = (a + src) & U32
                    elif op == SUB:
                        a = (a - src) & U32
                    elif op == MUL:
                        a = (a * src) & U32
                    elif op == DIV:
                        if src == 0:
                            return 0
                        a //= src
                    elif op == OR:
                        a |= src
                    elif op == AND:
                        a &= src
                    elif op == XOR:
                        a ^= src
                    elif op == LSH:
                        a = (a << (src & 31)) & U32
                    elif op == RSH:
                        a >>= src & 31
                    elif op == NEG:
                        a = -a & U32
                    else:
                        raise InvalidFilter(f"opcode {code:#06x}", pc - 1)
                elif code == LD | IMM:
                    a = k
                elif code == LDX | IMM:
                    x = k
                elif code == LD | W | LEN:
                    a = SECCOMP_DATA_SIZE
                elif code == LDX | W | LEN:
                    x = SECCOMP_DATA_SIZE
                elif code == LD | MEM:
                    a = mem[k]
                elif code == LDX | MEM:
                    x = mem[k]
                elif code == ST:
                    mem[k] = a
                elif code == STX:
                    mem[k] = x
                elif code == MISC | TAX:
                    x = a
                elif code == MISC | TXA:
                    a = x
                else:
                    raise InvalidFilter(f"opcode {code:#06x}", pc - 1)


def run(program: bytes, nr: int, arch: int = AUDIT_ARCH_X86_64, args=(), ip: int = 0) -> int:
    """Check and run `program` once on one seccomp_data."""
    return Program(program).run(nr, arch, args, ip)


_ACTIONS = {RET_KILL_PROCESS: "kill-process", RET_KILL_THREAD: "kill-thread",
            RET_TRAP: "trap", RET_ERRNO: "errno", RET_USER_NOTIF: "user-notify",
            RET_TRACE: "trace", RET_LOG: "log", RET_ALLOW: "allow"}


def verdict(ret: int) -> str:
    """What the kernel does with a filter's return value (one filter loaded).

    The data field is kept where it is observable: the errno (capped at
    MAX_ERRNO as the kernel does), trap's si_errno, trace's event message."""
    action, data = ret & ACTION_FULL, ret & DATA
    name = _ACTIONS.get(action)
    if name is None:
        return "kill-process"                # kernel/seccomp.c: default: kill
    if name == "errno":
        return f"errno {min(data, MAX_ERRNO)}"
    if name in ("trap", "trace") and data:
        return f"{name} {data}"
    return name
