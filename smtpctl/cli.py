"""The smtpctl command line: the Click group, and the personalities chosen by program name.

Command families live in smtpctl/commands/, one module each, and are imported only when used so that
`smtpctl show status` starts fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# name -> "module:attribute" of a Click command or group. Each family adds its line.
COMMANDS: dict[str, str] = {
    "encrypt": "smtpctl.commands.encrypt:encrypt",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Control the PySMTPD mail server."""


def _personality(prog: str, argv: list[str]) -> int | None:
    """Run the sendmail/mailq/newaliases/makemap personality, or None for plain smtpctl."""
    if prog in ("sendmail", "send-mail"):
        if any(arg.startswith("-bi") for arg in argv):
            return importlib.import_module("smtpctl.commands.maps").newaliases_main(argv, "newaliases")
        return importlib.import_module("smtpctl.commands.sendmail").sendmail_main(argv, prog)
    if prog == "makemap":
        return importlib.import_module("smtpctl.commands.maps").makemap_main(argv, prog)
    if prog == "newaliases":
        return importlib.import_module("smtpctl.commands.maps").newaliases_main(argv, prog)
    if prog == "mailq":
        return importlib.import_module("smtpctl.commands.queue").mailq_main(argv, prog)
    if prog == "smtpctl":
        return None
    print(f"{prog}: unsupported mode", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or os.path.basename(sys.argv[0])
    if prog in ("__main__.py", "python", "python3"):
        prog = "smtpctl"
    status = _personality(prog, argv)
    if status is not None:
        sys.exit(status)
    cli.main(args=argv, prog_name="smtpctl")
