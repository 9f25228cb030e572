"""`smtpctl explain`: where would mail from S to R go, and why? Asked of the running daemon, nothing is sent."""

from __future__ import annotations

import sys
from typing import Any

import click

from smtpctl import render
from smtpctl.exitcodes import Exit
from smtpctl.words import Leaf, call


@click.command(cls=Leaf)
@click.option("--from", "sender", default="", metavar="SENDER", help="The MAIL FROM address (empty: <>).")
@click.option("--to", "rcpt", required=True, metavar="RECIPIENT", help="The RCPT TO address.")
@click.option("--src", metavar="IP", help="The client's address (default: a local submission).")
@click.option("--rdns", metavar="NAME", help="The client's reverse DNS name.")
@click.option("--listener", metavar="NAME", help="The listener it arrives on: interface, interface:port or tag.")
@click.option("--auth-user", metavar="USER", help="The authenticated user, if any.")
@click.option("--helo", metavar="NAME", help="The HELO/EHLO name.")
@click.option("--tls", is_flag=True, help="The session uses TLS.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON.")
def explain(sender: str, rcpt: str, src: str | None, rdns: str | None, listener: str | None,
            auth_user: str | None, helo: str | None, tls: bool, as_json: bool) -> None:
    """Explain, without sending mail, which rule a message matches, why earlier rules did not, the action,
    and the expansion down to mailboxes, commands and relays.

    Exit 0 when the recipient would be accepted, 1 when it would be refused.

    \b
    Examples:
      smtpctl explain --from alice@example.org --to bob@example.com
      smtpctl explain --src 192.0.2.7 --helo mx.example.net --to postmaster@example.com
    """
    args: dict[str, Any] = {"sender": sender, "rcpt": rcpt, "src": src, "rdns": rdns, "listener": listener,
                            "auth_user": auth_user, "helo": helo, "tls": tls}
    result = call("explain", **{key: value for key, value in args.items() if value not in (None, "", False)})
    if as_json:
        render.print_json(result)
    else:
        render.print_lines(explanation_lines(result))
    sys.exit(Exit.OK if _accepted(result) else Exit.FAILED)


def _accepted(result: dict[str, Any]) -> bool:
    if ((result.get("session") or {}).get("refusal")) is not None:
        return False
    expansion = result.get("expansion") or {}
    return bool(result.get("action")) and bool(expansion.get("accepted"))


def explanation_lines(result: dict[str, Any]) -> list[str]:
    sender = result.get("sender") or ""
    lines = [f"mail from <{sender}> to <{result.get('rcpt')}>"]
    facts = result.get("facts") or {}
    origin = "local submission" if facts.get("local_socket") else f"from {facts.get('address')}"
    extras = [f"{label} {facts[key]}" for key, label in
              (("rdns", "rdns"), ("helo", "helo"), ("auth_user", "auth"), ("tag", "tag")) if facts.get(key)]
    if facts.get("tls"):
        extras.append("tls")
    lines.append(f"session: {origin}" + (f" ({', '.join(extras)})" if extras else ""))
    session = result.get("session") or {}
    if result.get("listener"):
        lines.append(f"listener: {result['listener']}")
    lines.extend(f"  {step}" for step in session.get("steps") or [])
    refusal = session.get("refusal")
    if refusal is not None:
        # The session refuses before the rules are tried: a builtin filter, or the senders table.
        command = "RCPT TO" if refusal.get("phase") == "rcpt-to" else "MAIL FROM" \
            if refusal.get("phase") == "mail-from" else refusal.get("phase")
        lines.append(f"refused at {command}: {refusal.get('code')} {refusal.get('text')} ({refusal.get('reason')})")
        return lines
    if session.get("junk"):
        lines.append("  the message will be marked as junk (X-Spam: Yes)")
    lines.append("rules:")
    lines.extend(f"  {reason}" for reason in result.get("rules") or [])
    matched = result.get("matched")
    if result.get("tempfail"):
        # A table failed while the rules were tried: no rule was chosen, and the daemon answers 451, not 550.
        lines.append(f"a table lookup failed: the recipient is deferred (451 Temporary failure: <{result.get('rcpt')}>)")
        return lines
    if matched is None:
        lines.append(f"no rule matched: the recipient is refused (550 Invalid recipient: <{result.get('rcpt')}>)")
        return lines
    where = f" ({matched['location']})" if matched.get("location") else ""
    lines.append(f"matched rule #{matched['number']}{where}: {matched['text']}")
    if result.get("rejected"):
        lines.append(f"the rule rejects: the recipient is refused (550 Invalid recipient: <{result.get('rcpt')}>)")
        return lines
    action = result.get("action") or {}
    where = f" ({action['location']})" if action.get("location") else ""
    lines.append(f"action{where}: {action.get('text') or action.get('name')}")
    expansion = result.get("expansion") or {}
    lines.append("expansion:")
    lines.extend(f"  {line}" for line in expansion.get("lines") or [])
    refusal = expansion.get("refusal")
    if refusal:
        lines.append(f"refused: {refusal[0]} {refusal[1]}: <{result.get('rcpt')}>")
        return lines
    lines.append("deliveries:")
    for delivery in expansion.get("deliveries") or []:
        target = delivery.get("mda_exec") or delivery.get("dest")
        who = f" as {delivery['mda_user']}" if delivery.get("mda_user") else ""
        if delivery.get("user"):  # the action's `user`: the delivery runs as that account, whoever the recipient
            who = f" as {delivery['user']} (the action's user)"
        lines.append(f"  {delivery.get('type')} via action {delivery.get('dispatcher')}: {target}{who}")
        if delivery.get("fails"):
            # Accepted at RCPT (as OpenSMTPD accepts it), but the delivery fails as soon as it is tried.
            outcome = "deferred" if delivery.get("fails_class") == 4 else "bounced"
            lines.append(f"    this delivery will fail ({outcome}): {delivery['fails']}")
    return lines
