"""Decision equivalence: the compiled seccomp programs decide what the policies say.

Three parties, each independent of the others:

  * the reference (broker/jail/seccomp/reference.py) reads the policy text and
    decides a (syscall number, arguments, architecture) tuple;
  * the interpreter (broker/jail/seccomp/bpf_interp.py) runs the compiled
    program on the same tuple's seccomp_data;
  * the kernel runs the compiled program on the same tuple, made as a real
    syscall by tests/seccomp_runner.c.

`tuples(ref)` generates the inputs for one policy; `check_policy()` compares
reference and interpreter on all of them and, when asked, interpreter and
kernel on every tuple a process can produce (this machine's architecture or
i386 through int 0x80).

To let the kernel run any syscall number with any arguments safely, the
program it loads is the compiled one with every `ret K` replaced by
`ret ERRNO|i`, i the index of K among the program's distinct return values:
nothing is ever executed, the syscall returns -i, and i names K exactly
(numbers a kernel never passes through seccomp are left out: unfiltered()).
Control flow (every load and jump) is untouched, so the kernel's path is
the original program's path.  A prefix lets the runner's worker thread
leave through exit(2) with a magic arg5; no generated tuple has it.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from broker.jail.seccomp import bpf_interp as bi
from broker.jail.seccomp.reference import Reference

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF
X86_64 = bi.AUDIT_ARCH_X86_64
I386 = bi.AUDIT_ARCH_I386
AARCH64 = 0xC00000B7
MAGIC = 0x5EC0C0DE0DDBA115
SYS_EXIT = 60
RUNNER_SRC = Path(__file__).resolve().parent / "seccomp_runner.c"

# The highest x86_64 syscall number swept (every number up to it is tried);
# the kernel's table ends at 469 (6.18), x32 numbers at 547.
SWEEP = 560


# -- tuples ----------------------------------------------------------------------

def _boundaries(op: str, v: int) -> set[int]:
    """Argument values at the edges of `arg OP v`."""
    lo, hi = v & U32, v >> 32
    vals = {v, v - 1, v + 1, 0, 1, U64, U64 - 1, U32, U32 + 1, 0x7FFFFFFF, 0x80000000,
            1 << 63, (1 << 63) - 1, lo, hi, lo | (1 << 32), v ^ (1 << 32), v ^ (1 << 63),
            lo | (U32 << 32), (lo << 32), (hi << 32) | lo ^ 1, ~v, v ^ 1}
    if op in ("&", "in"):
        bits = [b for b in range(64) if v >> b & 1]
        outside = [b for b in range(64) if not v >> b & 1]
        vals |= {1 << b for b in range(64)}              # each bit alone
        vals |= {v & ~(1 << b) for b in bits}            # the mask minus one bit
        vals |= {v | 1 << b for b in outside}            # the mask plus one bit
        vals |= {~v & U64, (~v & U64) | v, v & U32, v & ~U32 & U64}
    return {x & U64 for x in vals}


def _witness(conj) -> list[int]:
    """Arguments that make every atom of a conjunction hold, where one value can."""
    args = [0] * 6
    by_arg: dict[int, list] = {}
    for atom in conj:
        by_arg.setdefault(atom[0], []).append(atom)
    for i, atoms in by_arg.items():
        candidates = sorted(set().union(*(_boundaries(op, v) for _, op, v in atoms)))
        ok = [c for c in candidates if all(Reference.holds(op, c, v) for _, op, v in atoms)]
        args[i] = ok[0] if ok else 0
    return args


def tuples(ref: Reference, seed: str = ""):
    """(nr, args, arch) inputs for one policy: a set, so nothing is counted twice."""
    rng = random.Random(f"{seed}:{ref.path}")
    out: set[tuple[int, tuple[int, ...], int]] = set()

    def add(nr, args, arch=X86_64):
        args = tuple(a & U64 for a in args) + (0,) * (6 - len(args))
        if nr == SYS_EXIT and args[5] == MAGIC:
            return
        out.add((nr & U32, args, arch))

    def rand_args():
        return [rng.choice([0, 1, rng.getrandbits(32), rng.getrandbits(64), U64, U32 + 1])
                for _ in range(6)]

    listed = sorted(ref.rules)
    # every number, listed or not, and numbers outside the table
    for nr in range(SWEEP + 1):
        add(nr, [0] * 6)
        add(nr, rand_args())
    for nr in (0x3FFFFFFF, 0x40000000, 0x4000FFFF, 0x7FFFFFFF, 0x80000000, 0x80000001,
               0xFFFFFFFF, 0xFFFFFFFE, 0x10000, 0x1000, 1024, 0xFFFF):
        add(nr, [0] * 6)
        add(nr, [U64] * 6)
    for nr in listed:
        base = nr & 0x3FFFFFFF
        add(base | 0x40000000, [0] * 6)                       # its x32 twin
        add(base | 0x40000000, [U64] * 6)
        add(base | 0x80000000, [0] * 6)
        add(base | 0x100000, [0] * 6)
        for arch in (I386, AARCH64, 0, U32, X86_64 ^ 0x80000000, X86_64 ^ 0x40000000,
                     X86_64 ^ 1):
            add(nr, [0] * 6, arch)
        add(nr, rand_args(), I386)
    for nr in (0, 1, 3, 59, 60, 231, 0x40000000 | 59):       # wrong arch, unlisted too
        for arch in (I386, AARCH64):
            add(nr, [0] * 6, arch)

    for nr in listed:
        rules = ref.rules[nr]
        # arguments that matter to no rule, and high halves: never a way around
        add(nr, [0] * 6)
        add(nr, [U64] * 6)
        for i in range(6):
            for v in (U64, 1 << 32, U32 << 32, U32, 1 << 63, 1):
                a = [0] * 6
                a[i] = v
                add(nr, a)
        for _ in range(8):
            add(nr, rand_args())
        for dnf, _action in rules:
            if dnf is None:
                continue
            for conj in dnf:
                w = _witness(conj)
                add(nr, w)
                noisy = list(w)
                mentioned = {a[0] for a in conj}
                for i in range(6):
                    if i not in mentioned:
                        noisy[i] = rng.getrandbits(64)
                add(nr, noisy)
                for i in mentioned:                  # the high half set under a holding low half
                    h = list(w)
                    h[i] = w[i] | (1 << 32)
                    add(nr, h)
                    h[i] = w[i] ^ (U32 << 32)
                    add(nr, h)
                for arg, op, v in conj:
                    for x in _boundaries(op, v):
                        a = list(w)                  # the rest of the conjunction holds
                        a[arg] = x
                        add(nr, a)
                        a = [rng.getrandbits(64) for _ in range(6)]    # or likely not
                        a[arg] = x
                        add(nr, a)
    return out


# -- the kernel --------------------------------------------------------------------

_CALL = struct.Struct("=II6Q")
_RESULT = struct.Struct("=iiiIqQ")
NOT_RUN, RETURNED, TRAPPED, THREAD_KILLED, PROCESS_KILLED, DIED, LOAD_FAILED, LOADED = range(8)


@dataclass
class KernelResult:
    status: int
    ret: int = 0
    ip: int = 0
    trap_errno: int = 0
    trap_syscall: int = 0
    trap_arch: int = 0


def runner() -> str | None:
    """The compiled runner (built once per source version), or None without a compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or os.uname().machine != "x86_64":
        return None
    src = RUNNER_SRC.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    d = Path(tempfile.gettempdir()) / f"privbroker-seccomp-runner-{os.geteuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not d.is_dir() or d.is_symlink():
        d = Path(tempfile.mkdtemp(prefix="privbroker-seccomp-runner-"))   # not ours: no reuse
    exe = d / f"runner-{digest}"
    if not exe.exists():
        tmp = d / f"runner-{digest}.{os.getpid()}"
        p = subprocess.run([cc, "-O1", "-Wall", "-pthread", "-mno-red-zone", "-U_FORTIFY_SOURCE",
                            "-o", str(tmp), str(RUNNER_SRC)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"building the seccomp runner failed:\n{p.stderr}")
        os.replace(tmp, exe)
    return str(exe)


def run_in_kernel(program: bytes, calls, mode: int = 0) -> list[KernelResult]:
    """Load `program` in a worker thread and make each call (abi, nr, args):
    abi 0 the syscall instruction, 1 int 0x80.  mode 0: one process for all
    (a new one after a death); 1: one process per call; 2: load only."""
    exe = runner()
    if exe is None:
        raise RuntimeError("no C compiler for the seccomp runner")
    data = [struct.pack("=II", mode, len(program) // 8), program, struct.pack("=I", len(calls))]
    data += [_CALL.pack(abi, nr & U32, *[a & U64 for a in args])
             for abi, nr, args in calls]
    p = subprocess.run([exe], input=b"".join(data), capture_output=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"seccomp runner failed with status {p.returncode}: {p.stderr!r}")
    out = []
    for status, terr, tsys, tarch, ret, ip in _RESULT.iter_unpack(p.stdout):
        out.append(KernelResult(status, ret, ip, terr, tsys, tarch))
    return out


def load_errno(program: bytes) -> int:
    """0 if seccomp(2) accepts `program`, else its errno."""
    r = run_in_kernel(program, [], mode=2)[0]
    assert r.status in (LOADED, LOAD_FAILED), r
    return 0 if r.status == LOADED else r.ret


def _ld(k):
    return struct.pack("=HBBI", 0x20, 0, 0, k)


def _jeq(k, jt, jf):
    return struct.pack("=HBBI", 0x15, jt, jf, k)


def _ret(k):
    return struct.pack("=HBBI", 0x06, 0, 0, k)


def escape_prefix() -> bytes:
    """exit(2) with arg5 == MAGIC from this architecture: allowed; else on to what follows."""
    n = 9
    insns = [_ld(4), _jeq(X86_64, 0, n - 2), _ld(0), _jeq(SYS_EXIT, 0, n - 4),
             _ld(16 + 8 * 5 + 4), _jeq(MAGIC >> 32, 0, n - 6), _ld(16 + 8 * 5),
             _jeq(MAGIC & U32, 0, n - 8), _ret(bi.RET_ALLOW)]
    assert len(insns) == n
    return b"".join(insns)


def with_escape(program: bytes) -> bytes:
    return escape_prefix() + program


def remap_returns(program: bytes) -> tuple[bytes, dict[int, int]]:
    """Every `ret K` -> `ret ERRNO|i`; returns the program and {i: K}."""
    insns = bi.decode(program)
    index: dict[int, int] = {}
    out = []
    for code, jt, jf, k in insns:
        if code == 0x16:
            raise ValueError("ret A cannot be remapped")
        if code == 0x06:
            i = index.setdefault(k, len(index) + 1)
            k = bi.RET_ERRNO | i
        out.append(struct.pack("=HBBI", code, jt, jf, k))
    if len(index) > bi.MAX_ERRNO:
        raise ValueError("too many distinct return values")
    return b"".join(out), {i: k for k, i in index.items()}


_ia32: bool | None = None


def ia32_available() -> bool:
    """Does int 0x80 reach the kernel's i386 entry here (IA32 emulation)?"""
    global _ia32
    if _ia32 is None:
        prog = with_escape(_ret(bi.RET_ERRNO | 7))
        r = run_in_kernel(prog, [(1, 20, [0] * 6)])[0]
        _ia32 = r.status == RETURNED and r.ret == -7
    return _ia32


_probed: dict[tuple[int, int], bool] = {}


def unfiltered(numbers, abi: int = 0) -> set[int]:
    """The syscall numbers this kernel does not pass through seccomp at all.

    Probed with a program returning ERRNO for everything and zero arguments:
    a number that comes back without that errno never reached the filter.
    (Mainline Linux filters every number; this host's kernel was seen to
    skip 335 and 336.)  Such numbers are left out of kernel runs: with other
    arguments they would run whatever the kernel does for them."""
    todo = sorted({nr & U32 for nr in numbers} - {nr for nr, a in _probed if a == abi})
    if todo:
        prog = with_escape(_ret(bi.RET_ERRNO | 4001))
        for nr, r in zip(todo, run_in_kernel(prog, [(abi, nr, [0] * 6) for nr in todo])):
            _probed[(nr, abi)] = not (r.status == RETURNED and r.ret == -4001)
    return {nr for (nr, a), skipped in _probed.items() if a == abi and skipped}


def kernel_returns(program: bytes, calls) -> list[int | None]:
    """What the kernel's run of `program` returns for each (nr, args, arch), via
    the remapped program; None for a tuple no process here can produce."""
    remapped, names = remap_returns(program)
    prog = with_escape(remapped)
    if len(prog) // 8 > bi.MAXINSNS:
        raise ValueError("program too long for the escape prefix")
    skip64 = unfiltered(nr for nr, _a, arch in calls if arch == X86_64)
    i386 = [nr for nr, args, arch in calls if arch == I386 and all(a <= U32 for a in args)]
    skip32 = unfiltered(i386, abi=1) if i386 and ia32_available() else None
    runnable, where = [], []
    for j, (nr, args, arch) in enumerate(calls):
        if arch == X86_64 and nr not in skip64:
            runnable.append((0, nr, args))
            where.append(j)
        elif (arch == I386 and skip32 is not None and nr not in skip32
              and all(a <= U32 for a in args)):
            runnable.append((1, nr, args))
            where.append(j)
    out: list[int | None] = [None] * len(calls)
    for j, r in zip(where, run_in_kernel(prog, runnable)):
        if r.status == RETURNED and -r.ret in names:
            out[j] = names[-r.ret]
        else:                       # not a path of the program: report it as such
            out[j] = -1 - r.status
    return out


# -- the check -----------------------------------------------------------------------

@dataclass
class Report:
    policy: str
    default: str | None
    tuples: int = 0
    kernel_tuples: int = 0
    mismatches: list = field(default_factory=list)      # (tuple, reference, interpreter)
    kernel_mismatches: list = field(default_factory=list)  # (tuple, interpreter, kernel)
    verdicts: Counter = field(default_factory=Counter)       # the reference's, by action


def check_policy(path, program: bytes, default: str | None = None, kernel: bool = False,
                 constants=None, inputs=None) -> Report:
    ref = Reference(path, default, constants=constants)
    interp = bi.Program(program)
    rep = Report(str(path), default)
    inputs = sorted(inputs if inputs is not None else tuples(ref))
    got = []
    for nr, args, arch in inputs:
        ret = interp.run(nr, arch, args)
        got.append(ret)
        want = ref.decide(nr, args, arch)
        have = bi.verdict(ret)
        rep.verdicts[want.split()[0]] += 1
        if want != have:
            rep.mismatches.append(((nr, args, arch), want, have))
    rep.tuples = len(inputs)
    if kernel:
        for t, ret, k in zip(inputs, got, kernel_returns(program, inputs)):
            if k is None:
                continue
            rep.kernel_tuples += 1
            if k != ret:
                rep.kernel_mismatches.append((t, ret, k))
    return rep
