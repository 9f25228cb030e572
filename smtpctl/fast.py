"""A fast path for the commands scripts run most (`show status`, `show stats`) that skips importing Click.

`show queue` in a pipe (no filter) too: its 50,000 lines come preformatted from the daemon, and the whole
command should take well under half a second. Only an unambiguous, complete command line in a pipe takes this path; anything else (a terminal, --help, a
prefix that needs a listing, an unknown option) returns None and the Click command line handles it, with the
same output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEFAULT_SOCKET = "/var/run/smtpd.sock"  # shared.paths.DEFAULT_SOCKET (tests check they agree)
INCOMPATIBLE = "incompatible smtpd and smtpctl"  # smtpctl.client.INCOMPATIBLE (not imported here: start-up time)


# smtpctl.commands.show.SHOW_CHILDREN's names (that module imports Click; a test checks they agree).
_SHOW_CHILDREN = ("mta", "envelope", "hoststats", "message", "queue", "hosts", "relays", "routes", "stats",
                  "status")


def queue_notes(result: dict) -> list[str]:
    """What `show queue` says on stderr beside its list (here and in smtpctl.commands.queue)."""
    notes = [f"corrupt queue file moved aside: corrupt/{entry['name']}: {entry['reason']}"
             for entry in result.get("corrupt", [])]
    notes += [f"message {msgid} is acknowledged and waits for room on the disk (the commit journal keeps it); "
              "it is listed once its files are written" for msgid in result.get("waiting_for_disk", [])]
    if result.get("loading"):
        notes.append("the queue is still being loaded; the list may be incomplete")
    return notes


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
    if which == "queue" and not as_json:
        return _show_queue(socket_path or os.environ.get("SMTPD_SOCKET") or DEFAULT_SOCKET)
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
        from shared.wire import json_text

        value = result if which == "status" else result["stats"]
        # The same bytes as smtpctl.render.print_json writes.
        sys.stdout.write(json_text(value) + "\n")
    else:
        lines = showtext.status_lines(result) if which == "status" else showtext.stats_lines(result["stats"])
        sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _show_queue(socket_path: str) -> int | None:
    """`smtpctl show queue | ...`: the lines as the daemon made them (smtpctl.commands.queue.run_show_queue
    does the same with Click). None, for the Click path to decide, when there is no daemon to ask (it lists
    the spool offline) or the reply is not what this path expects."""
    import socket

    from shared.wire import encode, request
    from smtpctl import client

    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    with connection:
        try:
            connection.connect(socket_path)
            connection.sendall(encode(request(1, "show.queue", format="lines")))
        except OSError:
            return None
        # As long as any smtpctl request waits for its answer (a hung daemon: `mailq | wc -l` waited for ever).
        connection.settimeout(client.DEFAULT_TIMEOUT)
        try:
            reply = _read_reply(connection.recv)
        except TimeoutError:
            sys.stderr.write(f"smtpctl: {client.NO_ANSWER}\n")
            return 1
    if reply is None:
        return None
    if not reply.get("ok"):
        error = reply.get("error")
        message = error.get("message", "command failed") if isinstance(error, dict) else INCOMPATIBLE
        sys.stdout.flush()
        sys.stderr.write(f"smtpctl: {message}\n")
        return 1
    result = reply.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("lines"), str):
        return None
    for note in queue_notes(result):
        sys.stderr.write(f"smtpctl: {note}\n")
    sys.stderr.flush()
    sys.stdout.write(result["lines"])
    sys.stdout.flush()
    return 0


def _read_reply(receive: Callable[[int], bytes]) -> dict[str, object] | None:
    """The reply line (events before it skipped), decoded; None if the connection ends first or it is not a
    reply of our protocol version."""
    import json

    from shared.wire import PROTOCOL_VERSION

    received = bytearray()
    searched = 0
    while True:
        end = received.find(b"\n", searched)
        if end < 0:
            searched = len(received)
            try:
                chunk = receive(1 << 20)
            except TimeoutError:
                raise
            except OSError:
                return None
            if not chunk:
                return None
            received += chunk
            continue
        try:
            message = json.loads(bytes(received[:end]))
        except (ValueError, RecursionError):
            return None
        del received[:end + 1]
        searched = 0
        if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
            return None
        if "event" not in message:
            return message
