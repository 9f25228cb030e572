"""`smtpctl show ...`: status, stats, and the relay's hosts, routes, relays, hoststats and paused routes.

The queue's show commands (queue, envelope, message) are the queue family's (smtpctl/commands/queue.py); this
group only names them, in OpenSMTPD's order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from smtpctl import render, showtext
from smtpctl.words import Leaf, WordGroup, call, json_option

SHOW_CHILDREN = {
    "mta": "smtpctl.commands.show:show_mta",
    "envelope": "smtpctl.commands.queue:show_envelope",
    "hoststats": "smtpctl.commands.show:show_hoststats",
    "message": "smtpctl.commands.queue:show_message",
    "queue": "smtpctl.commands.queue:show_queue",
    "hosts": "smtpctl.commands.show:show_hosts",
    "relays": "smtpctl.commands.show:show_relays",
    "routes": "smtpctl.commands.show:show_routes",
    "stats": "smtpctl.commands.show:show_stats",
    "status": "smtpctl.commands.show:show_status",
}


@click.group(cls=WordGroup, lazy=SHOW_CHILDREN)
def show() -> None:
    """Show the daemon's state: status, stats, queue, envelopes, relay hosts and routes.

    \b
    Example:
      smtpctl show stats
    """


STATE_STYLES = {"running": "green", "paused": "bold yellow"}


@click.command("status", cls=Leaf)
@json_option
def show_status(as_json: bool) -> None:
    """Whether MDA, MTA and SMTP are running or paused.

    \b
    Example:
      smtpctl show status
    """
    status = call("show.status")
    if as_json:
        render.print_json(status)
    elif render.is_terminal():
        render.print_table(["subsystem", "state"],
                           [(label, status.get(name, "")) for name, label in showtext.SUBSYSTEM_LABELS],
                           styles=STATE_STYLES)
    else:
        render.print_lines(showtext.status_lines(status))


@click.command("stats", cls=Leaf)
@json_option
def show_stats(as_json: bool) -> None:
    """The daemon's counters as key=value lines (uptime also as uptime.human).

    \b
    Example:
      smtpctl show stats | grep ^smtp.session
    """
    stats = call("show.stats")["stats"]
    if as_json:
        render.print_json(stats)
    elif render.is_terminal():
        lines = showtext.stats_lines(stats)
        render.print_table(["counter", "value"], [line.split("=", 1) for line in lines])
    else:
        render.print_lines(showtext.stats_lines(stats))


def _mta_show(name: str, command: str, formatter: Callable[[list[dict[str, Any]]], list[str]],
              summary: str, example: str, headers: list[str]) -> click.Command:
    @click.command(name, cls=Leaf, help=f"{summary}\n\n\b\nExample:\n  {example}")
    @json_option
    def show_rows(as_json: bool) -> None:
        rows = call(command)["rows"]
        if as_json:
            render.print_json(rows)
        elif render.is_terminal() and rows:
            render.print_table(headers, [[row.get(key, "") for key in headers] for row in rows])
        else:
            render.print_lines(formatter(rows))

    return show_rows


show_hosts = _mta_show("hosts", "show.hosts", showtext.hosts_lines,
                       "The relay's known hosts (nothing until the relay has connected somewhere).",
                       "smtpctl show hosts", ["address", "ptr", "refcount", "nconn", "lastconn"])
show_routes = _mta_show("routes", "show.routes", showtext.routes_lines,
                        "The relay's routes, with their connection and error counts.",
                        "smtpctl show routes", ["id", "route", "flags", "nconn", "nerror", "penalty", "timeout"])
show_relays = _mta_show("relays", "show.relays", showtext.relays_lines,
                        "The relay's active relays.", "smtpctl show relays", ["text"])
show_hoststats = _mta_show("hoststats", "show.hoststats", showtext.hoststats_lines,
                           "The last delivery result per destination domain.",
                           "smtpctl show hoststats", ["domain", "time", "text"])
_show_mta_paused = _mta_show("paused", "show.mta.paused", showtext.mta_paused_lines,
                             "Relay routes paused with `smtpctl pause mta from ADDR for DOMAIN`.",
                             "smtpctl show mta paused", ["source", "domain"])


@click.group("mta", cls=WordGroup)
def show_mta() -> None:
    """The relay's state: `show mta paused`.

    \b
    Example:
      smtpctl show mta paused
    """


show_mta.add_command(_show_mta_paused)
