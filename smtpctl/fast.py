"""A fast path for the commands scripts run most (`show status`, `show stats`) that skips importing Click.

Only an unambiguous, complete command line in a pipe takes this path; anything else (a terminal, --help, a
prefix that needs a listing, an unknown option) returns None and the Click command line handles it, with the
same output.
"""

from __future__ import annotations

import os
import sys

DEFAULT_SOCKET = "/var/run/smtpd.sock"  # shared.paths.DEFAULT_SOCKET (tests check they agree)


# smtpctl.commands.show.SHOW_CHILDREN's names (that module imports Click; a test checks they agree).
_SHOW_CHILDREN = ("mta", "envelope", "hoststats", "message", "queue", "hosts", "relays", "routes", "stats",
                  "status")


def _resolve(word: str, names: tuple[str, ...]) -> str | None:
    if word in names:
        return word
    candidates = [name for name in names if name.startswith(word)] if word else []
    return candidates[0] if len(candidates) == 1 else None


def _split_socket(argv: list[str]) -> tuple[str | None, list[str]] | None:
    if argv and argv[0] == "--socket" and len(argv) >= 2:
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--socket="):
        return argv[0].partition("=")[2], argv[1:]
    if argv and argv[0].startswith("-"):
        return None
    return None, argv


def run(argv: list[str]) -> int | None:
    if sys.stdout.isatty():
        return None
    split = _split_socket(argv)
    if split is None:
        return None
    socket_path, words = split
    as_json = words[-1:] == ["--json"]
    if as_json:
        words = words[:-1]
    from smtpctl.cli import COMMANDS

    if len(words) != 2 or _resolve(words[0], tuple(COMMANDS)) != "show":
        return None
    which = _resolve(words[1], _SHOW_CHILDREN)
    if which not in ("status", "stats"):
        return None
    from smtpctl import showtext
    from smtpctl.client import Client, ControlError, DaemonNotRunning

    # shared.paths' rule (option, then SMTPD_SOCKET, then the default) without importing it: it costs
    # dataclasses, a third of this path's start-up.
    socket_path = socket_path or os.environ.get("SMTPD_SOCKET") or DEFAULT_SOCKET
    try:
        with Client(socket_path) as client:
            result = client.call(f"show.{which}")
    except DaemonNotRunning:
        sys.stderr.write("smtpctl: smtpd doesn't seem to be running\n")
        return 1
    except ControlError as error:
        sys.stderr.write(f"smtpctl: {error.message}\n")
        return 1
    if as_json:
        import json

        value = result if which == "status" else result["stats"]
        # The same bytes as smtpctl.render.print_json writes.
        sys.stdout.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
    else:
        lines = showtext.status_lines(result) if which == "status" else showtext.stats_lines(result["stats"])
        sys.stdout.write("".join(line + "\n" for line in lines))
    return 0
