"""The SMTP/LMTP client of the relay: one connection to one remote host, on our own asyncio protocol.

Why not aiosmtplib (the maintained asyncio SMTP client): the relay needs four things it does
not offer —
  * LMTP: after DATA an LMTP server answers once per accepted recipient; aiosmtplib reads one reply;
  * the remote's reply exactly as sent (every line of a multi-line reply, for the bounce and `show queue`),
    and strict checking of each line (same code on every line, `-` or space after it, printable text):
    aiosmtplib joins the text and accepts lines such as ``" 25"`` or a bare ``"250"`` continuation
    (the reply shapes of CVE-2020-8794);
  * streaming the message from the spool file with dot-stuffing, instead of holding it in memory whole
    (35 MB per message, up to 100 concurrent transfers);
  * binding a source address per route together with the TLS modes above on one code path.
So this module is a small, strict client; everything it does is exercised against real servers in tests.

Limits (a misbehaving server costs one envelope's attempt, never the daemon): a reply line may be at most
MAX_REPLY_LINE bytes, a reply at most MAX_REPLY_LINES lines; anything else raises BadReply.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from smtpd import trace
from smtpd.mta.reports import SessionReports, masked, tls_text
from smtpd.queue import codec
from smtpd.smtp.connection import SocketConnection

MAX_REPLY_LINE = 4096  # RFC 5321 says 512; some servers send longer text, nobody sends 4 KiB per line
MAX_REPLY_LINES = 64
CHUNK = 64 * 1024
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)")
_PRINTABLE = re.compile(r"[^\x20-\x7e\t\x80-\U0010ffff]")


class ClientError(Exception):
    """The session cannot go on (connection lost, timeout, TLS failure, bad reply): a temporary failure."""


class CertificateRejected(ClientError):
    """The server's certificate did not pass the relay's check: a matter of that relay's policy, not of the route."""


class BadReply(ClientError):
    """The remote's reply broke the protocol (malformed or oversized)."""


class RepliesCut(ClientError):
    """An LMTP session ended after some of its per-recipient replies to DATA: those are final (the server
    delivered or refused for those recipients), the rest are not known."""

    def __init__(self, replies: list[Reply], reason: str) -> None:
        super().__init__(reason)
        self.replies = replies


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # each line as received, without CRLF, control characters replaced

    @property
    def text(self) -> str:
        """The whole reply, one line per line of the remote (kept as the envelope's errorline)."""
        return "\n".join(self.lines)

    @property
    def message(self) -> str:
        """The text of the last line without the code (what a log line shows)."""
        return self.lines[-1][4:] if len(self.lines[-1]) > 4 else ""

    @property
    def is_ok(self) -> bool:
        """A positive completion (2xx). 3xx are intermediate replies that only DATA (354) and AUTH (334) expect,
        and those are checked by their code."""
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500


@dataclass
class Extensions:
    names: dict[str, str] = field(default_factory=dict)  # upper-case keyword -> parameters

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        names: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line[4:].strip().partition(" ")
            if keyword:
                names[keyword.upper()] = params.strip()
        return cls(names)

    def has(self, name: str) -> bool:
        return name.upper() in self.names

    def auth_mechanisms(self) -> set[str]:
        return {word.upper() for word in self.names.get("AUTH", "").split()}

    def size_limit(self) -> int:
        try:
            return int(self.names.get("SIZE", "0").split()[0])
        except (ValueError, IndexError):
            return 0


def _clean(text: str) -> str:
    """Control characters in a reply become '?': they must not reach logs, envelopes or bounces raw."""
    return _PRINTABLE.sub("?", text)


class SmtpClient:
    """One client connection. Methods raise ClientError; SMTP-level refusals come back as Reply.

    The bytes received land in the connection's own buffer (smtpd.smtp.connection, as under the server's
    sessions), so the client can tell whether the server sent more than the reply it read, and can drop what
    came before a TLS handshake, without reaching into a stream's internals."""

    def __init__(self, connection: SocketConnection, *, timeout: float, peer: str, lmtp: bool = False,
                 session_id: str = "", subsystem: str = "mta") -> None:
        self.connection = connection
        self.timeout = timeout
        self.peer = peer
        self.lmtp = lmtp
        self.session_id = session_id
        self.subsystem = subsystem  # the trace subsystem of its lines: mta, or mda for a local lmtp action
        self.extensions = Extensions()
        self.tls = False
        self.tls_verified = False
        self.tls_version = ""
        self.peer_cert_error = ""
        self.reports: SessionReports | None = None  # the session's smtp-out reports (None: nobody listens)
        self.sent_size = 0  # the last message's bytes as sent (dot-stuffed, CRLF), without the final dot

    # -- connecting ---------------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, address: str, port: int, *, timeout: float, source: str | None = None,
                      tls_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                      lmtp: bool = False, session_id: str = "", subsystem: str = "mta") -> SmtpClient:
        """Open the TCP connection (TLS at once when tls_context is given: smtps); an address starting with
        "/" is the path of a Unix socket (lmtp:///path)."""
        loop = asyncio.get_running_loop()
        local_addr = (source, 0) if source else None
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            if address.startswith("/"):
                opening = loop.create_unix_connection(SocketConnection, address)
            else:
                opening = loop.create_connection(SocketConnection, address, port, family=family,
                                                 local_addr=local_addr, ssl=tls_context,
                                                 server_hostname=server_hostname if tls_context else None)
            _, connection = await asyncio.wait_for(opening, timeout)
        except TimeoutError:
            raise ClientError("Connection timeout") from None
        except ssl.SSLCertVerificationError as error:  # (smtps: worded as for STARTTLS)
            raise CertificateRejected(f"TLS certificate verification failed: {error.verify_message}") from None
        except ssl.SSLError as error:
            raise ClientError(f"TLS handshake failed: {_reason(error)}") from None
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else _reason(error)
            raise ClientError(f"Connection failed: {reason}") from None
        peer = address if address.startswith("/") else f"{address}:{port}"
        client = cls(connection, timeout=timeout, peer=peer, lmtp=lmtp, session_id=session_id, subsystem=subsystem)
        if tls_context is not None:
            client._note_tls(tls_context)
        return client

    def _note_tls(self, context: ssl.SSLContext) -> None:
        self.tls = True
        self.tls_verified = context.verify_mode == ssl.CERT_REQUIRED
        ssl_object = self.connection.get_extra_info("ssl_object")
        self.tls_version = ssl_object.version() if ssl_object is not None else ""

    # -- replies ------------------------------------------------------------------------------------------
    async def read_reply(self) -> Reply:
        lines: list[str] = []
        code = None
        while True:
            raw = await self._read_line()
            if self.reports is not None:  # (each line as it came, before it is checked, as 6.8 reports it)
                self.reports("protocol-server", _clean(raw.decode("utf-8", errors="replace")))
            match = _REPLY_LINE.fullmatch(raw)
            if match is None:
                raise BadReply(f"Bad response from remote host: malformed line {_clean(_preview(raw))!r}")
            line_code = int(match.group(1))
            if code is not None and line_code != code:
                raise BadReply("Bad response from remote host: reply code changed within a multi-line reply")
            code = line_code
            text = match.group(3).decode("utf-8", errors="replace")
            separator = match.group(2).decode()
            if separator == "" and text:
                raise BadReply(f"Bad response from remote host: malformed line {_clean(_preview(raw))!r}")
            lines.append(_clean(f"{line_code}{separator or ' '}{text}".rstrip()))
            self._trace(f"<<< {lines[-1]}")
            if separator != "-":
                return Reply(code, tuple(lines))
            if len(lines) >= MAX_REPLY_LINES:
                raise BadReply(f"Bad response from remote host: more than {MAX_REPLY_LINES} lines in one reply")

    async def _read_line(self) -> bytes:
        buffer = self.connection.buffer
        searched = 0
        while (end := buffer.find(b"\n", searched)) < 0:
            if len(buffer) > MAX_REPLY_LINE:
                raise BadReply(f"Bad response from remote host: reply line longer than {MAX_REPLY_LINE} bytes")
            searched = len(buffer)
            if not await self._receive():
                if buffer:
                    raise ClientError("Connection closed unexpectedly (inside a reply line)")
                raise ClientError("Connection closed unexpectedly")
        if end >= MAX_REPLY_LINE:
            raise BadReply(f"Bad response from remote host: reply line longer than {MAX_REPLY_LINE} bytes")
        raw = bytes(buffer[:end])
        del buffer[:end + 1]
        return raw.rstrip(b"\r")

    async def _receive(self) -> int:
        try:
            return await asyncio.wait_for(self.connection.receive(), self.timeout)
        except TimeoutError:
            self._timed_out()
            raise ClientError("Connection timeout") from None
        except ssl.SSLError as error:
            raise ClientError(f"TLS error: {error.reason or error}") from None
        except OSError as error:
            raise ClientError(f"Connection error: {error.strerror or error}") from None

    # -- commands -----------------------------------------------------------------------------------------
    async def command(self, line: str, *, secret: bool = False, in_step: bool = True,
                      then: tuple[str, ...] = ()) -> Reply:
        """Send one command line and read its reply. ``then``: a report (event and fields) made once the line is
        sent, before its reply is read (link-identify after EHLO, tx-envelope after RCPT, as 6.8 orders them)."""
        if "\r" in line or "\n" in line:
            raise ClientError("refusing to send a command containing a line break")
        self._trace(">>> " + (_hidden(line) if secret else line))
        if self.reports is not None:
            self.reports("protocol-client", masked(line) if secret else line)
        await self._write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        if then and self.reports is not None:
            self.reports(*then)
        return await self._only_reply() if in_step else await self.read_reply()

    async def _only_reply(self) -> Reply:
        """One reply, and nothing after it: we never pipeline, so a line the server sent beyond its reply (a
        banner of several "220 " lines, an answer before the end of the message) would be read as the answer to
        our next command, and every answer after it would be one step late (a DATA answered by the RCPT's 250:
        the message "delivered" without being sent)."""
        reply = await self.read_reply()
        self.check_in_step()
        return reply

    def has_unread(self) -> bool:
        """Whether the server sent something we have not read (a session out of step, or closing)."""
        return bool(self.connection.buffer)

    def check_in_step(self) -> None:
        if self.has_unread():
            raise BadReply("Bad response from remote host: it sent more than one reply (session out of step)")

    async def _write(self, data: bytes) -> None:
        try:
            self.connection.write(data)
            await asyncio.wait_for(self.connection.drain(), self.timeout)
        except TimeoutError:
            self._timed_out()
            raise ClientError("Connection timeout") from None
        except (OSError, ssl.SSLError) as error:
            raise ClientError(f"Connection error: {error}") from None

    async def greeting(self) -> Reply:
        return await self._only_reply()

    async def hello(self, name: str) -> Reply:
        """EHLO (LHLO for LMTP), falling back to HELO when EHLO is refused with 5xx (SMTP only)."""
        if self.lmtp:
            reply = await self.command(f"LHLO {name}", then=("link-identify", "LHLO", name))
        else:
            reply = await self.command(f"EHLO {name}", then=("link-identify", "EHLO", name))
            if reply.code >= 500:
                self.extensions = Extensions()
                return await self.command(f"HELO {name}", then=("link-identify", "HELO", name))
        if reply.is_ok:
            self.extensions = Extensions.from_ehlo(reply)
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        reply = await self.command("STARTTLS", in_step=False)
        if reply.code != 220:
            return reply
        # Anything the server sent after its 220 and before the handshake is discarded (STARTTLS injection).
        self.connection.buffer.clear()
        try:
            await asyncio.wait_for(self.connection.start_tls(context, self.timeout, server_hostname=server_hostname,
                                                             server_side=False), self.timeout)
        except TimeoutError:
            raise ClientError("TLS handshake timeout") from None
        except ssl.SSLCertVerificationError as error:
            raise CertificateRejected(f"TLS certificate verification failed: {error.verify_message}") from None
        except (ssl.SSLError, OSError) as error:
            raise ClientError(f"TLS handshake failed: {_reason(error)}") from None
        self._note_tls(context)
        self.extensions = Extensions()
        self.report_tls()
        return reply

    def report_tls(self) -> None:
        if self.reports is not None:
            self.reports("link-tls", tls_text(self.connection.get_extra_info("ssl_object")))

    async def auth(self, username: str, password: str) -> Reply:
        """AUTH PLAIN, or LOGIN when the server offers that and not PLAIN (the caller checked it offers one)."""
        mechanisms = self.extensions.auth_mechanisms()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            return await self.command(f"AUTH PLAIN {token}", secret=True)
        reply = await self.command("AUTH LOGIN")
        if reply.code != 334:
            return reply
        reply = await self.command(base64.b64encode(username.encode()).decode(), secret=True)
        if reply.code != 334:
            return reply
        return await self.command(base64.b64encode(password.encode()).decode(), secret=True)

    async def mail_from(self, sender: str, params: list[str]) -> Reply:
        return await self.command(" ".join([f"MAIL FROM:<{sender}>", *params]))

    async def rcpt_to(self, rcpt: str) -> Reply:
        return await self.command(f"RCPT TO:<{rcpt}>")

    async def data(self, message_lines: AsyncIterator[bytes], recipients: int) -> list[Reply]:
        """DATA, the dot-stuffed message, and the final reply (one per accepted recipient with LMTP).

        Returns [the refusal] when the server does not answer 354."""
        reply = await self.begin_data()
        if reply.code >= 400:
            return [reply]
        return await self.send_message(message_lines, recipients)

    async def begin_data(self) -> Reply:
        """DATA: 354, or the server's refusal (4xx, 5xx)."""
        reply = await self.command("DATA")
        if reply.code != 354 and reply.code < 400:
            # Only 354 lets the message go: a 2xx here is no delivery (nothing was sent), and a session where
            # DATA gets some other answer is out of step.
            raise BadReply(f"Bad response from remote host: DATA answered with {_clean(reply.lines[-1][:80])!r}")
        return reply

    async def send_message(self, message_lines: AsyncIterator[bytes], recipients: int) -> list[Reply]:
        """After DATA's 354: the message (already in wire form, dot-stuffed), the end marker, and the final
        reply, or with LMTP one per accepted recipient (RepliesCut if the session ends among those)."""
        buffer = bytearray()
        self.sent_size = 0
        async for chunk in message_lines:
            buffer += chunk
            self.sent_size += len(chunk)
            if len(buffer) >= CHUNK:
                await self._write(bytes(buffer))
                buffer.clear()
        buffer += b".\r\n"
        if self.reports is not None:  # (the message's own lines are not reported; its end is)
            self.reports("protocol-client", ".")
        await self._write(bytes(buffer))
        self._trace(">>> [message] .")
        count = recipients if self.lmtp else 1
        replies: list[Reply] = []
        try:
            for _ in range(count):
                replies.append(await self.read_reply())
        except ClientError as error:
            if replies:  # (LMTP) the recipients already answered for must not be delivered again on retry
                raise RepliesCut(replies, error.args[0]) from error
            raise
        # These replies are final even if the server sent more after them (out of step from here on): taken back
        # as a failure, a message the server accepted would be sent again. The pool does not reuse a session with
        # unread bytes (has_unread).
        return replies

    async def rset(self) -> Reply:
        return await self.command("RSET")

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.command("QUIT"), min(self.timeout, 5))
        except (ClientError, TimeoutError):
            pass
        await self.close()

    async def close(self) -> None:
        try:
            self.connection.close()
            await asyncio.wait_for(self.connection.wait_closed(), 2)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            pass
        if self.reports is not None:  # (every end of a session comes here; told once)
            self.reports.disconnected()

    @property
    def closed(self) -> bool:
        return self.connection.closed

    def get_extra_info(self, name: str) -> object:
        return self.connection.get_extra_info(name)

    def _timed_out(self) -> None:
        if self.reports is not None:
            self.reports("timeout")

    def _trace(self, text: str) -> None:
        if trace.wants(self.subsystem):
            trace.emit(self.subsystem, f"{self.session_id}: {text}", session=self.session_id, peer=self.peer)


def _hidden(line: str) -> str:
    """An AUTH line for the trace: the command and mechanism, never a credential."""
    words = line.split(" ")
    if words[0].upper() == "AUTH":
        return " ".join(words[:2]) + " ..."
    return "..."


def _reason(error: BaseException) -> str:
    """What went wrong, never empty: asyncio reports a connection the server closed during the TLS handshake as a
    ConnectionResetError without arguments (the errorline said `TLS handshake failed: ` and nothing more)."""
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
    return reason or "connection closed by the remote host"


def _preview(raw: bytes) -> str:
    return raw[:80].decode("utf-8", errors="replace")


async def stuffed_lines(path: str) -> AsyncIterator[bytes]:
    """The spool's message file (LF line endings, dot-unstuffed) as CRLF lines, dot-stuffed for DATA."""
    loop = asyncio.get_running_loop()
    handle = await loop.run_in_executor(None, codec.open_message, path)
    try:
        pending = b""
        while True:
            block = await loop.run_in_executor(None, handle.read, CHUNK)
            if not block:
                break
            pending += block
            *complete, pending = pending.split(b"\n")
            yield b"".join(_wire_line(line) for line in complete)
        if pending:
            yield _wire_line(pending)
    finally:
        handle.close()


def _wire_line(line: bytes) -> bytes:
    line = line.rstrip(b"\r")
    if line.startswith(b"."):
        line = b"." + line
    return line + b"\r\n"
