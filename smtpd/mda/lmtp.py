"""LMTP delivery (RFC 2033) to `host:port` or a Unix socket path, e.g. Dovecot's lmtp service.

One session per call: `LHLO`, `MAIL FROM:<sender>`, one `RCPT TO` per recipient, `DATA`, the message
(dot-stuffed, CRLF), then one reply per accepted recipient. Each recipient gets its own result: 2xx delivered,
4xx temporary, 5xx permanent. A connection or protocol failure is temporary for every recipient.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import BinaryIO

from shared.numbers import ascii_digits
from smtpd.mda.local import message_lines

LMTP_TIMEOUT = 300.0


@dataclass(frozen=True)
class LmtpReply:
    code: int
    text: str  # the whole last reply line, e.g. "250 2.0.0 <bob> Saved"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return not (200 <= self.code < 300 or 500 <= self.code < 600)


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
    if not host or not ascii_digits(port_text):
        raise LmtpError(f"invalid LMTP destination: {destination}")
    return host, int(port_text)


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> LmtpReply:
        while True:
            line = await self.reader.readline()
            if not line:
                raise LmtpError("Connection closed unexpectedly")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not ascii_digits(text[:3]):
                raise LmtpError(f"LMTP server error: {text}")
            if len(text) == 3 or text[3] != "-":
                return LmtpReply(int(text[:3]), text)

    async def command(self, line: str) -> LmtpReply:
        self.writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        await self.writer.drain()
        return await self.reply()


async def deliver_lmtp(destination: str, helo: str, sender: str, recipients: list[str], prefix: bytes,
                       message: BinaryIO, timeout: float = LMTP_TIMEOUT) -> list[LmtpReply]:
    """Deliver one message to recipients; one reply per recipient, in order. Raises LmtpError.

    Once the message has been sent, each recipient's reply is final as it arrives: when the session fails after
    some of them (the server closes, a timeout), those keep their replies (a recipient the server said 250 for
    has its copy: retrying it would deliver it twice) and only the recipients still waiting get the failure,
    as temporary replies."""
    after_data: list[LmtpReply | None] = []  # filled by _transaction once DATA's replies are being read
    try:
        return await asyncio.wait_for(_deliver(destination, helo, sender, recipients, prefix, message, after_data),
                                      timeout)
    except TimeoutError:
        failure = LmtpError("Connection timeout")
    except OSError as error:
        failure = LmtpError(f"Connection failed: {error.strerror or error}")
    except LmtpError as error:
        failure = error
    if not after_data or all(reply is None for reply in after_data):
        raise failure
    return [reply if reply is not None else LmtpReply(421, str(failure)) for reply in after_data]


async def _deliver(destination: str, helo: str, sender: str, recipients: list[str], prefix: bytes,
                   message: BinaryIO, after_data: list[LmtpReply | None]) -> list[LmtpReply]:
    target = parse_destination(destination)
    if isinstance(target, str):
        reader, writer = await asyncio.open_unix_connection(target)
    else:
        reader, writer = await asyncio.open_connection(target[0], target[1])
    session = _Session(reader, writer)
    try:
        return await _transaction(session, helo, sender, recipients, prefix, message, after_data)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _transaction(session: _Session, helo: str, sender: str, recipients: list[str], prefix: bytes,
                       message: BinaryIO, after_data: list[LmtpReply | None]) -> list[LmtpReply]:
    greeting = await session.reply()
    if greeting.code != 220:
        raise LmtpError(f"LMTP server error: {greeting.text}")
    for line in (f"LHLO {helo}", f"MAIL FROM:<{sender}>"):
        reply = await session.command(line)
        if not reply.ok:
            if reply.code >= 500:
                return [reply] * len(recipients)
            raise LmtpError(f"LMTP server error: {reply.text}")
    replies: list[LmtpReply | None] = []
    accepted = 0
    for recipient in recipients:
        reply = await session.command(f"RCPT TO:<{recipient}>")
        replies.append(reply if not reply.ok else None)
        accepted += reply.ok
    if not accepted:
        await _quit(session)
        return [reply for reply in replies if reply is not None]
    data_reply = await session.command("DATA")
    if data_reply.code != 354:
        if data_reply.code >= 500:
            return [reply or data_reply for reply in replies]
        raise LmtpError(f"LMTP server error: {data_reply.text}")
    await _send_body(session, prefix, message)
    # From here each reply is final for its recipient: kept in after_data as it comes (refusals at RCPT too),
    # so that a session cut short keeps the replies already received (see deliver_lmtp).
    after_data[:] = replies
    for index, reply in enumerate(replies):
        if reply is None:
            after_data[index] = await session.reply()
    await _quit(session)
    return [reply for reply in after_data if reply is not None]


async def _send_body(session: _Session, prefix: bytes, message: BinaryIO) -> None:
    buffer = bytearray()
    for line in message_lines(prefix, message):
        body = line.rstrip(b"\r\n")
        if body.startswith(b"."):
            buffer += b"."
        buffer += body + b"\r\n"
        if len(buffer) >= 1 << 16:
            session.writer.write(bytes(buffer))
            buffer.clear()
            await session.writer.drain()
    buffer += b".\r\n"
    session.writer.write(bytes(buffer))
    await session.writer.drain()


async def _quit(session: _Session) -> None:
    try:
        await session.command("QUIT")
    except (LmtpError, OSError):
        pass
