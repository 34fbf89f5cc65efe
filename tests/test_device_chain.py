"""How the rules' answers combine (broker/devices/chain.py)."""
import os

import pytest

from broker.devices import chain
from broker.devices.rules import ALLOW, DENY, DETACH, IGNORE, LOCKDOWN, Device, Rule


class Says(Rule):
    type = "says"

    def __init__(self, name, verdict):
        super().__init__(name=name)
        self.verdict = verdict
        self.asked = 0

    def check(self, dev):
        self.asked += 1
        return self.verdict


DEV = Device("/dev/x", os.stat_result((0o20600, 1, 1, 1, 0, 0, 0, 0, 0, 0)), None)


def decide(*verdicts):
    return chain.decide(tuple(Says(f"r{i}", v) for i, v in enumerate(verdicts)), DEV)


@pytest.mark.parametrize("verdicts,final,deciding", [
    ((), DENY, None),                                     # default deny
    ((IGNORE, IGNORE), DENY, None),
    ((ALLOW,), ALLOW, "r0"),
    ((IGNORE, ALLOW, ALLOW), ALLOW, "r1"),
    ((ALLOW, DENY), DENY, "r1"),                          # any DENY denies
    ((DENY, ALLOW, DENY), DENY, "r0"),                    # the first DENY is named
    ((ALLOW, LOCKDOWN), LOCKDOWN, "r0"),
    ((DETACH, ALLOW), DETACH, "r1"),
    ((ALLOW, DETACH, LOCKDOWN), LOCKDOWN, "r0"),          # lockdown beats detach
    ((LOCKDOWN,), DENY, None),                            # qualifies an allow, is none
    ((DETACH, IGNORE), DENY, None),
    ((ALLOW, LOCKDOWN, DENY), DENY, "r2"),
])
def test_combination(verdicts, final, deciding):
    d = decide(*verdicts)
    assert d.verdict is final
    assert (d.rule.name if d.rule else None) == deciding
    assert d.allowed is (final is not DENY)


def test_every_rule_is_asked_and_the_trail_says_what_each_answered():
    rules = (Says("a", DENY), Says("b", IGNORE), Says("c", ALLOW))
    d = chain.decide(rules, DEV)
    assert [r.asked for r in rules] == [1, 1, 1]
    assert d.trail() == "a=DENY c=ALLOW"
    assert d.explain() == "rule 'a'"
    assert chain.decide((), DEV).explain() == "no rule allows this device (default deny)"
