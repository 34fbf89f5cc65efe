"""The rule chain: every rule looks at the device; their answers combine.

  - any DENY denies (the first DENY in chain order is the deciding rule);
  - otherwise, if some rule says ALLOW, the device is allowed, and
      ALLOW_WITH_LOCKDOWN from any rule makes it "allowed, locked down",
      else ALLOW_WITH_DETACH from any rule makes it "allowed, detach drivers";
  - otherwise DENY (default deny: no rule allowed it).

The conditional verdicts qualify an allow; they do not make one.  This is
where we differ from permission_broker, whose engine lets a lone
ALLOW_WITH_* allow: it can, because its chain starts by allowing every USB
device; with an allow list, a lone conditional verdict from the "claimed
interfaces" rule would let any USB device through.  Lockdown beats detach:
they contradict each other (keep the kernel drivers vs. take them away) and
lockdown is the one that gives less.

An allowed device may be used as far as the allowing rules say (their
access(): READ and/or WRITE); any of them allows, so the grant is their
union.  Only ALLOW answers count: a conditional verdict qualifies an allow
and grants nothing of its own.

Every rule is asked, also after a DENY, so the log line can say what each
one answered; rules are cheap and read only what they need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .rules import ALLOW, DENY, DETACH, IGNORE, LOCKDOWN, Device, Rule, Verdict
from .rules.base import READ, READ_WRITE, WRITE

ACCESS_NAMES = {READ: "read only", WRITE: "write only"}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict                      # ALLOW, ALLOW_WITH_LOCKDOWN/DETACH or DENY
    rule: Rule | None                     # the deciding rule; None: default deny
    answers: tuple[tuple[str, Verdict], ...]
    reason: str = ""                      # set when no rule could be asked
    access: int = READ_WRITE              # allowed: READ and/or WRITE (rules.base)
    explanation: str = field(init=False, default="")    # explain(), for messages
    trail_text: str = field(init=False, default="")     # trail(), for the log
    log_fields: dict = field(init=False, default=None, compare=False)  # for the log line

    def __post_init__(self):
        # computed once: a remembered decision is logged many times
        object.__setattr__(self, "explanation", self.explain())
        object.__setattr__(self, "trail_text", self.trail())
        object.__setattr__(self, "log_fields", {
            "rule": self.rule_name, "rule_verdict": self.verdict.value,
            "rules": self.trail_text})
        if self.allowed and self.access != READ_WRITE:
            self.log_fields["access"] = ACCESS_NAMES[self.access]

    @property
    def allowed(self) -> bool:
        return self.verdict is not DENY

    @property
    def rule_name(self) -> str:
        return self.rule.name if self.rule is not None else "default-deny"

    def explain(self) -> str:
        if self.reason:
            return self.reason
        if self.rule is None:
            return "no rule allows this device (default deny)"
        return f"rule {self.rule.describe()}"

    def trail(self) -> str:
        """What each rule answered, for the log: 'a=ALLOW b=IGNORE ...'."""
        return " ".join(f"{n}={v.value}" for n, v in self.answers if v is not IGNORE) or "-"


def decide(rules: tuple[Rule, ...], dev: Device) -> Decision:
    answers = []
    first_deny = first_allow = None
    lockdown = detach = False
    access = 0
    for rule in rules:
        verdict = rule.check(dev)
        answers.append((rule.name, verdict))
        if verdict is DENY and first_deny is None:
            first_deny = rule
        elif verdict is ALLOW:
            first_allow = first_allow or rule
            if access != READ_WRITE:        # asked only while it can add something
                access |= rule.access(dev)
        elif verdict is LOCKDOWN:
            lockdown = True
        elif verdict is DETACH:
            detach = True
    answers = tuple(answers)
    if first_deny is not None:
        return Decision(DENY, first_deny, answers)
    if first_allow is None:
        return Decision(DENY, None, answers)
    if not access & READ_WRITE:
        # An ALLOW that grants neither read nor write (allow_group on a node
        # whose ACL gives its group nothing) is no grant: it denies rather
        # than fall back to anything wider.
        return Decision(DENY, first_allow, answers,
                        reason=f"the allowing rules ({first_allow.name!r} first) grant neither "
                               f"read nor write (denied)")
    verdict = LOCKDOWN if lockdown else DETACH if detach else ALLOW
    if verdict is not ALLOW and access != READ_WRITE:
        # usbfs takes its ioctls (lockdown's, detach's) on a read-write fd
        # only: a grant of less cannot be carried out, so it is no grant
        return Decision(DENY, first_allow, answers,
                        reason=f"{verdict.value} needs a read-write fd, and the allowing "
                               f"rules grant {ACCESS_NAMES[access & READ_WRITE]} (denied)")
    return Decision(verdict, first_allow, answers, access=access & READ_WRITE)


def no_record(path: str) -> Decision:
    return Decision(DENY, None, (), reason="the device has no udev record (default deny)")
