"""LMTP delivery (RFC 2033) to `host:port` or a Unix socket path, e.g. Dovecot's lmtp service.

One session per call: `LHLO`, `MAIL FROM:<sender>`, one `RCPT TO` per recipient, `DATA`, the message
(dot-stuffed, CRLF), then one reply per accepted recipient. Each recipient gets its own result: 2xx delivered,
4xx temporary, 5xx permanent. A connection or protocol failure is temporary for every recipient still waiting.
The session is the relay's strict client (smtpd/mta/client.py, in its LMTP mode): one LMTP client for the local
`lmtp` action and for `relay host lmtp://`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO

from shared.numbers import ascii_digits
from smtpd.mda.local import message_lines
from smtpd.mta.client import CHUNK, ClientError, RepliesCut, Reply, SmtpClient
from smtpd.mta.session import ascii_address

LMTP_TIMEOUT = 300.0  # for each step of the session (connecting, each reply, each write)


@dataclass(frozen=True)
class LmtpReply:
    code: int
    text: str  # the whole last reply line, e.g. "250 2.0.0 <bob> Saved"

    @classmethod
    def of(cls, reply: Reply) -> LmtpReply:
        return cls(reply.code, reply.lines[-1])

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return not (200 <= self.code < 300 or 500 <= self.code < 600)


# An address with a UTF-8 local part, to a server that does not offer SMTPUTF8 (as the relay says it).
UTF8_REFUSED = LmtpReply(553, "553 5.6.7 SMTPUTF8 not supported by the LMTP server")


class LmtpError(Exception):
    """The session failed before per-recipient replies: temporary for all recipients."""


def parse_destination(destination: str) -> tuple[str, int] | str:
    """`host:port`, `[v6]:port` -> (host, port); a path starting with / -> the socket path."""
    if destination.startswith("/"):
        return destination
    if destination.startswith("["):
        host, _, rest = destination[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = destination.rpartition(":")
    if not host or not ascii_digits(port_text) or not 0 < int(port_text) < 65536:
        raise LmtpError(f"invalid LMTP destination: {destination}")
    return host, int(port_text)


async def deliver_lmtp(destination: str, helo: str, sender: str, recipients: list[str], prefix: bytes,
                       message: BinaryIO, timeout: float = LMTP_TIMEOUT) -> list[LmtpReply]:
    """Deliver one message to recipients; one reply per recipient, in order. Raises LmtpError.

    Once the message has been sent, each recipient's reply is final as it arrives: when the session fails after
    some of them (the server closes, a timeout), those keep their replies (a recipient the server said 250 for
    has its copy: retrying it would deliver it twice) and only the recipients still waiting get the failure,
    as temporary replies."""
    target = parse_destination(destination)
    address, port = (target, 0) if isinstance(target, str) else target
    try:
        client = await SmtpClient.connect(address, port, timeout=timeout, lmtp=True, subsystem="mda",
                                          session_id="lmtp")
    except ClientError as error:
        raise LmtpError(str(error)) from None
    try:
        return await _transaction(client, helo, sender, recipients, prefix, message)
    except ClientError as error:
        raise LmtpError(str(error)) from None
    finally:
        await client.close()


async def _transaction(client: SmtpClient, helo: str, sender: str, recipients: list[str], prefix: bytes,
                       message: BinaryIO) -> list[LmtpReply]:
    greeting = await client.greeting()
    if greeting.code != 220:
        raise LmtpError(f"LMTP server error: {greeting.lines[-1]}")
    hello = await client.hello(helo)
    if not hello.is_ok:
        if hello.code >= 500:
            return [LmtpReply.of(hello)] * len(recipients)
        raise LmtpError(f"LMTP server error: {hello.lines[-1]}")
    sender, addresses, parameters = _utf8_plan(client, sender, recipients)
    if sender is None:
        return [UTF8_REFUSED] * len(recipients)
    reply = await client.mail_from(sender, parameters)
    if not reply.is_ok:
        if reply.code >= 500:
            return [LmtpReply.of(reply)] * len(recipients)
        raise LmtpError(f"LMTP server error: {reply.lines[-1]}")
    refusals: list[LmtpReply | None] = []
    for address in addresses:
        if address is None:
            refusals.append(UTF8_REFUSED)
            continue
        reply = await client.rcpt_to(address)
        refusals.append(None if reply.is_ok else LmtpReply.of(reply))
    accepted = refusals.count(None)
    if not accepted:
        await client.quit()
        return [reply for reply in refusals if reply is not None]
    data_reply = await client.begin_data()
    if data_reply.code != 354:
        if data_reply.code >= 500:
            return [reply or LmtpReply.of(data_reply) for reply in refusals]
        raise LmtpError(f"LMTP server error: {data_reply.lines[-1]}")
    try:
        finals = await client.send_message(_wire_chunks(prefix, message), accepted)
    except RepliesCut as cut:
        # The replies received are final for their recipients; the others wait for a later try.
        received = iter([LmtpReply.of(reply) for reply in cut.replies])
        return [reply or next(received, None) or LmtpReply(421, str(cut)) for reply in refusals]
    await client.quit()
    received = iter(finals)
    return [reply or LmtpReply.of(next(received)) for reply in refusals]


def _utf8_plan(client: SmtpClient, sender: str,
               recipients: list[str]) -> tuple[str | None, list[str | None], list[str]]:
    """(MAIL FROM address, RCPT TO addresses, MAIL parameters) as the server can take them, as the relay does
    (smtpd/mta/session.py): with SMTPUTF8 offered, UTF-8 addresses go as they are (and the parameter is sent);
    without it, a domain goes in A-labels, and an address whose local part is UTF-8 cannot go (None: refused for
    good). Sent as UTF-8 without the parameter, Dovecot took the sender for <> and the sender was lost."""
    addresses = [sender, *recipients]
    if all(address.isascii() for address in addresses):
        return sender, list(recipients), []
    if client.extensions.has("SMTPUTF8"):
        return sender, list(recipients), ["SMTPUTF8"]
    ascii_sender = ascii_address(sender) if sender else sender
    return ascii_sender, [ascii_address(recipient) if "@" in recipient else
                          (recipient if recipient.isascii() else None) for recipient in recipients], []


async def _wire_chunks(prefix: bytes, message: BinaryIO) -> AsyncIterator[bytes]:
    """The prefix and the message as DATA carries them: CRLF line ends, a leading dot doubled."""
    buffer = bytearray()
    for line in message_lines(prefix, message):
        body = line.rstrip(b"\r\n")
        if body.startswith(b"."):
            buffer += b"."
        buffer += body + b"\r\n"
        if len(buffer) >= CHUNK:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)
