"""Output: rich tables and colours on a terminal, OpenSMTPD's stable text in pipes, JSON with --json.

rich is imported only when a terminal is there to see it, so that scripts (and `smtpctl show status` in a
pipe) start fast. NO_COLOR or TERM=dumb turn the rich output off as well.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from shared.wire import json_text

_console: Any = None


def is_terminal(stream: Any = None) -> bool:
    stream = stream if stream is not None else sys.stdout
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return interactive and os.environ.get("TERM") != "dumb" and "NO_COLOR" not in os.environ


def console() -> Any:
    """The shared rich Console (imported on first use)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(highlight=False)
    return _console


def print_json(value: Any) -> None:
    """One JSON document on one line (JSON Lines when called once per item)."""
    sys.stdout.write(json_text(value) + "\n")
    sys.stdout.flush()


def print_lines(lines: Iterable[str]) -> None:
    out = sys.stdout
    for line in lines:
        out.write(line + "\n")
    out.flush()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None,
                styles: dict[str, str] | None = None) -> None:
    """A rich table; ``styles`` maps a cell's text to a style (e.g. {"paused": "yellow"})."""
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header)
    styles = styles or {}
    for row in rows:
        cells = [str(cell) for cell in row]
        table.add_row(*(f"[{styles[cell]}]{cell}[/]" if cell in styles else _escape(cell) for cell in cells))
    console().print(table)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def error(message: str) -> None:
    """`smtpctl: message` on stderr, as OpenSMTPD prints its errors."""
    sys.stdout.flush()
    sys.stderr.write(f"smtpctl: {message}\n")
    sys.stderr.flush()
