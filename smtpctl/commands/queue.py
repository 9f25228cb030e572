"""smtpctl's queue commands: show queue / mailq, show envelope, show message, schedule, remove, pause/resume
envelope, discover.

`show queue` talks to the daemon; when it is not running it reads the spool itself (runstate `offline`), as
OpenSMTPD does. Output: the reference's 14-field lines when piped, a table on a terminal, JSON Lines with
--json (docs/queue.md). The commands that change the queue accept filters and --dry-run.

Attaching: ``show_queue``, ``show_envelope``, ``show_message`` are commands named queue/envelope/message for
the `show` group; ``pause_envelope`` / ``resume_envelope`` are commands named `envelope` for the pause/resume
groups; ``schedule``, ``remove``, ``discover`` are top-level commands; ``mailq_main`` is the mailq personality.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import click

from shared.ids import format_msgid, parse_evpid, parse_msgid
from shared.paths import Paths
from shared.wire import json_text
from smtpctl import queuekey, render
from smtpctl.fast import queue_notes
from smtpctl.queuekey import OfflineKey
from smtpctl.words import Leaf, possibilities, words_so_far
from smtpd.queue.codec import NO_KEY, PLAIN, WRONG_KEY, QueueCodecError
from smtpd.queue.listing import (
    EnvelopeFilter,
    Row,
    envelope_row,
    format_line,
    parse_age,
    plural_envelopes,
    row_to_json,
    vis,
)
from smtpd.queue.spool import MESSAGE_FILE, UNLOADABLE, CorruptEntry, LoadedMessage, Spool, read_envelope_file

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 255
NOT_RUNNING = "smtpd doesn't seem to be running"
INCOMPATIBLE = "incompatible smtpd and smtpctl"


class DaemonDown(Exception):
    pass


class CommandFailed(Exception):
    pass


# -- talking to the daemon ----------------------------------------------------------------------------------
def _paths() -> Paths:
    context = click.get_current_context(silent=True)
    obj = getattr(context, "obj", None) if context is not None else None
    paths = getattr(obj, "paths", None) or (obj.get("paths") if isinstance(obj, dict) else None)
    return paths if isinstance(paths, Paths) else Paths.from_environment()


def call_daemon(command: str, large_reply: bool = False, **args: Any) -> Any:
    """One control request. Raises DaemonDown when there is no daemon, CommandFailed on an error reply.

    A large reply (show queue: megabytes on one line) is read here in linear time rather than by the shared
    client."""
    socket_path = _paths().socket
    if large_reply:
        return _call_directly(socket_path, command, args)
    try:
        from smtpctl.client import Client, ControlError, DaemonNotRunning
    except ImportError:  # the control client is another family's; speak the protocol directly without it
        return _call_directly(socket_path, command, args)
    try:
        with Client(socket_path) as client:
            return client.call(command, **args)
    except DaemonNotRunning:
        raise DaemonDown(NOT_RUNNING) from None
    except ControlError as error:
        raise CommandFailed(error.message) from None


def _call_directly(socket_path: str, command: str, args: dict[str, Any]) -> Any:
    from shared import protocol
    from smtpctl import client

    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
        connection.sendall(protocol.encode(protocol.request(1, command, **args)))
    except OSError:
        connection.close()
        raise DaemonDown(NOT_RUNNING) from None
    # As long as any smtpctl request waits for its answer (a hung daemon: `mailq | wc -l` waited for ever).
    connection.settimeout(client.DEFAULT_TIMEOUT)
    with connection:
        received = bytearray()
        while True:
            searched = len(received)
            try:
                chunk = connection.recv(1 << 20)
            except TimeoutError:
                raise CommandFailed(client.NO_ANSWER) from None
            except OSError:  # reset: the daemon died (kill -9) before answering; as an end of file
                chunk = b""
            if not chunk:
                raise CommandFailed("connection closed by smtpd")
            received += chunk
            end = received.find(b"\n", searched)
            while end >= 0:
                line = bytes(received[:end])
                del received[:end + 1]
                try:
                    reply = protocol.decode_reply(line)
                except (ValueError, RecursionError, protocol.ProtocolError):
                    raise CommandFailed(INCOMPATIBLE) from None
                if "event" not in reply:
                    if reply.get("ok"):
                        return reply.get("result")
                    error = reply.get("error")
                    if not isinstance(error, dict):
                        raise CommandFailed(INCOMPATIBLE)
                    raise CommandFailed(str(error.get("message", "command failed")))
                end = received.find(b"\n")


# The name errors and notes go under: `mailq` when run as mailq (a user who typed mailq was told `smtpctl: ...`).
program = "smtpctl"


def _fail(message: str, code: int = EXIT_FAILURE) -> None:
    click.echo(f"{program}: {message}", err=True)
    sys.exit(code)


# -- filters shared by the commands ----------------------------------------------------------------------------
def filter_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--sender",
                     help="Sender address contains this text (case-insensitive); `@`: the null sender."),
        click.option("--rcpt", help="Recipient (original or final) contains this text."),
        click.option("--domain", help="Recipient domain is exactly this."),
        click.option("--older", metavar="AGE", help="Created at least AGE ago (90s, 15m, 4h, 2d, 1w)."),
        click.option("--newer", metavar="AGE", help="Created at most AGE ago."),
        click.option("--state", type=click.Choice(["pending", "inflight", "suspended", "offline"]),
                     help="Only envelopes in this state."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _filter_args(sender: str | None, rcpt: str | None, domain: str | None, older: str | None,
                 newer: str | None, state: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"sender": sender, "rcpt": rcpt, "domain": domain, "state": state}
    for key in ("sender", "rcpt", "domain"):
        # The daemon reads an empty filter as no filter at all, and a changing command given a filter but no
        # target acts on `all`: `smtpctl remove --domain "$D"` with D empty would empty the whole queue.
        if args[key] == "":
            raise click.BadParameter("must not be empty (`all` names every envelope)", param_hint=f"--{key}")
    for key, value in (("older", older), ("newer", newer)):
        if value is not None:
            try:
                args[key] = parse_age(value)
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint=f"--{key}") from None
    return {key: value for key, value in args.items() if value is not None}


# What each command takes, in the order OpenSMTPD's smtpctl lists the possibilities of a bad target.
TARGETS = {"schedule": ("<msgid>", "<evpid>", "all"), "discover": ("<evpid>", "<msgid>")}
DEFAULT_TARGETS = ("<evpid>", "<msgid>", "all")


def _check_target(value: str, choices: tuple[str, ...] = DEFAULT_TARGETS) -> str:
    """The target in lower case; anything else prints `possibilities are:` and exits 255, as OpenSMTPD."""
    if "all" in choices and value == "all":
        return value
    if (len(value) == 16 and parse_evpid(value)) or (len(value) == 8 and parse_msgid(value)):
        return value.lower()
    possibilities(click.get_current_context(), choices)


# -- show queue -------------------------------------------------------------------------------------------
# Why an envelope file that is fine cannot be read: it is encrypted and smtpctl has no key, or another one.
KEY_REASONS = frozenset({NO_KEY, WRONG_KEY})


def _load_offline(spool: Spool, msgid: int, keys: OfflineKey) -> LoadedMessage:
    """A message's envelopes as smtpctl reads them with the daemon down: the first unreadable file makes it
    look for smtpd.conf's key, and the message is read again if one is found."""
    loaded = spool.load_message(msgid, move_corrupt=False)
    if loaded.corrupt and keys.settle():
        loaded = spool.load_message(msgid, move_corrupt=False)
    return loaded


def _key_locked(spool: Spool, msgid: int, entry: CorruptEntry) -> tuple[int, list[tuple[str, str]]]:
    """How many envelope files behind ``entry`` only lack the key, and (label, reason) of the others."""
    if entry.reason in KEY_REASONS:
        return 1, []
    label = format_msgid(msgid)
    if entry.name != label or not entry.reason.startswith(UNLOADABLE):
        return 0, [(entry.name, entry.reason)]
    # Not one envelope of the message loads (an encrypted queue read without its key, usually): each file's own
    # reason tells the ones that need the key from the damaged ones.
    folder = spool.message_dir(msgid)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return 0, [(entry.name, entry.reason)]
    locked, others = 0, []
    for name in names:
        if name == MESSAGE_FILE or (name.startswith(".") and name.endswith(".tmp")):
            continue
        _, reason = read_envelope_file(os.path.join(folder, name), msgid, name)
        if reason in KEY_REASONS:
            locked += 1
        elif reason:
            others.append((f"{label}.{name}", reason))
    return (locked, others) if locked else (0, [(entry.name, entry.reason)])


def offline_rows(spool_root: str, msgid: int | None, selector: EnvelopeFilter,
                 config_path: str) -> tuple[list[Row], list[str]]:
    """Rows read from the spool by smtpctl itself (daemon down). Nothing is moved; problems are reported.
    Encrypted envelopes are read with smtpd.conf's key; without it they are counted in one problem line."""
    spool = Spool(spool_root)
    if not os.path.isdir(spool.queue):
        raise CommandFailed(f"{spool.queue}: no such spool directory")
    rows: list[Row] = []
    problems: list[str] = []
    keys = OfflineKey(config_path)
    locked = 0
    now = time.time()
    msgids = [msgid] if msgid is not None else spool.message_ids()
    for current in msgids:
        loaded = _load_offline(spool, current, keys)
        for entry in loaded.corrupt:
            count, others = _key_locked(spool, current, entry)
            locked += count
            problems += [f"corrupt queue file queue/{current >> 24:02x}/{name}: {reason}" for name, reason in others]
        for envelope in sorted(loaded.envelopes, key=lambda item: (item.ctime, item.evpid)):
            if not envelope.ttl:  # (OpenSMTPD 6.8's: its expiry is the configuration's, as the daemon gives it)
                envelope.ttl = keys.ttl_for(envelope.dispatcher)
            # Every envelope is `offline` with the daemon down; `--state suspended` still finds the paused ones
            # (their flag is on disk).
            paused = selector.state == "suspended" and "suspend" in envelope.flags
            if selector.matches(envelope, "suspended" if paused else "offline", now):
                rows.append(envelope_row(envelope, "offline", None))
    for entry in spool.corrupt_entries():
        problems.append(f"corrupt queue file moved aside: corrupt/{entry.name}: {entry.reason}")
    if locked:
        problems.append(keys.note(locked))
    rows.sort(key=lambda row: (row[7], row[0]))  # oldest first (ctime, then evpid), as the daemon lists them
    return rows, problems


def _label_path(label: str) -> str:
    """Where a file named by its corrupt/ label (`<msgid>` or `<msgid>.<file>`) lives under queue/."""
    msgid, _, name = label.partition(".")
    folder = f"queue/{msgid[:2]}/{msgid}"
    return f"{folder}/{name}" if name else folder


def offline_corrupt(spool_root: str, config_path: str) -> list[dict[str, Any]]:
    """The corrupt files, read by smtpctl itself: those moved aside, then those still in queue/ (the daemon
    moves them aside when it loads them). Encrypted files are read with smtpd.conf's key, as the daemon reads
    them; without it they are listed with the codec's reason."""
    spool = Spool(spool_root)
    if not os.path.isdir(spool.queue):
        raise CommandFailed(f"{spool.queue}: no such spool directory")
    found = [{"path": f"corrupt/{entry.name}", "moved": entry.moved, "reason": entry.reason}
             for entry in spool.corrupt_entries()]
    keys = OfflineKey(config_path)
    for msgid in spool.message_ids():
        for entry in _load_offline(spool, msgid, keys).corrupt:
            found.append({"path": _label_path(entry.name), "moved": 0, "reason": entry.reason})
    return found


def print_corrupt(entries: list[dict[str, Any]], as_json: bool) -> None:
    """`show queue --corrupt`: one line per file, `path|moved|reason` (moved: unix time it was moved aside
    under corrupt/, 0 if it is still in queue/; reason vis-encoded), or JSON Lines with those three keys."""
    out = sys.stdout
    for entry in entries:
        if as_json:
            out.write(json_text(entry) + "\n")
        else:
            out.write(f"{entry['path']}|{entry['moved']}|{vis(str(entry['reason']))}\n")
    out.flush()


def run_show_corrupt(as_json: bool) -> int:
    try:
        result = call_daemon("show.queue", corrupt_only=True)
        entries = [{"path": f"corrupt/{entry['name']}", "moved": entry["moved"], "reason": entry["reason"]}
                   for entry in result.get("corrupt", [])]
    except DaemonDown:
        try:
            paths = _paths()
            entries = offline_corrupt(paths.spool, paths.config)
        except CommandFailed as error:
            _fail(str(error))
            return EXIT_FAILURE
        except PermissionError as error:  # (reading the spool offline: a user's smtpctl on root's queue)
            _fail(f"{error.filename}: {error.strerror}" if error.filename else str(error))
            return EXIT_FAILURE
    except CommandFailed as error:
        _fail(str(error))
        return EXIT_FAILURE
    print_corrupt(entries, as_json)
    return EXIT_OK


def _relative(seconds: float) -> str:
    seconds = int(seconds)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{sign}{seconds // size}{unit}"
    return f"{sign}{seconds}s"


def _iso(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def render_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    table = Table(show_lines=False, header_style="bold")
    # The envelope id never folds (it is what one copies into `smtpctl remove` or `show envelope`); the other
    # columns fold around it on a narrow terminal.
    table.add_column("envelope", no_wrap=True, min_width=16)
    for column in ("state", "age", "created", "from", "to", "tries", "next/last", "expires in", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        state, value = row[11], row[12]
        if state == "pending":
            timing = "now" if value is not None and value <= 0 else f"in {_relative(value or 0)}"
        elif state == "inflight":
            timing = f"{_relative(value or 0)} ago"
        else:
            timing = "-"
        if "suspend" in str(row[3]).split(","):
            state = "suspended"
        recipient = row[5] if row[5] == row[6] else f"{row[5]} → {row[6]}"
        cells = (str(row[0]), state, _relative(now - int(row[7])), _iso(int(row[7])), str(row[4]), recipient,
                 str(row[10]), timing, _relative(int(row[8]) - now), str(row[13]))
        # Text, not markup: addresses and error lines come from the network ("[bold]" must stay literal), and
        # vis-encoded so that no control character reaches the terminal.
        table.add_row(*(Text(vis(cell)) for cell in cells))
    console = Console()
    console.print(table)
    console.print(f"{len(rows)} envelope{'s' if len(rows) != 1 else ''}", highlight=False)


def print_rows(rows: list[Row], as_json: bool) -> None:
    if as_json:
        out = sys.stdout
        for row in rows:
            out.write(json_text(row_to_json(row)) + "\n")
    elif render.is_terminal():
        render_table(rows)
    else:
        sys.stdout.write("".join(format_line(row) + "\n" for row in rows))
    sys.stdout.flush()


def run_show_queue(msgid_text: str | None, filters: dict[str, Any], as_json: bool) -> int:
    msgid = None
    if msgid_text is not None:
        msgid = parse_msgid(msgid_text)
        if msgid is None:
            if words_so_far(click.get_current_context()):  # (`smtpctl show queue X`, not mailq's argument)
                possibilities(click.get_current_context(), ["<msgid>"])
            raise click.BadParameter(f"{msgid_text!r} is not a <msgid> (8 hex digits)", param_hint="msgid")
    selector = EnvelopeFilter.from_args(filters)
    args = dict(filters)
    if msgid is not None:
        args["msgid"] = format_msgid(msgid)
    piped_lines = not as_json and not render.is_terminal()  # (NO_COLOR, TERM=dumb: the lines too)
    if piped_lines:
        args["format"] = "lines"
    try:
        result = call_daemon("show.queue", large_reply=True, **args)
    except DaemonDown:
        try:
            paths = _paths()
            rows, problems = offline_rows(paths.spool, msgid, selector, paths.config)
        except CommandFailed as error:
            _fail(str(error))
            return EXIT_FAILURE
        except PermissionError as error:  # (reading the spool offline: a user's smtpctl on root's queue)
            _fail(f"{error.filename}: {error.strerror}" if error.filename else str(error))
            return EXIT_FAILURE
        for problem in problems:
            click.echo(f"{program}: {problem}", err=True)
        print_rows(rows, as_json)
        return EXIT_OK
    except CommandFailed as error:
        _fail(str(error))
        return EXIT_FAILURE
    for note in queue_notes(result):
        click.echo(f"{program}: {note}", err=True)
    if "lines" in result:
        sys.stdout.write(result["lines"])
        sys.stdout.flush()
    else:
        print_rows(result["rows"], as_json)
    return EXIT_OK


@click.command("queue", cls=Leaf)
@click.argument("msgid", required=False)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one object per envelope (docs/queue.md).")
@click.option("--corrupt", "corrupt_only", is_flag=True,
              help="List the corrupt queue files instead: `path|moved|reason` (docs/queue.md).")
def show_queue(msgid: str | None, sender: str | None, rcpt: str | None, domain: str | None, older: str | None,
               newer: str | None, state: str | None, as_json: bool, corrupt_only: bool) -> None:
    """List the queued envelopes (all, or those of MSGID)."""
    if corrupt_only:
        if msgid is not None or any((sender, rcpt, domain, older, newer, state)):
            raise click.UsageError("--corrupt takes no msgid and no filter")
        sys.exit(run_show_corrupt(as_json))
    filters = _filter_args(sender, rcpt, domain, older, newer, state)
    sys.exit(run_show_queue(msgid, filters, as_json))


# sendmail's and Postfix's mailq flags that scripts pass out of habit (verbose, the submission queue, the -bp
# that named the mode): OpenSMTPD's mailq ignores every argument, we ignore these and honour our filters.
MAILQ_HABITS = frozenset({"-v", "-Ac", "-bp"})


def mailq_main(argv: list[str], prog: str) -> int:
    """The mailq personality: `show queue` with the same options; usage errors exit 255 as smtpctl's do."""
    global program
    program = prog
    arguments = [argument for argument in argv if argument not in MAILQ_HABITS]
    try:
        show_queue.main(args=arguments, prog_name=prog, standalone_mode=False)
    except click.UsageError as error:
        error.show()
        return EXIT_USAGE
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Exit as exit_request:
        return exit_request.exit_code
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    return EXIT_OK


# -- show envelope / show message ----------------------------------------------------------------------------
# As OpenSMTPD (reference §2.4): the file is printed as it is, no daemon needed; a gzip file is printed
# uncompressed (as its `zcat`), an encrypted one decrypted (the key: smtpctl/queuekey.py); a word that is not an
# id lists what was expected (exit 255); a file that cannot be opened is `smtpctl: fopen: <strerror>`, exit 1.
ENVELOPE_PLACEHOLDERS = ["<evpid>"]
MESSAGE_PLACEHOLDERS = ["<msgid>", "<evpid>"]


def _print_file(path: str) -> None:
    try:
        if queuekey.is_encrypted(path):
            handle = queuekey.decrypted(path, _paths().config, lambda codec: codec.open_message(path))
        else:
            handle = PLAIN.open_message(path)  # the file itself, or its gzip content unpacked
    except OSError as error:
        _fail(f"fopen: {error.strerror or error}")
        return
    except queuekey.KeyProblem as problem:
        _fail(str(problem))
        return
    except QueueCodecError as error:
        _fail(f"{path}: {error}")
        return
    with handle:
        shutil.copyfileobj(handle, sys.stdout.buffer)
    sys.stdout.flush()


def _expected(placeholders: list[str]) -> None:
    possibilities(click.get_current_context(), placeholders)


@click.command("envelope", cls=Leaf, placeholders=ENVELOPE_PLACEHOLDERS)
@click.argument("evpid")
def show_envelope(evpid: str) -> None:
    """Print an envelope file (no daemon needed)."""
    value = parse_evpid(evpid) if len(evpid) == 16 else None
    if value is None:
        _expected(ENVELOPE_PLACEHOLDERS)
        return
    _print_file(Spool(_paths().spool).envelope_path(value))


@click.command("message", cls=Leaf, placeholders=MESSAGE_PLACEHOLDERS)
@click.argument("msgid")
def show_message(msgid: str) -> None:
    """Print a queued message (MSGID, or the message of EVPID; no daemon needed)."""
    value = parse_evpid(msgid) if len(msgid) == 16 else parse_msgid(msgid) if len(msgid) == 8 else None
    if value is None:
        _expected(MESSAGE_PLACEHOLDERS)
        return
    spool = Spool(_paths().spool)
    path = os.path.join(spool.message_dir(value >> 32 if len(msgid) == 16 else value), MESSAGE_FILE)
    _print_file(path)


# -- commands that change the queue ------------------------------------------------------------------------------
def _change(command: str, verb: str, target: str | None, filters: dict[str, Any], dry_run: bool,
            as_json: bool = False) -> None:
    choices = TARGETS.get(command, DEFAULT_TARGETS)
    if target is None:
        if not filters:
            possibilities(click.get_current_context(), choices)  # OpenSMTPD's answer to a missing target
        target = "all"
    target = _check_target(target, choices)
    try:
        result = call_daemon(command, target=target, dry_run=dry_run, **filters)
    except DaemonDown:
        _fail(NOT_RUNNING)
        return
    except CommandFailed as error:
        _fail(str(error))
        return
    count = int(result.get("count", 0))
    if dry_run:
        print_rows(result.get("rows", []), as_json)
        click.echo(f"{count} envelope{'s' if count > 1 else ''} would be {verb} (dry run)", err=as_json)
        return
    click.echo(plural_envelopes(count, verb))


def _change_command(name: str, command: str, verb: str, summary: str) -> click.Command:
    @click.command(name, cls=Leaf, help=summary)
    @click.argument("target", required=False, metavar="EVPID|MSGID|all")
    @filter_options
    @click.option("--dry-run", is_flag=True, help="Only list the envelopes that would be affected.")
    @click.option("--json", "as_json", is_flag=True, help="With --dry-run: JSON Lines.")
    def run(target: str | None, sender: str | None, rcpt: str | None, domain: str | None, older: str | None,
            newer: str | None, state: str | None, dry_run: bool, as_json: bool) -> None:
        _change(command, verb, target, _filter_args(sender, rcpt, domain, older, newer, state), dry_run, as_json)

    return run


schedule = _change_command("schedule", "schedule", "scheduled", "Try delivering the selected envelopes now.")
remove = _change_command("remove", "remove", "removed", "Remove the selected envelopes from the queue.")
pause_envelope = _change_command("envelope", "pause.envelope", "paused",
                                 "Suspend the selected envelopes (no delivery until resumed).")
resume_envelope = _change_command("envelope", "resume.envelope", "resumed", "Resume suspended envelopes.")


@click.command("discover", cls=Leaf)
@click.argument("target", metavar="EVPID|MSGID", required=False)
def discover(target: str | None) -> None:
    """Make the daemon read a message's envelopes from the spool again."""
    if target is None:
        possibilities(click.get_current_context(), TARGETS["discover"])
    target = _check_target(target, TARGETS["discover"])
    try:
        result = call_daemon("discover", target=target)
    except DaemonDown:
        _fail(NOT_RUNNING)
        return
    except CommandFailed as error:
        _fail(str(error))
        return
    count = int(result.get("count", 0))
    click.echo(f"{count} envelope{'s' if count != 1 else ''} discovered")


def iter_commands() -> Iterable[tuple[str, click.Command]]:
    """(group, command) pairs for whoever assembles the CLI: group "" is top level."""
    yield "show", show_queue
    yield "show", show_envelope
    yield "show", show_message
    yield "pause", pause_envelope
    yield "resume", resume_envelope
    yield "", schedule
    yield "", remove
    yield "", discover
