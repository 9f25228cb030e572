"""The ruleset: (session facts, sender, recipient) -> the first matching rule (reference §3.6).

Rules are tried in file order and the first match wins. Inside a rule the tests run in the reference's order
(tag, from, for, helo, auth, tls, mail-from, rcpt-to) and the first failing test ends the rule; ``reasons``
records, one line per rule tried, which test failed, for `smtpctl explain`. A table error is a temporary failure
of the whole decision. Unlike OpenSMTPD 6.8 (whose `tls` test always errors, giving 451), `tls` is evaluated:
it holds when the session is under TLS.

For envelopes produced by expansion (``internal``), the from key is "local", and rules that test `from socket`
or `from rdns` without a table are skipped, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smtpd import trace
from smtpd.config.model import Action, Condition, Config, MatchRule
from smtpd.lookup.facts import SessionFacts
from smtpd.lookup.tables.base import Service, TableError
from smtpd.lookup.tables.matching import ascii_lower

FAMILY_ORDER = ("tag", "from", "for", "helo", "auth", "tls", "mail-from", "rcpt-to")


@dataclass
class RuleDecision:
    rule: MatchRule | None = None
    action: Action | None = None
    rejected: bool = False
    tempfail: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.action is not None


@dataclass(frozen=True)
class _Envelope:
    """What one evaluation looks at."""

    facts: SessionFacts
    sender: str
    rcpt: str
    internal: bool

    @property
    def from_key(self) -> str:
        return "local" if self.internal or self.facts.local_socket else self.facts.address

    @property
    def rcpt_domain(self) -> str:
        return ascii_lower(self.rcpt.rpartition("@")[2])


class _Skip(Exception):
    """This rule does not apply to expanded envelopes."""


def match_rules(config: Config, tables: Any, facts: SessionFacts, sender: str, rcpt: str,
                internal: bool = False) -> RuleDecision:
    decision = RuleDecision()
    envelope = _Envelope(facts, sender, rcpt, internal)
    for rule in config.rules:
        number = rule.number or (config.rules.index(rule) + 1)
        try:
            failed = _first_failing_test(rule, tables, envelope)
        except _Skip:
            decision.reasons.append(f"rule #{number}: skipped for an expanded envelope")
            continue
        except TableError as error:
            decision.tempfail = True
            decision.reasons.append(f"rule #{number}: table error: {error}")
            trace.emit("rules", "temporary failure in processing of a rule", rule=number, error=str(error))
            return decision
        if failed is not None:
            decision.reasons.append(f"rule #{number}: {failed}")
            continue
        decision.rule = rule
        decision.rejected = rule.reject
        if not rule.reject and rule.action is not None:
            decision.action = config.actions.get(rule.action)
            if decision.action is None:  # the parser drops such rules; be safe anyway
                decision.rejected = True
        decision.reasons.append(f"rule #{number}: matched")
        if trace.wants("rules"):  # (the rule's text is made only when someone reads it)
            trace.emit("rules", f"rule #{number} matched: {rule_text(rule)}", rule=number, rcpt=rcpt,
                       sender=sender, action=rule.action or "reject")
        return decision
    decision.reasons.append("no rule matched")
    trace.emit("rules", "no rule matched", rcpt=rcpt, sender=sender)
    return decision


def _first_failing_test(rule: MatchRule, tables: Any, envelope: _Envelope) -> str | None:
    """None when every test of the rule holds, else a sentence saying which one failed."""
    conditions = {condition.family: condition for condition in rule.conditions}
    for family in FAMILY_ORDER:
        condition = conditions.get(family)
        if condition is None:
            if family in ("from", "for") and not _default_test(family, tables, envelope):
                return f"`{family} local` (the default) does not hold"
            continue
        if not _holds(condition, tables, envelope):
            return f"`{condition_text(condition)}` does not hold"
    return None


def _default_test(family: str, tables: Any, envelope: _Envelope) -> bool:
    if family == "from":
        return _from_local(tables, envelope)
    return _for_local(tables, envelope)


def _holds(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    if (condition.family == "from" and condition.variant == "rdns" and condition.table is not None
            and envelope.facts.rdns is None and not envelope.internal):
        # A client without a reverse name fails `from rdns <t>` and `! from rdns <t>` alike: there is no name
        # to look up, so the negation does not turn the miss into a match (checked against OpenSMTPD 6.8).
        return False
    test = _TESTS[condition.family]
    result = test(condition, tables, envelope)
    # `from auth X`, `from mail-from X`, `for rcpt-to X`: "from any"/"for any" plus the test, and `!` negates
    # only the test; the any-part always holds, so negating the whole result is the same thing.
    return not result if condition.negated else result


def regex_address(address: str, regex: bool) -> str:
    """The client address a `src regex` table sees: an IPv6 one in brackets (`[::1]`), as the reference's key
    is; address tables (netaddr) take it bare."""
    return f"[{address}]" if regex and ":" in address else address


def _table_test(tables: Any, condition: Condition, service: Service, candidate: str) -> bool:
    assert condition.table is not None
    if condition.regex:
        return bool(tables.match(condition.table, Service.REGEX, candidate))
    return bool(tables.match(condition.table, service, candidate))


def _from_local(tables: Any, envelope: _Envelope) -> bool:
    key = envelope.from_key
    if key == "local":
        return True
    return bool(tables.match("localhost", Service.NETADDR, key))


def _for_local(tables: Any, envelope: _Envelope) -> bool:
    return bool(tables.match("localnames", Service.DOMAIN, envelope.rcpt_domain))


def _test_from(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    variant = condition.variant
    if variant == "any":
        return True
    if variant == "local":
        return _from_local(tables, envelope)
    if variant == "socket":
        if envelope.internal:
            raise _Skip
        return envelope.facts.local_socket
    if variant == "src":
        return _table_test(tables, condition, Service.NETADDR, regex_address(envelope.from_key, condition.regex))
    if variant == "rdns":
        if condition.table is None:
            if envelope.internal:
                raise _Skip
            return envelope.facts.rdns is not None
        # The reverse name is looked up as it is (case aside), not as a domain: OpenSMTPD 6.8 does not expand
        # `*` here (`*.example.org` does not match mail.example.org; checked against its daemon).
        if envelope.internal:  # an expanded envelope is "local", whoever the client was (OpenSMTPD 6.8)
            return _table_test(tables, condition, Service.STRING, "local")
        return envelope.facts.rdns is not None and _table_test(
            tables, condition, Service.STRING, ascii_lower(envelope.facts.rdns))
    if variant == "auth":
        return _auth_test(condition, tables, envelope)
    if variant == "mail-from":
        return _test_mail_from(condition, tables, envelope)
    raise ValueError(f"unknown from variant {variant!r}")


def _test_for(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    variant = condition.variant
    if variant == "any":
        return True
    if variant == "local":
        return _for_local(tables, envelope)
    if variant == "domain":
        return _table_test(tables, condition, Service.DOMAIN, envelope.rcpt_domain)
    if variant == "rcpt-to":
        return _table_test(tables, condition, Service.MAILADDR, envelope.rcpt)
    raise ValueError(f"unknown for variant {variant!r}")


def _auth_test(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    user = envelope.facts.auth_user
    if user is None:
        return False
    if condition.table is None:
        return True
    if envelope.facts.local_socket:
        # A local submission is authenticated without a user name: `auth <t>` sees the empty string, not the
        # submitting Unix user (checked against OpenSMTPD 6.8: `from auth { "root" }` misses root's sendmail,
        # `from auth { "" }` and `from auth regex { "^$" }` match it).
        user = ""
    service = Service.MAILADDR if "@" in user else Service.STRING
    return _table_test(tables, condition, service, user)


def _test_tag(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    # An untagged session's tag is the empty string, which a table or regex may match (OpenSMTPD 6.8, checked
    # against its daemon: `tag regex "^$"` holds for it, `! tag regex "^$"` does not).
    return _table_test(tables, condition, Service.STRING, envelope.facts.tag or "")


def _test_helo(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    return _table_test(tables, condition, Service.DOMAIN, ascii_lower(envelope.facts.helo))


def _test_tls(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    return envelope.facts.tls


def _test_mail_from(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    # A regex sees the empty sender (<>) as "@", the text OpenSMTPD 6.8 makes of an address with neither part
    # (checked against its daemon: "^@$" matches a bounce, "^$" does not).
    sender = envelope.sender or ("@" if condition.regex else "")
    return _table_test(tables, condition, Service.MAILADDR, sender)


def _test_rcpt_to(condition: Condition, tables: Any, envelope: _Envelope) -> bool:
    return _table_test(tables, condition, Service.MAILADDR, envelope.rcpt)


_TESTS: dict[str, Callable[[Condition, Any, _Envelope], bool]] = {
    "from": _test_from, "for": _test_for, "tag": _test_tag, "helo": _test_helo, "auth": _auth_test,
    "tls": _test_tls, "mail-from": _test_mail_from, "rcpt-to": _test_rcpt_to,
}


# -- text (the reference's rule_to_text, for traces and explain) ----------------------------------------------
def _table_ref(condition: Condition) -> str:
    if condition.table is None:
        return ""
    name = condition.table if condition.table.startswith("<") else f"<{condition.table}>"
    return ("regex " if condition.regex else "") + name


def condition_text(condition: Condition) -> str:
    words = ["!"] if condition.negated else []
    words.append(condition.family)
    if condition.variant:
        words.append(condition.variant)
    table = _table_ref(condition)
    if table:
        words.append(table)
    return " ".join(words)


def rule_text(rule: MatchRule) -> str:
    ordered = sorted(rule.conditions, key=lambda condition: FAMILY_ORDER.index(condition.family)
                     if condition.family in FAMILY_ORDER else len(FAMILY_ORDER))
    parts = ["match", *(condition_text(condition) for condition in ordered)]
    parts.append("reject" if rule.reject or rule.action is None else f"action {rule.action}")
    return " ".join(parts)
