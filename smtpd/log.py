"""Daemon logging: lines on stderr in the foreground (-d), syslog (mail) with -F or detached.

As OpenSMTPD's, an informational line is the message alone (`0123456789abcdef smtp connected address=...`: log
parsers such as fail2ban's filters anchor on the session id); warnings and debug lines start with `warn: ` and
`debug: `. The few informational lines that OpenSMTPD itself starts with `info: ` (the start, pause/resume, table
updates) carry it in their message."""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

LOGGER_NAME = "smtpd"
_LEVEL_WORDS = {logging.DEBUG: "debug: ", logging.INFO: "", logging.WARNING: "warn: ",
                logging.ERROR: "warn: ", logging.CRITICAL: "fatal: "}


_CSTYLE = {0x00: "\\0", 0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f",
           0x0D: "\\r"}


def visible(text: str, *, white: bool = False) -> str:
    """A value from a client made safe for one log line (as OpenSMTPD passes such values through strnvis):
    control characters and bytes outside printable ASCII are escaped (`\\r`, `\\n`, `\\t`, `\\0`, else `\\ooo`
    octal), a backslash is doubled, and with ``white`` a space is escaped too (`\\040`), so that a user name can
    neither start a new log line nor pose as another `key=value` field of the line."""
    if text.isascii() and text.isprintable() and "\\" not in text and not (white and " " in text):
        return text  # the usual case, unchanged
    out: list[str] = []
    for byte in text.encode("utf-8", "surrogateescape"):
        if byte == 0x5C:
            out.append("\\\\")
        elif 0x21 <= byte <= 0x7E or (byte == 0x20 and not white):
            out.append(chr(byte))
        elif not white and byte in _CSTYLE:
            out.append(_CSTYLE[byte])
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


class _ReferenceFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "bare", False):  # a trace line: as the trace bus wrote it
            return record.getMessage()
        line = f"{_LEVEL_WORDS.get(record.levelno, '')}{record.getMessage()}"
        if not record.exc_info or record.exc_info[1] is None:
            return line
        # An unexpected error names itself on its line (its text may hold a client's bytes: made visible); with
        # -v its traceback follows, one `debug:` line each, for a bug report.
        error = record.exc_info[1]
        line += f": {type(error).__name__}: {visible(str(error))}"
        if logging.getLogger(LOGGER_NAME).isEnabledFor(logging.DEBUG):
            trace_lines = "".join(traceback.format_exception(error)).rstrip("\n").splitlines()
            line += "".join(f"\ndebug: {visible(text)}" for text in trace_lines)
        return line


class _BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines logged on the event loop are written together at the end of the loop's turn: a message's
    accepted/envelope lines cost one write(2), not one each. Lines from other threads go out at once."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.pending: list[str] = []
        self.scheduled = False
        self.holding = 0  # inside batch(): its end writes the lines, no loop turn is asked for them

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 — as logging does: report, never raise into the caller
            self.handleError(record)
            return
        self.add(line, loop)

    def add(self, line: str, loop: asyncio.AbstractEventLoop) -> None:
        """A line ready to write (formatted, terminated), logged on the running ``loop``."""
        with self.lock:  # type: ignore[union-attr]  # (another thread's line may be flushing them)
            self.pending.append(line)
        if not self.scheduled and not self.holding:
            self.scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        self.write_pending()

    def write_pending(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.pending:
                lines, self.pending = "".join(self.pending), []
                self.stream.write(lines)
        super().flush()


# The priorities OpenSMTPD's log functions use: its `warn:` lines are errors to syslog (log_warn, log_warnx), its
# `fatal:` line is critical. A `mail.err` rule (Debian's rsyslog sends mail.err to /var/log/mail.err) keeps them.
_SYSLOG_PRIORITY = {logging.DEBUG: logging.handlers.SysLogHandler.LOG_DEBUG,
                    logging.INFO: logging.handlers.SysLogHandler.LOG_INFO,
                    logging.WARNING: logging.handlers.SysLogHandler.LOG_ERR,
                    logging.ERROR: logging.handlers.SysLogHandler.LOG_ERR,
                    logging.CRITICAL: logging.handlers.SysLogHandler.LOG_CRIT}


class SyslogHandler(logging.handlers.SysLogHandler):
    """Lines to syslog (facility mail) as syslog(3) sends them for OpenSMTPD, which opens its log with its name
    and the pid: `<PRI>Mmm dd hh:mm:ss smtpd[PID]: message`, so that the log says `smtpd[PID]:` (what fail2ban's
    `_daemon = smtpd`, `journalctl -t smtpd` and mail log summarizers look for; without a tag, syslog took the
    message's first word for the program's name). One datagram per line (a traceback's lines too), no NUL.
    Without a syslog daemon a line is dropped quietly, and the next one tries to connect again."""

    def __init__(self, address: str = "/dev/log") -> None:
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 — as logging does: report, never raise into the caller
            self.handleError(record)
            return
        priority = self.encodePriority(self.facility, _SYSLOG_PRIORITY.get(record.levelno, self.LOG_DEBUG))
        head = f"<{priority}>{time.strftime('%b %e %H:%M:%S')} smtpd[{os.getpid()}]: "
        for line in text.split("\n"):
            self.send(f"{head}{line}".encode("utf-8", "surrogateescape"))

    def send(self, datagram: bytes) -> None:
        with self.lock:  # type: ignore[union-attr]  # (lines from other threads: one socket)
            try:
                self.socket.send(datagram)
            except OSError:
                try:  # the syslog daemon restarted, or was not there yet
                    self.socket.close()
                    self._connect_unixsocket(self.address)
                    self.socket.send(datagram)
                except OSError:
                    pass


class TraceToLog:
    """The trace bus's console when the log goes to syslog (-F, or detached): each trace line is a debug-priority
    message of the log, whatever `log verbose/brief` says, as OpenSMTPD's traces are (written to stderr, they
    went nowhere once detached, and to the terminal with -F)."""

    def __init__(self) -> None:
        self.partial = ""

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            record = logging.LogRecord(LOGGER_NAME, logging.DEBUG, "", 0, line, None, None)
            record.bare = True
            for handler in logging.getLogger(LOGGER_NAME).handlers:
                handler.handle(record)
        return len(text)

    def flush(self) -> None:
        pass


_batching: _BatchedStreamHandler | None = None  # the foreground handler, when setup() installed one


@contextmanager
def batch() -> Iterator[None]:
    """Lines logged on the event loop inside this block are written together when it ends.

    For lines logged together just before a task waits (a message's accepted/envelope lines): the flush the
    handler would otherwise schedule costs the event loop a turn of its own when nothing else is ready."""
    handler = _batching
    if handler is None:
        yield
        return
    handler.holding += 1
    try:
        yield
    finally:
        handler.holding -= 1
        if not handler.holding:
            handler.write_pending()  # (a flush already scheduled still runs: it finds nothing, or later lines)


def _only_to(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether an INFO record of ``logger`` would reach ``handler`` and nothing else, with nothing filtering it,
    and be written by our formatter."""
    if not logger.isEnabledFor(logging.INFO) or handler.filters or handler.level > logging.INFO or not isinstance(
            handler.formatter, _ReferenceFormatter):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return False
        if current.handlers:
            return current.handlers == [handler] and not current.propagate
        if not current.propagate:
            return False
        current = current.parent
    return False


class _DaemonLogger(logging.Logger):
    """The daemon's loggers (get()). On the event loop, an INFO line whose only way out is the foreground handler
    (the daemon's setup with -d: no filter, no other handler) joins that handler's batch at once, formatted as
    the handler would: no LogRecord and no handler chain for it. With 8 sessions and a queue storing nothing,
    so that the event loop is the limit, that took 5-13% more messages a second in four pairs (bench/README.md).
    Anything else takes the usual way."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        handler = _batching
        if handler is not None and not kwargs and _only_to(self, handler) and not _is_mapping_call(args):
            try:
                loop = asyncio.get_running_loop()
                text = str(msg) % args if args else str(msg)
            except (RuntimeError, TypeError, ValueError):  # no loop here, or a bad format: the usual way reports it
                pass
            else:
                handler.add(f"{text}{handler.terminator}", loop)  # (as _ReferenceFormatter writes it)
                return
        super().info(msg, *args, **kwargs)


def _is_mapping_call(args: tuple[object, ...]) -> bool:
    # logging takes a lone non-empty mapping as the arguments by name: leave that to it
    return len(args) == 1 and isinstance(args[0], Mapping) and bool(args[0])


def setup(to_syslog: bool = False, verbose: bool = False) -> None:
    # Our lines say neither process, thread nor source line: do not collect them for every record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None  # noqa: SLF001 — the logging HOWTO's own advice against a stack walk per record
    global _batching
    _batching = None
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    if to_syslog:
        handler: logging.Handler = SyslogHandler()
    else:
        handler = _batching = _BatchedStreamHandler()
    handler.setFormatter(_ReferenceFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def get(name: str = "") -> logging.Logger:
    """The logger of a subsystem (`smtpd.smtp`, `smtpd.queue`, ...)."""
    previous = logging.getLoggerClass()
    logging.setLoggerClass(_DaemonLogger)  # (for this name only: other libraries' loggers stay as they are)
    try:
        return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
    finally:
        logging.setLoggerClass(previous)
