"""One relay session: connect, greeting, EHLO, STARTTLS, AUTH — then transactions, one per message.

`open_session` either returns a ready SmtpClient or raises SessionError (the route failed: try the next host).
`transfer` sends one message for a group of envelopes over a ready session and resolves each envelope.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import dns.exception
import dns.name

from shared.numbers import ascii_digits
from smtpd import log, trace
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.lookup.tables import asked_off_the_loop
from smtpd.mta.client import (
    BadReply,
    CertificateRejected,
    ClientError,
    RepliesCut,
    Reply,
    SmtpClient,
    stuffed_lines,
)
from smtpd.mta.plan import Plan, PlanError, helo_name, secret_for
from smtpd.mta.reports import Opener, SessionReports
from smtpd.mta.tls import TlsMode, TlsSetupError, client_context
from smtpd.queue import codec
from smtpd.queue.envelope import DsnNotify, Envelope
from smtpd.smtp.address import valid_domain

LOG = log.get("mta")
_ESC = re.compile(r"^[245]\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})\b")


class SessionError(Exception):
    """The session could not be set up or broke. ``route_failure``: count it against the route. ``policy``: the
    host does not meet the relay's TLS policy (STARTTLS required but missing or refused, certificate rejected): the
    next host is tried, but the route is not penalised, since other relays (opportunistic TLS) use it well."""

    def __init__(self, message: str, route_failure: bool = True, permanent: bool = False,
                 policy: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.route_failure = route_failure and not policy
        self.permanent = permanent
        self.policy = policy


@dataclass
class Job:
    envelope: Envelope
    future: asyncio.Future[DeliveryResult]
    queued: float = 0.0
    relay_text: str = ""  # where it went, for the log line
    session_id: str = ""
    address: str = ""  # the RCPT TO address when it differs from the envelope's dest (an IDN domain as A-labels)
    source: str = ""  # our address in the session, for the log line

    def resolve(self, result: DeliveryResult) -> None:
        if not self.future.done():
            self.future.set_result(result)


@dataclass
class Session:
    client: SmtpClient
    host_name: str
    address: str
    plan_key: str
    messages: int = 0
    id: str = field(default_factory=lambda: secrets.token_hex(8))


def esc_code(reply_text: str) -> int:
    """x.S.D of the reply's enhanced status code as S*10+D (the envelope's esc-code), 0 when absent."""
    match = _ESC.match(reply_text.split("\n")[-1])
    if match is None:
        return 0
    subject, detail = int(match.group(2)), int(match.group(3))
    return subject * 10 + detail if detail < 10 else subject * 100 + detail


def result_for_reply(reply: Reply) -> DeliveryResult:
    """2xx: delivered; 5xx: refused for good; anything else (4xx, or a 3xx where a final reply was due): retry."""
    code = esc_code(reply.text)
    if reply.code >= 500:
        return DeliveryResult.permfail(reply.text, code)
    if reply.is_ok:
        return DeliveryResult.ok(reply.text)
    return DeliveryResult.tempfail(reply.text, code)


def rcpt_result(reply: Reply) -> DeliveryResult:
    """The result of a refused RCPT. A 552 is temporary: RFC 821 gave "too many recipients" that code, and RFC 5321
    4.5.3.1.10 has clients take a 552 to RCPT as they take 452 (as Postfix does), not bounce the recipient."""
    if reply.code == 552:
        return DeliveryResult.tempfail(reply.text, esc_code(reply.text))
    return result_for_reply(reply)


# -- opening ------------------------------------------------------------------------------------------------
async def open_session(plan: Plan, host_name: str, address: str, tables: Any, mailname: str,
                       timeout: float, allow_tls: bool = True, reports: Opener | None = None,
                       rdns: str = "") -> Session:
    """Connect and get the session ready for MAIL FROM. Raises SessionError. ``reports``: the session is told to
    the relay's filter processes (``rdns``: the host's PTR name, for link-connect)."""
    session_id = secrets.token_hex(8)
    policy = plan.tls
    use_smtps = policy.mode is TlsMode.SMTPS
    try:
        context = client_context(policy) if policy.mode is not TlsMode.NONE and allow_tls else None
    except TlsSetupError as error:
        raise SessionError(str(error), route_failure=False) from None
    # The name the certificate must carry. A smarthost or exchanger given as an address is checked against that
    # address (an IP entry of the certificate): with None the handshake would check no name at all.
    server_hostname = host_name if host_name and not _is_address(host_name) and not host_name.startswith("[") \
        else address
    scheme = plan.scheme  # (smtp+tls://, smtp+notls:// as OpenSMTPD logs them; these said smtp://)
    # A Unix socket, or TCP (an IPv6 address in brackets, as in a URL: `[::1]:25`, not `::1:25`)
    where = address if address.startswith("/") else f"[{address}]:{plan.port}" if ":" in address \
        else f"{address}:{plan.port}"
    LOG.info("%s mta connecting address=%s://%s host=%s", session_id, scheme, where, host_name)
    trace.emit("mta", f"{session_id}: connecting to {where} ({host_name}) {policy.describe()}",
               session=session_id, host=host_name, address=address)
    try:
        client = await SmtpClient.connect(address, plan.port, timeout=timeout, source=plan.source,
                                          tls_context=context if use_smtps else None,
                                          server_hostname=server_hostname, lmtp=plan.lmtp, session_id=session_id)
    except ClientError as error:
        _log_error(session_id, error.args[0])
        raise SessionError(error.args[0], policy=isinstance(error, CertificateRejected)) from None
    LOG.info("%s mta connected", session_id)
    if client.tls:  # smtps: TLS came with the connection
        _log_tls(session_id, client)
    opened = reports(session_id) if reports is not None else None
    if opened is not None:  # (a connection that never opened is no session to report, docs/filters.md)
        _open_reports(client, opened, rdns or address)
    session = Session(client, host_name, address, plan.session_key, id=session_id)
    try:
        await _handshake(session, plan, tables, mailname, context, server_hostname)
    except (ClientError, SessionError, PlanError) as error:
        await client.close()
        _log_error(session_id, error.message if isinstance(error, SessionError | PlanError) else error.args[0])
        if isinstance(error, SessionError):
            raise
        if isinstance(error, PlanError):
            raise SessionError(error.message, route_failure=False, permanent=error.permanent) from None
        raise SessionError(error.args[0], policy=isinstance(error, CertificateRejected)) from None
    return session


def _log_error(session_id: str, reason: str) -> None:
    """As OpenSMTPD: why a session could not be opened or made ready (`mta error reason=...`; without it an
    exchanger that refused, timed out or failed TLS, before the next one took the mail, was in no log line at
    all); the envelopes' results follow in their `mta delivery` lines."""
    LOG.info("%s mta error reason=%s", session_id, log.visible(reason.split("\n")[-1]))


def _log_tls(session_id: str, client: SmtpClient) -> None:
    """As OpenSMTPD: `mta tls ciphers=VERSION:CIPHER:BITS` once the session is encrypted."""
    from smtpd.smtp import tls

    described = tls.describe(client.get_extra_info("ssl_object"))
    version, cipher, bits = (described or "::").split(":")[:3]
    LOG.info("%s mta tls ciphers=%s:%s:%s", session_id, version, cipher, bits)


def _open_reports(client: SmtpClient, reports: SessionReports, rdns: str) -> None:
    client.reports = reports
    reports.link_connect(rdns, client.get_extra_info("sockname"), client.get_extra_info("peername"))
    if client.tls:  # smtps: TLS came with the connection
        client.report_tls()


def greeting_name(greeting: Reply) -> str:
    """The name a greeting gives (its first word), as link-greeting reports it: empty when it is no domain."""
    words = greeting.lines[0][4:].split(" ", 1)
    name = words[0] if words else ""
    literal = name.startswith("[") and name.endswith("]") and len(name) > 2
    return name if literal or valid_domain(name) else ""


async def _handshake(session: Session, plan: Plan, tables: Any, mailname: str, context: Any,
                     server_hostname: str | None) -> None:
    client = session.client
    greeting = await client.greeting()
    if greeting.code != 220:
        raise SessionError(greeting.text)
    if client.reports is not None:
        client.reports("link-greeting", greeting_name(greeting))
    sockname = client.get_extra_info("sockname")
    local_address = sockname[0] if sockname else None
    helo = await asked_off_the_loop(tables, helo_name, tables, plan, local_address, mailname)
    reply = await client.hello(helo)
    if not reply.is_ok:
        raise SessionError(reply.text)
    if context is not None and not client.tls:
        offered = client.extensions.has("STARTTLS")
        if plan.tls.required and not offered:
            raise SessionError("TLS required but not supported by remote host", policy=True)
        if offered:
            reply = await client.starttls(context, server_hostname)
            if reply.code != 220:
                # A refusal of opportunistic STARTTLS (454) lets the session go on in clear text; a 421 does not:
                # the server is closing the connection, and the next exchanger is to be tried.
                if reply.code == 421:  # (closing: a failure of the host like any other)
                    raise SessionError(reply.text)
                if plan.tls.required:
                    raise SessionError(reply.text, policy=True)
            else:
                _log_tls(session.id, client)
                trace.emit("mta", f"{session.id}: TLS established ({client.tls_version}, "
                           f"{'verified' if client.tls_verified else 'not verified'})", session=session.id)
                reply = await client.hello(helo)
                if not reply.is_ok:
                    raise SessionError(reply.text)
    if plan.auth_label:
        await _authenticate(session, plan, tables)


async def _authenticate(session: Session, plan: Plan, tables: Any) -> None:
    client = session.client
    if not client.tls:
        raise SessionError("Refuse to AUTH over unsecure channel", route_failure=False)
    if not client.extensions.has("AUTH"):
        raise SessionError("AUTH not advertised", route_failure=False)
    if not client.extensions.auth_mechanisms() & {"PLAIN", "LOGIN"}:
        # The only mechanisms we speak; the credentials are not sent to a server that did not offer one of them.
        raise SessionError("no supported AUTH method", route_failure=False)
    username, password = await asked_off_the_loop(tables, secret_for, tables, plan)
    reply = await client.auth(username, password)
    if client.reports is not None:
        client.reports("link-auth", username, "pass" if reply.code == 235 else "fail")
    if reply.code != 235:
        raise SessionError(f"AUTH rejected: {reply.text}", route_failure=False)
    trace.emit("mta", f"{session.id}: authenticated as {username}", session=session.id)


def ascii_address(address: str) -> str | None:
    """address with its domain in A-labels (`u@bücher.example` -> `u@xn--bcher-kva.example`) when the domain is
    its only non-ASCII part; None when the local part is not ASCII or the domain is no valid IDN."""
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    if domain.isascii():
        return address
    try:
        return f"{local}@{dns.name.from_unicode(domain).to_text(omit_final_dot=True)}"
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


def _is_address(name: str) -> bool:
    return ascii_digits(name.replace(".", "")) or ":" in name


# -- one message ----------------------------------------------------------------------------------------------
async def transfer(session: Session, plan: Plan, jobs: list[Job], message_path: str, has_8bit: bool,
                   size: int) -> bool:
    """Send one message to the jobs' recipients. Resolves every job. False if the session is unusable."""
    client = session.client
    extensions = client.extensions
    sender = plan.sender
    params: list[str] = []
    if has_8bit and extensions.has("8BITMIME"):
        params.append("BODY=8BITMIME")
    if extensions.has("SIZE"):
        params.append(f"SIZE={size}")
    smtputf8 = extensions.has("SMTPUTF8")
    if not smtputf8:
        # An address whose only non-ASCII part is its domain needs no SMTPUTF8: the domain goes as A-labels
        # (IDNA, the name the MX lookup asked for), as RFC 6531 3.2 allows. Only a UTF-8 local part needs it.
        sender = ascii_address(sender) or sender
        for job in jobs:
            job.address = ascii_address(job.envelope.dest) or job.envelope.dest
    needs_utf8 = not sender.isascii()
    utf8_jobs = [job for job in jobs if not (job.address or job.envelope.dest).isascii()]
    if (needs_utf8 or utf8_jobs) and not smtputf8:
        refused = jobs if needs_utf8 else utf8_jobs
        for job in refused:
            job.resolve(DeliveryResult.permfail("SMTPUTF8 not supported by remote host", 67))
        jobs = [job for job in jobs if not job.future.done()]
        if not jobs:
            return True
    elif needs_utf8 or utf8_jobs:
        params.append("SMTPUTF8")
    dsn = extensions.has("DSN")
    first = jobs[0].envelope
    if dsn and first.dsn_ret:
        params.append(f"RET={first.dsn_ret}")
    if dsn and first.dsn_envid:
        params.append(f"ENVID={first.dsn_envid}")
    while True:
        usable, overflow, limit_reply = await _transaction(session, sender, jobs, message_path, params, dsn)
        if not overflow or limit_reply is None:
            return usable
        if not usable or client.closed:
            _resolve_all(overflow, rcpt_result(limit_reply))
            return usable
        # RFC 5321 4.5.3.1.10: the server's recipient limit was reached; the others go in the next transaction.
        trace.emit("mta", f"{session.id}: recipient limit of the remote reached; {len(overflow)} recipients "
                   "go in a new transaction", session=session.id)
        jobs = overflow


async def _transaction(session: Session, sender: str, jobs: list[Job], message_path: str, params: list[str],
                       dsn: bool) -> tuple[bool, list[Job], Reply | None]:
    """MAIL FROM:<sender>, RCPTs, DATA for jobs. Resolves every job but the overflow: those from the first one that met a 452
    (or 552) after the remote had accepted others in this transaction (its recipient limit) on, to be sent in a new
    transaction. Returns (the session is usable, overflow, that 452 reply)."""
    client = session.client
    accepted: list[Job] = []
    overflow: list[Job] = []
    limit_reply: Reply | None = None
    try:
        reply = await client.mail_from(sender, params)
        if not reply.is_ok:  # (no transaction began: nothing but the protocol lines is reported, as in 6.8)
            _resolve_all(jobs, result_for_reply(reply))
            await _reset(client)
            return not client.closed, [], None
        msgid = f"{jobs[0].envelope.evpid >> 32:08x}"
        _tx(client, "tx-begin", msgid)
        _tx(client, "tx-mail", msgid, "ok", sender)
        for index, job in enumerate(jobs):
            reply = await client.command(_rcpt_line(job.envelope, dsn, job.address),
                                         then=("tx-envelope", msgid, f"{job.envelope.evpid:016x}"))
            _tx(client, "tx-rcpt", msgid, _result_word(reply), job.address or job.envelope.dest)
            if reply.is_ok:
                accepted.append(job)
            elif reply.code in (452, 552) and accepted:
                # "Too many recipients": what the remote takes in one transaction is reached. Sending the other
                # RCPTs would only get the same answer; they wait for the next transaction, not for a retry.
                # (552: RFC 821's code for it, see rcpt_result.)
                overflow, limit_reply = jobs[index:], reply
                break
            else:
                job.resolve(rcpt_result(reply))
        if not accepted:
            _tx_ended(client, msgid, committed=False)
            await _reset(client)
            return not client.closed, [], None
        replies = await _data(client, msgid, message_path, len(accepted))
        if len(replies) == 1:  # SMTP, or DATA itself refused: one answer for every accepted recipient
            replies = replies * len(accepted)
        for job, reply in zip(accepted, replies, strict=True):
            result = result_for_reply(reply)
            if dsn and result.outcome is Outcome.OK:
                _leave_success_notice_to_remote(session, job.envelope)
            job.resolve(result)
        session.messages += 1
        return True, overflow, limit_reply
    except RepliesCut as error:  # (LMTP) the recipients answered for keep their answer; the others wait
        for job, reply in zip(accepted, error.replies, strict=False):
            job.resolve(result_for_reply(reply))
        _resolve_all(jobs, DeliveryResult.tempfail(error.args[0]))
        await client.close()
        return False, [], None
    except BadReply as error:
        _resolve_all(jobs, DeliveryResult.tempfail(error.args[0]))
        await client.close()
        return False, [], None
    except ClientError as error:
        _resolve_all(jobs, DeliveryResult.tempfail(error.args[0]))
        await client.close()
        return False, [], None
    except OSError as error:
        _resolve_all(jobs, DeliveryResult.tempfail(f"cannot read the message: {error.strerror}"))
        await client.close()
        return False, [], None
    except codec.QueueCodecError as error:  # (the connection is closed before the final dot: nothing is sent)
        _resolve_all(jobs, DeliveryResult.tempfail(f"cannot read the message: {error}"))
        await client.close()
        return False, [], None


async def _data(client: SmtpClient, msgid: str, message_path: str, recipients: int) -> list[Reply]:
    """DATA and the message: [the refusal of DATA] (the transaction reset, as 6.8 does), or the final replies."""
    reply = await client.begin_data()
    _tx(client, "tx-data", msgid, "ok" if reply.code == 354 else _result_word(reply))
    if reply.code != 354:
        _tx_ended(client, msgid, committed=False)
        await _reset(client)
        return [reply]
    replies = await client.send_message(stuffed_lines(message_path), recipients)
    for final in replies:  # (LMTP: one per recipient, each reported as 6.8 reports it)
        _tx_ended(client, msgid, committed=final.is_ok)
    return replies


def _tx(client: SmtpClient, event: str, msgid: str, *fields: str) -> None:
    if client.reports is not None:
        client.reports(event, msgid, *fields)


def _tx_ended(client: SmtpClient, msgid: str, *, committed: bool) -> None:
    """tx-commit (with the bytes sent) or tx-rollback, then tx-reset: the transaction is over."""
    if client.reports is None:
        return
    if committed:
        client.reports("tx-commit", msgid, str(client.sent_size))
    else:
        client.reports("tx-rollback", msgid)
    client.reports("tx-reset", msgid)


def _result_word(reply: Reply) -> str:
    return "ok" if reply.is_ok else "permfail" if reply.code >= 500 else "tempfail"


def _rcpt_line(envelope: Envelope, dsn: bool, address: str = "") -> str:
    line = f"RCPT TO:<{address or envelope.dest}>"
    if dsn and envelope.dsn_notify:
        notify = DsnNotify(envelope.dsn_notify)
        if notify & DsnNotify.NEVER:
            words = ["NEVER"]
        else:
            words = [name for flag, name in ((DsnNotify.SUCCESS, "SUCCESS"), (DsnNotify.FAILURE, "FAILURE"),
                                             (DsnNotify.DELAY, "DELAY")) if notify & flag]
        line += f" NOTIFY={','.join(words)}"
    if dsn and envelope.dsn_orcpt:
        # With or without NOTIFY: RFC 3461 5.2.2 has a relay pass ORCPT on unchanged whenever it was given.
        # The queue keeps the address as the client gave it after `rfc822;` (smtpd/smtp/address.py);
        # RFC 3461 4.2 wants the address type in front of it.
        orcpt = envelope.dsn_orcpt
        line += f" ORCPT={orcpt if ';' in orcpt else 'rfc822;' + orcpt}"
    return line


def _leave_success_notice_to_remote(session: Session, envelope: Envelope) -> None:
    """The remote offers DSN and got our NOTIFY/ORCPT: reporting success is its job from now on (RFC 3461
    §5.2.2), so no "relayed" notice from us. The scheduler decides on the notice from the envelope it handed
    over (the same object, deleted right after a success): clearing SUCCESS there is how the agent says so."""
    notify = DsnNotify(envelope.dsn_notify)
    if notify & DsnNotify.SUCCESS:
        envelope.dsn_notify = notify & ~DsnNotify.SUCCESS
        trace.emit("mta", f"{session.id}: {envelope.evpid:016x}: the remote offers DSN; it reports success",
                   session=session.id, evpid=f"{envelope.evpid:016x}")


def _resolve_all(jobs: list[Job], result: DeliveryResult) -> None:
    for job in jobs:
        job.resolve(result)


async def _reset(client: SmtpClient) -> None:
    try:
        await client.rset()
    except ClientError:
        await client.close()


def message_facts(handle: BinaryIO) -> tuple[bool, int]:
    """(the message has 8-bit bytes, its size on the wire with CRLF line ends), read from ``handle`` (the
    message as codec.open_message gives it) — once per message, in a worker thread."""
    has_8bit = False
    size = 0
    while block := handle.read(1 << 20):
        size += len(block) + block.count(b"\n")
        if not has_8bit and not block.isascii():
            has_8bit = True
    return has_8bit, size
