"""The line format of opensmtpd-extras' table configuration files (table-sqlite, -postgres, -mysql, -redis, -ldap):
one `key value` setting per line, `#` lines and blank lines skipped. Every one of those programs splits a line
alike, so the backends that read their files share this reader."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

# The key ends at the first space, tab or colon (`dbpath /x`, `dbpath\t/x`, `dbpath: /x`, `dbpath:/x`); blanks,
# and colons followed by a blank, are skipped before the value.
SEPARATOR = re.compile(r"[ \t:]")
VALUE_START = re.compile(r"^(?:\s|:(?=\s))+")


def setting_lines(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, key, value) for each setting of the file's text, in order; value is "" when missing."""
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        found = SEPARATOR.search(line)
        key, value = (line[:found.start()], line[found.end():]) if found else (line, "")
        yield number, key, VALUE_START.sub("", value)


def bound_seconds(default: float) -> float:
    """One of the backends' time bounds for a server (to connect, to answer): ``default`` seconds, times
    SMTPD_TABLE_TIMEOUT_SCALE when that is set. The tests set it below 1, so that what they check of a server
    that hangs takes seconds less; an administrator has no reason to."""
    try:
        scale = float(os.environ.get("SMTPD_TABLE_TIMEOUT_SCALE", "1"))
    except ValueError:
        scale = 1.0
    return default * scale if 0 < scale <= 1 else default
