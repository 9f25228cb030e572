"""`smtpctl trace` / `untrace`: switch the daemon's trace subsystems on and off, or follow their events live.

`smtpctl trace expand` turns the trace on (its lines go to the daemon's log) and returns at once.
`smtpctl trace expand lookup --follow` streams those events to the terminal until Ctrl-C, then turns off what it
turned on (unless another follower or `smtpctl trace` keeps it on). The daemon keeps a bounded buffer per follower: a slow reader loses events, and is told how many.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from shared.protocol import TRACE_KEYWORDS
from smtpctl import render
from smtpctl.client import ControlError, DaemonNotRunning
from smtpctl.exitcodes import Exit
from smtpctl.words import Leaf, fail, simple, state

SUBSYSTEM_COLOURS = {
    "smtp": "cyan", "mta": "magenta", "expand": "green", "lookup": "yellow", "rules": "bright_blue",
    "queue": "blue", "scheduler": "bright_magenta", "bounce": "red", "stat": "bright_black", "table": "yellow",
    "io": "white", "imsg": "white", "filters": "bright_cyan", "mproc": "white",
}


def complete_keywords(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [keyword for keyword in TRACE_KEYWORDS if keyword.startswith(incomplete)]


def _check_keywords(keywords: tuple[str, ...]) -> list[str]:
    for keyword in keywords:
        if keyword not in TRACE_KEYWORDS:
            fail(f"invalid trace keyword: {keyword}")
    return list(keywords)


@click.command(cls=Leaf, placeholders=["<str>"])
@click.argument("keywords", nargs=-1, required=True, metavar="SUBSYSTEM...", shell_complete=complete_keywords)
@click.option("-f", "--follow", is_flag=True, help="Stream the events here until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="With --follow: one JSON object per event and line.")
@click.option("--session", metavar="ID", help="With --follow: only events that mention this session id.")
@click.option("--address", metavar="TEXT", help="With --follow: only events that mention this address.")
@click.option("--msgid", metavar="MSGID", help="With --follow: only events that mention this message id.")
@click.option("--buffer", "capacity", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="With --follow: events the daemon keeps for us while we are slow, before dropping.")
def trace(keywords: tuple[str, ...], follow: bool, as_json: bool, session: str | None, address: str | None,
          msgid: str | None, capacity: int) -> None:
    """Turn on tracing of SUBSYSTEM (imsg io smtp filters mta bounce scheduler lookup stat rules mproc
    expand table queue, or all); with --follow, show the events live.

    \b
    Examples:
      smtpctl trace expand && smtpctl trace lookup
      smtpctl trace smtp expand --follow --address bob@example.org
    """
    wanted = _check_keywords(keywords)
    if not follow:
        simple("trace", keywords=wanted)
        return
    filters = {key: value for key, value in (("session", session), ("address", address), ("msgid", msgid))
               if value}
    sys.exit(follow_events(wanted, filters, capacity, as_json))


@click.command(cls=Leaf, placeholders=["<str>"])
@click.argument("keywords", nargs=-1, required=True, metavar="SUBSYSTEM...", shell_complete=complete_keywords)
def untrace(keywords: tuple[str, ...]) -> None:
    """Turn off tracing of SUBSYSTEM.

    \b
    Example:
      smtpctl untrace expand
    """
    simple("untrace", keywords=_check_keywords(keywords))


def follow_events(keywords: list[str], filters: dict[str, str], capacity: int, as_json: bool) -> int:
    printer = _JsonPrinter() if as_json else (_RichPrinter() if render.is_terminal() else _PlainPrinter())
    client = state().client(timeout=None)
    try:
        for event in client.stream("trace.follow", keywords=keywords, capacity=capacity, **filters):
            printer.show(event)
    except KeyboardInterrupt:
        return Exit.OK  # the usual way to stop following; closing the socket turns the traces off
    except DaemonNotRunning:
        fail("smtpd doesn't seem to be running")
    except ControlError as error:
        fail(error.message)
    finally:
        client.close()
    return Exit.OK


def terminal_safe(text: str) -> str:
    """Text whose control characters are written as vis(3) does (ESC as \\^[): an event quotes what clients
    and remote servers sent (`smtp: ... <<< EHLO ...`), which must not drive the terminal it is shown on.
    Printable characters, UTF-8 included, tabs and newlines are left alone; other invisible ones (bidi
    overrides) become \\uXXXX."""
    if text.isprintable():
        return text
    from smtpd.queue.listing import vis

    out = []
    for char in text:
        code = ord(char)
        if char.isprintable() or char in "\t\n":
            out.append(char)
        elif code < 0x100 or 0xDC80 <= code <= 0xDCFF:
            out.append(vis(char))
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


class _PlainPrinter:
    """The daemon log's trace lines (`expand: lka_expand: ...`); losses on stderr."""

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "trace":
            sys.stdout.write(f"{event.get('subsystem')}: {event.get('message')}\n")
            sys.stdout.flush()
        elif kind == "dropped":
            render.error(f"{event.get('count')} trace events dropped (reading too slowly)")


class _JsonPrinter:
    def show(self, event: dict[str, Any]) -> None:
        if event.get("type") in ("trace", "dropped"):
            render.print_json(event)


class _RichPrinter:
    """Time, subsystem (coloured, aligned) and message; losses in red."""

    def show(self, event: dict[str, Any]) -> None:
        from rich.markup import escape

        console = render.console()
        kind = event.get("type")
        if kind == "start":
            console.print(f"[dim]following {', '.join(event.get('subsystems', []))}; Ctrl-C to stop[/]")
        elif kind == "trace":
            subsystem = str(event.get("subsystem", ""))
            stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("time", 0))))
            colour = SUBSYSTEM_COLOURS.get(subsystem, "white")
            message = escape(terminal_safe(str(event.get("message", ""))))
            console.print(f"[dim]{stamp}[/] [{colour}]{subsystem:<9}[/] {message}", soft_wrap=True)
        elif kind == "dropped":
            console.print(f"[bold red]... {event.get('count')} events dropped: the terminal is too slow[/]")
