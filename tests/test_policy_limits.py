"""[limits] in broker.toml: the per-uid limits, calls_per_second among them;
unknown keys and bad values are errors that name the table."""
import tomllib

import pytest

from broker import policy
from conftest import ROOT


def parse(text: str):
    return policy.parse(tomllib.loads('profiles_dir = "p"\n' + text))


def test_defaults_without_a_section():
    p = parse("")
    assert (p.limits.max_live_jails, p.limits.launches_per_second) == (16, 10.0)
    assert p.calls_per_second == 200.0


def test_the_sample_deployment_sets_them():
    p = policy.load(str(ROOT / "examples" / "broker.toml"))
    assert (p.limits.max_live_jails, p.limits.launches_per_second, p.calls_per_second) == \
        (16, 20.0, 200.0)


def test_calls_per_second_is_read():
    assert parse("[limits]\ncalls_per_second = 50\n").calls_per_second == 50.0


@pytest.mark.parametrize("value", ["0", "-1", '"fast"', "true"])
def test_a_bad_calls_per_second_is_refused(value):
    with pytest.raises(policy.PolicyError, match=r"\[limits\]: calls_per_second must be positive"):
        parse(f"[limits]\ncalls_per_second = {value}\n")


def test_an_unknown_key_in_limits_is_refused():
    with pytest.raises(policy.PolicyError, match=r"\[limits\]: unknown keys calls_per_minute"):
        parse("[limits]\ncalls_per_minute = 5\n")


def test_a_grant_cannot_change_the_call_rate():
    # it applies before a call is matched to a grant
    with pytest.raises(policy.PolicyError, match="unknown keys calls_per_second"):
        parse('[[grant]]\nname = "g"\nusers = ["root"]\nprofiles = ["minimal"]\n'
              "calls_per_second = 5\n")
