"""smtpctl's state-changing commands: pause/resume mda|mta|smtp (and relay routes), log brief|verbose,
profile/unprofile, update table, reload and stop.

They print `command succeeded` (exit 0) or `command failed` (exit 1, the reason on stderr) as OpenSMTPD does;
reload prints what changed, or the new configuration's errors with exit 78 (the daemon keeps the old one).
"""

from __future__ import annotations

import ipaddress
import sys

import click

from shared.numbers import ascii_digits
from smtpctl import render
from smtpctl.exitcodes import Exit
from smtpctl.words import Leaf, WordGroup, call, fail, invalid_command, json_option, possibilities, simple

PROFILE_KEYWORDS = ("imsg", "queue")


def _subsystem_command(verb: str, subsystem: str) -> click.Command:
    @click.command(subsystem, cls=Leaf,
                   help=f"{verb.capitalize()} the {subsystem.upper()} subsystem.\n\n\b\nExample:\n"
                        f"  smtpctl {verb} {subsystem}")
    def change() -> None:
        simple(verb, subsystem=subsystem)

    return change


def _route_words(ctx: click.Context, words: tuple[str, ...]) -> tuple[str, str] | None:
    """`from ADDR for DOMAIN` after `pause mta`, with OpenSMTPD's listings for what is missing or wrong."""
    if not words:
        return None
    if words[0] != "from" and not "from".startswith(words[0]):
        possibilities(ctx, ["from <addr>"])
    if len(words) < 2:
        possibilities(ctx, ["from <addr>"])
    try:
        ipaddress.ip_address(words[1])
    except ValueError:
        possibilities(ctx, ["from <addr>"])
    if len(words) < 3 or not "for".startswith(words[2]):
        possibilities(ctx, ["from <addr> for"])
    if len(words) < 4:
        possibilities(ctx, ["from <addr> for <str>"])  # (as OpenSMTPD lists the word after `for`)
    if len(words) > 4:
        invalid_command()
    return words[1], words[3]


def _mta_command(verb: str) -> click.Command:
    @click.command("mta", cls=Leaf, context_settings={"ignore_unknown_options": True},
                   help=f"{verb.capitalize()} the relay (MTA), or only its route from ADDR for DOMAIN.\n\n\b\n"
                        f"Examples:\n  smtpctl {verb} mta\n  smtpctl {verb} mta from 192.0.2.1 for example.org")
    @click.argument("words", nargs=-1)
    @click.pass_context
    def change(ctx: click.Context, words: tuple[str, ...]) -> None:
        route = _route_words(ctx, words)
        if route is None:
            simple(verb, subsystem="mta")
        else:
            simple(f"{verb}.mta.route", source=route[0], domain=route[1])

    return change


PAUSE_CHILDREN = {"mta": "smtpctl.commands.control:pause_mta",
                  "envelope": "smtpctl.commands.queue:pause_envelope",
                  "mda": "smtpctl.commands.control:pause_mda",
                  "smtp": "smtpctl.commands.control:pause_smtp"}
RESUME_CHILDREN = {"mta": "smtpctl.commands.control:resume_mta",
                   "envelope": "smtpctl.commands.queue:resume_envelope",
                   "mda": "smtpctl.commands.control:resume_mda",
                   "route": "smtpctl.commands.control:resume_route",
                   "smtp": "smtpctl.commands.control:resume_smtp"}


@click.group(cls=WordGroup, lazy=PAUSE_CHILDREN)
def pause() -> None:
    """Pause a subsystem (mda, mta, smtp), a relay route, or envelopes.

    \b
    Example:
      smtpctl pause smtp
    """


@click.group(cls=WordGroup, lazy=RESUME_CHILDREN)
def resume() -> None:
    """Resume a subsystem (mda, mta, smtp), a relay route, or envelopes.

    \b
    Example:
      smtpctl resume smtp
    """


pause_mda = _subsystem_command("pause", "mda")
pause_smtp = _subsystem_command("pause", "smtp")
pause_mta = _mta_command("pause")
resume_mda = _subsystem_command("resume", "mda")
resume_smtp = _subsystem_command("resume", "smtp")
resume_mta = _mta_command("resume")


def _route_id(ctx: click.Context, param: click.Parameter, value: str) -> int:
    if not ascii_digits(value) or int(value) < 1:
        possibilities(ctx, ["<routeid>"])
    return int(value)


@click.command("route", cls=Leaf, placeholders=["<routeid>"])
@click.argument("route_id", metavar="ROUTEID", callback=_route_id)
def resume_route(route_id: int) -> None:
    """Resume a relay route suspended after errors (ids from `smtpctl show routes`).

    \b
    Example:
      smtpctl resume route 3
    """
    simple("resume.route", route=route_id)


# -- log ----------------------------------------------------------------------------------------------------
@click.group(cls=WordGroup)
def log() -> None:
    """Switch the daemon's logging between brief and verbose (debug) messages.

    \b
    Example:
      smtpctl log verbose
    """


@log.command("brief", cls=Leaf)
def log_brief() -> None:
    """Log informational messages only.

    \b
    Example:
      smtpctl log brief
    """
    simple("log.brief")


@log.command("verbose", cls=Leaf)
def log_verbose() -> None:
    """Log debug messages too.

    \b
    Example:
      smtpctl log verbose
    """
    simple("log.verbose")


# -- profile ------------------------------------------------------------------------------------------------
def _profile_command(name: str, command: str, verb: str) -> click.Command:
    @click.command(name, cls=Leaf, placeholders=["<str>"],
                   help=f"{verb} profiling ({', '.join(PROFILE_KEYWORDS)}).\n\n\b\nExample:\n  smtpctl {name} imsg")
    @click.argument("keyword", metavar="KEYWORD",
                    shell_complete=lambda ctx, param, incomplete: [word for word in PROFILE_KEYWORDS
                                                                   if word.startswith(incomplete)])
    def change(keyword: str) -> None:
        if keyword not in PROFILE_KEYWORDS:
            fail(f"invalid profile keyword: {keyword}")
        simple(command, keyword=keyword)

    return change


profile = _profile_command("profile", "profile", "Turn on")
unprofile = _profile_command("unprofile", "unprofile", "Turn off")


# -- update table -------------------------------------------------------------------------------------------
@click.group(cls=WordGroup)
def update() -> None:
    """Reload a table from its source.

    \b
    Example:
      smtpctl update table aliases
    """


@update.command("table", cls=Leaf, placeholders=["<str>"])
@click.argument("name")
def update_table(name: str) -> None:
    """Reload the table NAME (its file or database) without reloading the configuration.

    \b
    Example:
      smtpctl update table aliases
    """
    simple("update.table", table=name)


# -- reload, stop -------------------------------------------------------------------------------------------
@click.command(cls=Leaf)
@json_option
def reload(as_json: bool) -> None:
    """Re-read the configuration and its tables; switch to it only if it is valid.

    Prints what changed. When the new configuration has errors they are printed as FILE:LINE: message, the
    daemon keeps running on the old one, and the exit code is 78. SIGHUP to the daemon does the same.

    \b
    Example:
      smtpctl reload
    """
    result = call("reload")
    if as_json:
        render.print_json(result)
    else:
        for warning in result.get("warnings", []):
            # As `smtpd -n` prints them: `FILE:LINE: warning: ...` already says what it is.
            sys.stderr.write(f"{warning}\n" if "warning:" in warning else f"smtpctl: warning: {warning}\n")
        if not result.get("ok"):
            for error in result.get("errors", []):
                sys.stderr.write(f"{error}\n")
            render.error("configuration invalid, smtpd keeps running with the previous one")
            sys.exit(Exit.CONFIG)
        changes = result.get("changes") or []
        render.print_lines(changes if changes else ["no changes"])
        print("configuration reloaded")
    sys.exit(Exit.OK if result.get("ok") else Exit.CONFIG)


@click.command(cls=Leaf)
def stop() -> None:
    """Stop the daemon (it finishes what it is doing, deliveries in progress stay queued).

    \b
    Example:
      smtpctl stop
    """
    simple("stop")
