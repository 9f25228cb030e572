"""smtpctl's exit codes (reference §2.2-2.3, plus the ones our extra commands need)."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # `command failed`, daemon not running, refused, bad keyword
    SOFTWARE = 70  # sendmail: the enqueue failed (EX_SOFTWARE)
    TEMPFAIL = 75  # sendmail: queued offline (EX_TEMPFAIL)
    CONFIG = 78  # reload: the new configuration is invalid; the daemon keeps the old one (EX_CONFIG)
    INTERRUPTED = 130  # Ctrl-C at a prompt or a wait (the streams, trace --follow and monitor, end with 0 on it)
    USAGE = 255  # the command line did not parse (`possibilities are:` / `invalid command`)
