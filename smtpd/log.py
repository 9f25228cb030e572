"""Daemon logging: `info: ...` / `warn: ...` lines on stderr in the foreground (-d), syslog (mail) with -F."""

from __future__ import annotations

import logging
import logging.handlers
import sys

LOGGER_NAME = "smtpd"
_LEVEL_WORDS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "warn", logging.CRITICAL: "fatal"}


class _ReferenceFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{_LEVEL_WORDS.get(record.levelno, 'info')}: {record.getMessage()}"


def setup(to_syslog: bool = False, verbose: bool = False) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    if to_syslog:
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError:
            handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ReferenceFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def get(name: str = "") -> logging.Logger:
    """The logger of a subsystem (`smtpd.smtp`, `smtpd.queue`, ...)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
