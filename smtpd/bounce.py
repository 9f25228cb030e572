"""Delivery status notifications (RFC 3464 multipart/report), queued as new messages.

The scheduler calls ``Bouncer.report(envelope, kind)`` when an envelope failed for good, expired, was delayed
past a warn interval, or was delivered with NOTIFY=SUCCESS. Reports for envelopes of the same message, sender
and kind are grouped into one DSN (they are collected for ``group_delay`` seconds). The DSN is queued with the
null sender, to the original sender, routed by the ruleset like a local submission; the future that
``report`` returns resolves once the DSN is durable, so the scheduler removes the original envelope only after
its report is safe.

Never reported: a null sender, a message that is itself a report (flag ``bounce``; a "double bounce" is only
logged), NOTIFY=NEVER, or a kind that NOTIFY does not ask for (an empty NOTIFY means FAILURE,DELAY).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import secrets
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smtpd import log, trace
from smtpd.queue import codec
from smtpd.queue.envelope import EXPANDED_FLAG, DsnNotify, Envelope, EnvelopeType, shared_flags
from smtpd.smtp.address import xtext_decode
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

LOG = log.get("bounce")
FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"
KINDS = (FAILED, DELAYED, DELIVERED, RELAYED)
GROUP_DELAY = 1.0
MAX_RETURNED_BYTES = 10 * 1024 * 1024  # a bigger original is returned as headers only

# (sender, smtpname) -> the envelopes that carry a DSN to that sender (type, dispatcher, dest... filled).
Router = Callable[[str, str], Awaitable[list[Envelope]]]


class BounceRoutingError(Exception):
    """The DSN has nowhere to go (no rule accepts its recipient); it is dropped and logged."""


class BounceRoutingDeferred(Exception):
    """Where the DSN goes cannot be known for now (a table or ~/.forward failing): the failed envelope and its
    report wait for a later try."""


def duration_text(seconds: int) -> str:
    """`N second(s)` below a minute, then minutes, hours, days (integer division, singular for 1)."""
    seconds = max(0, int(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def remaining_text(seconds: int) -> str:
    """A time left as an upper bound, in its two largest units with the smaller one rounded up: `3 days 20
    hours` for what is left of 4 days 4 hours after arrival (less a few seconds). One unit in duration_text's
    way would say `3 days`, and the sender told "up to 3 days" got the failure report most of a day later."""
    seconds = max(0, int(seconds))
    for (big, big_size), (small, small_size) in ((("day", 86400), ("hour", 3600)),
                                                 (("hour", 3600), ("minute", 60)),
                                                 (("minute", 60), ("second", 1))):
        if seconds >= big_size:
            smalls = -(-seconds // small_size)  # rounded up
            count, rest = divmod(smalls, big_size // small_size)
            text = f"{count} {big}{'s' if count != 1 else ''}"
            return text + (f" {rest} {small}{'s' if rest != 1 else ''}" if rest else "")
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def status_code(envelope: Envelope, kind: str) -> str:
    """The enhanced status code (RFC 3463) of one recipient, e.g. 5.4.7."""
    if kind in (DELIVERED, RELAYED):
        return "2.0.0"
    klass = envelope.esc_class if envelope.esc_class in (2, 4, 5) else (4 if kind == DELAYED else 5)
    if kind == FAILED and klass == 4:
        klass = 5  # a failure report is permanent whatever the last attempt said
    if kind == DELAYED:
        klass = 4
    code = envelope.esc_code
    if not code:
        return f"{klass}.0.0"
    # (stored as subject × 10 + detail, or subject × 100 + detail for a detail of two digits: 5.7.26 is 726)
    subject, detail = divmod(code, 100 if code >= 100 else 10)
    return f"{klass}.{subject}.{detail}"


def wants_report(envelope: Envelope, kind: str) -> bool:
    if not envelope.sender or "bounce" in envelope.flags or envelope.type is EnvelopeType.BOUNCE:
        return False
    if kind in (DELIVERED, RELAYED) and EXPANDED_FLAG in envelope.flags:
        return True  # (its address's `expanded` report: the sender asked NOTIFY=SUCCESS of that address)
    notify = envelope.dsn_notify
    if notify & DsnNotify.NEVER:
        return False
    if kind in (DELIVERED, RELAYED):
        return bool(notify & DsnNotify.SUCCESS)
    if notify == DsnNotify.NONE:
        return True  # RFC 3461: without NOTIFY, failures and delays are reported
    return bool(notify & (DsnNotify.FAILURE if kind == FAILED else DsnNotify.DELAY))


@dataclass
class ReportContext:
    smtpname: str
    now: float
    delay: int = 0  # delayed: the warn interval passed
    remaining: int = 0  # delayed: how long the message stays queued still (QUIRK fixed: the real time)
    # failed on expiry: evpid -> the last temporary failure before it (the report's reason, not "Envelope expired")
    last_errors: dict[int, str] = field(default_factory=dict)


def _split_headers(message: bytes) -> bytes:
    end = message.find(b"\n\n")
    return message if end < 0 else message[:end + 1]


LONGEST_LINE = 600  # a piece of error text: with an address (up to 255) or a field name before it, under 998


def _pieces(line: str) -> list[str]:
    """A line of an error text cut at blanks (or anywhere, for a long word) into pieces of LONGEST_LINE at most."""
    if len(line) <= LONGEST_LINE:
        return [line]
    return textwrap.wrap(line, LONGEST_LINE, break_on_hyphens=False) or [line[:LONGEST_LINE]]


MESSAGE_ID = re.compile(rb"^message-id:[ \t]*((?:\n[ \t])?[ \t]*<[!-;=?-~]+@[!-;=?-~]+>)[ \t]*$",
                        re.IGNORECASE | re.MULTILINE)


def _original_message_id(headers: bytes) -> str | None:
    """The original's Message-ID (`<left@right>`, maybe folded onto the next line), for In-Reply-To and
    References; None when it has none or none of that form (nothing is copied that could break the header)."""
    match = MESSAGE_ID.search(headers)
    found = match.group(1).decode("ascii").strip() if match else None
    return found if found is not None and len(found) <= LONGEST_LINE else None  # (a header line stays under 998)


def _human_part(kind: str, envelopes: list[Envelope], context: ReportContext) -> list[str]:
    lines = [f"This is the mail system at {context.smtpname} (PySMTPD).", ""]
    if kind == FAILED:
        lines += ["Your message could not be delivered to the following recipient(s).",
                  "This is a permanent error: the mail system has given up on them.", ""]
    elif kind == DELAYED:
        lines += [f"Your message has not been delivered yet after more than {duration_text(context.delay)},",
                  "to the following recipient(s). The mail system keeps trying:", ""]
    elif kind == DELIVERED:
        lines += ["Your message was delivered to the following recipient(s).", ""]
    else:
        lines += ["Your message was passed on to another mail system for the following",
                  "recipient(s); that system does not confirm the final delivery.", ""]
    for envelope in envelopes:
        address = envelope.rcpt or envelope.dest
        error = envelope.errorline
        last = context.last_errors.get(envelope.evpid)
        if last and kind == FAILED:
            error = f"{error}; the last attempt said: {last}"
        if error and kind in (FAILED, DELAYED):
            # (a delivery program's or a server's long text: cut, so that no line of the report passes 998)
            pieces = [piece for text_line in error.splitlines() or [""] for piece in _pieces(text_line)]
            lines.append(f"<{address}>: {pieces[0]}")
            lines += [f"    {piece}" for piece in pieces[1:]]
        elif kind in (DELIVERED, RELAYED) and EXPANDED_FLAG in envelope.flags:
            lines.append(f"<{address}>: expanded to several recipients, which this report does not list")
        else:
            lines.append(f"<{address}>")
    lines.append("")
    if kind == DELAYED:
        lines += ["This is only a warning: you do not need to send the message again.",
                  f"It stays in the queue for up to {remaining_text(context.remaining)} more; if it still cannot"]
        # (NOTIFY=DELAY without FAILURE: no failure report will follow, so none is promised)
        if any(wants_report(envelope, FAILED) for envelope in envelopes):
            lines += ["be delivered by then, you will receive a failure report.", ""]
        else:
            lines += ["be delivered by then, it is given up; you asked for no failure report.", ""]
    lines += ["Please do not reply to this message.", ""]
    return lines


def readable_xtext(text: str) -> str:
    """ENVID and ORCPT as the report shows them: decoded from the xtext the client sent them in (RFC 3461:
    `bob+2Btag@x` is `bob+tag@x`), unless decoding gives something that is no printable ASCII text (a line
    break would start a field of its own in the report): then as sent."""
    decoded = xtext_decode(text)
    return decoded if all(" " <= char <= "~" for char in decoded) else text


def _status_part(kind: str, envelopes: list[Envelope], context: ReportContext) -> list[str]:
    first = envelopes[0]
    lines = [f"Reporting-MTA: dns; {context.smtpname}"]
    if first.dsn_envid:
        lines.append(f"Original-Envelope-Id: {readable_xtext(first.dsn_envid)}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(first.ctime, localtime=True)}")
    lines.append("")
    for envelope in envelopes:
        if envelope.dsn_orcpt:
            orcpt = envelope.dsn_orcpt
            if ";" not in orcpt:
                orcpt = readable_xtext(orcpt)
                orcpt = f"{_address_type(orcpt)}; {orcpt}"
            lines.append(f"Original-Recipient: {orcpt}")
        expanded = kind in (DELIVERED, RELAYED) and EXPANDED_FLAG in envelope.flags
        # (an expanded address is reported as itself: its targets are nobody's business but its owner's)
        final = (envelope.rcpt or envelope.dest) if expanded else (envelope.dest or envelope.rcpt)
        lines.append(f"Final-Recipient: {_address_type(final)}; {final}")
        lines.append(f"Action: {'expanded' if expanded else kind}")
        lines.append(f"Status: {status_code(envelope, kind)}")
        # (an expired envelope's: the failure that kept it back, which is what the transport said)
        diagnostic = (context.last_errors.get(envelope.evpid) if kind == FAILED else None) or envelope.errorline
        if diagnostic and kind in (FAILED, DELAYED):
            # A reply of several lines is folded: each line after the first starts with a blank, or it would
            # begin a field of its own (RFC 3464 fields follow the header rules).
            folded = "\n ".join(piece for line in diagnostic.splitlines() if line.strip()
                                 for piece in _pieces(line.strip()))
            lines.append(f"Diagnostic-Code: {_diagnostic_type(folded)}; {folded}")
        if envelope.last_try:
            lines.append(f"Last-Attempt-Date: {email.utils.formatdate(envelope.last_try, localtime=True)}")
        if kind == DELAYED:
            expire = envelope.ctime + envelope.ttl
            lines.append(f"Will-Retry-Until: {email.utils.formatdate(expire, localtime=True)}")
        lines.append("")
    return lines


SMTP_REPLY = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")


def _diagnostic_type(text: str) -> str:
    """RFC 3464 2.3.6: `smtp` for a server's reply (it starts with its code); our own texts (a connection
    refused, a loop, what a delivery program said) are of our private type, not passed off as SMTP replies."""
    return "smtp" if SMTP_REPLY.match(text) else "X-PySMTPD"


def _address_type(address: str) -> str:
    """RFC 6533: an address that is not ASCII (SMTPUTF8 mail) is of type utf-8 (in a global report)."""
    return "rfc822" if address.isascii() else "utf-8"


def render_report(kind: str, envelopes: list[Envelope], original: bytes, context: ReportContext) -> bytes:
    """The DSN message, LF line endings (as every message is stored in the queue). Where the report or the
    returned message holds UTF-8 (SMTPUTF8 mail, a server's reply in UTF-8), its parts are the internationalized
    ones of RFC 6533 (text in utf-8, message/global-delivery-status, message/global[-headers]) instead of
    declaring that text ASCII."""
    if kind not in KINDS or not envelopes:
        raise ValueError(f"bad report: {kind!r} with {len(envelopes)} envelope(s)")
    first = envelopes[0]
    boundary = f"{secrets.randbits(64)}/{context.smtpname}"
    message_id = f"<{secrets.token_hex(8)}@{context.smtpname}>"
    return_full = first.dsn_ret.upper() == "FULL" or (not first.dsn_ret and kind in (FAILED, DELAYED))
    if len(original) > MAX_RETURNED_BYTES:
        return_full = False
    human = _human_part(kind, envelopes, context)
    status = _status_part(kind, envelopes, context)
    utf8_text = not all(line.isascii() for line in human)
    global_status = not all(line.isascii() for line in status)
    global_original = not _split_headers(original).isascii()
    body = original if return_full else _split_headers(original)
    original_id = _original_message_id(_split_headers(original))
    # Parts holding 8-bit text say so (without the field a part is 7bit: RFC 2045 6.1, 2046 5.2.1), and so does
    # the report that holds them (a multipart's encoding covers its parts'): an 8BITMIME original, a UTF-8 text.
    eight_bit = ["Content-Transfer-Encoding: 8bit"]
    body_8bit = not body.isascii()
    report_8bit = utf8_text or global_status or body_8bit
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{context.smtpname}>",
        f"To: <{first.sender}>",
        f"Subject: Delivery status notification: {kind}",
        f"Date: {email.utils.formatdate(context.now, localtime=True)}",
        f"Message-ID: {message_id}",
        *([f"In-Reply-To: {original_id}", f"References: {original_id}"] if original_id else []),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        *(eight_bit if report_8bit else []),
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        *(["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"] if utf8_text else
          ["Content-Type: text/plain; charset=us-ascii"]),
        "",
        *human,
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/global-delivery-status" if global_status else "Content-Type: message/delivery-status",
        *(eight_bit if global_status else []),
        "",
        *status,
        f"--{boundary}",
    ]
    if return_full:
        description = {DELIVERED: "Delivered message", RELAYED: "Relayed message"}.get(kind, "Undelivered message")
        lines += [f"Content-Description: {description}",
                  "Content-Type: message/global" if global_original else "Content-Type: message/rfc822"]
    else:
        lines += ["Content-Description: Message headers",
                  "Content-Type: message/global-headers" if global_original else "Content-Type: text/rfc822-headers"]
    lines += [*(eight_bit if body_8bit else []), ""]
    head = "\n".join(lines).encode("utf-8", errors="surrogateescape") + b"\n"
    body = body.replace(b"\r\n", b"\n")
    if not body.endswith(b"\n"):
        body += b"\n"
    return head + body + f"\n--{boundary}--\n".encode()


@dataclass
class _Group:
    kind: str
    msgid: int
    sender: str
    envelopes: list[Envelope] = field(default_factory=list)
    futures: list[asyncio.Future[bool]] = field(default_factory=list)
    context: ReportContext | None = None
    last_errors: dict[int, str] = field(default_factory=dict)


class Bouncer:
    """Collects report requests, renders and queues DSNs."""

    def __init__(self, daemon: Daemon | None, queue: object, smtpname: str, router: Router | None = None,
                 group_delay: float = GROUP_DELAY) -> None:
        self.daemon = daemon
        self.queue = queue
        self.smtpname = smtpname
        self.router = router or self._route_by_rules
        self.group_delay = group_delay
        self.groups: dict[tuple[int, str, str], _Group] = {}

    def report(self, envelope: Envelope, kind: str, delay: int = 0, remaining: int = 0,
               last_error: str = "") -> asyncio.Future[bool]:
        """Ask for a report. The future resolves True when the DSN is queued, False when none is sent, and
        raises when queueing failed (the caller keeps the envelope and tries again later). ``last_error``: for
        an expired envelope, the temporary failure that kept it back."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not wants_report(envelope, kind):
            if kind == FAILED and ("bounce" in envelope.flags or envelope.type is EnvelopeType.BOUNCE):
                # (only a report that failed is a double bounce; one delivered or delayed is not news)
                LOG.info("bounce: double bounce for %016x (%s): dropped", envelope.evpid, envelope.errorline)
            trace.emit("bounce", f"bounce: no {kind} report for {envelope.evpid:016x}", evpid=f"{envelope.evpid:016x}")
            future.set_result(False)
            return future
        key = (envelope.msgid, envelope.sender, kind)
        group = self.groups.get(key)
        if group is None:
            group = _Group(kind, envelope.msgid, envelope.sender)
            self.groups[key] = group
            asyncio.get_running_loop().call_later(self.group_delay, self._flush_soon, key)
        if group.envelopes and group.context is not None:
            # One text for every recipient of the report: the shortest delay and the longest time left are true
            # of each ("not delivered after more than", "stays in the queue for up to").
            delay, remaining = min(delay, group.context.delay), max(remaining, group.context.remaining)
        group.envelopes.append(envelope)
        group.futures.append(future)
        if last_error:
            group.last_errors[envelope.evpid] = last_error
        group.context = ReportContext(self.smtpname, time.time(), delay, remaining, group.last_errors)
        trace.emit("bounce", f"bounce: {kind} report for {envelope.evpid:016x} to <{envelope.sender}> queued",
                   evpid=f"{envelope.evpid:016x}", kind=kind)
        return future

    def _flush_soon(self, key: tuple[int, str, str]) -> None:
        group = self.groups.pop(key, None)
        if group is not None:
            asyncio.ensure_future(self._send(group))

    async def _send(self, group: _Group) -> None:
        try:
            msgid = await self._queue_report(group)
        except BounceRoutingError as error:
            LOG.warning("bounce: %s report for message %08x to <%s> dropped: %s", group.kind, group.msgid,
                        group.sender, error)
            trace.emit("bounce", f"bounce: {group.kind} report for message {group.msgid:08x} to <{group.sender}> "
                                 f"dropped: {error}", original=f"{group.msgid:08x}", kind=group.kind)
            for future in group.futures:
                if not future.done():
                    future.set_result(False)
            return
        except Exception as error:  # noqa: BLE001 — reported to every waiter: they keep their envelopes
            LOG.warning("bounce: could not queue a %s report for message %08x to <%s>: %s", group.kind,
                        group.msgid, group.sender, error)
            for future in group.futures:
                if not future.done():
                    future.set_exception(error)
            return
        STATS.increment("bounce.message")
        STATS.increment("bounce.envelope", len(group.envelopes))
        STATS.increment("queue.bounce")
        LOG.info("bounce: %s report for message %08x to <%s> queued as %08x (%d recipient(s))", group.kind,
                 group.msgid, group.sender, msgid, len(group.envelopes))
        # The original's msgid too: `trace --follow --msgid ORIGINAL` sees where its report went.
        trace.emit("bounce", f"bounce: {group.kind} report for message {group.msgid:08x} to <{group.sender}> "
                             f"queued as {msgid:08x}",
                   msgid=f"{msgid:08x}", original=f"{group.msgid:08x}", kind=group.kind,
                   recipients=len(group.envelopes))
        for future in group.futures:
            if not future.done():
                future.set_result(True)

    async def _queue_report(self, group: _Group) -> int:
        original = await asyncio.to_thread(self._read_original, group.msgid)
        assert group.context is not None
        data = render_report(group.kind, group.envelopes, original, group.context)
        envelopes = await self.router(group.sender, self.smtpname)
        if not envelopes:
            raise BounceRoutingError("no delivery for the sender's address")
        now = int(time.time())
        for envelope in envelopes:
            envelope.sender = ""
            envelope.rcpt = envelope.rcpt or group.sender
            envelope.sockaddr = envelope.sockaddr or "local"
            envelope.helo = envelope.helo or self.smtpname
            envelope.hostname = envelope.hostname or "localhost"
            envelope.smtpname = self.smtpname
            envelope.ctime = now
            envelope.flags = shared_flags((*envelope.flags, "bounce", "authenticated"))
            envelope.dsn_notify = DsnNotify.NONE
        return await self.queue.inject(data, envelopes)  # type: ignore[attr-defined]

    def _read_original(self, msgid: int) -> bytes:
        path = self.queue.message_path(msgid)  # type: ignore[attr-defined]
        try:
            with codec.open_message(path) as handle:
                return handle.read(MAX_RETURNED_BYTES + 1)
        except (OSError, codec.QueueCodecError):
            return b"(the original message could not be read)\n"

    async def _route_by_rules(self, sender: str, smtpname: str) -> list[Envelope]:
        """Route like a local submission of MAIL FROM:<> RCPT TO:<sender>, via the ruleset and expansion."""
        daemon = self.daemon
        if daemon is None:
            raise BounceRoutingError("no daemon to route with")
        from smtpd.lookup.expand import expand_recipient
        from smtpd.lookup.facts import SessionFacts
        from smtpd.lookup.rules import match_rules

        facts = SessionFacts(address="local", rdns="localhost", helo=smtpname, auth_user=None,
                             listener_hostname=smtpname, local_socket=True)
        config, tables = daemon.config, daemon.tables

        def route() -> list[Envelope]:
            decision = match_rules(config, tables, facts, "", sender)
            if decision.tempfail:
                raise RuntimeError("temporary failure while matching rules")
            if decision.rejected or decision.action is None:
                raise BounceRoutingError("no rule accepts the sender's address")
            result = expand_recipient(config, tables, facts, "", sender, smtpname)
            if result.refusal is not None:
                code, text = result.refusal
                if 400 <= code < 500:  # (a table or ~/.forward failing for now): the report must wait, not go
                    raise BounceRoutingDeferred(f"temporary failure while expanding the sender's address: {code} "
                                                f"{text}")
                raise BounceRoutingError(f"{code} {text}")
            return list(result.deliveries)

        return await asyncio.to_thread(route)
