"""Local delivery (OpenSMTPD's mda): mbox, maildir, lmtp, mda commands, |pipes and /files from expansion.

`daemon.mda.deliver(envelope, message_path)` delivers one envelope and never raises. It

1. finds the envelope's action in the running config;
2. refuses a loop (the message already carries `Delivered-To: <dest>`);
3. resolves who the delivery runs as: the action's `user`, else the envelope's user through the userbase
   (`<getpwnam>` by default). As root it never delivers as root: root's mbox is opened by the privileged child
   and written after dropping to the unprivileged user; every other method refuses uid 0
   (`not allowed to deliver to: root`). When the daemon runs unprivileged it delivers as itself;
4. prepends `Return-Path: <sender>` (non-empty senders) and `Delivered-To: <rcpt>`;
5. runs the method (see local.py, command.py, lmtp.py) and maps the outcome to a DeliveryResult.

The mbox spool directory is /var/mail unless the environment variable SMTPD_MAILDIR_ROOT (or the daemon option
`mail_spool`) names another one: tests and the unprivileged trial run deliver under a folder of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pwd
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from shared.durations import duration_to_text
from shared.ids import new_session_id
from smtpd import log, trace
from smtpd.config.model import Action, Config, Method
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.lookup.tables import asked_off_the_loop
from smtpd.lookup.tables.base import Service, TableError
from smtpd.lookup.userinfo import DEFAULT_USERBASE, UserInfoError, parse_userinfo, unprivileged_user
from smtpd.mda import command, lmtp, local, offline
from smtpd.mda.privilege import ChildResult, ForkServer, Identity, privileged, run_as
from smtpd.mda.variables import VariableContext, VariableError, expand
from smtpd.mta.session import esc_code
from smtpd.queue import codec
from smtpd.queue.envelope import Envelope
from smtpd.queue.format import OPENSMTPD_MBOXFILE
from smtpd.stats import STATS, KeyGauge

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

ENV_MAIL_ROOT = "SMTPD_MAILDIR_ROOT"
DEFAULT_MAIL_ROOT = "/var/mail"
MAX_SESSIONS = 50
MAX_SESSIONS_PER_USER = 7
MAX_HEADER_BYTES = 1 << 20
LOOP_CHECK_BLOCK = 16384  # read at once for the loop check's quick answer
LMTP_BATCH_WINDOW = 0.05  # seconds an LMTP delivery waits for the other envelopes of its message
LMTP_MAX_RECIPIENTS = 100  # recipients in one LMTP transaction
WRAPPED_FILTER = "/bin/cat"  # what %{mda} runs for mbox and maildir actions under a wrapper
# Mailbox writes as root go through the fork helper in batches: one child writes up to MAILBOX_BATCH messages
# into one mailbox, and at most MAILBOX_CHILDREN children write to the same mailbox at once (each child counts
# as one session for MAX_SESSIONS and MAX_SESSIONS_PER_USER). While one child writes to a mailbox, another one
# starts only when MAILBOX_MORE messages wait: fewer wait for the running child to end (a fork costs far more
# CPU than a write), and go together with the next child. A child starts at most once per MAILBOX_WINDOW per
# mailbox (unless MAILBOX_MORE wait): a mailbox receiving a steady flow gets batches, a lone message goes at once.
MAILBOX_BATCH = 32
MAILBOX_CHILDREN = 4
MAILBOX_MORE = 8
MAILBOX_WINDOW = 0.02

_log = log.get("mda")


def mail_root(options: Any = None) -> str:
    configured = getattr(options, "mail_spool", None) if options is not None else None
    return configured or os.environ.get(ENV_MAIL_ROOT) or DEFAULT_MAIL_ROOT


@dataclass(frozen=True)
class _Job:
    envelope: Envelope
    action: Action
    identity: Identity  # who the work runs as
    username: str  # the recipient's user name (for %{user.username}, lmtp -u, the mbox name)
    directory: str  # the recipient's home
    prefix: bytes
    context: VariableContext
    # The stored message file's (device, inode): an LMTP batch gathers the envelopes of one message by it (the
    # clear copy a compressed or encrypted message is read from is made for each envelope).
    source: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _LmtpMember:
    recipient: str  # what goes in RCPT TO
    prefix: bytes  # this envelope's Return-Path/Delivered-To lines (used when it is alone in its batch)
    future: asyncio.Future[DeliveryResult]


@dataclass(frozen=True)
class _MailboxItem:
    fields: dict[str, object]  # this message's part of the request (sender, prefix, extension, junk)
    fd: int  # our own duplicate of the message's descriptor, closed once the batch is sent
    trace_fields: dict[str, object]
    future: asyncio.Future[ChildResult]


@dataclass
class _MailboxLine:
    """The deliveries waiting for one mailbox (same method, writer and path), and its children at work."""

    request: dict[str, object]
    user: str  # the per-user session limit's key
    waiting: list[_MailboxItem] = field(default_factory=list)
    running: int = 0
    last_start: float = float("-inf")  # when its last child took its batch (event loop time)


@dataclass
class _LmtpBatch:
    destination: str
    sender: str
    message: BinaryIO
    members: list[_LmtpMember] = field(default_factory=list)


class _Failure(Exception):
    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.text)
        self.result = result


class MdaAgent:
    """The local delivery agent: one per daemon."""

    def __init__(self, config_source: Any, tables: Any, mailname: str, options: Any = None) -> None:
        # config_source: the Daemon (its .config is read at each delivery, so reloads apply) or a Config.
        self._config_source = config_source
        self._tables = tables
        self.mailname = mailname
        self.mail_root = mail_root(options)
        self._sessions: asyncio.Semaphore | None = None
        self._per_user: dict[str, asyncio.Semaphore] = {}
        self._per_user_waiting: dict[str, int] = {}
        self._users = KeyGauge("mda.user")  # users with an envelope here
        self.replay_task: asyncio.Task[Any] | None = None
        self._offline_failed: set[str] = set()  # offline files that failed for now: not tried at every rescan
        self._offline_retry = asyncio.Event()
        self.forkserver = ForkServer()
        self.lmtp_batch_window = LMTP_BATCH_WINDOW
        self._lmtp_batches: dict[tuple[Any, ...], _LmtpBatch] = {}
        self._lmtp_tasks: set[asyncio.Task[None]] = set()
        self._mailboxes: dict[str, _MailboxLine] = {}
        self._mailbox_tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def tables(self) -> Any:
        # The daemon's registry when we have one (it may be rebuilt at reload), else the one we were given.
        return getattr(self._config_source, "tables", None) or self._tables

    @property
    def config(self) -> Config:
        source = self._config_source
        return source if isinstance(source, Config) else source.config

    async def start(self) -> None:
        self._sessions = asyncio.Semaphore(MAX_SESSIONS)
        paths = getattr(self._config_source, "paths", None)
        if paths is not None:
            offline.ensure_offline_directory(paths.spool)
            self.replay_task = asyncio.create_task(self._replay_offline(paths))
            pause_listeners = getattr(self._config_source, "pause_listeners", None)
            if pause_listeners is not None:
                pause_listeners.append(self._on_pause)

    def _on_pause(self, _daemon: Any, subsystem: str, paused: bool) -> None:
        """`smtpctl resume smtp`: the offline files kept while SMTP was paused (sendmail keeps a message there
        when the daemon says it cannot take it now) are submitted at once, not at the next start."""
        if subsystem == "smtp" and not paused:
            self._offline_failed.clear()
            self._offline_retry.set()

    async def _replay_offline(self, paths: Any) -> None:
        """Once the control socket answers (the control server starts after us), submit offline messages; then
        look again now and then for files that came while we run (a file that failed for now is tried again
        after offline.RETRY_SECONDS, or when SMTP is resumed)."""
        try:
            if not await offline.wait_for_socket(paths.socket):
                _log.warning("offline: the control socket never answered; offline messages not replayed")
                return
            retry_at = 0.0  # when the files that failed for now are tried again
            loop = asyncio.get_running_loop()
            while True:
                self._offline_retry.clear()
                if not self._offline_failed:
                    retry_at = loop.time() + offline.RETRY_SECONDS
                elif loop.time() >= retry_at:
                    self._offline_failed.clear()
                try:
                    await offline.replay_offline(paths.spool, paths.socket, paths.mailname, self._offline_failed)
                except Exception:  # noqa: BLE001 — replaying is best effort; the files stay for the next start
                    _log.exception("offline: replay failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._offline_retry.wait(), offline.RESCAN_SECONDS)
        except asyncio.CancelledError:
            raise

    async def stop(self) -> None:
        if self.replay_task is not None:
            self.replay_task.cancel()
        self._stopping = True
        for task in list(self._mailbox_tasks):
            task.cancel()
        await asyncio.gather(*self._mailbox_tasks, return_exceptions=True)
        for line in self._mailboxes.values():
            for item in line.waiting:
                os.close(item.fd)
                if not item.future.done():
                    item.future.set_result(ChildResult(local.EX_TEMPFAIL, "daemon stopping"))
            line.waiting.clear()
        await self.forkserver.stop()

    # -- the contract ---------------------------------------------------------------------------------
    async def deliver(self, envelope: Envelope, message_path: str) -> DeliveryResult:
        started = time.time()
        # `show stats`' mda.envelope (envelopes being delivered) and mda.user (their users), as OpenSMTPD's
        user_key = envelope.mda_user or envelope.dest
        STATS.increment("mda.envelope")
        self._users.add(user_key)
        try:
            result = await self._deliver_limited(envelope, message_path)
        except _Failure as failure:
            result = failure.result
        except Exception as error:  # noqa: BLE001 — a delivery never takes the daemon down
            _log.exception("mda: unexpected error delivering %016x", envelope.evpid)
            result = DeliveryResult.tempfail(f"internal error: {type(error).__name__}: {error}")
        finally:
            STATS.decrement("mda.envelope")
            self._users.remove(user_key)
        self._log_result(envelope, result, started)
        return result

    async def _deliver_limited(self, envelope: Envelope, message_path: str) -> DeliveryResult:
        if self._batched(envelope):
            # The batch's child takes the session limits (_run_mailbox_batch): a session is a child, not a message.
            return await self._deliver(envelope, message_path)
        async with self._limited(envelope.mda_user or envelope.dest):
            return await self._deliver(envelope, message_path)

    @contextlib.asynccontextmanager
    async def _limited(self, user_key: str) -> AsyncIterator[None]:
        """One of the MAX_SESSIONS sessions, and one of this user's MAX_SESSIONS_PER_USER. While waiting for
        it the delivery counts in `show stats`' mda.pending, while holding it in mda.running."""
        if self._sessions is None:
            self._sessions = asyncio.Semaphore(MAX_SESSIONS)
        per_user = self._per_user.setdefault(user_key, asyncio.Semaphore(MAX_SESSIONS_PER_USER))
        self._per_user_waiting[user_key] = self._per_user_waiting.get(user_key, 0) + 1
        STATS.increment("mda.pending")
        pending = True
        try:
            async with self._sessions, per_user:
                STATS.decrement("mda.pending")
                pending = False
                STATS.increment("mda.running")
                try:
                    yield
                finally:
                    STATS.decrement("mda.running")
        finally:
            if pending:  # cancelled while waiting
                STATS.decrement("mda.pending")
            self._per_user_waiting[user_key] -= 1
            if not self._per_user_waiting[user_key]:
                del self._per_user_waiting[user_key]
                self._per_user.pop(user_key, None)

    def _batched(self, envelope: Envelope) -> bool:
        """Whether this delivery is a mailbox write through the fork helper (see _run_in_child)."""
        if not privileged():
            return False
        action = self.config.actions.get(envelope.dispatcher)
        if action is None or action.wrapper:
            return False
        if envelope.mda_exec:
            return envelope.mda_exec.startswith("/")  # a /file from an alias or .forward: mboxfile
        return action.method in (Method.MBOX, Method.MAILDIR)

    async def _deliver(self, envelope: Envelope, message_path: str) -> DeliveryResult:
        action = self.config.actions.get(envelope.dispatcher)
        if action is None:
            return DeliveryResult.tempfail(f"no such dispatcher: {envelope.dispatcher}")
        if action.method is Method.RELAY:
            return DeliveryResult.permfail(f"dispatcher {action.name} relays, it does not deliver locally")
        try:
            message, source = await _open_message(message_path)
        except OSError as error:
            return DeliveryResult.tempfail(f"cannot open message: {error.strerror}")
        except codec.QueueCodecError as error:
            return DeliveryResult.tempfail(f"cannot read message: {error}")
        with message:
            if _has_loop(message, envelope.dest, envelope.rcpt):
                return DeliveryResult(Outcome.LOOP, "Loop detected", 5, 47)
            job = await asked_off_the_loop(self.tables, self._prepare, envelope, action, source)  # the userbase
            trace.emit("mda", f"delivering {envelope.evpid:016x} to {envelope.dest} as {job.identity.username} "
                              f"via {envelope.mda_exec or action.method}", evpid=f"{envelope.evpid:016x}")
            return await self._run(job, message)

    # -- preparing ------------------------------------------------------------------------------------
    def refusal(self, envelope: Envelope) -> DeliveryResult | None:
        """How delivering this envelope would fail before anything runs (its user is unknown, or is root for a
        method that never runs as root), or None: what `smtpctl explain` says of a delivery it lists."""
        action = self.config.actions.get(envelope.dispatcher)
        if action is None or action.method is Method.RELAY:
            return None
        try:
            self._identity(envelope, action)
        except _Failure as failure:
            return failure.result
        return None

    def _identity(self, envelope: Envelope, action: Action) -> tuple[str, str, Identity]:
        """(user name, home, who the work runs as); _Failure when it may not run at all."""
        username, uid, gid, directory = self._resolve_user(envelope, action)
        if not privileged():
            return username, directory, Identity.current()
        if uid == 0 and (action.method is not Method.MBOX or envelope.mda_exec):
            raise _Failure(DeliveryResult.permfail(f"not allowed to deliver to: {username}"))
        # (mbox for root: _run_mbox writes as the unprivileged user)
        return username, directory, Identity.for_user(username, uid, gid, directory)

    def _prepare(self, envelope: Envelope, action: Action, source: tuple[int, int]) -> _Job:
        username, directory, identity = self._identity(envelope, action)
        prefix = b""
        if envelope.sender:
            prefix += f"Return-Path: <{envelope.sender}>\n".encode("utf-8", "surrogateescape")
        prefix += f"Delivered-To: {envelope.rcpt or envelope.dest}\n".encode("utf-8", "surrogateescape")
        context = VariableContext(envelope.sender, envelope.rcpt or envelope.dest, envelope.dest, username,
                                  directory, delimiter=(self.config.smtp.sub_addr_delim or "+")[:1])
        return _Job(envelope, action, identity, username, directory, prefix, context, source)

    def _resolve_user(self, envelope: Envelope, action: Action) -> tuple[str, int, int, str]:
        if action.user:
            try:
                entry = pwd.getpwnam(action.user)
            except KeyError:
                raise _Failure(DeliveryResult.permfail(f"delivery user '{action.user}' does not exist")) from None
            return entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir
        name = envelope.mda_user or envelope.dest.rpartition("@")[0].lower()
        userbase = action.userbase_table or DEFAULT_USERBASE
        value = None
        if self.tables is not None:
            try:
                value = self.tables.lookup(userbase, Service.USERINFO, name)
            except TableError as error:
                raise _Failure(DeliveryResult.tempfail(f"userbase <{userbase}>: {error}")) from None
        if value is not None:
            try:
                info = parse_userinfo(name, value)
            except UserInfoError as error:
                raise _Failure(DeliveryResult.tempfail(str(error))) from None
            return info.username, info.uid, info.gid, info.directory
        if envelope.mda_exec or self.tables is None:
            # Files and commands from aliases run as the daemon's unprivileged user, a system account.
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                pass
            else:
                return entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir
        raise _Failure(DeliveryResult.permfail(f"user {name} does not exist"))

    # -- running --------------------------------------------------------------------------------------
    async def _run(self, job: _Job, message: BinaryIO) -> DeliveryResult:
        exec_item = job.envelope.mda_exec
        if exec_item:
            if exec_item.startswith("|"):
                return await self._run_shell_item(job, exec_item[1:], message)
            if exec_item.startswith(OPENSMTPD_MBOXFILE):
                return await self._run_mboxfile(job, exec_item.rsplit(" ", 1)[-1], message)
            if exec_item.startswith("/"):
                return await self._run_mboxfile(job, exec_item, message)
            return await self._run_shell_item(job, exec_item, message)
        method = job.action.method
        if job.action.wrapper:
            return await self._run_wrapped(job, message)
        if method is Method.MBOX:
            return await self._run_mbox(job, message)
        if method is Method.MAILDIR:
            return await self._run_maildir(job, message)
        if method is Method.LMTP:
            return await self._run_lmtp(job, message)
        if method is Method.MDA:
            return await self._run_command(job, self._expand_argv(job.action.mda_command or "", job), message)
        return DeliveryResult.permfail(f"dispatcher {job.action.name} ({method}) has no local delivery method")

    def _mbox_path(self, job: _Job) -> str:
        if "/" in job.username or job.username in ("", ".", ".."):
            raise _Failure(DeliveryResult.permfail(f"invalid user name for a mailbox: {job.username!r}"))
        return os.path.join(self.mail_root, job.username)

    async def _run_mbox(self, job: _Job, message: BinaryIO) -> DeliveryResult:
        path = self._mbox_path(job)
        sender, prefix = job.envelope.sender, job.prefix
        writer = job.identity
        if privileged() and job.identity.uid == 0:
            writer = _unprivileged_identity()
        writer = writer.with_group(_spool_group(self.mail_root))
        if privileged():
            # The helper's child opens the mailbox as root (creating it for its owner), then drops to writer.
            return _child_result(await self._run_in_child(
                {"method": "mbox", "path": path, "owner": [job.identity.uid, job.identity.gid],
                 "identity": _identity_fields(writer)}, {"sender": sender, "prefix": prefix.decode("latin-1")},
                message, writer.username))

        def write(_: object) -> None:
            local.deliver_mbox(path, sender, prefix, message)

        return _child_result(await run_as(writer, write))

    async def _run_mboxfile(self, job: _Job, path: str, message: BinaryIO) -> DeliveryResult:
        sender, prefix = job.envelope.sender, job.prefix
        if privileged():
            return _child_result(await self._run_in_child(
                {"method": "mboxfile", "path": path, "identity": _identity_fields(job.identity)},
                {"sender": sender, "prefix": prefix.decode("latin-1")}, message, job.identity.username))

        def write(_: object) -> None:
            local.deliver_mboxfile(path, sender, prefix, message)

        return _child_result(await run_as(job.identity, write))

    async def _run_maildir(self, job: _Job, message: BinaryIO) -> DeliveryResult:
        directory = self._expand(job.action.maildir_path or "~/Maildir", job)
        if not directory.startswith("/"):
            # OpenSMTPD's mail.maildir runs in the user's home: a relative path is a folder under the home
            # (`maildir "Mail"` is ~/Mail), or under / for a user whose home is not an absolute path.
            home = job.directory if job.directory.startswith("/") else "/"
            directory = os.path.join(home, directory)
        extension, junk, prefix = job.envelope.mda_subaddress, job.action.junk, job.prefix
        if privileged():
            return _child_result(await self._run_in_child(
                {"method": "maildir", "directory": directory, "identity": _identity_fields(job.identity)},
                {"extension": extension, "junk": junk, "prefix": prefix.decode("latin-1")}, message,
                job.identity.username))

        def write(_: object) -> None:
            local.deliver_maildir(directory, prefix, message, extension, junk)

        return _child_result(await run_as(job.identity, write))

    async def _run_in_child(self, request: dict[str, object], item: dict[str, object], message: BinaryIO,
                            user: str) -> ChildResult:
        """Write one message through the fork helper, in a batch with the others waiting for the same mailbox.

        A fork costs far more CPU than writing a small message, so messages for one mailbox share a child. No
        message waits for a batch to fill: a child starts at once when fewer than MAILBOX_CHILDREN write to the
        mailbox, and takes everything waiting when it starts; messages that arrive meanwhile go with the next
        child. Each message still gets its own result (a failed write fails that message alone)."""
        key = json.dumps(request, sort_keys=True)
        line = self._mailboxes.get(key)
        if line is None:
            self._forget_idle_mailboxes()
            line = self._mailboxes[key] = _MailboxLine(request, user)
        future: asyncio.Future[ChildResult] = asyncio.get_running_loop().create_future()
        # Our own descriptor: the envelope's file is closed if its delivery is cancelled before the batch goes.
        line.waiting.append(_MailboxItem(item, os.dup(message.fileno()), trace.bound(), future))
        self._start_mailbox_child(key, line)
        return await future

    def _start_mailbox_child(self, key: str, line: _MailboxLine) -> None:
        if self._stopping or not line.waiting or line.running >= MAILBOX_CHILDREN:
            return
        if line.running and len(line.waiting) < MAILBOX_MORE:
            return  # they go with the next child, when a running one ends
        line.running += 1
        task = asyncio.get_running_loop().create_task(self._run_mailbox_batch(key, line))
        self._mailbox_tasks.add(task)
        task.add_done_callback(self._mailbox_tasks.discard)

    def _forget_idle_mailboxes(self) -> None:
        """Drop the lines of mailboxes idle for a while (kept meanwhile for their last_start)."""
        if len(self._mailboxes) < 64:
            return
        horizon = asyncio.get_running_loop().time() - 10 * MAILBOX_WINDOW
        for key, line in list(self._mailboxes.items()):
            if not line.waiting and not line.running and line.last_start < horizon:
                del self._mailboxes[key]

    async def _run_mailbox_batch(self, key: str, line: _MailboxLine) -> None:
        batch: list[_MailboxItem] = []
        loop = asyncio.get_running_loop()
        try:
            delay = line.last_start + MAILBOX_WINDOW - loop.time()
            if delay > 0 and len(line.waiting) < MAILBOX_MORE:
                await asyncio.sleep(delay)  # a flow to this mailbox: let more messages join this child
            async with self._limited(f"uid {line.request['identity']['uid']}"):  # type: ignore[index]
                # Taken now, not when the task was made: what arrived in between goes in this batch.
                line.last_start = loop.time()
                while line.waiting and len(batch) < MAILBOX_BATCH:
                    item = line.waiting.pop(0)
                    if item.future.done():  # its delivery was cancelled
                        os.close(item.fd)
                    else:
                        batch.append(item)
                if not batch:
                    return
                results = await self._send_batch(line.request, batch)
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            for item in batch:
                if not item.future.done():
                    item.future.set_result(ChildResult(local.EX_TEMPFAIL, "delivery batch interrupted"))
            line.running -= 1
            self._start_mailbox_child(key, line)

    async def _send_batch(self, request: dict[str, object], batch: list[_MailboxItem]) -> list[ChildResult]:
        try:
            return await self.forkserver.run_batch({**request, "items": [item.fields for item in batch]},
                                                   [item.fd for item in batch],
                                                   [item.trace_fields for item in batch])
        except Exception as error:  # noqa: BLE001 — every message of the batch gets an answer
            _log.exception("mda: delivery batch failed")
            return [ChildResult(local.EX_TEMPFAIL, f"internal error: {type(error).__name__}: {error}")] * len(batch)
        finally:
            for item in batch:
                os.close(item.fd)

    async def _run_lmtp(self, job: _Job, message: BinaryIO) -> DeliveryResult:
        """Join (or open) the LMTP batch of this message and destination, and wait for this envelope's reply.

        The scheduler hands the envelopes of one message at about the same time: those that go to the same LMTP
        destination within LMTP_BATCH_WINDOW share one transaction (several RCPT TO, one DATA), and each gets the
        reply to its own recipient.
        """
        destination = job.action.lmtp_destination or ""
        recipient = job.envelope.dest if job.action.lmtp_rcpt_to else job.username
        key = (job.envelope.msgid, job.source, job.action.name, destination,
               job.envelope.sender)
        loop = asyncio.get_running_loop()
        batch = self._lmtp_batches.get(key)
        if batch is None or len(batch.members) >= LMTP_MAX_RECIPIENTS:
            # The batch reads its own descriptor: this envelope's file is closed when its delivery returns.
            shared = open(os.dup(message.fileno()), "rb")  # noqa: SIM115 — closed when the batch is done
            shared.seek(0)  # a real lseek: the envelope's buffered reader may have rewound only its buffer
            batch = _LmtpBatch(destination, job.envelope.sender, shared)
            self._lmtp_batches[key] = batch
            loop.call_later(self.lmtp_batch_window, self._flush_lmtp, key, batch)
        future: asyncio.Future[DeliveryResult] = loop.create_future()
        batch.members.append(_LmtpMember(recipient, job.prefix, future))
        return await future

    def _flush_lmtp(self, key: tuple[Any, ...], batch: _LmtpBatch) -> None:
        if self._lmtp_batches.get(key) is batch:
            del self._lmtp_batches[key]
        task = asyncio.get_running_loop().create_task(self._run_lmtp_batch(batch))
        self._lmtp_tasks.add(task)
        task.add_done_callback(self._lmtp_tasks.discard)

    async def _run_lmtp_batch(self, batch: _LmtpBatch) -> None:
        members = batch.members
        if len(members) == 1:
            prefix = members[0].prefix
        else:
            # One DATA for several recipients: a Delivered-To line would show every recipient to each of them
            # (Bcc included), so the shared copy carries only Return-Path (Dovecot too omits it in that case).
            prefix = f"Return-Path: <{batch.sender}>\n".encode("utf-8", "surrogateescape") if batch.sender else b""
        trace.emit("mda", f"lmtp: one transaction to {batch.destination} for {len(members)} recipient(s): "
                          + ", ".join(member.recipient for member in members), destination=batch.destination)
        try:
            replies = await lmtp.deliver_lmtp(batch.destination, self.mailname, batch.sender,
                                              [member.recipient for member in members], prefix, batch.message)
            results = [_lmtp_result(reply) for reply in replies]
        except lmtp.LmtpError as error:
            results = [DeliveryResult.tempfail(str(error))] * len(members)
        except Exception as error:  # noqa: BLE001 — every waiting envelope must get an answer
            _log.exception("mda: LMTP transaction to %s failed", batch.destination)
            results = [DeliveryResult.tempfail(f"internal error: {type(error).__name__}: {error}")] * len(members)
        finally:
            batch.message.close()
        if len(results) != len(members):
            results = [DeliveryResult.tempfail("LMTP server error: reply count mismatch")] * len(members)
        for member, result in zip(members, results, strict=True):
            if not member.future.done():
                member.future.set_result(result)

    async def _run_shell_item(self, job: _Job, shell_command: str, message: BinaryIO) -> DeliveryResult:
        # The text of a |command item is the alias or .forward owner's shell command, never envelope data.
        return await self._run_command(job, ["/bin/sh", "-c", shell_command], message)

    async def _run_wrapped(self, job: _Job, message: BinaryIO) -> DeliveryResult:
        wrapper = self.config.mda_wrappers.get(job.action.wrapper or "")
        if wrapper is None:
            return DeliveryResult.permfail(f"no mda wrapper with that name: {job.action.wrapper}")
        method = job.action.method
        if method is Method.MDA:
            wrapped = self._expand_argv(job.action.mda_command or "", job)
        elif method in (Method.MBOX, Method.MAILDIR, Method.LMTP):
            return await self._run_wrapped_mailbox(job, wrapper, message)
        else:
            return DeliveryResult.permfail(f"wrapper not supported for {method}")
        try:
            argv = command.wrap_argv(wrapper, wrapped, job.context)
        except VariableError as error:
            return DeliveryResult.permfail(f"mda command line could not be expanded: {error}")
        return await self._run_command(job, argv, message)

    async def _run_wrapped_mailbox(self, job: _Job, wrapper: str, message: BinaryIO) -> DeliveryResult:
        """mbox, maildir and lmtp under a wrapper: the wrapper runs as the recipient around a filter, then we write
        (or send over LMTP; a wrapper there used to bounce every message, `wrapper not supported`).

        The wrapped command (%{mda}) is `/bin/cat`: the wrapper (limits, environment, a filter of its own) runs
        as the recipient with the message on stdin, and its standard output is what gets delivered, by the same
        writer as without a wrapper (locks, From_ line, truncate on failure, the fork helper as root). So the
        recipient never has to run the daemon's own Python, which it usually cannot even read.
        """
        try:
            argv = command.wrap_argv(wrapper, [WRAPPED_FILTER], job.context)
        except VariableError as error:
            return DeliveryResult.permfail(f"mda command line could not be expanded: {error}")
        filter_job = job
        if privileged() and job.identity.uid == 0:
            # root's mbox: the wrapper, like the write, runs as the unprivileged user, never as root.
            filter_job = dataclasses.replace(job, identity=_unprivileged_identity())
        with tempfile.TemporaryFile(prefix="smtpd-wrapped-") as filtered:
            result = await self._run_command(filter_job, argv, message, stdout=filtered)
            if result.outcome is not Outcome.OK:
                return result
            if filtered.seek(0, os.SEEK_END) == 0:
                # Delivering nothing would lose the message: the wrapper did not pass it on.
                return DeliveryResult.tempfail("mda wrapper wrote no message on its standard output")
            filtered.seek(0)
            unprefixed = dataclasses.replace(job, prefix=b"")  # the wrapper's output already holds the prefix
            if job.action.method is Method.MBOX:
                return await self._run_mbox(unprefixed, filtered)
            if job.action.method is Method.LMTP:
                # Its own copy, never in a batch with the other envelopes' (their filtered copies differ).
                info = os.fstat(filtered.fileno())
                return await self._run_lmtp(dataclasses.replace(unprefixed, source=(info.st_dev, info.st_ino)),
                                            filtered)
            return await self._run_maildir(unprefixed, filtered)

    async def _run_command(self, job: _Job, argv: list[str], message: BinaryIO,
                           stdout: BinaryIO | None = None) -> DeliveryResult:
        environment = command.delivery_environment(job.identity, job.envelope.sender,
                                                   job.envelope.rcpt or job.envelope.dest, job.envelope.dest,
                                                   job.envelope.mda_subaddress)
        # The command learns about the recipient, even when an unprivileged daemon runs it as itself.
        environment["USER"] = environment["LOGNAME"] = job.username
        environment["HOME"] = job.directory or "/"
        outcome = await command.run_command(argv, job.identity, environment, job.prefix, message, stdout=stdout)
        if outcome.ok:
            return DeliveryResult.ok()
        if outcome.temporary:
            return DeliveryResult.tempfail(outcome.error_text())
        return DeliveryResult.permfail(outcome.error_text())

    @staticmethod
    def _expand_argv(template: str, job: _Job) -> list[str]:
        try:
            return command.command_argv(template, job.context)
        except VariableError as error:
            raise _Failure(DeliveryResult.permfail(f"mda command line could not be expanded: {error}")) from None

    def _expand(self, template: str, job: _Job) -> str:
        try:
            return expand(template, job.context)
        except VariableError as error:
            raise _Failure(DeliveryResult.permfail(f"mda command line could not be expanded: {error}")) from None

    # -- logging --------------------------------------------------------------------------------------
    @staticmethod
    def _log_result(envelope: Envelope, result: DeliveryResult, started: float) -> None:
        words = {Outcome.OK: "Ok", Outcome.TEMPFAIL: "TempFail", Outcome.PERMFAIL: "PermFail",
                 Outcome.LOOP: "PermFail"}
        stat = "Delivered" if result.outcome is Outcome.OK else f"Error ({result.text})"
        delay = duration_to_text(max(0, int(started - envelope.ctime))) if envelope.ctime else "0s"
        _log.info("%016x mda delivery evpid=%016x from=<%s> to=<%s> rcpt=<%s> user=%s delay=%s result=%s stat=%s",
                  new_session_id(), envelope.evpid, envelope.sender, envelope.dest,
                  envelope.rcpt or envelope.dest, envelope.mda_user, delay, words[result.outcome], stat)


def _lmtp_result(reply: lmtp.LmtpReply) -> DeliveryResult:
    if reply.ok:
        return DeliveryResult.ok()
    # The server's enhanced status code (552 5.2.2 mailbox full, 550 5.1.1 no such user) is the recipient's
    # status in a report, as for a relayed recipient; x.3.0 only when the reply carries none.
    code = esc_code(reply.text) or 30
    if reply.temporary:
        return DeliveryResult.tempfail(reply.text, code)
    return DeliveryResult.permfail(reply.text, code)


def _child_result(result: ChildResult) -> DeliveryResult:
    if result.status == 0:
        return DeliveryResult.ok()
    if result.timed_out:
        return DeliveryResult.tempfail("terminated; timeout")
    if result.status < 0:
        return DeliveryResult.tempfail(f"terminated; signal {-result.status}")
    if result.status in command.TEMPFAIL_STATUSES:
        return DeliveryResult.tempfail(result.text or "temporary failure")
    return DeliveryResult.permfail(result.text or f"exited with status {result.status}")


async def _open_message(path: str) -> tuple[BinaryIO, tuple[int, int]]:
    """The message file itself, or its clear text in memory when it is stored compressed or encrypted; and the
    stored file's (device, inode). Told by its bytes, not by the configuration: mail queued while `queue
    compression` was on is still delivered in clear once it is off (opened as a plain file, its gzip bytes went
    into the mailbox). Decoding runs in a worker thread; a clear file is opened on the loop, as it always was."""
    if not codec.current().active:  # (when it is, every message is stored encoded: straight to the thread)
        handle = open(path, "rb")  # noqa: SIM115 — returned, or closed below
        try:
            encoded = codec.is_encoded(handle.read(2))
            handle.seek(0)
            info = os.fstat(handle.fileno())
        except BaseException:
            handle.close()
            raise
        if not encoded:
            return handle, (info.st_dev, info.st_ino)
        handle.close()
    return await asyncio.to_thread(_decoded_message, path)


def _decoded_message(path: str) -> tuple[BinaryIO, tuple[int, int]]:
    info = os.stat(path)
    return codec.open_message(path), (info.st_dev, info.st_ino)


def _has_loop(message: BinaryIO, dest: str, rcpt: str = "") -> bool:
    """Whether the header already holds `Delivered-To: <dest>`, or `Delivered-To: <rcpt>`, the line this delivery
    writes (_prepare): then the message is looping. (With dest alone, mail to an alias that came back to it
    was never caught: its line names the alias, not the user.)"""
    # Usually the whole header is in the first block and names no Delivered-To at all: one search says so.
    head = message.read(LOOP_CHECK_BLOCK)
    message.seek(0)
    end = head.find(b"\n\n")
    if end >= 0 and b"delivered-to" not in head[:end].lower():
        return False
    wanted = {address.strip().lower() for address in (dest, rcpt) if address.strip()}
    read = 0
    try:
        for line in message:
            read += len(line)
            if line in (b"\n", b"\r\n") or read > MAX_HEADER_BYTES:
                break
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"delivered-to":
                text = value.decode("utf-8", "replace").strip().strip("<>").strip().lower()
                if text in wanted:
                    return True
        return False
    finally:
        message.seek(0)


def _identity_fields(identity: Identity) -> dict[str, object]:
    return {"uid": identity.uid, "gid": identity.gid, "groups": list(identity.groups), "home": identity.home}


def _spool_group(directory: str) -> int | None:
    """The spool directory's group when members may create files there (the dotlock needs it)."""
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return info.st_gid if info.st_mode & 0o020 else None


def _unprivileged_identity() -> Identity:
    entry = pwd.getpwnam(unprivileged_user())
    return Identity.for_user(entry.pw_name, entry.pw_uid, entry.pw_gid, "/")


def build(daemon: Daemon) -> MdaAgent:
    agent = MdaAgent(daemon, daemon.tables, daemon.mailname, daemon.options)
    daemon.mda = agent
    return agent
