"""OpenSMTPD's command grammar on top of Click: unique-prefix words and the `possibilities are:` listings.

``WordGroup`` resolves a word the way smtpctl's parser does: an exact child name first, else a unique prefix of
one (`sh q` is `show queue`, `show st` is ambiguous, `show hosts` is exact although `hoststats` exists). A word
that matches nothing, an ambiguous one, or a missing one prints `possibilities are:` and the node's children
(prefixed with the words matched so far) on stderr, exit 255. ``Leaf`` commands print `invalid command` for
extra words and their own possibilities for missing arguments. Click keeps driving --help, options and
completion, so every command keeps its --help text and example.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from shared.paths import Paths
from smtpctl import render
from smtpctl.client import Client, ControlError, DaemonNotRunning
from smtpctl.exitcodes import Exit

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def words_so_far(ctx: click.Context) -> list[str]:
    """The canonical words of the command line up to this context, without the program name."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return list(reversed(names))


def possibilities(ctx: click.Context, children: Iterable[str]) -> NoReturn:
    prefix = " ".join(words_so_far(ctx))
    lines = ["possibilities are:"] + [f"{prefix} {child}".strip() for child in children]
    sys.stdout.flush()
    sys.stderr.write("\n".join(lines) + "\n")
    sys.exit(Exit.USAGE)


def invalid_command() -> NoReturn:
    sys.stdout.flush()
    sys.stderr.write("invalid command\n")
    sys.exit(Exit.USAGE)


class WordGroup(click.Group):
    """A group whose children may be lazy ("module:attribute") and are matched by unique prefix."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = dict(lazy or {})

    def lazy_children(self) -> dict[str, str]:
        return self.lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(self.lazy_children())
        return names + [name for name in self.commands if name not in names]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        target = self.lazy_children().get(name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        _ensure_example(command, " ".join([*words_so_far(ctx), name]))
        self.commands[name] = command
        return command

    def visible_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in self.list_commands(ctx) if not self._is_hidden(ctx, name)]

    def _is_hidden(self, ctx: click.Context, name: str) -> bool:
        command = self.commands.get(name)
        return bool(command is not None and command.hidden)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            possibilities(ctx, self.visible_commands(ctx))
        rest = super().parse_args(ctx, args)
        # Options alone (`smtpctl --socket S`) leave no command word: list the children, as for no words.
        remaining = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or ctx.args
        if not remaining and not ctx.resilient_parsing:
            possibilities(ctx, self.visible_commands(ctx))
        return rest

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                              list[str]]:
        word = args[0]
        names = self.list_commands(ctx)
        if word not in names:
            candidates = self.prefix_candidates(word, names)
            if len(candidates) != 1:
                if ctx.resilient_parsing:
                    return None, None, args
                possibilities(ctx, self.visible_commands(ctx))
            word = candidates[0]
        command = self.get_command(ctx, word)
        if command is None:  # a lazy target that does not exist (yet)
            if ctx.resilient_parsing:
                return None, None, args
            possibilities(ctx, self.visible_commands(ctx))
        return word, command, args[1:]

    def prefix_candidates(self, word: str, names: list[str]) -> list[str]:
        return [name for name in names if name.startswith(word)] if word else []

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.visible_commands(ctx):
            try:
                command = self.get_command(ctx, name)
            except ImportError:
                command = None
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=70)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


# Examples for commands written elsewhere whose help has none (shown as the help's epilog). A command that
# carries its own "Example" in its help keeps it.
FALLBACK_EXAMPLES = {
    "show queue": "smtpctl show queue --sender alice@example.org",
    "show envelope": "smtpctl show envelope 0123456789abcdef",
    "show message": "smtpctl show message 01234567",
    "schedule": "smtpctl schedule all",
    "remove": "smtpctl remove 01234567",
    "discover": "smtpctl discover 01234567",
    "pause envelope": "smtpctl pause envelope all",
    "resume envelope": "smtpctl resume envelope all",
    "encrypt": "echo 'secret' | smtpctl encrypt",
}


def _ensure_example(command: click.Command, path: str) -> None:
    text = f"{command.help or ''}\n{command.epilog or ''}"
    if "Example" in text or path not in FALLBACK_EXAMPLES:
        return
    command.epilog = f"\b\nExample:\n  {FALLBACK_EXAMPLES[path]}"


_NEGATIVE_NUMBER = re.compile(r"-[0-9]+")


class Leaf(click.Command):
    """A command at the end of the grammar: extra words are `invalid command`, a missing argument lists
    the placeholders it expects (as `update table <str>`)."""

    def __init__(self, *args: Any, placeholders: Iterable[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)
        self.placeholders = list(placeholders or [])

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.MissingParameter as missing:
            if ctx.resilient_parsing or isinstance(missing.param, click.Option):
                raise  # a required option (`explain --to`): Click names it; there is no word to list
            possibilities(ctx, self.placeholders or [f"<{param.name}>" for param in self.params
                                                      if isinstance(param, click.Argument)])
        except click.NoSuchOption as error:
            # `resume route -1`: a negative number is a word that is no valid argument, not an option.
            if ctx.resilient_parsing or not _NEGATIVE_NUMBER.fullmatch(error.option_name):
                raise
            if self.placeholders:
                possibilities(ctx, self.placeholders)
            invalid_command()
        except click.UsageError as error:
            if ctx.resilient_parsing:
                raise
            if "unexpected extra argument" in str(error):
                invalid_command()
            raise


# -- what every command needs ---------------------------------------------------------------------------
@dataclass
class CliState:
    paths: Paths
    extras: dict[str, Any] = field(default_factory=dict)

    def client(self, timeout: float | None = 120.0) -> Client:
        return Client(self.paths.socket, timeout=timeout)


def state() -> CliState:
    ctx = click.get_current_context()
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):
        obj = CliState(Paths.from_environment())
        ctx.find_root().obj = obj
    return obj


def fail(message: str, code: int = Exit.FAILED) -> NoReturn:
    render.error(message)
    sys.exit(code)


def call(command: str, **args: Any) -> Any:
    """One request; on any error print OpenSMTPD's words and exit 1."""
    try:
        with state().client() as client:
            return client.call(command, **args)
    except DaemonNotRunning:
        fail("smtpd doesn't seem to be running")
    except ControlError as error:
        fail(error.message)


def simple(command: str, **args: Any) -> None:
    """A command answered by `command succeeded` / `command failed` (reference §2.3)."""
    try:
        with state().client() as client:
            client.call(command, **args)
    except DaemonNotRunning:
        fail("smtpd doesn't seem to be running")
    except ControlError as error:
        if error.code in ("forbidden", "version-mismatch", "busy", "unknown-command", "closed"):
            fail(error.message)
        print("command failed")
        sys.stdout.flush()
        render.error(error.message)
        sys.exit(Exit.FAILED)
    print("command succeeded")


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(function)


# -- the root group -------------------------------------------------------------------------------------
class RootGroup(WordGroup):
    def lazy_children(self) -> dict[str, str]:
        from smtpctl.cli import COMMANDS

        return COMMANDS

    def prefix_candidates(self, word: str, names: list[str]) -> list[str]:
        """A prefix means what it meant to OpenSMTPD's smtpctl (`smtpctl e` is encrypt, although explain is
        ours too); our own commands answer to the prefixes left over, and `stop` only to its whole word, so
        that no typo (`smtpctl st` for a `show st...`) stops the daemon."""
        from smtpctl.cli import OPENSMTPD_COMMANDS, WHOLE_WORD_ONLY

        candidates = [name for name in super().prefix_candidates(word, names) if name not in WHOLE_WORD_ONLY]
        theirs = [name for name in candidates if name in OPENSMTPD_COMMANDS]
        return theirs if theirs else candidates

    def invoke(self, ctx: click.Context) -> Any:
        # `smtpctl monitor | head`, `smtpctl show queue | head -1`: the reader left, which is how such a pipe
        # ends, not a failure (Click itself would exit 1 here).
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(Exit.OK) from None


@click.group(cls=RootGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--socket", "socket_path", metavar="PATH", envvar="SMTPD_SOCKET",
              help="The daemon's control socket (default /var/run/smtpd.sock, or $SMTPD_SOCKET).")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None) -> None:
    """Control the PySMTPD mail server.

    Words may be shortened to any unique prefix, as in OpenSMTPD: `smtpctl sh q` is `smtpctl show queue`.

    \b
    Example:
      smtpctl show status
    """
    ctx.obj = CliState(Paths.from_environment(socket=socket_path))
