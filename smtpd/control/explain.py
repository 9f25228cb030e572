"""`smtpctl explain`: which rule a sender/recipient pair matches, why earlier rules did not, the action, and
the expansion tree, computed by the same code the SMTP session runs (rules.match_rules, expand.expand_recipient)
against the running configuration and tables, without sending mail.

Runs in a worker thread (expansion reads files and tables).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, is_dataclass
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
    listener = _find_listener(config, args.get("listener"))
    facts = _facts(daemon, args, listener)
    from smtpd.lookup.rules import match_rules

    decision = match_rules(config, daemon.tables, facts, sender, rcpt)
    result: dict[str, Any] = {
        "sender": sender, "rcpt": rcpt, "facts": asdict(facts),
        "listener": _listener_text(listener) if listener else None,
        "rules": _rule_lines(config, decision),
        "matched": _rule_dict(decision.rule) if decision.rule is not None else None,
        "rejected": bool(decision.rejected), "tempfail": bool(decision.tempfail),
        "action": _action_dict(decision.action) if decision.action is not None else None,
        "expansion": None,
    }
    if decision.action is None or decision.rejected or decision.tempfail:
        return result
    from smtpd.lookup.expand import expand_recipient

    expansion = expand_recipient(config, daemon.tables, facts, sender, rcpt, daemon.mailname)
    result["expansion"] = {
        "accepted": expansion.refusal is None,
        "refusal": list(expansion.refusal) if expansion.refusal else None,
        "tree": [node.to_dict() for node in expansion.tree],
        "lines": expansion.render_tree(),
        "deliveries": [_delivery_dict(envelope) for envelope in expansion.deliveries],
    }
    return result


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
    return SessionFacts(
        address="local" if local and source == "local" else source,
        rdns=args.get("rdns") or None,
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


def rule_text(rule: MatchRule) -> str:
    """The rule as smtpd.conf text (the config's own dumper when there is one)."""
    try:
        from smtpd.config.dump import rule_to_text  # type: ignore[attr-defined]

        return str(rule_to_text(rule))
    except (ImportError, AttributeError):
        pass
    words = ["match"]
    for condition in rule.conditions:
        words.append(("!" if condition.negated else "") + condition.family)
        if condition.variant and condition.variant != condition.family:
            words.append(condition.variant)
        if condition.table:
            words.append(("regex " if condition.regex else "") + f"<{condition.table}>")
    words.append("reject" if rule.reject else f'action "{rule.action}"')
    return " ".join(words)


def _rule_dict(rule: MatchRule) -> dict[str, Any]:
    return {"number": rule.number, "text": rule_text(rule),
            "location": str(rule.location) if rule.location else None}


def _action_dict(action: Action) -> dict[str, Any]:
    values = {key: (str(value) if not isinstance(value, (bool, int, type(None))) else value)
              for key, value in _plain(action).items() if value not in (None, False, "")}
    values["name"] = action.name
    values["method"] = str(action.method)
    return values


def _plain(value: Any) -> dict[str, Any]:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else {}


def _delivery_dict(envelope: Any) -> dict[str, Any]:
    return {"dispatcher": envelope.dispatcher, "type": str(envelope.type), "dest": envelope.dest,
            "mda_exec": envelope.mda_exec or None, "mda_user": envelope.mda_user or None,
            "flags": sorted(envelope.flags)}
