"""Filter processes: `filter NAME proc-exec "cmd"` and `proc NAME "cmd"` (with `filter NAME proc NAME`).

Each declared processor is one long-lived child speaking OpenSMTPD 6.8's line protocol on its standard input and
output (docs/filters.md), so the filters written for OpenSMTPD (filter-dkimsign, filter-rspamd, filter-senderscore,
...) run unchanged:

* at start the daemon sends `config|KEY|VALUE` lines and `config|ready`; the process answers with
  `register|report|smtp-in|EVENT` and `register|filter|smtp-in|PHASE` lines and `register|ready`;
* sessions then send `report|0.6|TIME|smtp-in|EVENT|SESSION|...` lines to every process registered for EVENT,
  the relay client's sessions `report|0.6|TIME|smtp-out|EVENT|SESSION|...` lines (smtpd/mta/reports.py), and `filter|0.6|TIME|smtp-in|PHASE|SESSION|TOKEN|...` requests to the processes of their listener's filter
  chain registered for PHASE, each answered by `filter-result|SESSION|TOKEN|DECISION[|ARGUMENT]`;
* in the `data-line` phase each line of the message goes to the process and comes back, changed or not, as
  `filter-dataline|SESSION|TOKEN|LINE`, up to a line of a single dot.

Where we do better than 6.8: a process that exits, or that answers something malformed, does not take the daemon
down (6.8 exits): it is logged, the requests waiting for it fail temporarily (so no mail passes a filter that
did not run), and it is started again after a delay that grows while it keeps failing. A request unanswered
within the session timeout fails the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smtpd import log, trace
from smtpd.config.model import Config, Filter
from smtpd.smtp import replies
from smtpd.smtp.headers import has_bare_line_ending

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

PROTOCOL_VERSION = "0.6"
SMTPD_VERSION = "6.8.0p2"  # what filters are told: the protocol is 6.8's, and some filters check the version
SUBSYSTEM = "smtp-in"
OUT_SUBSYSTEM = "smtp-out"  # the relay client's sessions, reported to the processes of the relay action's filter
REPORT_EVENTS = frozenset({
    "link-connect", "link-disconnect", "link-greeting", "link-identify", "link-tls", "link-auth",
    "tx-reset", "tx-begin", "tx-mail", "tx-rcpt", "tx-envelope", "tx-data", "tx-commit", "tx-rollback",
    "protocol-client", "protocol-server", "filter-report", "filter-response", "timeout",
})
FILTER_PHASES = frozenset({
    "connect", "helo", "ehlo", "starttls", "auth", "mail-from", "rcpt-to", "data", "data-line", "commit",
})
REGISTER_TIMEOUT = 30.0  # seconds a process has to say `register|ready`
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # after each exit in a row
STDERR_LINE_MAX = 1024
REPORT_BACKLOG = 16 << 20  # bytes of reports a process may leave unread
LINE_MAX = 65536 + 1024  # a data line of up to 64 KiB and the protocol's fields
# A message line as long as DATA refuses it (its bytes before the LF, CR included; smtpd/smtp/session.py's
# LINE_MAX_BYTES): BDAT, which has no lines, could bring one; it is not sent to the filters (their answer, past
# LINE_MAX, would be taken for a misbehaving process), and the message is refused.
DATA_LINE_MAX = 65535

_log = log.get("filter")


class FilterFailure(Exception):
    """A filter process could not answer (it exited, was not running, answered garbage, or took too long)."""


@dataclass(frozen=True)
class ProcessorSpec:
    """A process as the configuration declares it; equal specs are the same process across a reload."""

    name: str
    command: str
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    in_use: bool = False  # a listener's filter runs it (6.8 tells only such processes their subsystem)
    out_use: bool = False  # a relay action's filter runs it: it is told smtp-out as well


def specs_of(config: Config) -> dict[str, ProcessorSpec]:
    """Every processor of the configuration by name: `proc` declarations and `filter NAME proc-exec` ones. All
    are started, as 6.8 starts them, even those no listener uses. (Not the config model's Proc: its location
    would make a moved line a changed process at a reload.)"""
    from smtpd.smtp.filters import chain_members

    used = {processor_of(config, member.name) for listener in config.listeners
            for member in chain_members(config, listener.filter)}
    out_used = {processor_of(config, member.name) for action in config.actions.values()
                if action.relay is not None for member in chain_members(config, action.relay.filter)}
    # (a `filter NAME proc-exec` declares its process among the procs too, as 6.8's grammar does)
    return {proc.name: ProcessorSpec(proc.name, proc.command, proc.user, proc.group, proc.chroot, proc.name in used,
                                     proc.name in out_used)
            for proc in config.procs.values()}


def processor_of(config: Config, filter_name: str) -> str | None:
    """The processor a chain member stands for (None for a builtin filter)."""
    item = config.filters.get(filter_name)
    if item is None:
        return None
    if item.kind == "proc-exec":
        return item.name
    if item.kind == "proc":
        return item.proc
    return None


def report_line(event: str, session: str, fields: tuple[str, ...], subsystem: str = SUBSYSTEM) -> str:
    """The one place report lines are made, for both subsystems."""
    return "|".join(("report", PROTOCOL_VERSION, timestamp(), subsystem, event, session,
                     *(escape(field) for field in fields)))


def timestamp() -> str:
    now = time.time()
    return f"{int(now)}.{int(now % 1 * 1_000_000):06d}"


def escape(value: str) -> str:
    """A field as it can travel on one line (a field may hold `|`: it is the last one, or readers split
    at most as far as they need); CR and LF cannot be in what SMTP gives us, but are removed to be sure."""
    return value.replace("\r", "").replace("\n", "")


class Processor:
    """One running filter process."""

    def __init__(self, spec: ProcessorSpec, session_timeout: float, admd: str) -> None:
        self.spec = spec
        self.admd = admd
        self.name = spec.name
        self.session_timeout = session_timeout
        self.reports: frozenset[str] = frozenset()
        self.out_reports: frozenset[str] = frozenset()  # the smtp-out events it registered
        self.phases: frozenset[str] = frozenset()
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.stopping = False
        # A request waiting for its filter-result, by (session, token).
        self._pending: dict[tuple[str, str], asyncio.Future[tuple[str, str]]] = {}
        # Where the lines of a data-line stream go, by session (one message at a time per session), with the
        # stream's token: lines with another are a message given up before (its filter was too slow), not this one's.
        self._streams: dict[str, tuple[str, Callable[[str | None], None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        self._dropping = False  # reports are being dropped (see report)
        self._ready_since = 0.0
        self._restart: asyncio.TimerHandle | None = None

    # -- starting ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the process and wait for its registrations. Raises FilterFailure when it cannot."""
        spec = self.spec
        try:
            argv, options = _launch(spec)
        except (KeyError, OSError) as error:
            raise FilterFailure(f"filter process {spec.name}: {error}") from None
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, close_fds=True, limit=LINE_MAX,
                **options)
        except OSError as error:
            raise FilterFailure(f"filter process {spec.name}: cannot run {spec.command!r}: {error}") from None
        trace.emit("filters", f"filter process {spec.name} started, pid {self.process.pid}: {spec.command}",
                   filter=spec.name, pid=self.process.pid)
        self._tasks.append(asyncio.create_task(self._read_stderr()))
        with contextlib.suppress(FilterFailure, ConnectionError):  # (one that exited at once: said below)
            self._send_lines([f"config|smtpd-version|{SMTPD_VERSION}",
                              f"config|smtp-session-timeout|{int(self.session_timeout)}",
                              *([f"config|subsystem|{SUBSYSTEM}"] if spec.in_use else []),
                              *([f"config|subsystem|{OUT_SUBSYSTEM}"] if spec.out_use else []),
                              f"config|admd|{self.admd}", "config|ready"])
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                await self._registrations()
        except TimeoutError:
            self._kill()
            raise FilterFailure(f"filter process {spec.name}: no `register|ready` within "
                                f"{REGISTER_TIMEOUT:.0f} seconds") from None
        except FilterFailure:
            self._kill()
            raise
        self.ready = True
        self._ready_since = time.monotonic()
        self._tasks.append(asyncio.create_task(self._read_results()))
        _log.info("info: filter process %s ready (reports: %s; smtp-out reports: %s; filters: %s)", spec.name,
                  ", ".join(sorted(self.reports)) or "none", ", ".join(sorted(self.out_reports)) or "none",
                  ", ".join(sorted(self.phases)) or "none")

    async def _registrations(self) -> None:
        reports: set[str] = set()
        out_reports: set[str] = set()
        phases: set[str] = set()
        while True:
            line = await self._read_line()
            if line is None:
                raise FilterFailure(f"filter process {self.name} exited before `register|ready`")
            fields = line.split("|")
            if fields == ["register", "ready"]:
                break
            if len(fields) != 4 or fields[0] != "register" or fields[1] not in ("report", "filter"):
                raise FilterFailure(f"filter process {self.name}: invalid registration: {line[:200]!r}")
            kind, subsystem, name = fields[1:]
            known = REPORT_EVENTS if kind == "report" else FILTER_PHASES
            if subsystem not in (SUBSYSTEM, OUT_SUBSYSTEM) or (kind == "filter" and subsystem != SUBSYSTEM):
                raise FilterFailure(f"filter process {self.name}: invalid registration: {line[:200]!r}")
            if name not in known:
                raise FilterFailure(f"filter process {self.name}: unknown {'report event' if kind == 'report' else 'filter phase'} "
                                    f"in registration: {line[:200]!r}")
            if subsystem == OUT_SUBSYSTEM:
                out_reports.add(name)
                continue
            (reports if kind == "report" else phases).add(name)
        self.reports, self.out_reports, self.phases = frozenset(reports), frozenset(out_reports), frozenset(phases)

    async def _read_line(self) -> str | None:
        assert self.process is not None and self.process.stdout is not None
        try:
            raw = await self.process.stdout.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            raise FilterFailure(f"filter process {self.name}: line longer than {LINE_MAX} bytes") from None
        return raw[:-1].decode("utf-8", "surrogateescape").removesuffix("\r")

    # -- running ---------------------------------------------------------------------------------------------------
    async def _read_results(self) -> None:
        why = ""
        try:
            while (line := await self._read_line()) is not None:
                if not self._dispatch(line):
                    why = f"sent an invalid line: {line[:200]!r}"
                    break
        except FilterFailure as error:
            why = str(error)
        except (ConnectionError, OSError) as error:
            why = f"read failed: {error}"
        if not why:  # its output ended: it exited, or is about to
            status = None
            if self.process is not None:
                with contextlib.suppress(TimeoutError):
                    status = await asyncio.wait_for(self.process.wait(), 1)
            why = "exited" + (f" (status {status})" if status is not None else "")
        self._lost(why)

    def _dispatch(self, line: str) -> bool:
        """Take one line of the process; False: it is no line of the protocol (the process is started again).
        An answer to no request waiting (one that timed out, or for a session that ended) is logged and left,
        as 6.8 leaves an answer for an unknown session."""
        kind, _, rest = line.partition("|")
        if kind not in ("filter-result", "filter-dataline"):
            return False
        session, _, rest = rest.partition("|")
        token, _, value = rest.partition("|")
        if kind == "filter-result":
            waiter = self._pending.pop((session, token), None)
            if waiter is not None and not waiter.done():
                decision, _, argument = value.partition("|")
                waiter.set_result((decision, argument))
                return True
        else:
            stream = self._streams.get(session)
            if stream is not None and stream[0] == token:
                stream[1](value)
            # (else the lines of a message given up (its client left, or its filters were too slow), still on
            # their way: left without a word)
            return True
        _log.warning("filter process %s answered a request not waiting: %s", self.name, log.visible(line[:200]))
        return True

    async def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        stderr = self.process.stderr
        with contextlib.suppress(Exception):
            while raw := await stderr.readline():
                text = raw.decode("utf-8", "replace").rstrip("\r\n")[:STDERR_LINE_MAX]
                _log.warning("filter process %s: %s", self.name, log.visible(text))

    def _lost(self, why: str) -> None:
        """The process is gone or unusable: fail what waits for it, and start it again later."""
        was_ready, self.ready = self.ready, False
        self._kill()
        failure = FilterFailure(f"filter process {self.name} {why}")
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(failure)
        self._pending.clear()
        for _, stream in list(self._streams.values()):
            stream(None)  # the stream ends without its dot
        self._streams.clear()
        if self.stopping:
            return
        if was_ready:
            _log.warning("filter process %s %s; requests to it fail temporarily until it is back",
                         self.name, why)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._ready_since and time.monotonic() - self._ready_since > 60:
            self._failures = 0  # it had run well for a while: start it again soon
        self._ready_since = 0.0
        delay = RESTART_DELAYS[min(self._failures, len(RESTART_DELAYS) - 1)]
        self._failures += 1
        loop = asyncio.get_running_loop()
        self._restart = loop.call_later(delay, lambda: asyncio.ensure_future(self._start_again()))

    async def _start_again(self) -> None:
        self._restart = None
        if self.stopping:
            return
        self._tasks = [task for task in self._tasks if not task.done()]
        try:
            await self.start()
            _log.info("info: filter process %s started again", self.name)
        except FilterFailure as error:
            _log.warning("%s", error)
            self._schedule_restart()

    def _kill(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, 9)

    async def stop(self) -> None:
        self.stopping = True
        self.ready = False
        if self._restart is not None:
            self._restart.cancel()
        process = self.process
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()  # a filter ends when its input does
            try:
                await asyncio.wait_for(process.wait(), 2)
            except TimeoutError:
                self._kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.wait(), 2)
        for task in self._tasks:
            task.cancel()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(FilterFailure(f"filter process {self.name} stopped"))
        self._pending.clear()

    # -- talking -----------------------------------------------------------------------------------------------------
    def _send_lines(self, lines: list[str]) -> None:
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            raise FilterFailure(f"filter process {self.name} is not running")
        process.stdin.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))

    def report(self, line: str) -> None:
        """One report line, not waited for. A process that stops reading its input does not make the daemon
        hold its reports without end: past REPORT_BACKLOG bytes waiting, they are dropped (said once)."""
        if not self.ready:
            return
        stdin = self.process.stdin if self.process is not None else None
        if stdin is not None and stdin.transport.get_write_buffer_size() > REPORT_BACKLOG:
            if not self._dropping:
                self._dropping = True
                _log.warning("filter process %s reads none of its input: reports to it are dropped", self.name)
            return
        self._dropping = False
        with contextlib.suppress(FilterFailure):
            self._send_lines([line])

    async def ask(self, phase: str, session: str, fields: tuple[str, ...]) -> tuple[str, str]:
        """One filter request; its (decision, argument). Raises FilterFailure."""
        if not self.ready:
            raise FilterFailure(f"filter process {self.name} is not running")
        token = f"{secrets.randbits(64):016x}"
        waiter: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._pending[(session, token)] = waiter
        line = "|".join(("filter", PROTOCOL_VERSION, timestamp(), SUBSYSTEM, phase, session, token,
                         *(escape(field) for field in fields)))
        try:
            self._send_lines([line])
            async with asyncio.timeout(self.session_timeout):
                return await waiter
        except TimeoutError:
            raise FilterFailure(f"filter process {self.name} did not answer within "
                                f"{self.session_timeout:.0f} seconds") from None
        finally:
            self._pending.pop((session, token), None)

    def open_stream(self, session: str, receive: Callable[[str | None], None]) -> str:
        """Begin a data-line stream of ``session``; returned lines go to ``receive``. Returns the token."""
        if not self.ready:
            raise FilterFailure(f"filter process {self.name} is not running")
        token = f"{secrets.randbits(64):016x}"
        self._streams[session] = (token, receive)
        return token

    def send_data_lines(self, session: str, token: str, lines: list[str]) -> None:
        stamp = timestamp()
        prefix = f"filter|{PROTOCOL_VERSION}|{stamp}|{SUBSYSTEM}|data-line|{session}|{token}|"
        self._send_lines([prefix + line for line in lines])

    def close_stream(self, session: str) -> None:
        self._streams.pop(session, None)

    async def drain(self) -> None:
        """Wait while the process's input pipe is full (a filter slower than the client)."""
        process = self.process
        if process is not None and process.stdin is not None and not process.stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()


def _launch(spec: ProcessorSpec) -> tuple[list[str], dict[str, Any]]:
    """The command line and the user switch of the process: `/bin/sh -c COMMAND` as 6.8 runs it, as the `user`
    and `group` the declaration names, else the unprivileged user; inside `chroot` when one is named (entered by
    coreutils' chroot(8), which switches user after entering, as a child of ours could not once switched). Only
    a daemon running as root switches at all."""
    argv = ["/bin/sh", "-c", spec.command]
    if os.geteuid() != 0:
        return argv, {}
    from smtpd.lookup.userinfo import unprivileged_user

    entry = pwd.getpwnam(spec.user or unprivileged_user())
    gid = entry.pw_gid
    if spec.group is not None:
        import grp

        gid = grp.getgrnam(spec.group).gr_gid
    if spec.chroot:
        return ["chroot", f"--userspec={entry.pw_uid}:{gid}", "--groups=", spec.chroot, *argv], {}
    # The working folder is the daemon's, as 6.8 leaves it (a home such as /nonexistent must not stop it).
    return argv, {"user": entry.pw_uid, "group": gid, "extra_groups": []}


@dataclass(frozen=True)
class Chain:
    """A listener's filter chain as its sessions run it: each member with its process (None: builtin), and the
    processes that get the sessions' reports (only those of the chain, as in 6.8; each once)."""

    members: tuple[tuple[Filter, Processor | None], ...]
    reporters: tuple[Processor, ...]

    def data_line_stages(self) -> list[Processor]:
        stages: list[Processor] = []
        for _, processor in self.members:
            if processor is not None and "data-line" in processor.phases and processor not in stages:
                stages.append(processor)
        return stages


class ProcessorSet:
    """The processes of one configuration snapshot; sessions hold it for their whole life."""

    def __init__(self, processors: dict[str, Processor]) -> None:
        self.processors = processors
        self._chains: dict[tuple[int, str], Chain | None] = {}
        self._relay_reporters: dict[tuple[int, str], tuple[Processor, ...]] = {}
        self._holders = 0
        self._retired = False
        self.on_retired: Callable[[ProcessorSet], None] = lambda _: None

    def get(self, name: str | None) -> Processor | None:
        return self.processors.get(name) if name is not None else None

    def chain(self, config: Config, name: str | None) -> Chain | None:
        """The chain of the listener filter ``name``; None when it runs no process (or there is no filter)."""
        if not name or not self.processors:
            return None
        key = (id(config), name)
        if key not in self._chains:
            from smtpd.smtp.filters import chain_members

            members = tuple((item, self.get(processor_of(config, item.name)))
                            for item in chain_members(config, name))
            reporters: list[Processor] = []
            for _, processor in members:
                if processor is not None and processor not in reporters:
                    reporters.append(processor)
            self._chains[key] = Chain(members, tuple(reporters)) if reporters else None
        return self._chains[key]

    def relay_reporters(self, config: Config, name: str | None) -> tuple[Processor, ...]:
        """The processes that get the smtp-out reports of a relay action whose `filter` is ``name``: those its
        filter (or chain) runs, each once, as in 6.8 (builtin members judge nothing there). Empty without any."""
        if not name or not self.processors:
            return ()
        key = (id(config), name)
        if key not in self._relay_reporters:
            from smtpd.smtp.filters import chain_members

            found: list[Processor] = []
            for item in chain_members(config, name):
                processor = self.get(processor_of(config, item.name))
                if processor is not None and processor not in found:
                    found.append(processor)
            self._relay_reporters[key] = tuple(found)
        return self._relay_reporters[key]

    def hold(self) -> ProcessorSet:
        self._holders += 1
        return self

    def release(self) -> None:
        self._holders -= 1
        if self._retired and self._holders <= 0:
            self.on_retired(self)

    def retire(self) -> None:
        self._retired = True
        if self._holders <= 0:
            self.on_retired(self)


class FilterProcesses:
    """The component: starts the configuration's processes before the listeners open, and keeps them matching
    the configuration across reloads (a process whose declaration did not change keeps running)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.current = ProcessorSet({})
        self._previous: ProcessorSet | None = None
        self._started: list[Processor] = []
        # The sets still in use: the current one, and replaced ones that sessions begun before a reload hold. A
        # process ends once no set of these has it (several reloads may share it between sets).
        self._live: list[ProcessorSet] = []

    def _timeout(self) -> float:
        server = self.daemon.smtp
        limits = getattr(server, "limits", None)
        return float(getattr(limits, "timeout", 300.0))

    async def _start_set(self, config: Config, reuse: dict[str, Processor]) -> ProcessorSet:
        processors: dict[str, Processor] = {}
        started: list[Processor] = []
        try:
            for name, spec in specs_of(config).items():
                kept = reuse.get(name)
                if kept is not None and kept.spec == spec and not kept.stopping:
                    processors[name] = kept
                    continue
                processor = Processor(spec, self._timeout(), config.admd or self.daemon.mailname)
                await processor.start()
                started.append(processor)
                processors[name] = processor
        except FilterFailure:
            for processor in started:
                await processor.stop()
            raise
        self._started = started
        result = ProcessorSet(processors)
        result.on_retired = self._retired
        return result

    async def start(self) -> None:
        self.current = await self._start_set(self.daemon.config, {})
        self._live = [self.current]
        self.daemon.processors = self.current

    async def stop(self) -> None:
        everyone = {id(processor): processor for held in (*self._live, self._previous) if held is not None
                    for processor in held.processors.values()}
        for processor in everyone.values():
            await processor.stop()

    async def reconfigure(self, old: Config, new: Config) -> list[str]:
        replacement = await self._start_set(new, self.current.processors)
        self._previous, self.current = self.current, replacement
        self._live.append(replacement)
        self.daemon.processors = replacement
        return []

    def commit(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            previous.retire()

    def rollback(self) -> None:
        previous, self._previous = self._previous, None
        if previous is None:
            return
        replacement, self.current = self.current, previous
        self.daemon.processors = previous
        if replacement in self._live:
            self._live.remove(replacement)
        for processor in self._started:
            asyncio.ensure_future(processor.stop())

    def _retired(self, retired: ProcessorSet) -> None:
        """A replaced set no session holds any more: stop its processes that no set still in use has."""
        if retired in self._live:
            self._live.remove(retired)
        in_use = {id(processor) for held in self._live for processor in held.processors.values()}
        for processor in retired.processors.values():
            if id(processor) not in in_use:
                asyncio.ensure_future(processor.stop())


def build(daemon: Daemon) -> FilterProcesses:
    daemon.processors = ProcessorSet({})
    return FilterProcesses(daemon)


class DataLineStream:
    """A message's text through the `data-line` filters of a session's chain, in order, into its builder.

    It stands in for the builder (``feed``/``finish``): the session feeds the client's text (dot-unstuffed, CRLF
    line endings) as it reads it; the lines go to the first process in their SMTP form (a leading dot doubled),
    each process's lines to the next, and the last one's lines, unstuffed, into the builder. ``first_lines``
    (the Received header this daemon adds) go through first, as 6.8 sends them. The builder's strict line-ending
    check is made here, on the client's text, since the lines split here would hide a bare CR or LF."""

    def __init__(self, stages: list[Processor], session: str, builder: Any, first_lines: list[str], *,
                 strict: bool, timeout: float) -> None:
        self.stages = stages
        self.session = session
        self.builder = builder
        self.strict = strict
        self.timeout = timeout
        self.failure: FilterFailure | None = None
        self.refusal: Any = None
        # What the client sent (without CRs, as the message is stored); past max-message-size nothing more
        # goes to the filters (a filter holding the message until its end would hold it all).
        self._received = 0
        self._max_size: int | None = getattr(builder, "max_size", None)
        self._partial = b""
        self._skipping = False  # the rest of a line too long is being dropped
        self._output: list[str] = []
        self._more = asyncio.Event()
        self._ended = False
        self._tokens = [stage.open_stream(session, self._receiver(index)) for index, stage in enumerate(stages)]
        self._send(0, first_lines)

    @property
    def size(self) -> int:
        return int(self.builder.size)

    def _receiver(self, index: int) -> Callable[[str | None], None]:
        last = index == len(self.stages) - 1

        def receive(line: str | None) -> None:
            if line is None:
                self._fail(FilterFailure(f"filter process {self.stages[index].name} ended during a message"))
            elif not last:
                self._send(index + 1, [line])
            elif line == ".":
                self._ended = True
                self._more.set()
            else:
                self._output.append(line)
                if len(self._output) >= 256:
                    self._more.set()
        return receive

    def _send(self, index: int, lines: list[str]) -> None:
        if self.failure is not None or not lines:
            return
        try:
            self.stages[index].send_data_lines(self.session, self._tokens[index], lines)
        except FilterFailure as error:
            self._fail(error)

    def _fail(self, error: FilterFailure) -> None:
        if self.failure is None:
            self.failure = error
            _log.warning("%s: %s", self.session, error)
        self._more.set()

    async def feed(self, data: bytes) -> None:
        if self._max_size is not None:
            self._received += len(data) - data.count(b"\r")
            if self._received > self._max_size:
                self._partial = b""
                if self.refusal is None:
                    self.refusal = replies.TOO_BIG
                await self._flush()
                return
        data = self._partial + data if self._partial else data
        cut = data.rfind(b"\n") + 1
        partial = data[cut:]
        if cut:
            block = data[:cut]
            if self.strict and self.refusal is None and has_bare_line_ending(block):
                self.refusal = replies.BARE_LINE_ENDING
            if self._skipping or len(block) > DATA_LINE_MAX:
                lines = self._short_lines(block)
            else:
                lines = block.decode("utf-8", "surrogateescape").split("\n")[:-1]
            self._send(0, [_stuffed(line.removesuffix("\r")) for line in lines])
        if len(partial) >= DATA_LINE_MAX:  # (not held without end either)
            self._too_long()
            partial = b""
        self._partial = partial
        if cut and self.failure is None:
            # A process that reads none of its input for the session timeout fails the message, as one that
            # does not answer (the session would otherwise wait here, past every timeout of its own).
            try:
                async with asyncio.timeout(self.timeout):
                    await self.stages[0].drain()
            except TimeoutError:
                self._fail(FilterFailure(f"filter process {self.stages[0].name} read none of the message "
                                         f"within {self.timeout:.0f} seconds"))
        await self._flush()

    def _too_long(self) -> None:
        """A line too long (a BDAT message's): dropped up to its end, and the message refused."""
        self._skipping = True
        if self.refusal is None:
            self.refusal = replies.LINE_TOO_LONG

    def _short_lines(self, block: bytes) -> list[str]:
        """The lines of ``block`` (ending with a LF) but those too long, and the rest of one begun before."""
        raw = block.split(b"\n")[:-1]
        if self._skipping:
            self._skipping = False
            raw = raw[1:]
        lines = []
        for line in raw:
            if len(line) >= DATA_LINE_MAX:
                self._too_long()
                self._skipping = False
            else:
                lines.append(line.decode("utf-8", "surrogateescape"))
        return lines

    async def _flush(self) -> None:
        if self._output and self.failure is None:
            lines, self._output = self._output, []
            await self.builder.feed("".join(_unstuffed(line) + "\r\n" for line in lines).encode(
                "utf-8", "surrogateescape"))

    async def finish(self) -> Any:
        """The client's text is all in: end the stream, wait for the last process's dot, finish the builder.
        Returns the refusal (a Reply) or None; a process that failed gives a temporary failure."""
        tail, self._partial = self._partial, b""
        if self._skipping:
            tail = b""
        if tail:
            if self.strict and b"\r" in tail and self.refusal is None:
                self.refusal = replies.BARE_LINE_ENDING
            self._send(0, [_stuffed(tail.decode("utf-8", "surrogateescape").rstrip("\r"))])
        self._send(0, ["."])
        try:
            async with asyncio.timeout(self.timeout):
                while not self._ended and self.failure is None:
                    self._more.clear()
                    await self._flush()
                    if not self._ended and self.failure is None:
                        await self._more.wait()
        except TimeoutError:
            self._fail(FilterFailure(f"filter processes did not end the message within {self.timeout:.0f} seconds"))
        self.close()
        await self._flush()
        refusal = await self.builder.finish()
        if self.failure is not None:
            return replies.FILTER_FAILED
        return self.refusal or refusal

    def close(self) -> None:
        for stage in self.stages:
            stage.close_stream(self.session)


def _stuffed(line: str) -> str:
    return "." + line if line.startswith(".") else line


def _unstuffed(line: str) -> str:
    return line[1:] if line.startswith(".") else line
