"""How the rules' answers combine (broker/devices/chain.py)."""
import os

import pytest

from broker.devices import chain
from broker.devices.rules import ALLOW, DENY, DETACH, IGNORE, LOCKDOWN, Device, Rule
from broker.devices.rules.base import READ, READ_WRITE, WRITE


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


class Grants(Says):
    """ALLOW (or whatever it is told), granting `access` (rules.base)."""

    def __init__(self, name, access, verdict=ALLOW):
        super().__init__(name, verdict)
        self.granted = access

    def access(self, dev):
        return self.granted


@pytest.mark.parametrize("grants,access,logged", [
    ((READ,), READ, "read only"),
    ((WRITE,), WRITE, "write only"),
    ((READ, WRITE), READ_WRITE, None),                   # any ALLOW allows: the union
    ((READ, READ_WRITE), READ_WRITE, None),
])
def test_access_is_the_union_of_what_the_allowing_rules_grant(grants, access, logged):
    d = chain.decide(tuple(Grants(f"g{i}", a) for i, a in enumerate(grants)), DEV)
    assert d.verdict is ALLOW and d.access == access
    assert d.log_fields.get("access") == logged


def test_only_allow_answers_grant_access():
    # a conditional verdict qualifies an allow; what it would grant is not asked
    d = chain.decide((Grants("r", READ_WRITE), Grants("l", READ, LOCKDOWN)), DEV)
    assert d.verdict is LOCKDOWN and d.access == READ_WRITE
    # a rule that DENYs or IGNOREs grants nothing either
    d = chain.decide((Grants("r", READ), Grants("i", READ_WRITE, IGNORE)), DEV)
    assert d.access == READ


@pytest.mark.parametrize("qualifier", [LOCKDOWN, DETACH])
def test_lockdown_or_detach_on_less_than_read_write_denies(qualifier):
    # the usbfs ioctls need a read-write fd: CheckPathAccess must not say
    # yes to what OpenPath could not do
    d = chain.decide((Grants("r", READ), Grants("q", READ_WRITE, qualifier)), DEV)
    assert d.verdict is DENY and "needs a read-write fd" in d.explain()


def test_an_allow_that_grants_nothing_denies():
    d = chain.decide((Grants("broken", 0),), DEV)
    assert d.verdict is DENY and not d.allowed
    assert "grant neither read nor write" in d.explain()


def test_access_is_asked_only_while_it_can_add_something():
    # an ACL read makes a decision unrememberable: allow_group's access()
    # is not asked once an earlier rule granted read-write
    asked = []

    class Counting(Grants):
        def access(self, dev):
            asked.append(self.name)
            return self.granted

    d = chain.decide((Counting("rw", READ_WRITE), Counting("r", READ)), DEV)
    assert d.access == READ_WRITE and asked == ["rw"]
    asked.clear()
    d = chain.decide((Counting("r", READ), Counting("w", WRITE)), DEV)
    assert d.access == READ_WRITE and asked == ["r", "w"]
