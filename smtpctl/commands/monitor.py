"""`smtpctl monitor`: one row of counters per second, in the reference's columns (§2.4).

The daemon streams its counters; the rows are computed here. `curr` columns are absolute, the others are the
change since the previous row (the first row holds the totals).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import click

from smtpctl import render
from smtpctl.client import ControlError, DaemonNotRunning
from smtpctl.exitcodes import Exit
from smtpctl.words import Leaf, fail, state

HEADER = ("--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------",
          "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce")
ROW_FORMAT = "{:4d} {:4d} {:4d}  {:4d} {:4d} {:4d} {:4d}    {:4d}    {:4d} {:4d}   {:4d}   {:4d}   {:4d}"
COLUMNS = ("client_curr", "client_conn", "client_disc", "envelope_curr", "envelope_enq", "envelope_deq",
           "ok", "tmpfail", "prmfail", "loop", "expire", "remove", "bounce")
HEADER_EVERY = 25

# The totals behind the delta columns, by column.
DELTA_KEYS = {
    "ok": ("scheduler.delivery.ok",),
    "tmpfail": ("scheduler.delivery.tempfail",),
    "prmfail": ("scheduler.delivery.permfail",),
    "loop": ("scheduler.delivery.loop",),
    "expire": ("scheduler.envelope.expired",),
    "remove": ("scheduler.envelope.removed",),
    "bounce": ("queue.bounce",),
}
CONNECTION_KEYS = ("smtp.session.inet4", "smtp.session.inet6", "smtp.session.local")
# The envelopes the scheduler took in since the start: the event's `digest`, put in the snapshot under this name.
ENQUEUED = "digest.enqueued"


def _total(stats: dict[str, int], keys: tuple[str, ...]) -> int:
    return sum(int(stats.get(key, 0)) for key in keys)


def _counters(stats: dict[str, int]) -> dict[str, int]:
    """Absolute values: the two `curr` columns and the running totals the other columns are deltas of."""
    values = {"client_curr": int(stats.get("smtp.session", 0)),
              "connections": _total(stats, CONNECTION_KEYS),
              "envelope_curr": int(stats.get("scheduler.envelope", 0)),
              "enqueued": int(stats.get(ENQUEUED, 0))}
    values.update({column: _total(stats, keys) for column, keys in DELTA_KEYS.items()})
    return values


def monitor_rows(snapshots: Iterator[dict[str, int]]) -> Iterator[dict[str, int]]:
    """One row per snapshot. Deltas are never shown negative (a counter reset shows as 0)."""
    previous = {key: 0 for key in ("client_curr", "connections", "envelope_curr", "enqueued", *DELTA_KEYS)}
    for stats in snapshots:
        now = _counters(stats)
        delta = {key: now[key] - previous[key] for key in now}
        connected = delta["connections"]
        enqueued = delta["enqueued"]
        row = {
            "client_curr": now["client_curr"],
            "client_conn": connected,
            "client_disc": connected - delta["client_curr"],
            "envelope_curr": now["envelope_curr"],
            "envelope_enq": enqueued,
            "envelope_deq": enqueued - delta["envelope_curr"],
            **{column: delta[column] for column in DELTA_KEYS},
        }
        previous = now
        yield {column: max(0, row[column]) for column in COLUMNS}


def _snapshot(event: dict[str, Any]) -> dict[str, int]:
    """The counters of one event, with the digest's enqueued total (a daemon without a digest: none)."""
    stats = dict(event["stats"])
    digest = event.get("digest")
    if isinstance(digest, dict) and isinstance(digest.get("enqueued"), int):
        stats[ENQUEUED] = digest["enqueued"]
    return stats


def _finite(value: float) -> float:
    # FloatRange lets "nan" through (no comparison with NaN fails).
    if value != value:
        raise click.BadParameter("nan is not a number of seconds")
    return value


def format_row(row: dict[str, int]) -> str:
    return ROW_FORMAT.format(*(row[column] for column in COLUMNS))


@click.command(cls=Leaf)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row.")
@click.option("-c", "--count", type=click.IntRange(1), help="Stop after this many rows (default: never).")
@click.option("-i", "--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              callback=lambda ctx, param, value: _finite(value), help="Seconds between rows.")
def monitor(as_json: bool, count: int | None, interval: float) -> None:
    """Show the daemon's activity every second until Ctrl-C: clients, envelopes, deliveries.

    \b
    Example:
      smtpctl monitor
    """
    client = state().client(timeout=None)
    terminal = render.is_terminal() and not as_json
    try:
        snapshots = (_snapshot(event) for event in client.stream("monitor", interval=interval)
                     if event.get("type") == "stats" and isinstance(event.get("stats"), dict))
        for number, row in enumerate(monitor_rows(snapshots)):
            if as_json:
                render.print_json(row)
            else:
                _print_row(number, row, terminal)
            if count is not None and number + 1 >= count:
                break
    except KeyboardInterrupt:
        pass
    except DaemonNotRunning:
        fail("smtpd doesn't seem to be running")
    except ControlError as error:
        fail(error.message)
    finally:
        client.close()
    sys.exit(Exit.OK)


def _print_row(number: int, row: dict[str, Any], terminal: bool) -> None:
    out = sys.stdout
    if number % HEADER_EVERY == 0:
        if number:
            out.write("\n")
        if terminal:
            out.write("".join(f"\033[1m{line}\033[0m\n" for line in HEADER))
        else:
            out.write("".join(line + "\n" for line in HEADER))
    out.write(format_row(row) + "\n")
    out.flush()
