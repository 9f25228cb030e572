"""The daemon's log lines (smtpd/log.py): on the event loop, an INFO line whose only way out is the foreground
handler joins its batch without a LogRecord; with any other handler or a filter, lines take the usual way."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smtpd import log


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def foreground() -> Iterator[tuple[logging.Logger, io.StringIO, list[str]]]:
    """The daemon's foreground setup (-d) writing into a buffer, the (unformatted) messages of the LogRecords made
    meanwhile, and the logging state as it was afterwards."""
    top = logging.getLogger(log.LOGGER_NAME)
    saved = (list(top.handlers), top.level, top.propagate)
    factory = logging.getLogRecordFactory()
    records: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        records.append(str(record.msg))
        return record

    log.setup()
    written = io.StringIO()
    assert log._batching is not None  # noqa: SLF001
    log._batching.setStream(written)  # noqa: SLF001  (stderr in the daemon)
    logging.setLogRecordFactory(counting)
    try:
        yield log.get("smtp"), written, records
    finally:
        logging.setLogRecordFactory(factory)
        top.handlers[:] = saved[0]
        top.setLevel(saved[1])
        top.propagate = saved[2]
        log._batching = None  # noqa: SLF001


def on_loop(action: Callable[[], None]) -> None:
    async def scenario() -> None:
        action()

    asyncio.run(scenario())


def daemon_handlers_only() -> None:
    """The foreground handler alone, as in the daemon: pytest adds its capture handlers for each test's call."""
    logging.getLogger(log.LOGGER_NAME).handlers[:] = [log._batching]  # noqa: SLF001


def test_lines_join_the_foreground_batch_as_the_handler_writes_them(foreground: Any) -> None:
    logger, written, records = foreground
    daemon_handlers_only()

    def lines() -> None:
        with log.batch():
            logger.info("%s smtp message msgid=%s size=%d", "a1", "0badcafe", 22)
            logger.info("a1 smtp envelope evpid=0badcafe00000001 from=<%s>", "x@y.test")
            logger.warning("%s smtp: queue commit failed", "a1")

    on_loop(lines)
    assert written.getvalue() == ("a1 smtp message msgid=0badcafe size=22\n"
                                  "a1 smtp envelope evpid=0badcafe00000001 from=<x@y.test>\n"
                                  "warn: a1 smtp: queue commit failed\n")
    assert records == ["%s smtp: queue commit failed"]  # the INFO lines made no LogRecord


def test_another_handler_gets_them_as_records(foreground: Any) -> None:
    logger, written, records = foreground
    daemon_handlers_only()
    collect = Collect()
    logging.getLogger(log.LOGGER_NAME).addHandler(collect)
    on_loop(lambda: logger.info("%s smtp message msgid=%s", "b2", "12345678"))
    assert collect.messages == ["INFO b2 smtp message msgid=12345678"]
    assert written.getvalue() == "b2 smtp message msgid=12345678\n"


def test_a_filter_or_a_higher_level_still_decides(foreground: Any) -> None:
    logger, written, records = foreground
    daemon_handlers_only()
    seen: list[str] = []

    def keep_none(record: logging.LogRecord) -> bool:
        seen.append(record.getMessage())
        return False

    logger.addFilter(keep_none)
    try:
        on_loop(lambda: logger.info("c3 smtp message msgid=%s", "87654321"))
    finally:
        logger.removeFilter(keep_none)
    assert seen == ["c3 smtp message msgid=87654321"]
    logging.getLogger(log.LOGGER_NAME).setLevel(logging.WARNING)
    on_loop(lambda: logger.info("d4 smtp message msgid=%s", "11111111"))
    assert written.getvalue() == ""


def test_off_the_loop_and_odd_calls_take_the_usual_way(foreground: Any) -> None:
    logger, written, records = foreground
    daemon_handlers_only()
    logger.info("e5 from a thread, no loop")
    on_loop(lambda: logger.info("f6 %(name)s by name", {"name": "mapping"}))
    on_loop(lambda: logger.info("g7 %d", "not a number"))  # logging reports the bad format; it never raises
    assert "e5 from a thread, no loop\n" in written.getvalue()
    assert "f6 mapping by name\n" in written.getvalue()
    assert records == ["e5 from a thread, no loop", "f6 %(name)s by name", "g7 %d"]


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_error_names_itself_and_with_v_shows_its_traceback(foreground: Any, verbose: bool) -> None:
    """`smtp session failed` alone told an administrator nothing; the error's text comes from a client at times,
    so it is made visible like any client value (no second line, no terminal escape)."""
    logger, written, _ = foreground
    daemon_handlers_only()
    logging.getLogger(log.LOGGER_NAME).setLevel(logging.DEBUG if verbose else logging.INFO)

    def failing() -> None:
        try:
            raise ValueError("bad \x1b[31mline\ninfo: forged")
        except ValueError:
            logger.exception("%s smtp session failed", "a1")

    on_loop(failing)
    lines = written.getvalue().splitlines()
    assert lines[0] == "warn: a1 smtp session failed: ValueError: bad \\033[31mline\\ninfo: forged"
    if verbose:
        assert lines[1] == "debug: Traceback (most recent call last):"
        assert any("in failing" in line for line in lines) and all(line.startswith("debug: ") for line in lines[1:])
    else:
        assert len(lines) == 1


@contextlib.contextmanager
def syslog_logger(address: str) -> Iterator[logging.Logger]:
    """A logger of its own whose only way out is the daemon's syslog handler, sending to ``address``."""
    handler = log.SyslogHandler(address=address)
    handler.setFormatter(log._ReferenceFormatter())  # noqa: SLF001
    logger = logging.getLogger(f"smtpd-test-syslog-{address}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_syslog_lines_are_tagged_smtpd_pid_one_datagram_per_line(tmp_path: Any) -> None:
    """As syslog(3) sends OpenSMTPD's lines: `<PRI>TIMESTAMP smtpd[PID]: message` (facility mail), one datagram a
    line, no NUL; without the tag, syslog named the program after the message's first word (`info:`)."""
    import os
    import re
    import socket

    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    try:
        with syslog_logger(path) as logger:
            logger.info("0123456789abcdef smtp connected address=127.0.0.1 host=localhost")
            logger.warning("two\nlines")
            got = [server.recv(4096) for _ in range(3)]
    finally:
        server.close()
    head = rf"^<(\d+)>[A-Z][a-z]{{2}} [ \d]\d \d\d:\d\d:\d\d smtpd\[{os.getpid()}\]: "
    first = re.match(head + "(.*)$", got[0].decode())
    assert first is not None, got
    assert int(first.group(1)) == 2 * 8 + 6  # mail.info
    assert first.group(2).endswith("0123456789abcdef smtp connected address=127.0.0.1 host=localhost")
    second, third = (re.match(head + "(.*)$", datagram.decode()) for datagram in got[1:])
    # mail.err, as OpenSMTPD sends its `warn:` lines (they were mail.warning: a `mail.err` rule, as Debian's
    # rsyslog has for /var/log/mail.err, kept none of them)
    assert second is not None and third is not None and int(second.group(1)) == 2 * 8 + 3
    assert (second.group(2), third.group(2)) == ("warn: two", "lines")
    assert not any(b"\0" in datagram or b"\n" in datagram for datagram in got)


def test_syslog_without_a_daemon_drops_lines_quietly(tmp_path: Any, capsys: Any) -> None:
    with syslog_logger(str(tmp_path / "nobody-listens")) as logger:
        logger.info("lost")
    assert "Logging error" not in capsys.readouterr().err
