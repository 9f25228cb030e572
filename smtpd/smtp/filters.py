"""The builtin filters of a listener (`filter NAME phase P match [!]COND DECISION`, reference §3.8).

A listener names one filter or a chain; at each phase the session asks ``run_phase`` for the chain's filters of
that phase, in order. A filter whose condition holds (after its `!`) decides: `reject`, `disconnect` and
`rewrite` end the phase with that decision, `junk` marks the session or transaction (X-Spam: Yes) and ends it,
`bypass` ends it with proceed (the filters after it are skipped), `report` only traces and goes on. A filter
whose condition does not hold lets the next one decide; at the end of the chain the session proceeds.

Where OpenSMTPD 6.8 differs, on purpose:
* A table that fails while a condition is tested gives a temporary failure (451, or 421 at connect), where 6.8
  reads the failure as "no match" (so `! src <allowed>` refused everyone, permanently, while a table was down).
* `auth` phase filters run (6.8 accepts them in the grammar and never runs them).

Filter processes (`proc`, `proc-exec`) in the same chain are asked by the session (smtpd/smtp/processes.py,
docs/filters.md); ``builtin_decision`` is one builtin filter's part of such a chain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from smtpd import trace
from smtpd.config.model import Condition, Config, Filter
from smtpd.lookup.rules import regex_address
from smtpd.lookup.tables.base import Service, TableError

# What a reject/disconnect message must look like (otherwise it becomes 421 Internal server error), as 6.8
# checks it: a 4 or 5, two more digits, a space and at least one character of text.
_VALID_REPLY = re.compile(r"[45][0-9][0-9] .+", re.DOTALL)


@dataclass(frozen=True)
class FilterFacts:
    """What the conditions look at, as the session knows it when the phase begins."""

    address: str  # "1.2.3.4", "::1", or "local"
    rdns: str | None
    fcrdns: bool
    helo: str | None
    auth_user: str | None
    mail_from: str | None  # the address of MAIL FROM, without brackets ("" for <>)
    rcpt_to: str | None = None  # in the rcpt-to phase


@dataclass(frozen=True)
class FilterDecision:
    decision: str  # "proceed" | "junk" | "rewrite" | "reject" | "disconnect" | "tempfail" | "report"
    code: int = 0
    text: str = ""  # the reply's text after the code (reject, disconnect, tempfail), or the rewritten value
    filter: str | None = None


PROCEED = FilterDecision("proceed")


def phase_filters(config: Config, name: str | None, phase: str) -> list[Filter]:
    """The builtin filters of ``phase`` that the listener's filter (or chain) ``name`` runs, in order."""
    if not name:
        return []
    item = config.filters.get(name)
    if item is None:
        return []
    members = [config.filters[member] for member in item.chain if member in config.filters] \
        if item.kind == "chain" else [item]
    return [member for member in members if member.kind == "phase" and member.phase == phase]


def reply_of(message: str) -> tuple[int, str]:
    """A reject/disconnect message as a reply: its code and text; an invalid one is 421 Internal server error."""
    if not _VALID_REPLY.fullmatch(message):
        return 421, "Internal server error"
    return int(message[:3]), message[4:]


def run_phase(config: Config, tables: Any, name: str | None, phase: str, facts: FilterFacts,
              session: str = "") -> FilterDecision:
    for item in phase_filters(config, name, phase):
        decision = builtin_decision(item, tables, phase, facts, session)
        if decision is not None and decision.decision != "report":
            return decision
    return PROCEED


def chain_members(config: Config, name: str | None) -> list[Filter]:
    """The filters the listener's filter (or chain) ``name`` runs, in order: builtin ones and processes."""
    item = config.filters.get(name) if name else None
    if item is None:
        return []
    if item.kind == "chain":
        return [config.filters[member] for member in item.chain if member in config.filters]
    return [item]


def runs_processes(config: Config, name: str | None) -> bool:
    return any(member.kind in ("proc", "proc-exec") for member in chain_members(config, name))


def builtin_decision(item: Filter, tables: Any, phase: str, facts: FilterFacts,
                     session: str = "") -> FilterDecision | None:
    """What one builtin filter decides; None: the next filter decides (its condition does not hold). A
    `report` decision lets the next one decide too: it only carries its text for the chain's processes
    (their `filter-report` event)."""
    condition = item.conditions[0]
    try:
        holds = _holds(condition, tables, facts)
    except TableError as error:
        trace.emit("filters", f"{session}: filters phase={phase}, filter={item.name}, table error: {error}",
                   session=session, phase=phase, filter=item.name, decision="tempfail")
        if phase == "connect":
            return FilterDecision("tempfail", 421, "4.3.0 Temporary failure", item.name)
        return FilterDecision("tempfail", 451, "4.3.0 Temporary failure", item.name)
    if not holds:
        _trace(session, phase, item, "proceed")
        return None
    decision = item.decision or "reject"
    _trace(session, phase, item, decision)
    if decision == "report":
        return FilterDecision("report", text=item.decision_arg or "", filter=item.name)
    if decision == "bypass":
        return FilterDecision("proceed", filter=item.name)
    if decision == "junk":
        return FilterDecision("junk", filter=item.name)
    if decision == "rewrite":
        return FilterDecision("rewrite", text=item.decision_arg or "", filter=item.name)
    code, text = reply_of(item.decision_arg or "")
    if code == 421:
        decision = "disconnect"
    return FilterDecision(decision, code, text, item.name)


def _trace(session: str, phase: str, item: Filter, decision: str) -> None:
    if trace.wants("filters"):
        argument = f", response={item.decision_arg}" if decision != "proceed" and item.decision_arg else ""
        trace.emit("filters", f"{session}: filters phase={phase}, action={decision}, filter={item.name}{argument}",
                   session=session, phase=phase, filter=item.name, decision=decision)


def _holds(condition: Condition, tables: Any, facts: FilterFacts) -> bool:
    matched = _matches(condition, tables, facts)
    return not matched if condition.negated else matched


def _table(condition: Condition, tables: Any, service: Service, key: str | None) -> bool:
    if key is None or condition.table is None:
        return False
    return bool(tables.match(condition.table, Service.REGEX if condition.regex else service, key))


def _matches(condition: Condition, tables: Any, facts: FilterFacts) -> bool:
    family = condition.family
    if family == "fcrdns":
        return facts.fcrdns
    if family == "rdns":
        if condition.table is None:
            return facts.rdns is not None
        return _table(condition, tables, Service.DOMAIN, facts.rdns.lower() if facts.rdns else None)
    if family == "src":
        return _table(condition, tables, Service.NETADDR, regex_address(facts.address, condition.regex))
    if family == "helo":
        return _table(condition, tables, Service.DOMAIN, facts.helo.lower() if facts.helo else None)
    if family == "auth":
        if condition.table is None or facts.auth_user is None:
            return facts.auth_user is not None
        service = Service.MAILADDR if "@" in facts.auth_user else Service.STRING  # as the rules' `auth <t>`
        return _table(condition, tables, service, facts.auth_user)
    if family == "mail-from":
        return _table(condition, tables, Service.MAILADDR, facts.mail_from)
    if family == "rcpt-to":
        return _table(condition, tables, Service.MAILADDR, facts.rcpt_to)
    raise ValueError(f"unknown filter condition {family!r}")
