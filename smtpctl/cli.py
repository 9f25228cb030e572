"""The smtpctl command line: the Click group, and the personalities chosen by program name.

Command families live in smtpctl/commands/, one module each, and are imported only when used so that
`smtpctl show status` starts fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

# name -> "module:attribute" of a Click command or group. Each family adds its line. The order is OpenSMTPD's
# (it is the order of the `possibilities are:` listing); our own commands follow.
COMMANDS: dict[str, str] = {
    "discover": "smtpctl.commands.queue:discover",
    "pause": "smtpctl.commands.control:pause",
    "resume": "smtpctl.commands.control:resume",
    "show": "smtpctl.commands.show:show",
    "log": "smtpctl.commands.control:log",
    "monitor": "smtpctl.commands.monitor:monitor",
    "profile": "smtpctl.commands.control:profile",
    "remove": "smtpctl.commands.queue:remove",
    "schedule": "smtpctl.commands.queue:schedule",
    "trace": "smtpctl.commands.trace:trace",
    "unprofile": "smtpctl.commands.control:unprofile",
    "untrace": "smtpctl.commands.trace:untrace",
    "update": "smtpctl.commands.control:update",
    "encrypt": "smtpctl.commands.encrypt:encrypt",
    "spf": "smtpctl.commands.spf:spf",
    "reload": "smtpctl.commands.control:reload",
    "stop": "smtpctl.commands.control:stop",
    "explain": "smtpctl.commands.explain:explain",
}
# The words OpenSMTPD 6.8's smtpctl has at this level: a prefix that chose one of them there still does here.
OPENSMTPD_COMMANDS = frozenset(list(COMMANDS)[:15])
WHOLE_WORD_ONLY = frozenset({"stop"})


def __getattr__(name: str) -> object:
    # The Click group lives in smtpctl.words and is imported on demand: Click costs more start-up time than
    # `smtpctl show status` may take in total (bench/smtpctl_start.py).
    if name in ("cli", "LazyGroup"):
        from smtpctl import words

        return words.cli if name == "cli" else words.WordGroup
    raise AttributeError(name)


def _personality(prog: str, argv: list[str]) -> int | None:
    """Run the sendmail/mailq/newaliases/makemap personality, or None for plain smtpctl."""
    if prog in ("sendmail", "send-mail"):
        if any(arg.startswith("-bi") for arg in argv):
            return importlib.import_module("smtpctl.commands.maps").newaliases_main(argv, "newaliases")
        return importlib.import_module("smtpctl.commands.sendmail").sendmail_main(argv, prog)
    if prog == "makemap":
        return _listing(lambda: importlib.import_module("smtpctl.commands.maps").makemap_main(argv, prog))
    if prog == "newaliases":
        return _listing(lambda: importlib.import_module("smtpctl.commands.maps").newaliases_main(argv, prog))
    if prog == "mailq":
        return _listing(lambda: importlib.import_module("smtpctl.commands.queue").mailq_main(argv, prog))
    if prog == "smtpctl":
        return None
    print(f"{prog}: unsupported mode", file=sys.stderr)
    return 1


def _listing(run: Callable[[], int]) -> int:
    """Run a personality whose output is a listing: a reader that left (`makemap -U big.db | head`) is how such a
    pipe ends, not an error with a BrokenPipeError traceback. (Not sendmail's: its status says what became of
    a message.)"""
    try:
        return run()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or os.path.basename(sys.argv[0])
    if prog in ("__main__.py", "python", "python3"):
        prog = "smtpctl"
    status = _personality(prog, argv)
    if status is not None:
        sys.exit(status)
    from smtpctl import fast

    status = fast.run(argv)
    if status is not None:
        sys.exit(status)
    sys.exit(_run_click(argv))


def _run_click(argv: list[str]) -> int:
    import click

    from smtpctl.exitcodes import Exit
    from smtpctl.words import cli

    try:
        result = cli.main(args=argv, prog_name="smtpctl", standalone_mode=False)
    except click.UsageError as error:
        error.show()
        return Exit.USAGE
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Exit as error:
        return error.exit_code
    except (click.Abort, KeyboardInterrupt):
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `smtpctl monitor | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    return result if isinstance(result, int) else Exit.OK
