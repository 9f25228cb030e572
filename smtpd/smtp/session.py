"""One SMTP session: OpenSMTPD's states on asyncio streams (reference §7).

States (as the `smtp` traces name them): STATE_NEW -> STATE_CONNECTED (banner sent) -> STATE_TLS (STARTTLS
handshake) -> STATE_HELO (identified) -> STATE_AUTH_* (AUTH exchange) -> STATE_BODY (DATA/BDAT) -> STATE_QUIT.

Framing differs from OpenSMTPD on purpose, because we offer PIPELINING: a command line ends only at CRLF (a
bare LF is refused, it never ends or starts a command); DATA ends only at CRLF.CRLF and a message holding a
bare CR or LF is refused whole (docs/smtp.md, "SMTP smuggling"). Input is read in large blocks into one buffer;
commands are taken from it one at a time, so pipelined commands are answered in order and replies are flushed
when the buffer holds no further complete command. Anything buffered after STARTTLS is a command injection
attempt (CVE-2011-0411 class): the session is dropped.

A session keeps the config snapshot it began with; a reload affects only new sessions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import pwd
import re
import resource
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from shared.ids import format_evpid, format_msgid, new_evpid, new_session_id
from shared.numbers import ascii_digits
from smtpd import log, trace
from smtpd.config.model import AuthMode, Listener, TlsMode
from smtpd.lookup.facts import SessionFacts
from smtpd.lookup.tables.base import Service, TableError
from smtpd.queue.envelope import EXPANDED_FLAG, DsnNotify, Envelope, shared_flags
from smtpd.queue.store import QueueError
from smtpd.smtp import address as addr
from smtpd.smtp import proxy_header, replies, tls
from smtpd.smtp.auth import AuthResult, authenticate
from smtpd.smtp.connection import Connection
from smtpd.smtp.filters import PROCEED, FilterDecision, FilterFacts, builtin_decision, reply_of, run_phase
from smtpd.smtp.headers import MessageBuilder, received_header
from smtpd.smtp.processes import Chain, DataLineStream, FilterFailure, ProcessorSet, report_line
from smtpd.smtp.replies import Reply
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.smtp.listener import Endpoint, SmtpServer

LINE_MAX_BYTES = 65535
COMMAND_MAX = 2048
DATA_PROGRESS_BYTES = 64 * 1024
MAX_BAD_COMMANDS = 20
MAX_AUTH_FAILURES = 3

_log = log.get("smtp")


@dataclass(frozen=True)
class SessionLimits:
    """Timeouts in seconds. ``timeout``: a whole command line, or each 64 KiB of message data, must arrive
    within it (so a client dribbling bytes cannot hold a slot); ``lifetime``: the longest a session may last."""

    timeout: float = 300.0
    lifetime: float = 3600.0
    max_sessions: int = 1000

    @classmethod
    def from_environment(cls) -> SessionLimits:
        def number(name: str, default: float) -> float:
            try:
                return float(os.environ.get(name, default))
            except ValueError:
                return default

        return cls(timeout=number("SMTPD_SMTP_TIMEOUT", 300.0), lifetime=number("SMTPD_SMTP_LIFETIME", 3600.0),
                   max_sessions=min(int(number("SMTPD_SMTP_MAX_SESSIONS", 1000)), sessions_open_files_allow()))


# Descriptors kept back from SMTP sessions: the control socket and its clients, the queue's files, deliveries'
# pipes, the log. A session may hold two (its socket, and its message's file while DATA runs).
FD_RESERVE = 32


def sessions_open_files_allow() -> int:
    """How many sessions the open-files limit leaves room for: without this bound, a flood of clients took every
    descriptor and root's smtpctl could not connect any more (nor the queue open a file)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (soft - FD_RESERVE) // 2)


class _Close(Exception):
    """End the session (after the reply that says why, if any); ``reason`` goes to the disconnect log."""

    def __init__(self, reason: str = "disconnect") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Recipient:
    address: addr.Mailaddr
    parameters: addr.RcptParameters
    deliveries: list[Envelope]


@dataclass
class _Transaction:
    sender: addr.Mailaddr
    parameters: addr.MailParameters
    recipients: list[_Recipient] = field(default_factory=list)
    message: Any = None  # the queue's IncomingMessage once DATA/BDAT began
    builder: MessageBuilder | DataLineStream | None = None
    bdat_used: bool = False
    mail_from: str = ""  # the address of MAIL FROM as the client wrote it (the filters' `mail-from`)
    junk: bool = False  # a filter said junk in this transaction: X-Spam: Yes
    # Its envelopes counted in `scheduler.envelope.incoming` (OpenSMTPD's gauge of the envelopes of messages
    # being received: up at each accepted RCPT, down when the message is committed or dropped).
    incoming: int = 0
    # Its msgid, taken at MAIL FROM when filter processes get the session's reports (they are told it then).
    msgid: int | None = None


class Session:
    def __init__(self, server: SmtpServer, endpoint: Endpoint, connection: Connection, *,
                 local_user: str | None = None) -> None:
        self.server = server
        self.daemon = server.daemon
        self.config = server.daemon.config
        # The tables of the same snapshot: a reload swaps daemon.tables, and this session keeps the ones its
        # config's rules, actions and listener name (a table the reload renamed, removed or re-read is not seen).
        self.tables = server.daemon.tables
        if self.tables is not None:
            self.tables.hold()  # released at the end of run()
        # The filter processes of the same snapshot, and this listener's chain of them (None: it runs none).
        processors: ProcessorSet | None = getattr(server.daemon, "processors", None)
        self.processors = processors.hold() if processors is not None else None
        self.chain: Chain | None = processors.chain(self.config, endpoint.listener.filter) \
            if processors is not None else None
        self.endpoint = endpoint
        self.listener: Listener = endpoint.listener
        self.limits = server.limits
        self.connection = connection
        self.id = new_session_id()
        self.token = f"{self.id:016x}"
        self.buffer = connection.buffer  # filled by the connection, consumed from the front here
        self.state = "STATE_NEW"
        self.local = local_user is not None
        self.started = time.monotonic()
        # who the client is
        self.client_ip = "local" if self.local else ""
        self.client_port = 0
        self.rdns: str | None = None
        # forward-confirmed reverse DNS: "pass", "fail" or "error" (a lookup failed temporarily)
        self.fcrdns = "fail"
        self.smtpname = endpoint.smtpname
        self.helo: str | None = None
        self.esmtp = False
        self.secure = False
        self.tls_counter: str | None = None  # "smtp.smtps" or "smtp.tls" once counted; counted down at the end
        self.tls_text: str | None = None
        self.auth_user: str | None = local_user
        self.authenticated = self.local
        # counters
        self.mails = 0
        self.bad_commands = 0
        # The last MAIL was refused: the RCPTs and DATA a pipelining client sent behind it are no bad commands.
        self.mail_refused = False
        self.auth_failures = 0
        self.auth_command = "AUTH"  # the AUTH exchange's command, as its failed-command lines name it
        self.transaction: _Transaction | None = None
        self.disconnect_reason = "disconnect"
        self.junk = False  # a connect/helo/ehlo/auth filter said junk: every message gets X-Spam: Yes
        self.banner_sent = False  # a connect filter's rejection replaces the banner: HELO/EHLO are then refused
        self.link_connected = False  # link-connect was reported: link-disconnect will be
        self.last_mail_from: str | None = None  # kept after the transaction, as the filters see it
        # Bytes the client sent before our banner (a client must wait for it): HELO/EHLO among them get 503.
        self.early_bytes = 0
        self.line_was_early = False
        # message data progress (see _fill_message_data); reset for every DATA and BDAT
        self._data_deadline: float | None = None
        self._data_progress = 0
        # The idle timeout of command lines: one timer per session, moved on, instead of one set up and torn
        # down per line (see _wait_for_line).
        self._task: asyncio.Task[None] | None = None
        self._line_deadline = 0.0
        self._awaiting_line = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_expired = False
        self._local_listener: bool | None = None  # see _is_local_listener
        self._last_filter_code = 0  # the code of the last refusal by a filter (tx-rcpt's result)

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def client_text(self) -> str:
        """The client as HELO replies and Received print it: `1.2.3.4`, `::1`, or `local`."""
        return self.client_ip

    @property
    def sockaddr(self) -> str:
        if self.local:
            return "local"
        return f"[{self.client_ip}]" if ":" in self.client_ip else self.client_ip

    @property
    def dsn_offered(self) -> bool:
        return not self.listener.no_dsn

    def facts(self) -> SessionFacts:
        return SessionFacts(address=self.client_ip if not self.local else "local", rdns=self.rdns,
                            helo=self.helo or "", auth_user=self.auth_user if self.authenticated else None,
                            tls=self.secure, tag=self.listener.tag, listener_hostname=self.smtpname,
                            local_socket=self.local, fcrdns=self.fcrdns == "pass")

    # -- running -----------------------------------------------------------------------------------------------
    async def run(self, *, proxy: Any = None, smtps: bool = False) -> None:
        """Serve the session; ``proxy``: the ProxyData of a proxy-v2 listener's connection (read already)."""
        STATS.increment("smtp.session")
        self._task = asyncio.current_task()
        try:
            async with asyncio.timeout(self.limits.lifetime):
                await self._connect(proxy, smtps)
                await self._command_loop()
        except _Close as close:
            self.disconnect_reason = close.reason
        except TimeoutError:
            self._timed_out()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, EOFError):
            self.disconnect_reason = "disconnect"
        except asyncio.CancelledError:
            if self._idle_expired and self._task is not None and self._task.uncancel() == 0:
                self._timed_out()  # our own idle timer, not a shutdown
                return
            self.disconnect_reason = "shutdown"
            await self._send_quietly(replies.shutting_down(self.smtpname))
            raise
        except Exception:  # noqa: BLE001 — the daemon never dies of one session's input
            _log.exception("%s smtp session failed", self.token)
            await self._send_quietly(replies.INTERNAL_ERROR)
            self.disconnect_reason = "error"
        finally:
            try:
                await self._cleanup()
            finally:
                if self.tables is not None:
                    self.tables.release()
                if self.processors is not None:
                    self.processors.release()

    def _timed_out(self) -> None:
        self.disconnect_reason = "timeout"
        self._report("timeout")
        if trace.wants("io"):
            self._trace_io("timeout", timeout=self.limits.timeout)

    async def _connect(self, proxy: Any, smtps: bool) -> None:
        if not self.local:
            peer = self.connection.get_extra_info("peername") or ("", 0)
            self.client_ip, self.client_port = str(peer[0]).split("%")[0], int(peer[1])
            source = proxy_header.source(proxy) if proxy is not None else None
            if source is not None:
                self.client_ip, self.client_port = source
        if self.server.active > self.limits.max_sessions:
            # Checked before the DNS, so that a flood costs no lookups (its host is not known: `<unknown>`); the
            # connected line still says who it was, and opens the session its disconnected line closes.
            _log.info("%s smtp connected address=%s host=<unknown>", self.token, self.sockaddr)
            if not smtps:  # (an SMTPS client cannot read plaintext)
                await self.reply(replies.too_many_sessions(self.smtpname))
            raise _Close("too many sessions")
        if not self.local:
            family = "inet6" if ":" in self.client_ip else "inet4"
            STATS.increment(f"smtp.session.{family}")
            self.rdns, self.fcrdns = await self.server.client_names(self.client_ip)
            trace.emit("smtp", f"{self.token}: fcrdns={self.fcrdns} address={self.client_ip} "
                       f"host={self.rdns or '<unknown>'}", session=self.token, address=self.client_ip,
                       rdns=self.rdns or "", fcrdns=self.fcrdns)
        else:
            STATS.increment("smtp.session.local")
            # A local submission names itself after this host: nothing to confirm, it is trusted.
            self.rdns, self.fcrdns = self.daemon.mailname, "pass"
        trace.emit("smtp", f"{self.token}: connected to listener {self.endpoint.token} "
                   f"[hostname={self.smtpname}, port={self.endpoint.port}, tag={self.listener.tag or ''}]",
                   session=self.token, address=self.client_ip)
        _log.info("%s smtp connected address=%s host=%s", self.token, self.sockaddr if not self.local else "local",
                  self.rdns or "<unknown>")
        if trace.wants("io"):
            self._trace_io(f"connection opened from {self.sockaddr} port {self.client_port}", port=self.client_port)
        # Reported before an SMTPS handshake, as 6.8 does: link-tls follows, and a failed handshake is a
        # link-disconnect of a session the filters know. (The connect phase waits for TLS: its refusal is readable.)
        if self.chain is not None:
            self._report("link-connect", self.rdns or "<unknown>", self.fcrdns, *self._link_ends())
        self.link_connected = True
        if smtps:
            await self._start_tls()
            self._count_tls("smtp.smtps")
        self._set_state("STATE_CONNECTED")
        self.early_bytes = len(self.buffer) + self.connection.unread()
        if await self._filter("connect", "", argument=(self.rdns or "<unknown>", self.client_ip)) is None:
            return  # the rejection was the greeting
        self.banner_sent = True
        await self.reply(replies.banner(self.smtpname))
        self._report("link-greeting", self.smtpname)

    def _link_ends(self) -> tuple[str, str]:
        """The client's and our end of the connection, as link-connect reports them (`127.0.0.1:33018`)."""
        if self.local:
            where = f"unix:{self.daemon.paths.socket}"
            return where, where
        ours = self.connection.get_extra_info("sockname") or ("", 0)
        address = str(ours[0]).split("%")[0]
        return (f"{self.sockaddr}:{self.client_port}",
                f"{f'[{address}]' if ':' in address else address}:{ours[1]}")

    def _report(self, event: str, *fields: str) -> None:
        """Tell the chain's filter processes registered for ``event`` (docs/filters.md); nothing without them."""
        chain = self.chain
        if chain is None:
            return
        line = None
        for processor in chain.reporters:
            if event in processor.reports:
                if line is None:
                    line = report_line(event, self.token, fields)
                processor.report(line)

    def _count_tls(self, key: str) -> None:
        """smtp.smtps and smtp.tls count the sessions secured now, as smtp.session counts those open."""
        STATS.increment(key)
        self.tls_counter = key

    async def _cleanup(self) -> None:
        STATS.decrement("smtp.session")
        if self.tls_counter is not None:
            STATS.decrement(self.tls_counter)
            self.tls_counter = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if trace.wants("io"):
            self._trace_io(f"connection closed ({self.disconnect_reason})", reason=self.disconnect_reason)
        await self._abort_transaction()
        self._set_state("STATE_QUIT")
        if self.link_connected:  # (not for a client turned away before: the filters never heard of it)
            self._report("link-disconnect")
        reason = self.disconnect_reason
        if not reason.replace("-", "").isalnum():  # a value of several words is quoted, as OpenSMTPD's io-error one
            reason = '"' + reason.replace('"', "'") + '"'
        _log.info("%s smtp disconnected reason=%s", self.token, reason)
        try:
            self.connection.close()
            await asyncio.wait_for(self.connection.wait_closed(), 5)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 — the peer may be long gone
            pass
        # Input left unread (a client that pipelined up to the read limit, 1 MiB, then went away) is freed now:
        # the session's objects refer to each other and would otherwise wait for a full garbage collection,
        # which the daemon's collector settings make rare, so such clients made the daemon grow by their
        # buffers, wave after wave.
        try:
            self.buffer.clear()
        except BufferError:  # (a view still exported: left to the collector)
            pass

    async def _send_quietly(self, reply: Reply) -> None:
        try:
            self.connection.write(reply.wire())
            await asyncio.wait_for(self.connection.drain(), 2)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001
            pass

    def _set_state(self, state: str) -> None:
        if state != self.state:
            if trace.wants("smtp"):
                trace.emit("smtp", f"{self.token}: {self.state} -> {state}", session=self.token, state=state)
            self.state = state

    # -- reading -------------------------------------------------------------------------------------------------
    async def _fill(self) -> None:
        """Wait for more input in self.buffer (the connection appends to it)."""
        received = await self.connection.receive()
        if trace.wants("io"):
            self._trace_io(f"read {received} bytes" if received else "EOF", size=received)
        if not received:
            raise _Close("disconnect")

    async def _fill_message_data(self) -> None:
        """Read message data. Each 64 KiB must arrive within the timeout (not each read, which may bring one
        byte), so a client trickling its message cannot hold the session. The deadline is kept by the idle
        timer of command lines (no timer set up and torn down per read)."""
        loop = asyncio.get_running_loop()
        if self._data_deadline is None:
            self._data_deadline = loop.time() + self.limits.timeout
        before = len(self.buffer)
        self._line_deadline = self._data_deadline
        await self._wait_for_line()
        self._data_progress += len(self.buffer) - before
        if self._data_progress >= DATA_PROGRESS_BYTES:
            self._data_progress = 0
            self._data_deadline = loop.time() + self.limits.timeout

    async def read_line(self, secret: bool = False) -> str:
        """The next command line (without CRLF), within the idle timeout. ``secret``: an AUTH response, which
        is never traced nor logged."""
        while True:
            raw = await self._next_raw_line()
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            elif not self.local:
                # A bare LF never ends a command line: answer it as an error and do not act on its text.
                text = raw.decode("utf-8", "surrogateescape")
                self._trace_input(text, secret=secret)
                await self._error(replies.BARE_LF_COMMAND, self.auth_command if secret else _masked(text)[:64])
                continue
            if len(raw) >= COMMAND_MAX:
                await self._bad_input(replies.COMMAND_TOO_LONG)
                raise _Close("command too long")
            return raw.decode("utf-8", "surrogateescape")

    async def _line_too_long_close(self) -> NoReturn:
        """A line of LINE_MAX_BYTES or more, in a command or in the data: the reference's reply, then the end."""
        await self._bad_input(replies.LINE_TOO_LONG)
        raise _Close("line too long")

    async def _bad_input(self, reply: Reply) -> None:
        """Input that ends the session, as a line too long: the reply, logged as OpenSMTPD logs it (`smtp
        bad-input result="..."`, no command: the line is not one), that log tools count as a failure."""
        _log.info('%s smtp bad-input result="%s"', self.token, reply)
        await self.reply(reply)

    async def _next_raw_line(self) -> bytes:
        """Bytes up to the next LF (excluded); the whole line must arrive within the timeout."""
        end = self.buffer.find(b"\n")
        if end < 0:
            self._line_deadline = asyncio.get_running_loop().time() + self.limits.timeout
            while end < 0:
                if len(self.buffer) >= LINE_MAX_BYTES:
                    await self._line_too_long_close()
                await self._wait_for_line()
                end = self.buffer.find(b"\n")
        if end >= LINE_MAX_BYTES:
            await self._line_too_long_close()
        raw = bytes(self.buffer[:end])
        self.line_was_early = self.early_bytes > 0
        if self.line_was_early:  # (zero after the first lines of a session)
            self.early_bytes = max(0, self.early_bytes - end - 1)
        del self.buffer[:end + 1]
        return raw

    async def _wait_for_line(self) -> None:
        """Read more input (a command line, or message data); it must arrive by _line_deadline."""
        timer = self._idle_timer
        # A timer moved on while no read was waiting may come later than a message-data deadline: bring it back.
        if timer is None or timer.when() > self._line_deadline:
            if timer is not None:
                timer.cancel()
            self._idle_timer = asyncio.get_running_loop().call_at(self._line_deadline, self._check_idle)
        self._awaiting_line = True
        try:
            await self._fill()
        finally:
            self._awaiting_line = False

    def _check_idle(self) -> None:
        """The idle timer: cancel the session if a line is overdue, else come back at the next deadline."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._awaiting_line and now >= self._line_deadline and self._task is not None:
            self._idle_timer = None
            self._idle_expired = True
            self._task.cancel()
            return
        when = self._line_deadline if self._awaiting_line else now + self.limits.timeout
        self._idle_timer = loop.call_at(when, self._check_idle)

    def _trace_input(self, line: str, secret: bool = False) -> None:
        if trace.wants("smtp"):
            shown = "********" if secret else _masked(line)
            trace.emit("smtp", f"{self.token}: <<< {shown}", session=self.token)

    def _trace_io(self, text: str, **fields: Any) -> None:
        trace.emit("io", f"{self.token}: {text}", session=self.token, address=self.client_ip, **fields)

    async def _filter(self, phase: str, line: str | None, *, helo: str | None = None,
                      rcpt_to: str | None = None, argument: tuple[str, ...] = ("",)) -> FilterDecision | None:
        """Run the listener's filters of ``phase``: builtin ones (smtpd/smtp/filters.py) and filter processes
        (smtpd/smtp/processes.py; ``argument`` is what they are sent). None: they refused, the reply is sent
        (and the session closed for disconnect); otherwise proceed, junk (marked here) or rewrite."""
        if not self.listener.filter:
            return PROCEED
        facts = FilterFacts(address="local" if self.local else self.client_ip, rdns=self.rdns,
                            fcrdns=self.fcrdns == "pass", helo=helo if helo is not None else self.helo,
                            auth_user=self.auth_user if self.authenticated else None,
                            mail_from=self.transaction.mail_from if self.transaction is not None
                            else self.last_mail_from, rcpt_to=rcpt_to)
        if self.chain is not None:
            decision = await self._run_chain(self.chain, phase, facts, argument)
            self._report("filter-response", "connected" if phase == "connect" else phase,
                         *_response_fields(decision))
        else:
            arguments = (self.config, self.tables, self.listener.filter, phase, facts, self.token)
            if self.tables is not None and self.tables.lookups_may_block():
                decision = await asyncio.to_thread(run_phase, *arguments)
            else:
                decision = run_phase(*arguments)
        if decision.decision == "junk":
            # Before MAIL FROM it marks the session, after it the transaction (mail-from: cmd_mail does it).
            if self.transaction is not None:
                self.transaction.junk = True
            elif phase != "mail-from":
                self.junk = True
        if decision.decision not in ("reject", "disconnect", "tempfail"):
            return decision
        self._last_filter_code = decision.code
        _log.info("%s smtp filter-response phase=%s filter=%s response=%s result=\"%d %s\"", self.token, phase,
                  decision.filter, decision.decision, decision.code, log.visible(decision.text))
        await self.reply(Reply(decision.code, decision.text), command=line)
        if decision.code == 421 or decision.decision == "disconnect":
            raise _Close("filter")
        return None

    async def _run_chain(self, chain: Chain, phase: str, facts: FilterFacts,
                         argument: tuple[str, ...]) -> FilterDecision:
        """A chain with filter processes, member by member. The first filter that decides anything but
        proceed ends the phase, a process as a builtin filter (6.8: a rewrite is not passed on either)."""
        may_block = self.tables is not None and self.tables.lookups_may_block()
        for item, processor in chain.members:
            if processor is None:
                if item.kind != "phase" or item.phase != phase:
                    continue
                arguments = (item, self.tables, phase, facts, self.token)
                builtin = await asyncio.to_thread(builtin_decision, *arguments) if may_block \
                    else builtin_decision(*arguments)
                if builtin is not None and builtin.decision == "report":
                    # 6.8 tells the processes what the builtin filter reports, and the chain goes on
                    self._report("filter-report", "builtin", item.name, builtin.text)
                elif builtin is not None:
                    return builtin
                continue
            if phase not in processor.phases:
                continue
            try:
                word, text = await processor.ask(phase, self.token, argument)
            except FilterFailure as error:
                _log.warning("%s smtp: %s", self.token, error)
                return _filter_failed(phase, item.name)
            trace.emit("filters", f"{self.token}: filters phase={phase}, action={word}, filter={item.name}"
                       + (f", response={text}" if text else ""), session=self.token, phase=phase,
                       filter=item.name, decision=word)
            if word == "proceed":
                continue
            if word == "junk":
                return FilterDecision("junk", filter=item.name)
            if word == "rewrite":
                return FilterDecision("rewrite", text=text, filter=item.name)
            if word in ("reject", "disconnect"):
                code, reply_text = reply_of(text)
                return FilterDecision("disconnect" if code == 421 else word, code, reply_text, item.name)
            _log.warning("%s smtp: filter process %s answered %r, which is no filter result", self.token,
                         processor.name, word[:64])
            return _filter_failed(phase, item.name)
        return PROCEED

    def _trace_committed(self, msgid: str, envelopes: list[Envelope]) -> None:
        if trace.wants("imsg"):
            evpids = [format_evpid(envelope.evpid) for envelope in envelopes]
            trace.emit("imsg", f"{self.token}: smtp -> queue: message {msgid} committed, {len(evpids)} envelope(s)",
                       session=self.token, msgid=msgid, evpids=evpids)

    # -- writing ---------------------------------------------------------------------------------------------------
    async def reply(self, reply: Reply, *, command: str | None = None) -> None:
        self._write_reply(reply, command)
        await self._drain_replies()

    def _write_reply(self, reply: Reply, command: str | None = None) -> None:
        wire = reply.wire()
        if self.chain is not None:
            for line in str(reply).split("\n"):
                self._report("protocol-server", line)
        # Held while another pipelined command line waits: the group's replies then leave in one segment.
        self.connection.write(wire, hold=b"\n" in self.buffer)
        if trace.wants("io"):
            self._trace_io(f"write {len(wire)} bytes", size=len(wire))
        if trace.wants("smtp"):
            for line in str(reply).split("\n"):
                trace.emit("smtp", f"{self.token}: >>> {line}", session=self.token, code=reply.code)
        if reply.failed and command is not None:
            # (a reply may repeat what the client sent: made visible as the command is)
            _log.info('%s smtp failed-command command="%s" result="%s"', self.token, log.visible(command),
                      log.visible(str(reply).split("\n")[0]))

    async def _drain_replies(self) -> None:
        # Flush when no further pipelined command waits (RFC 2920: replies may be grouped), or when a client
        # that pipelines without reading has let replies pile up.
        # An empty write buffer means the kernel took it all: nothing to wait for.
        pending = self.connection.pending_output()
        if pending and (b"\n" not in self.buffer or pending > 65536):
            async with asyncio.timeout(self.limits.timeout):
                await self.connection.drain()

    async def _out_of_sequence(self, line: str) -> None:
        """RCPT, DATA or BDAT without a transaction: a bad command, unless it follows a refused MAIL."""
        if self.mail_refused:
            await self.reply(replies.BAD_SEQUENCE, command=line)
        else:
            await self._error(replies.BAD_SEQUENCE, line)

    async def _error(self, reply: Reply, command: str) -> None:
        """A client error: reply, and close after too many of them."""
        await self.reply(reply, command=command)
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            await self.reply(replies.too_many_errors(self.smtpname))
            raise _Close("too many errors")

    # -- the command loop --------------------------------------------------------------------------------------------
    async def _command_loop(self) -> None:
        handlers = {
            "HELO": self.cmd_helo, "EHLO": self.cmd_ehlo, "STARTTLS": self.cmd_starttls, "AUTH": self.cmd_auth,
            "MAIL FROM": self.cmd_mail, "RCPT TO": self.cmd_rcpt, "DATA": self.cmd_data, "BDAT": self.cmd_bdat,
            "RSET": self.cmd_rset, "NOOP": self.cmd_noop, "QUIT": self.cmd_quit, "HELP": self.cmd_help,
            "WIZ": self.cmd_wiz,
        }
        while True:
            line = await self.read_line()
            if self.connection.closed:
                # Gone, with commands still in the buffer (pipelined up to the read limit): answering them would
                # only fill the log with asyncio's warnings about writes to a closed socket.
                raise _Close("disconnect")
            self._trace_input(line)
            verb, argument = split_command(line)
            if self.chain is not None:  # (an AUTH line's credentials are not told)
                self._report("protocol-client", _masked(line))
            handler = handlers.get(verb)
            if handler is None:
                await self._error(replies.UNKNOWN_COMMAND, line)
                continue
            await handler(argument, line)

    # -- commands ----------------------------------------------------------------------------------------------------
    async def _no_arguments(self, argument: str, line: str) -> bool:
        if argument:
            await self._error(replies.NO_ARGUMENTS, line)
            return False
        return True

    async def cmd_noop(self, argument: str, line: str) -> None:
        if await self._no_arguments(argument, line):
            self._report("filter-response", "noop", "proceed")
            await self.reply(replies.NOOP_OK)

    async def cmd_help(self, argument: str, line: str) -> None:
        if await self._no_arguments(argument, line):
            await self.reply(replies.HELP)

    async def cmd_wiz(self, argument: str, line: str) -> None:
        if await self._no_arguments(argument, line):
            await self._error(replies.WIZ, line)

    async def cmd_quit(self, argument: str, line: str) -> None:
        if await self._no_arguments(argument, line):
            self._report("filter-response", "quit", "proceed")
            await self.reply(replies.QUIT_OK)
            raise _Close("quit")

    async def cmd_rset(self, argument: str, line: str) -> None:
        if not await self._no_arguments(argument, line):
            return
        if self.helo is None:
            await self._error(replies.BAD_SEQUENCE, line)
            return
        self._report("filter-response", "rset", "proceed")
        self.mail_refused = False
        if self.chain is not None:  # (reported as 6.8 does: the reply, then the transaction's end)
            self._set_state("STATE_HELO")
            await self.reply(replies.RSET_OK)
            await self._abort_transaction()
            return
        await self._abort_transaction()
        self._set_state("STATE_HELO")
        await self.reply(replies.RSET_OK)

    async def cmd_helo(self, argument: str, line: str) -> None:
        await self._identify(argument, line, extended=False)

    async def cmd_ehlo(self, argument: str, line: str) -> None:
        await self._identify(argument, line, extended=True)

    async def _identify(self, argument: str, line: str, *, extended: bool) -> None:
        if self.line_was_early or not self.banner_sent:
            await self._error(replies.BAD_SEQUENCE, line)
            return
        if self.helo is not None:
            await self._error(replies.ALREADY_IDENTIFIED, line)
            return
        if not argument:
            await self._error(replies.EHLO_NEEDS_DOMAIN if extended else replies.HELO_NEEDS_DOMAIN, line)
            return
        # The whole argument is the name (trailing spaces aside), for EHLO as for HELO: `EHLO foo bar` was
        # taken as `foo`; OpenSMTPD refuses it.
        name = argument.rstrip(" ")
        if not addr.valid_helo(name):
            await self._error(replies.BAD_HELO_DOMAIN, line)
            return
        decision = await self._filter("ehlo" if extended else "helo", line, helo=name, argument=(name,))
        if decision is None:
            return
        if decision.decision == "rewrite":
            name = decision.text
            if not addr.valid_helo(name):
                await self._error(replies.BAD_HELO_DOMAIN, line)
                return
        self.helo, self.esmtp = name, extended
        self.mail_refused = False
        self._set_state("STATE_HELO")
        self._report("link-identify", "EHLO" if extended else "HELO", name)
        if extended:
            await self.reply(replies.ehlo_ok(self.smtpname, name, self.client_text, self.extensions()))
        else:
            await self.reply(replies.helo_ok(self.smtpname, name, self.client_text))

    def extensions(self) -> list[str]:
        offered = ["8BITMIME", "ENHANCEDSTATUSCODES", f"SIZE {self.config.smtp.max_message_size}"]
        if self.dsn_offered:
            offered.append("DSN")
        offered += ["PIPELINING", "CHUNKING", "SMTPUTF8"]
        if self.starttls_offered:
            offered.append("STARTTLS")
        if self.auth_offered:
            offered.append("AUTH PLAIN LOGIN")
        offered.append("HELP")
        return offered

    @property
    def starttls_offered(self) -> bool:
        return self.listener.tls in (TlsMode.STARTTLS, TlsMode.REQUIRE) and not self.secure and not self.local

    @property
    def auth_offered(self) -> bool:
        return self.listener.auth is not AuthMode.NONE and self.secure and not self.authenticated

    # -- STARTTLS ------------------------------------------------------------------------------------------------------
    async def cmd_starttls(self, argument: str, line: str) -> None:
        if self.helo is None or self.transaction is not None:
            await self._error(replies.BAD_SEQUENCE, line)
            return
        # OpenSMTPD's order: a listener without STARTTLS (smtps included) says so whatever the argument.
        if self.local or self.listener.tls not in (TlsMode.STARTTLS, TlsMode.REQUIRE):
            await self._error(replies.NOT_SUPPORTED, line)
            return
        if self.secure:
            await self._error(replies.ALREADY_SECURE, line)
            return
        if argument:
            await self._error(replies.NO_PARAMETERS_ALLOWED, line)
            return
        # Stop reading before answering: whatever is already buffered was sent before our 220 (a command
        # injection), and the client's TLS handshake stays in the socket for the TLS layer to read.
        self.connection.pause_reading()
        if self.buffer or self.connection.unread():
            trace.emit("smtp", f"{self.token}: data pipelined after STARTTLS, dropping the session",
                       session=self.token)
            raise _Close("data after starttls")
        await self.reply(replies.STARTTLS_OK)
        await self._start_tls()
        self._count_tls("smtp.tls")
        # STARTTLS resets the identification (RFC 3207): the client must say EHLO again.
        self.helo = None
        self.esmtp = False
        self._set_state("STATE_CONNECTED")

    async def _start_tls(self) -> None:
        """Upgrade the connection; reading must be paused since the last byte that was plaintext."""
        self._set_state("STATE_TLS")
        if self.endpoint.ssl_context is None:
            raise _Close("no tls context")
        try:
            await self.connection.start_tls(self.endpoint.ssl_context, self.limits.timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as error:
            trace.emit("smtp", f"{self.token}: TLS handshake failed: {error}", session=self.token)
            # Why, in the disconnect line (as 6.8's `io-error: ...`): a client that presents no certificate to
            # a `verify` listener, or only offers TLS 1.0, is found in the log without a trace.
            raise _Close(f"tls handshake failed: {_handshake_failure(error)}") from None
        self.secure = True
        self.tls_text = tls.describe(self.connection.get_extra_info("ssl_object"))
        # As OpenSMTPD 6.8: one line per secured session, `smtp tls ciphers=VERSION:CIPHER:BITS`, and the same
        # text in the link-tls report (`version=..., cipher=..., bits=...` is OpenSMTPD 7's).
        ciphers = ":".join((self.tls_text or "::").split(":")[:3])
        _log.info("%s smtp tls ciphers=%s", self.token, ciphers)
        self._report("link-tls", ciphers)
        if trace.wants("io"):
            ssl_object = self.connection.get_extra_info("ssl_object")
            version, cipher = ssl_object.version(), ssl_object.cipher()[0]
            self._trace_io(f"TLS handshake done: {version} {cipher}", tls_version=version, cipher=cipher)

    # -- AUTH ------------------------------------------------------------------------------------------------------------
    async def cmd_auth(self, argument: str, line: str) -> None:
        # What a refusal's failed-command line names: the line, its credentials masked (`AUTH PLAIN ********`),
        # then the step that failed, as OpenSMTPD names them (`AUTH LOGIN (password)`, `AUTH PLAIN (...)`).
        self.auth_command = _masked(line)
        if self.helo is None or self.transaction is not None:
            await self._error(replies.BAD_SEQUENCE, self.auth_command)
            return
        if self.authenticated:
            await self._error(replies.ALREADY_AUTHENTICATED, self.auth_command)
            return
        if not self.auth_offered:
            await self._error(replies.NOT_SUPPORTED, self.auth_command)
            return
        if not argument:
            await self._error(replies.AUTH_NO_PARAMETERS, self.auth_command)
            return
        if await self._filter("auth", self.auth_command) is None:
            return
        mechanism, initial = split_auth_argument(argument)
        self._set_state("STATE_AUTH_INIT")
        try:
            if mechanism.upper() == "PLAIN":
                credentials = await self._auth_plain(initial.strip())
            elif mechanism.upper() == "LOGIN":
                credentials = await self._auth_login(initial.strip())
            else:
                # (named in the reply: with a client's control bytes made visible, never a bare CR in a reply)
                await self._error(replies.auth_method_unsupported(log.visible(mechanism, white=True)),
                                  self.auth_command)
                return
            if credentials is None:
                await self._error(replies.AUTH_SYNTAX, self.auth_command)
                return
            await self._check_credentials(*credentials)
        finally:
            self._set_state("STATE_HELO")

    async def _auth_response(self, prompt: Reply, state: str) -> str:
        self._set_state(state)
        self.auth_command = _AUTH_STEPS[state]
        await self.reply(prompt)
        line = await self.read_line(secret=True)
        self._trace_input(line, secret=True)
        return line

    async def _auth_plain(self, initial: str) -> tuple[str, str] | None:
        if not initial:
            initial = await self._auth_response(replies.AUTH_CONTINUE_EMPTY, "STATE_AUTH_INIT")
        decoded = _b64decode(initial)
        if decoded is None or decoded.count(b"\0") != 2:
            return None
        authzid, user, password = decoded.split(b"\0")
        # An empty user name is no syntax error (OpenSMTPD checks it, and it fails: 535 after the delay).
        if authzid and authzid != user:
            # Acting as another user is not supported: make sure such a request can never succeed.
            password = b"\0"
        return user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")

    async def _auth_login(self, initial: str) -> tuple[str, str] | None:
        if not initial:
            initial = await self._auth_response(replies.AUTH_USERNAME_PROMPT, "STATE_AUTH_USERNAME")
        user = _b64decode(initial)
        if user is None:
            return None
        # (an empty user name, as an empty line: the password is asked for, then 535, as OpenSMTPD does)
        answer = await self._auth_response(replies.AUTH_PASSWORD_PROMPT, "STATE_AUTH_PASSWORD")
        password = _b64decode(answer)
        if password is None:
            return None
        return user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")

    async def _check_credentials(self, user: str, password: str) -> None:
        self._set_state("STATE_AUTH_FINALIZE")
        result = await authenticate(self.tables, self.listener.auth_table, user, password)
        _log.info("%s smtp authentication user=%s result=%s", self.token, log.visible(user, white=True),
                  result.value)
        self._report("link-auth", user, {AuthResult.OK: "pass", AuthResult.TEMPFAIL: "error"}.get(result, "fail"))
        if result is AuthResult.OK:
            self.auth_user, self.authenticated = user, True
            await self.reply(replies.AUTH_OK)
        elif result is AuthResult.TEMPFAIL:
            await self.reply(replies.AUTH_TEMPFAIL, command=self.auth_command)
        else:
            self.auth_failures += 1
            await self.reply(replies.AUTH_FAILED, command=self.auth_command)
            if self.auth_failures >= MAX_AUTH_FAILURES:
                await self.reply(replies.too_many_auth_failures(self.smtpname))
                raise _Close("too many authentication failures")

    # -- MAIL ---------------------------------------------------------------------------------------------------------------
    async def cmd_mail(self, argument: str, line: str) -> None:
        if self.transaction is None:
            self.mail_refused = True  # (until the transaction begins)
        if self.helo is None or self.transaction is not None:
            await self._error(replies.BAD_SEQUENCE, line)
            return
        if self.listener.tls is TlsMode.REQUIRE and not self.secure and not self.local:
            await self._error(replies.MUST_STARTTLS, line)
            return
        if self.listener.auth is AuthMode.REQUIRED and not self.authenticated:
            await self._error(replies.MUST_AUTH, line)
            return
        if self.mails >= self.config.smtp.max_mails:
            await self.reply(replies.TOO_MANY_MAILS, command=line)
            return
        parsed = await self._parse_mail(argument, line)
        if parsed is None:
            return
        inner = written = parsed[2]
        self.last_mail_from = inner
        decision = await self._filter("mail-from", line, argument=(inner,))
        if decision is None:
            return
        if decision.decision == "rewrite":
            parsed = await self._parse_mail(decision.text, line)
            if parsed is None:
                return
            self.last_mail_from = inner = parsed[2]
        sender, parameters, _ = parsed
        if not await self._sender_allowed(sender, line):
            return
        self.transaction = transaction = _Transaction(sender, parameters, mail_from=inner)
        self.mail_refused = False
        if decision.decision == "junk":
            transaction.junk = True
        if self.chain is None:
            await self.reply(replies.MAIL_OK)
            return
        try:  # filter processes are told the transaction's msgid from here on, as 6.8 tells them
            transaction.msgid = self.daemon.queue.reserve_msgid()
        except Exception:  # noqa: BLE001 — QueueError: no free id
            _log.warning("%s smtp: cannot take a message id", self.token, exc_info=True)
            self.transaction = None
            await self.reply(replies.TEMPORARY_FAILURE_CLOSE)
            raise _Close("queue failure") from None
        await self.reply(replies.MAIL_OK)
        msgid = format_msgid(transaction.msgid)
        self._report("tx-begin", msgid)
        self._report("tx-mail", msgid, "ok", written)

    async def _parse_mail(self, argument: str, line: str) -> tuple[addr.Mailaddr, addr.MailParameters, str] | None:
        """MAIL FROM's sender, parameters and address as written (None: refused, the reply is sent)."""
        # The address is judged before the parameters, as OpenSMTPD does: `MAIL FROM:<a b> X=1` is a sender
        # syntax error (553), not an unsupported option. Only SMTPUTF8's presence is needed for the address.
        try:
            inner, parameter_text = addr.split_path(argument)
            sender = addr.parse_path_address(inner, allow_null=True, default_domain=self.smtpname,
                                             utf8=self.esmtp and addr.asks_smtputf8(parameter_text))
        except addr.AddressError:
            await self._error(replies.SENDER_SYNTAX, line)
            return None
        try:
            parameters = addr.parse_mail_parameters(parameter_text, dsn=self.dsn_offered,
                                                    smtputf8_offered=self.esmtp)
        except addr.ParameterError as error:
            reply = replies.envid_too_large(error.value) if error.kind == "too-large" \
                else replies.unsupported_option(error.value)
            await self._error(reply, line)
            return None
        return sender, parameters, inner

    async def _sender_allowed(self, sender: addr.Mailaddr, line: str) -> bool:
        table = self.listener.senders_table
        if table is None or not self.authenticated or self.local:
            return True
        try:
            value = await asyncio.to_thread(self.tables.lookup, table, Service.MAILADDRMAP,
                                            self.auth_user or "")
        except TableError as error:
            _log.warning("%s smtp: temporary failure of the senders table <%s>: %s", self.token, table, error)
            await self.reply(replies.TEMPORARY_ERROR, command=line)
            return False
        if addr.may_send_as(addr.senders_patterns(value), sender, self.config.smtp.sub_addr_delim):
            return True
        await self.reply(replies.SENDER_REJECTED, command=line)
        return False

    # -- RCPT ------------------------------------------------------------------------------------------------------------------
    async def cmd_rcpt(self, argument: str, line: str) -> None:
        transaction = self.transaction
        if transaction is None:
            await self._out_of_sequence(line)
            return
        if transaction.message is not None:
            await self._error(replies.BAD_SEQUENCE, line)
            return
        if len(transaction.recipients) >= self.config.smtp.max_rcpt:
            await self.reply(replies.TOO_MANY_RCPTS, command=line)
            return
        parsed = await self._parse_rcpt(transaction, argument, line)
        if parsed is None:
            return
        written = parsed[2]
        try:
            decision = await self._filter("rcpt-to", line, rcpt_to=written, argument=(written,))
        except _Close:  # a disconnect: the recipient was refused too
            self._report_rcpt(transaction, written, self._last_filter_code)
            raise
        if decision is None:
            self._report_rcpt(transaction, written, self._last_filter_code)
            return
        if decision.decision == "rewrite":
            parsed = await self._parse_rcpt(transaction, decision.text, line)
            if parsed is None:
                return
        rcpt, parameters, _ = parsed
        refusal, deliveries = await self._expand(transaction.sender, rcpt)
        if refusal is not None:
            await self.reply(refusal, command=line)
            self._report_rcpt(transaction, written, refusal.code)
            return
        transaction.recipients.append(_Recipient(rcpt, parameters, deliveries))
        transaction.incoming += len(deliveries)
        STATS.increment("scheduler.envelope.incoming", len(deliveries))
        if transaction.msgid is not None:  # the evpids are told now: the queue keeps them
            self._report_envelopes(transaction, deliveries)
        await self.reply(replies.RCPT_OK)
        self._report_rcpt(transaction, written, 250)

    def _report_envelopes(self, transaction: _Transaction, deliveries: list[Envelope]) -> None:
        assert transaction.msgid is not None
        msgid = format_msgid(transaction.msgid)
        taken = {delivery.evpid for recipient in transaction.recipients for delivery in recipient.deliveries}
        for delivery in deliveries:
            evpid = new_evpid(transaction.msgid)
            while evpid in taken:
                evpid = new_evpid(transaction.msgid)
            taken.add(evpid)
            delivery.evpid = evpid
            self._report("tx-envelope", msgid, format_evpid(evpid))

    def _report_rcpt(self, transaction: _Transaction, written: str, code: int) -> None:
        if transaction.msgid is not None:
            result = "ok" if code < 400 else "tempfail" if code < 500 else "permfail"
            self._report("tx-rcpt", format_msgid(transaction.msgid), result, written)

    async def _parse_rcpt(self, transaction: _Transaction, argument: str,
                          line: str) -> tuple[addr.Mailaddr, addr.RcptParameters, str] | None:
        """RCPT TO's recipient, parameters and address as written (None: refused, the reply is sent)."""
        try:
            inner, parameter_text = addr.split_path(argument)
            rcpt = addr.parse_path_address(inner, allow_null=False, default_domain=self.smtpname,
                                           utf8=transaction.parameters.smtputf8)
        except addr.AddressError:
            await self._error(replies.RECIPIENT_SYNTAX, line)
            return None
        try:
            parameters = addr.parse_rcpt_parameters(parameter_text, dsn=self.dsn_offered,
                                                    utf8=transaction.parameters.smtputf8,
                                                    default_domain=self.smtpname)
        except addr.ParameterError as error:
            reply = {"never-combined": replies.NOTIFY_NEVER_COMBINED, "orcpt": replies.ORCPT_SYNTAX}.get(
                error.kind, replies.unsupported_rcpt_option(error.value))
            await self._error(reply, line)
            return None
        return rcpt, parameters, inner

    async def _expand(self, sender: addr.Mailaddr, rcpt: addr.Mailaddr) -> tuple[Reply | None, list[Envelope]]:
        from smtpd.lookup.expand import expand_recipient

        tables = self.tables
        try:
            if tables.config is self.config and tables.expansion_is_immediate():
                result = expand_recipient(self.config, tables, self.facts(), str(sender), str(rcpt), self.smtpname)
            else:  # it may read files or the user database: off the event loop
                result = await asyncio.to_thread(expand_recipient, self.config, tables, self.facts(), str(sender),
                                                 str(rcpt), self.smtpname)
        except TableError as error:
            _log.warning("%s smtp: temporary failure for <%s>: %s", self.token, log.visible(str(rcpt)), error)
            return replies.rcpt_refused(*replies.TEMPORARY_FAILURE, str(rcpt)), []
        except Exception:  # noqa: BLE001 — a bug or a missing subsystem must not lose the session: tempfail
            _log.exception("%s smtp: expansion of %s failed", self.token, rcpt)
            return replies.rcpt_refused(*replies.TEMPORARY_FAILURE, str(rcpt)), []
        if result.refusal is not None:
            if result.refusal[0] // 100 == 4:  # the client only gets "Temporary failure": the log says why
                _log.warning("%s smtp: temporary failure for <%s>: %s", self.token, log.visible(str(rcpt)),
                             log.visible(result.why))
            return replies.rcpt_refused(result.refusal[0], result.refusal[1], str(rcpt)), []
        return None, list(result.deliveries)

    # -- DATA and BDAT -----------------------------------------------------------------------------------------------------------
    async def cmd_data(self, argument: str, line: str) -> None:
        if not await self._no_arguments(argument, line):  # first, as OpenSMTPD (and our NOOP/RSET/QUIT) do
            return
        transaction = self.transaction
        if transaction is None:
            await self._out_of_sequence(line)
            return
        if transaction.bdat_used:
            await self._error(replies.DATA_AFTER_BDAT, line)
            return
        if not transaction.recipients:
            # No bad command: after its recipients were refused, a pipelining client sends DATA all the same (RFC
            # 2920), and counting it cut off a relay with 421 after 20 such messages on one connection.
            await self.reply(replies.NO_RECIPIENT, command=line)
            return
        if await self._filter("data", line) is None:
            self._report_tx(transaction, "tx-data", "permfail")
            return
        if not await self._open_message(transaction, line):
            return
        self._set_state("STATE_BODY")
        await self.reply(replies.DATA_OK)
        self._report_tx(transaction, "tx-data", "ok")
        try:
            await self._receive_data(transaction)
        except QueueError as error:
            await self._queue_write_failed(transaction, error)
        await self._complete(transaction)

    async def _queue_write_failed(self, transaction: _Transaction, error: QueueError) -> NoReturn:
        """The message could not be written while it arrived (a full spool, once it is too big to be held in
        memory): nothing was accepted; the client keeps it and tries again later, as after a failed commit."""
        _log.warning("%s smtp: %s", self.token, error)  # ("queue write failed: ...", "cannot write message file: ...")
        if transaction.message is not None:
            await transaction.message.abort()
        self._drop_transaction()
        await self.reply(replies.TEMPORARY_FAILURE_CLOSE)
        raise _Close("queue failure")

    async def _open_message(self, transaction: _Transaction, line: str) -> bool:
        """Create the message in the queue and its builder (behind the data-line filter processes, if any).
        False: a filter process is not there to take it (the refusal is sent)."""
        try:
            transaction.message = self.daemon.queue.new_message(transaction.msgid)
        except Exception:  # noqa: BLE001 — QueueError or OSError: the client retries later
            _log.warning("%s smtp: cannot create a message in the queue", self.token, exc_info=True)
            await self.reply(replies.TEMPORARY_FAILURE_CLOSE)
            raise _Close("queue failure") from None
        message = transaction.message
        top = ("X-Spam: Yes\n" if self.junk or transaction.junk else "") \
            + self._received(transaction, format_msgid(message.msgid))
        stages = self.chain.data_line_stages() if self.chain is not None else []
        builder = MessageBuilder(
            message.write, max_size=self.config.smtp.max_message_size, received="" if stages else top,
            hostname=self.smtpname, local_listener=self._is_local_listener(),
            masquerade_from=str(transaction.sender) if self.listener.masquerade and self.authenticated
            and not transaction.sender.is_null else None,  # (<>: no address to put in From:, it is left alone)
            strict=not self.local)
        if not stages:
            transaction.builder = builder
            return True
        try:  # as 6.8: the header this daemon adds goes through the filters, first
            transaction.builder = DataLineStream(stages, self.token, builder, top.split("\n"),
                                                 strict=not self.local, timeout=self.limits.timeout)
        except FilterFailure as error:
            _log.warning("%s smtp: %s", self.token, error)
            await message.abort()
            transaction.message = None
            await self.reply(replies.FILTER_FAILED, command=line)
            return False
        return True

    def _report_tx(self, transaction: _Transaction, event: str, *fields: str) -> None:
        if transaction.msgid is not None:
            self._report(event, format_msgid(transaction.msgid), *fields)

    def _is_local_listener(self) -> bool:
        # Asked for every message; the answer depends on the endpoint only: parse its address once.
        if self._local_listener is None:
            from smtpd.config.interfaces import is_loopback

            self._local_listener = self.local or is_loopback(self.endpoint.address)
        return self._local_listener

    def _received(self, transaction: _Transaction, msgid: str) -> str:
        protocol = ("ESMTP" if self.esmtp else "SMTP") + ("S" if self.secure else "") + (
            "A" if self.authenticated else "")
        tls_text = self.tls_text
        auth_text = None
        if tls_text and self.listener.received_auth:  # (after the TLS details' parenthesis, as 6.8 writes it)
            auth_text = f"auth=yes user={self.auth_user}" if self.authenticated and not self.local else "auth=no"
        rcpt = str(transaction.recipients[0].address) if len(transaction.recipients) == 1 else None
        client = "local" if self.local else self.client_ip
        return received_header(helo=self.helo or "", rdns=self.rdns, client=client,
                               mask_src=self.listener.mask_src, smtpname=self.smtpname, protocol=protocol,
                               msgid=msgid, tls_text=tls_text, auth_text=auth_text, rcpt=rcpt)

    async def _receive_data(self, transaction: _Transaction) -> None:
        """Read DATA up to CRLF.CRLF, dot-unstuff, and feed the builder in large blocks."""
        builder = transaction.builder
        assert builder is not None
        self._data_deadline, self._data_progress = None, 0
        while True:
            end, stuffed = _scan_data(self.buffer)
            if end is not None:
                with memoryview(self.buffer) as view:
                    body = bytes(view[:end])
                del self.buffer[:end + 3]
                if _line_too_long(body, 0):
                    await self._line_too_long_close()
                if body:
                    await builder.feed(_unstuff(body) if stuffed else body)
                if trace.wants("smtp"):
                    trace.emit("smtp", f"{self.token}: <<< [EOM]", session=self.token)
                return
            # Everything up to the last CRLF is complete lines; the end marker may still be split.
            cut = self._complete_lines_end()
            if cut > 0:
                with memoryview(self.buffer) as view:
                    block = bytes(view[:cut])  # one copy (a bytearray slice would make two)
                del self.buffer[:cut]  # keep the CRLF: it may begin "\r\n.\r\n"
                if _line_too_long(block, 1):  # (its last line goes on with the CR kept in the buffer)
                    await self._line_too_long_close()
                await builder.feed(_unstuff(block) if stuffed else block)
                if trace.wants("smtp"):
                    trace.emit("smtp", f"{self.token}: <<< [MSG] {len(block)} bytes", session=self.token)
            # The line still arriving (after the buffer's last LF) may not grow past the limit. Not the buffer's
            # length: while the builder waited (a data-line filter slower than the client), more complete lines
            # came in behind it.
            if len(self.buffer) > LINE_MAX_BYTES + 2 and \
                    len(self.buffer) - self.buffer.rfind(b"\n") - 1 > LINE_MAX_BYTES:
                await self._line_too_long_close()
            await self._fill_message_data()

    def _complete_lines_end(self) -> int:
        """Where the buffer's complete lines end: its last CRLF, which stays in the buffer as it may begin the
        end marker. A local submission may end its lines with a bare LF (a network one is refused for it), so
        there a last bare LF ends them too: otherwise such a message would be one growing line, too long."""
        if not self.local:
            return self.buffer.rfind(b"\r\n")
        newline = self.buffer.rfind(b"\n")
        return newline - 1 if newline > 0 and self.buffer[newline - 1] == 13 else newline

    async def cmd_bdat(self, argument: str, line: str) -> None:
        words = argument.rstrip(" ").split(" ")  # (trailing spaces are ignored, as after any command)
        last = len(words) == 2 and words[1].upper() == "LAST"
        if not ascii_digits(words[0]) or len(words) > 2 or (len(words) == 2 and not last):
            await self.reply(replies.BDAT_SYNTAX, command=line)
            raise _Close("bad bdat")  # the chunk's length is unknown: the dialog cannot stay in step
        size = int(words[0])
        transaction = self.transaction
        error: Reply | None = None
        if transaction is None:
            error = replies.BAD_SEQUENCE
        elif not transaction.recipients:
            error = replies.NO_RECIPIENT
        if error is not None or transaction is None:
            await self._read_chunk(size, None)  # RFC 3030: the chunk is read (and dropped) all the same
            if error is replies.NO_RECIPIENT:  # (as DATA's: no bad command)
                await self.reply(error, command=line)
            else:
                await self._out_of_sequence(line)
            return
        if transaction.message is None:
            if await self._filter("data", line) is None:  # (a 421 closed the session; else the chunk is dropped)
                self._report_tx(transaction, "tx-data", "permfail")
                await self._read_chunk(size, None)
                return
            transaction.bdat_used = True
            if not await self._open_message(transaction, line):
                await self._read_chunk(size, None)
                return
            self._report_tx(transaction, "tx-data", "ok")
            self._set_state("STATE_BODY")
        try:
            await self._read_chunk(size, transaction.builder)
        except QueueError as error:
            await self._queue_write_failed(transaction, error)
        if last:
            await self._complete(transaction)
        else:
            await self.reply(replies.bdat_ok(size))

    async def _read_chunk(self, size: int, builder: MessageBuilder | DataLineStream | None) -> None:
        remaining = size
        self._data_deadline, self._data_progress = None, 0
        while remaining:
            if not self.buffer:
                await self._fill_message_data()
            block = bytes(self.buffer[:remaining])
            del self.buffer[:len(block)]
            remaining -= len(block)
            if builder is not None:
                await builder.feed(block)

    async def _complete(self, transaction: _Transaction) -> None:
        """The message is all in: refuse it, or make it durable and say 250."""
        builder, message = transaction.builder, transaction.message
        assert builder is not None and message is not None
        try:
            refusal = await builder.finish()
        except QueueError as error:
            await self._queue_write_failed(transaction, error)
        self._drop_transaction()
        self._set_state("STATE_HELO")
        if self.chain is not None:
            self._report("protocol-client", ".")
        if refusal is not None:
            await message.abort()
            await self.reply(refusal, command="DATA")
            self._report_refused(transaction)
            return
        try:
            refused = await self._filter("commit", "DATA") is None  # (logged as the other refusals of a message)
        except _Close:
            await message.abort()
            self._report_refused(transaction)
            raise
        if refused:
            await message.abort()
            self._report_refused(transaction)
            return
        envelopes = self._envelopes(transaction)
        try:
            for envelope in envelopes:
                message.add_envelope(envelope)
            await message.commit()
        except Exception:  # noqa: BLE001 — a queue failure: nothing was accepted
            _log.warning("%s smtp: queue commit failed", self.token, exc_info=True)
            await message.abort()
            await self.reply(replies.TEMPORARY_FAILURE_CLOSE)
            raise _Close("queue failure") from None
        self.mails += 1
        msgid = format_msgid(message.msgid)
        self._trace_committed(msgid, envelopes)
        # One write for these lines, without a loop turn of its own, and after the 250 has gone out: the client
        # does not wait for the log.
        with log.batch():
            _log.info("%s smtp message msgid=%s size=%d nrcpt=%d proto=%s", self.token, msgid, builder.size,
                      len(transaction.recipients), "ESMTP" if self.esmtp else "SMTP")
            # One line per accepted RCPT, as OpenSMTPD: the address the client gave, and the id of its (last)
            # envelope; the envelopes an alias or a .forward made of it are in their delivery lines (rcpt=<it>).
            for recipient in transaction.recipients:
                if recipient.deliveries:
                    _log.info("%s smtp envelope evpid=%s from=<%s> to=<%s>", self.token,
                              format_evpid(recipient.deliveries[-1].evpid), transaction.sender, recipient.address)
            self._write_reply(replies.message_accepted(msgid))
        await self._drain_replies()
        if transaction.msgid is not None:
            self._report("tx-commit", msgid, str(builder.size))
            self._report("tx-reset", msgid)

    def _report_refused(self, transaction: _Transaction) -> None:
        """A message refused at its end (by a filter, or as malformed): its transaction is over."""
        if transaction.msgid is not None:
            msgid = format_msgid(transaction.msgid)
            self._report("tx-data", msgid, "permfail")
            self._report("tx-rollback", msgid)
            self._report("tx-reset", msgid)

    def _envelopes(self, transaction: _Transaction) -> list[Envelope]:
        now = int(time.time())
        result: list[Envelope] = []
        for recipient in transaction.recipients:
            notify = DsnNotify.NONE
            for word in recipient.parameters.notify:
                notify |= DsnNotify[word]
            expanded = len(recipient.deliveries) > 1 and bool(notify & DsnNotify.SUCCESS)
            if expanded:
                # RFC 3461 6.2.7.3: an address expanded to several (an alias, a list, a .forward) is reported
                # once, as `expanded`, and success is not asked of each target. Else a sender's NOTIFY=SUCCESS
                # to staff@ got back every member's address, its mailbox or its outside forwarding address.
                notify &= ~DsnNotify.SUCCESS
                notify = notify or DsnNotify.NEVER  # (SUCCESS alone: nothing else was asked for)
            for position, delivery in enumerate(recipient.deliveries):
                if expanded and position == 0:  # (the one whose success is reported, as the address's)
                    delivery.flags = shared_flags((*delivery.flags, EXPANDED_FLAG))
                delivery.sender = str(transaction.sender)
                delivery.rcpt = str(recipient.address)
                delivery.helo = self.helo or ""
                delivery.hostname = self.rdns or "<unknown>"
                delivery.sockaddr = self.sockaddr
                delivery.smtpname = self.smtpname
                delivery.tag = self.listener.tag or ""
                delivery.ctime = now
                if self.authenticated:
                    delivery.username = self.auth_user or ""
                    delivery.flags = shared_flags((*delivery.flags, "authenticated"))
                delivery.dsn_notify = notify
                delivery.dsn_ret = transaction.parameters.ret
                delivery.dsn_envid = transaction.parameters.envid
                delivery.dsn_orcpt = recipient.parameters.orcpt
                result.append(delivery)
        return result

    def _drop_transaction(self) -> _Transaction | None:
        """End the transaction (committed, refused or aborted): its envelopes are no longer incoming."""
        transaction, self.transaction = self.transaction, None
        if transaction is not None and transaction.incoming:
            STATS.decrement("scheduler.envelope.incoming", transaction.incoming)
            transaction.incoming = 0
        return transaction

    async def _abort_transaction(self) -> None:
        transaction = self._drop_transaction()
        if transaction is None:
            return
        if transaction.message is not None:
            try:
                await transaction.message.abort()
            except Exception:  # noqa: BLE001
                _log.warning("%s smtp: aborting a message failed", self.token, exc_info=True)
        elif transaction.msgid is not None:
            self.daemon.queue.release_msgid(transaction.msgid)
        if isinstance(transaction.builder, DataLineStream):
            transaction.builder.close()
        if transaction.msgid is not None:
            self._report("tx-rollback", format_msgid(transaction.msgid))
            self._report("tx-reset", format_msgid(transaction.msgid))


# -- helpers ---------------------------------------------------------------------------------------------------------------
def _handshake_failure(error: BaseException) -> str:
    """A failed TLS handshake's cause in words: OpenSSL's verification message or reason (`peer did not return a
    certificate`, `unsupported protocol`), else what happened to the connection."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return str(error.verify_message)
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).lower().replace("_", " ")
    if isinstance(error, TimeoutError | ConnectionAbortedError):  # (asyncio aborts a handshake that takes too long)
        return "timeout"
    return "connection closed"


def _filter_failed(phase: str, name: str) -> FilterDecision:
    """A filter process that could not judge: nothing passes unfiltered (421 at connect, else 451)."""
    if phase == "connect":
        return FilterDecision("tempfail", 421, "4.3.0 Temporary failure", name)
    return FilterDecision("tempfail", replies.FILTER_FAILED.code, replies.FILTER_FAILED.text, name)


def _response_fields(decision: FilterDecision) -> tuple[str, ...]:
    """A phase's outcome as the filter-response report gives it: `proceed`, `reject|550 ...`, `rewrite|<v>`."""
    if decision.decision in ("reject", "disconnect", "tempfail"):
        word = "disconnect" if decision.decision == "disconnect" or decision.code == 421 else "reject"
        return word, f"{decision.code} {decision.text}"
    if decision.decision == "rewrite":
        return "rewrite", decision.text
    return (decision.decision,)


# The step of an AUTH exchange waiting for the client's line, as OpenSMTPD's failed-command lines name it.
_AUTH_STEPS = {"STATE_AUTH_INIT": "AUTH PLAIN (...)", "STATE_AUTH_USERNAME": "AUTH LOGIN (username)",
               "STATE_AUTH_PASSWORD": "AUTH LOGIN (password)"}


def _masked(line: str) -> str:
    """A command line as it may be traced or logged: an AUTH line keeps its mechanism, not its credentials."""
    if line[:5].upper() != "AUTH ":
        return line
    mechanism, initial = split_auth_argument(line[5:].lstrip(ARGUMENT_SPACE))
    return f"{line[:5]}{mechanism}" + (" ********" if initial else "")


def split_auth_argument(argument: str) -> tuple[str, str]:
    """AUTH's mechanism (as the client wrote it) and initial response: split at the first space, or when there
    is none at the first tab, as OpenSMTPD does."""
    separator = " " if " " in argument else "\t"
    mechanism, _, initial = argument.partition(separator)
    return mechanism, initial


# What OpenSMTPD skips before an argument: C's isspace() (so `MAIL FROM:<TAB><a@b>` is MAIL FROM:<a@b>).
ARGUMENT_SPACE = " \t\v\f\r"


def split_command(line: str) -> tuple[str, str]:
    """`MAIL FROM:` / `RCPT TO:` split at the first ':', other commands at the first space (§7.1); the
    argument's leading white space (tabs too) is skipped."""
    upper = line.upper()
    for verb in ("MAIL FROM", "RCPT TO"):
        if upper.startswith(verb + ":"):
            return verb, _skip_space(line[len(verb) + 1:])
    verb, _, argument = line.partition(" ")
    return verb.upper(), _skip_space(argument)


def _skip_space(argument: str) -> str:
    """The argument without its leading white space; white space alone loses its spaces only (`NOOP  ` is NOOP,
    docs/smtp.md, but `NOOP <TAB>` keeps an argument and is refused, as by OpenSMTPD)."""
    return argument.lstrip(ARGUMENT_SPACE) or argument.lstrip(" ")


# A line that starts with a dot is found by jumping from dot to dot with memchr (bytes.find of one byte): 2 us
# for 100 KB without a dot (base64 attachments have none), where a regular expression takes 38 us and a
# bytes.find of b"\r\n." 61 us (CPython's search for a short needle steps two bytes at a time). Prose has dots
# in most lines; after this many dots inside lines the regular expression searches the rest.
_DOTS_INSIDE_LINES = 8
_DOT_LINE = re.compile(rb"\r\n\.")


def _first_dot_line(buffer: bytearray) -> int:
    """Where the first CRLF followed by a dot begins, or -1."""
    position = buffer.find(b".", 2)
    for _ in range(_DOTS_INSIDE_LINES):
        if position < 0:
            return -1
        if buffer[position - 1] == 0x0A and buffer[position - 2] == 0x0D:
            return position - 2
        position = buffer.find(b".", position + 1)
    if position < 0:
        return -1
    found = _DOT_LINE.search(buffer, position - 2)
    return -1 if found is None else found.start()


def _line_too_long(block: bytes, tail: int) -> bool:
    """Whether a line of a DATA block (its bytes before the LF, CR included) has LINE_MAX_BYTES or more, as
    OpenSMTPD refuses it; ``tail`` bytes of the block's last line are still to come. Every line is checked,
    wherever the reads cut the data (a long line that came in one read with the end of the data used to be
    taken). One backward search per LINE_MAX_BYTES window: the window's last LF is where the next one starts."""
    size = len(block)
    start = 0
    while size - start + tail >= LINE_MAX_BYTES:
        newline = block.rfind(b"\n", start, start + LINE_MAX_BYTES)
        if newline < 0:
            return True
        start = newline + 1
    return False


def _scan_data(buffer: bytearray) -> tuple[int | None, bool]:
    """(where the line "." begins if the buffer holds CRLF.CRLF, whether a line before it may start with a
    dot). The buffer starts at a line start. One search in the usual case: the first line starting with a dot
    is either the end marker (nothing to unstuff before it) or a stuffed line (then the full search)."""
    if buffer.startswith(b"."):
        return _data_terminator(buffer), True
    first_dot = _first_dot_line(buffer)
    if first_dot < 0:
        return None, False
    if buffer.startswith(b"\r\n", first_dot + 3):
        return first_dot + 2, False
    return _data_terminator(buffer), True


def _data_terminator(buffer: bytearray) -> int | None:
    """Where the line "." begins, if the buffer (which starts at a line start) holds CRLF.CRLF."""
    if buffer.startswith(b".\r\n"):
        return 0
    found = buffer.find(b"\r\n.\r\n")
    return None if found < 0 else found + 2


def _unstuff(block: bytes) -> bytes:
    """Remove one leading dot from every line of a block that starts at a line start."""
    if block.startswith(b"."):
        block = block[1:]
    return block.replace(b"\r\n.", b"\r\n")


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        return None


def local_user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
