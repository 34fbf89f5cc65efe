"""Fuzzing (property-based, hypothesis) of the parsers that read untrusted or
hand-written input: the seccomp policy language and the launcher's wire
format.  (The minijail flag and config-file parsers have theirs in
test_config.py; the compiler's agreement with libseccomp, the reference and
the kernel, in test_seccomp_compiler.py and test_seccomp_conformance.py.)

Every input either parses or gives the module's named error (PolicyError,
WireError); anything else is a crash.  For every policy that parses, the
compiled program is run on random calls by both BPF interpreters (bpf.run,
bpf_interp.run) and must return what compiler.evaluate reads from the policy.

`make test` runs a short version; `make fuzz` sets PRIVBROKER_FUZZ_EXAMPLES
(e.g. 20000) for a long one.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings, strategies as st

from broker import wire
from broker.jail.seccomp import bpf, bpf_interp, compiler, syscall_names
from broker.jail.seccomp.errors import PolicyError
from broker.jail.seccomp.parser import parse_policy


def _examples(quick: int) -> int:
    """Examples per property: quick in `make test`, PRIVBROKER_FUZZ_EXAMPLES in `make fuzz`."""
    return int(os.environ.get("PRIVBROKER_FUZZ_EXAMPLES", quick))


FUZZ = settings(max_examples=_examples(200), deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# -- seccomp policy text ------------------------------------------------------------

NAMES = ["read", "write", "openat", "ioctl", "socket", "getppid", "mmap", "mprotect",
         "futex", "clone", "no_such_call", "READ", "read ", "1", "mseal"]
VALUES = ["0", "1", "0x10", "-1", "18446744073709551615", "18446744073709551616",
          "0xffffffff", "AF_UNIX", "AF_INET", "PROT_EXEC", "~PROT_EXEC", "PROT_READ|PROT_WRITE",
          "(PROT_READ)", "O_RDONLY|", "NO_SUCH_CONSTANT", "08", "1e3", "~", "|", "()", "TCGETS"]
OPS = ["==", "!=", "<", "<=", ">", ">=", "&", "in", "=", "=>", "in~", "==="]
ACTIONS = ["1", "allow", "0", "return 1", "return 0", "return 4096", "return -1", "return",
           "kill", "kill-process", "kill-thread", "trap", "trace", "log", "user-notify",
           "return EPERM", "nonsense"]


@st.composite
def atoms(draw):
    return (f"arg{draw(st.integers(0, 7))} {draw(st.sampled_from(OPS))} "
            f"{draw(st.sampled_from(VALUES))}")


@st.composite
def expressions(draw):
    conj = [" && ".join(draw(st.lists(atoms(), min_size=1, max_size=3)))
            for _ in range(draw(st.integers(1, 3)))]
    return " || ".join(conj)


@st.composite
def statements(draw):
    kind = draw(st.integers(0, 9))
    name = draw(st.sampled_from(NAMES))
    if kind <= 2:
        return f"{name}: {draw(st.sampled_from(ACTIONS))}"
    if kind <= 5:
        return f"{name}: {draw(expressions())}"
    if kind == 6:
        return f"{name}: {draw(expressions())}; {draw(st.sampled_from(ACTIONS))}"
    if kind == 7:
        return (f"{name}: {{{draw(expressions())}; {draw(st.sampled_from(ACTIONS))}, "
                f"{draw(expressions())}}}")
    if kind == 8:
        return draw(st.sampled_from(["@default kill-thread", "@default trap", "@default log",
                                     "@default bogus", "@denylist", "@include /dev/null",
                                     "@include ./nope.policy", "@frequency ./f", "@", "#x",
                                     "read: 1 \\", "", "   "]))
    return draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))


def _policy_file(text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".policy", dir=_TMP)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return path


_TMP = tempfile.mkdtemp(prefix="privbroker-fuzz-")
atexit.register(shutil.rmtree, _TMP, True)


def _parse_or_policy_error(text: str):
    """-> the Policy, or None after a PolicyError; any other exception is a crash."""
    path = _policy_file(text)
    try:
        return parse_policy(path)
    except PolicyError as e:
        assert str(e)
        return None
    finally:
        os.unlink(path)


@FUZZ
@given(st.lists(statements(), max_size=8))
def test_any_policy_text_parses_or_gives_a_policy_error(lines):
    policy = _parse_or_policy_error("\n".join(lines) + "\n")
    if policy is not None:
        try:
            compiler.compile_parsed(policy)
        except PolicyError as e:       # only for a program too large for the kernel
            assert "instructions" in str(e)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_as_a_policy_parse_or_give_a_policy_error(data):
    _parse_or_policy_error(data.decode("utf-8", errors="surrogateescape"))


AUDIT_ARCH, _ = syscall_names.audit_arch()
U64 = st.one_of(st.integers(0, 16), st.sampled_from([0xFFFFFFFF, 1 << 32, (1 << 64) - 1,
                                                       1 << 63, 0x7, 0x4]),
                st.integers(0, (1 << 64) - 1))


@FUZZ
@given(st.lists(statements(), min_size=1, max_size=8), st.data())
def test_compiled_programs_decide_what_the_policy_text_says(lines, data):
    """The differential property: for random policies that parse and random
    calls, both BPF interpreters return what evaluate() reads from the policy."""
    policy = _parse_or_policy_error("\n".join(lines) + "\n")
    assume(policy is not None)
    default = data.draw(st.sampled_from([None, "kill-process", "kill-thread", "trap", "log"]))
    program = compiler.compile_parsed(policy, default)
    bpf_interp.check(program)                       # what the kernel would accept
    listed = [nr for nr in range(0, 500) if policy.rules_for(nr) is not None]
    for _ in range(8):
        nr = data.draw(st.one_of(st.sampled_from(listed or [0]), st.integers(0, 500),
                                 st.sampled_from([0x40000000 | 0, 0x40000001, 0xFFFFFFFF])))
        arch = data.draw(st.sampled_from([AUDIT_ARCH, AUDIT_ARCH, 0x40000003]))  # i386
        args = tuple(data.draw(U64) for _ in range(6))
        want = compiler.evaluate(policy, nr, args, default, arch)
        assert bpf.run(program, bpf.seccomp_data(nr, arch, args)) == want, (nr, arch, args)
        assert bpf_interp.run(program, nr, arch, args) == want, (nr, arch, args)


# -- the launcher's wire format (front -> launcher) -------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=10)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_give_a_wire_error(data):
    try:
        msg = wire.decode(data)
    except wire.WireError as e:
        assert str(e)
    else:
        assert isinstance(msg, dict) and msg["v"] == wire.VERSION


def _valid_spec_dict() -> dict:
    from broker.jail.config import parse_command_line
    spec = parse_command_line(["-p", "-v", "-e", "-n", "-u", "nobody", "-g", "nogroup",
                               "-R", "RLIMIT_NOFILE,10,10", "-b", "/usr", "-k", "t,/t,tmpfs",
                               "--fs-path-ro", "/etc", "--env-add", "A=b", "/bin/true"])
    return json.loads(json.dumps(wire.spec_to_wire(spec)))


VALID = _valid_spec_dict()


@FUZZ
@given(st.data())
def test_any_spec_on_the_wire_rebuilds_or_gives_a_wire_error(data):
    """A valid spec with fields replaced, removed or added: a JailSpec of the
    right types, or a WireError; never another exception."""
    d = dict(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.integers(0, 2))
        key = data.draw(st.sampled_from(sorted(VALID)))
        if how == 0:
            d[key] = data.draw(JSONISH)
        elif how == 1:
            d.pop(key, None)
        else:
            d[data.draw(st.text(max_size=8))] = data.draw(JSONISH)
    try:
        spec = wire.spec_from_wire(d)
    except wire.WireError as e:
        assert str(e)
    else:
        assert wire.spec_from_wire(json.loads(json.dumps(wire.spec_to_wire(spec)))) == spec


def test_a_valid_spec_survives_the_wire():
    spec = wire.spec_from_wire(VALID)
    assert json.loads(json.dumps(wire.spec_to_wire(spec))) == VALID


# -- the launcher's acceptance of a launch (broker/launcher.accept_launch) ---------------

def _sample_envelope():
    from broker import policy
    from broker.envelope import Envelope
    return Envelope(policy.load(str(Path(__file__).resolve().parent.parent
                                    / "examples" / "broker.toml")))


def _broker_launch_msg() -> dict:
    """What an honest front sends for root launching the sample `minimal`."""
    from dataclasses import replace
    from broker.envelope import BROKER_FORCED
    env = _sample_envelope()
    spec = replace(env.profiles.spec("minimal"), argv=("/bin/true",), uid=0, gid=0,
                   **BROKER_FORCED)
    return {"op": "launch", "jail": "f", "profile": "minimal", "fd_targets": [],
            "spec": json.loads(json.dumps(wire.spec_to_wire(spec)))}


ENVELOPE = _sample_envelope()
LAUNCH = _broker_launch_msg()


@FUZZ
@given(st.data())
def test_a_forged_launch_is_accepted_only_inside_the_envelope(data):
    """A forged launch message (spec fields replaced, removed or added; the
    profile or fd targets changed) is refused with a WireError, SpecError or
    OutsideEnvelope, never another exception; and whatever is accepted has
    every forced field, a uid the policy grants and the profile's own values
    in every field a request may not set."""
    from dataclasses import fields
    from broker.envelope import BROKER_FORCED, REQUEST_FIELDS, OutsideEnvelope, granted_uid
    from broker.jail.spec import JailSpec, SpecError
    from broker.launcher import accept_launch
    msg = json.loads(json.dumps(LAUNCH))
    spec = msg["spec"]
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["spec", "spec", "spec", "msg"]))
        target = spec if where == "spec" else msg
        key = data.draw(st.sampled_from(sorted(target) + ["extra"]))
        how = data.draw(st.integers(0, 2))
        if how == 0:
            original = target.get(key)
            flips = [not original] if isinstance(original, bool) else []
            target[key] = data.draw(st.sampled_from(flips + [None, 0, 1, "x", [], {}])
                                    | JSONISH)
        elif how == 1:
            target.pop(key, None)
        else:
            target[data.draw(st.text(max_size=8))] = data.draw(JSONISH)
    try:
        profile, accepted, _ = accept_launch(msg, 0, ENVELOPE)
    except (wire.WireError, SpecError, OutsideEnvelope) as e:
        assert str(e)
        return
    base = ENVELOPE.profiles.spec(profile)
    for name, value in BROKER_FORCED.items():
        assert getattr(accepted, name) == value, name
    assert granted_uid(ENVELOPE.policy, profile, accepted.uid)
    for f in fields(JailSpec):
        if f.name not in REQUEST_FIELDS and f.name not in BROKER_FORCED:
            assert getattr(accepted, f.name) == getattr(base, f.name), f.name
    assert base.namespaces <= accepted.namespaces


def test_the_honest_launch_is_accepted():
    from broker.launcher import accept_launch
    profile, spec, targets = accept_launch(json.loads(json.dumps(LAUNCH)), 0, ENVELOPE)
    assert (profile, spec.argv, spec.uid, targets) == ("minimal", ("/bin/true",), 0, [])
