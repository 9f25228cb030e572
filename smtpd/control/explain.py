"""`smtpctl explain`: which rule a sender/recipient pair matches, why earlier rules did not, the action, and
the expansion tree, computed by the same code the SMTP session runs (rules.match_rules, expand.expand_recipient)
against the running configuration and tables, without sending mail.

Runs in a worker thread (expansion reads files and tables).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from smtpd.config.model import Action, Config, Listener, MatchRule
from smtpd.control.registry import ControlFailure
from smtpd.lookup.facts import SessionFacts

if TYPE_CHECKING:
    from smtpd.daemon import Daemon


def explain_delivery(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    config = daemon.config
    sender = str(args.get("sender") or "")
    rcpt = str(args.get("rcpt") or "")
    if not rcpt:
        raise ControlFailure("a recipient is needed (--to)")
    if "@" not in rcpt:
        rcpt = f"{rcpt}@{daemon.mailname}"  # as the session and sendmail complete a bare name
    listener = _find_listener(config, args.get("listener"))
    facts = _facts(daemon, args, listener)
    if listener is None and facts.local_socket:  # a local submission arrives on the socket listener
        listener = next((item for item in config.listeners if item.is_socket), None)
    from smtpd.lookup.rules import match_rules

    tables = daemon.tables if daemon.tables is not None else _snapshot_tables(daemon)
    checks = _session_checks(config, tables, listener, facts, sender, rcpt, daemon.mailname)
    sender, rcpt, facts = checks.sender, checks.rcpt, checks.facts
    result: dict[str, Any] = {
        "sender": sender, "rcpt": rcpt, "facts": asdict(facts),
        "listener": _listener_text(listener) if listener else None,
        "session": {"refusal": checks.refusal, "junk": checks.junk, "steps": checks.steps},
        "rules": [],
        "matched": None, "rejected": False, "tempfail": False, "action": None, "expansion": None,
    }
    if checks.refusal is not None:
        # Refused before RCPT TO is acted on (a filter, the senders table): no rule is ever tried.
        return result
    decision = match_rules(config, tables, facts, sender, rcpt)
    result |= {
        "rules": _rule_lines(config, decision),
        "matched": _rule_dict(decision.rule, config) if decision.rule is not None else None,
        "rejected": bool(decision.rejected), "tempfail": bool(decision.tempfail),
        "action": _action_dict(decision.action, config) if decision.action is not None else None,
    }
    if decision.action is None or decision.rejected or decision.tempfail:
        return result
    from smtpd.lookup.expand import expand_recipient

    expansion = expand_recipient(config, tables, facts, sender, rcpt, daemon.mailname)
    result["expansion"] = {
        "accepted": expansion.refusal is None,
        "refusal": list(expansion.refusal) if expansion.refusal else None,
        "tree": [node.to_dict() for node in expansion.tree],
        "lines": tree_lines(expansion.tree),
        "deliveries": [_delivery_dict(envelope, config, getattr(daemon, "mda", None)) for envelope in expansion.deliveries],
    }
    return result


@dataclass
class _SessionChecks:
    sender: str
    rcpt: str
    facts: SessionFacts
    refusal: dict[str, Any] | None = None
    junk: bool = False
    steps: list[str] = field(default_factory=list)


def _session_checks(config: Config, tables: Any, listener: Listener | None, facts: SessionFacts, sender: str,
                    rcpt: str, mailname: str) -> _SessionChecks:
    """What the session does before a recipient reaches the rules, in its order: the listener's builtin
    filters at connect, EHLO, AUTH, MAIL FROM (then the `senders` table of an authenticated sender) and
    RCPT TO. A refusal there is the answer the client gets (smtpd/smtp/session.py), whatever the rules say."""
    from smtpd.smtp import address as addr
    from smtpd.smtp.filters import FilterFacts, run_phase

    checks = _SessionChecks(sender, rcpt, facts)
    if listener is None:
        return checks
    filter_name = listener.filter
    from smtpd.smtp.filters import chain_members

    processes = [member.name for member in chain_members(config, filter_name) if member.kind in ("proc", "proc-exec")]
    if processes:  # programs of their own: asking them would be a session, with reports; said, not guessed
        checks.steps.append("filter processes not consulted: " + ", ".join(processes))
    phases: list[tuple[str, str | None]] = [("connect", None), ("ehlo", None)]
    if facts.auth_user and not facts.local_socket:
        phases.append(("auth", None))
    phases += [("mail-from", "senders"), ("rcpt-to", None)]
    for phase, after in phases:
        if filter_name:
            filter_facts = FilterFacts(address=facts.address, rdns=facts.rdns, fcrdns=facts.fcrdns,
                                       helo=checks.facts.helo or None, auth_user=facts.auth_user,
                                       mail_from=checks.sender if phase not in ("connect", "ehlo", "auth") else None,
                                       rcpt_to=checks.rcpt if phase == "rcpt-to" else None)
            decision = run_phase(config, tables, filter_name, phase, filter_facts, "explain")
            if decision.decision in ("reject", "disconnect", "tempfail"):
                checks.refusal = {"phase": phase, "filter": decision.filter, "code": decision.code,
                                  "text": decision.text, "reason": f"filter \"{decision.filter}\""}
                return checks
            if decision.decision != "proceed":
                checks.steps.append(f"phase {phase}: filter {decision.filter}: {decision.decision}"
                                    + (f" {decision.text}" if decision.decision == "rewrite" else ""))
            if decision.decision == "junk":
                checks.junk = True
            if decision.decision == "rewrite":
                value = decision.text.strip()
                value = value[1:-1] if value.startswith("<") and value.endswith(">") else value
                if phase in ("helo", "ehlo"):
                    checks.facts = replace(checks.facts, helo=value)
                elif phase == "mail-from":
                    checks.sender = value
                elif phase == "rcpt-to":
                    checks.rcpt = value if "@" in value else f"{value}@{mailname}"
        if after == "senders":
            refusal = _senders_refusal(config, tables, listener, facts, checks.sender, mailname, addr)
            if refusal is not None:
                checks.refusal = refusal
                return checks
    return checks


def _senders_refusal(config: Config, tables: Any, listener: Listener, facts: SessionFacts, sender: str,
                     mailname: str, addr: Any) -> dict[str, Any] | None:
    """The listener's `senders <table>` check of an authenticated (not local) session's MAIL FROM."""
    from smtpd.lookup.tables.base import Service, TableError
    from smtpd.smtp import replies

    table = listener.senders_table
    if table is None or not facts.auth_user or facts.local_socket:
        return None
    try:
        value = tables.lookup(table, Service.MAILADDRMAP, facts.auth_user)
    except TableError as error:
        reply = replies.TEMPORARY_ERROR
        return {"phase": "mail-from", "filter": None, "code": reply.code, "text": reply.text,
                "reason": f"senders table <{table}> failed: {error}"}
    try:
        parsed = addr.parse_path_address(sender, allow_null=True, default_domain=mailname, utf8=True)
    except addr.AddressError:
        return None  # (a syntax error is the session's 553, not the senders table's)
    patterns = addr.senders_patterns(value)
    if addr.may_send_as(patterns, parsed, config.smtp.sub_addr_delim):
        return None
    reply = replies.SENDER_REJECTED
    allowed = ", ".join(patterns) if patterns else "nothing"
    return {"phase": "mail-from", "filter": None, "code": reply.code, "text": reply.text,
            "reason": f"senders table <{table}>: {facts.auth_user} may send as {allowed}"}


def tree_lines(nodes: list[Any]) -> list[str]:
    """The expansion nodes as an indented tree, each under its parent (the list is in processing order)."""
    children: dict[int | None, list[Any]] = {}
    for node in nodes:
        children.setdefault(node.parent.number if node.parent is not None else None, []).append(node)
    lines: list[str] = []

    def walk(parent: int | None, indent: int) -> None:
        for node in children.get(parent, []):
            lines.append("  " * indent + node.describe())
            walk(node.number, indent + 1)

    walk(None, 0)
    return lines


def _snapshot_tables(daemon: Daemon) -> Any:
    """The configuration's tables opened for this question, when the daemon runs without a tables component."""
    from smtpd.lookup.tables import Tables

    return Tables(daemon.config, mailname=daemon.mailname, strict=False)


def _find_listener(config: Config, wanted: Any) -> Listener | None:
    if not wanted:
        return None
    text = str(wanted)
    for listener in config.listeners:
        names = {listener.interface, f"{listener.interface}:{listener.port}", listener.tag or ""}
        if text in names:
            return listener
    known = ", ".join(_listener_text(listener) for listener in config.listeners) or "none"
    raise ControlFailure(f"no listener {text!r} (listeners: {known})")


def _listener_text(listener: Listener) -> str:
    text = listener.interface if listener.is_socket else f"{listener.interface}:{listener.port}"
    return text + (f" tag {listener.tag}" if listener.tag else "")


def _facts(daemon: Daemon, args: dict[str, Any], listener: Listener | None) -> SessionFacts:
    source = str(args.get("src") or "local")
    if source != "local":
        try:
            source = str(ipaddress.ip_address(source))
        except ValueError:
            raise ControlFailure(f"invalid source address {source!r}") from None
    local = source == "local" or bool(listener and listener.is_socket)
    auth_user = args.get("auth_user") or None
    rdns = args.get("rdns") or None
    if local:
        # A local submission is what sendmail makes: it arrives on the socket listener (its tag), names itself
        # after this host (rdns = the mailname) and is authenticated as the submitting user, here the caller.
        if listener is None:
            listener = next((item for item in daemon.config.listeners if item.is_socket), None)
        rdns = rdns or daemon.mailname
        peer = args.get("_peer")
        auth_user = auth_user or (peer.user if peer is not None else None)
    return SessionFacts(
        address="local" if local and source == "local" else source,
        rdns=rdns,
        helo=str(args.get("helo") or ("localhost" if local else "")),
        auth_user=str(auth_user) if auth_user else None,
        tls=bool(args.get("tls")),
        tag=listener.tag if listener else None,
        listener_hostname=(listener.hostname if listener and listener.hostname else daemon.mailname),
        local_socket=local,
    )


def _rule_lines(config: Config, decision: Any) -> list[str]:
    reasons = list(getattr(decision, "reasons", []) or [])
    return [str(reason) for reason in reasons]


def rule_text(rule: MatchRule, config: Config) -> str:
    """The rule as smtpd.conf text."""
    from smtpd.config.dump import format_rule

    return format_rule(rule, config)


def _rule_dict(rule: MatchRule, config: Config) -> dict[str, Any]:
    return {"number": rule.number, "text": rule_text(rule, config),
            "location": str(rule.location) if rule.location else None}


def _action_dict(action: Action, config: Config) -> dict[str, Any]:
    from smtpd.config.dump import format_action

    return {"name": action.name, "method": str(action.method), "text": format_action(action, config),
            "location": str(action.location) if action.location else None}


def _delivery_dict(envelope: Any, config: Config, mda: Any = None) -> dict[str, Any]:
    # `user`: the account a local delivery runs as when its action fixes one (`user NAME`), whoever mda_user
    # (the recipient's name from the expansion) is; the MDA does the same (smtpd/mda: _resolve_user).
    # `fails`: what the MDA would answer at once, without running anything (root's maildir: "not allowed to
    # deliver to: root"), with `fails_class` 4 or 5; the recipient is accepted all the same, as OpenSMTPD does.
    action = config.actions.get(envelope.dispatcher)
    user = action.user if action is not None and action.is_local and action.user else None
    refusal = mda.refusal(envelope) if mda is not None and action is not None and action.is_local else None
    return {"dispatcher": envelope.dispatcher, "type": str(envelope.type), "dest": envelope.dest,
            "mda_exec": envelope.mda_exec or None, "mda_user": envelope.mda_user or None, "user": user,
            "flags": sorted(envelope.flags), "fails": refusal.text if refusal else None,
            "fails_class": refusal.esc_class if refusal else None}
