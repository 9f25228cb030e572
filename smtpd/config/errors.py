"""Diagnostics of the configuration parser: errors, warnings and fatal stops, as the user sees them.

Every message is one stderr line. Located ones read ``FILE:LINE: message`` (warnings ``FILE:LINE: warning:
message``); the others are printed as they are (``smtpd: table_create: ...``, ``warn: no rules, nothing to
do``, ``pushfile: PATH: No such file or directory``), exactly like OpenSMTPD prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from smtpd.config.model import Location


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    # A note accompanies an error (OpenSMTPD's `PATH: fopen: ...` line before `invalid configuration file`)
    # or is a warning-level line with OpenSMTPD's own wording (`warn: ...`); it does not count as an error.
    NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    text: str
    location: Location | None = None
    severity: Severity = Severity.ERROR

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    @property
    def is_warning(self) -> bool:
        return self.severity is Severity.WARNING

    def __str__(self) -> str:
        if self.location is None:
            return self.text
        if self.severity is Severity.WARNING:
            return f"{self.location}: warning: {self.text}"
        return f"{self.location}: {self.text}"


class FatalConfigError(Exception):
    """OpenSMTPD's fatalx()/errx() during parsing: the run stops at once.

    ``lines`` are printed as they are (e.g. ``["pki name not found: x", "smtpd"]``).
    """

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[-1] if lines else "smtpd")
        self.lines = list(lines)
