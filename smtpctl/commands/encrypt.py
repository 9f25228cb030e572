"""`smtpctl encrypt [string]`: hash passwords for credentials tables (reference §2.5).

With an argument it prints that argument's hash; without, it reads standard input and prints one hash per line
(only a trailing newline is removed from each line). It needs neither the daemon nor root.

The default is bcrypt (`$2b$`, cost 12); `--scheme sha512` gives the `$6$` form OpenSMTPD's own encrypt prints
on Linux. Both are accepted by OpenSMTPD 6.8 and by us.
"""

from __future__ import annotations

import sys

import click

from shared.passwords import DEFAULT_SCHEME, SCHEMES, PasswordSchemeError, hash_password
from smtpctl.words import Leaf

ARGUMENT_WARNING = ("smtpctl: warning: a password given as an argument is visible to other users (ps); "
                    "prefer standard input")


@click.command(cls=Leaf)
@click.option("--scheme", type=click.Choice(SCHEMES), default=DEFAULT_SCHEME, show_default=True,
              help="Hash scheme: bcrypt ($2b$) or sha512 ($6$, what OpenSMTPD's encrypt makes).")
@click.option("--rounds", type=int, default=None,
              help="bcrypt cost (4-31, default 12) or sha512 rounds (1000 and up, default 5000).")
@click.argument("string", required=False)
def encrypt(scheme: str, rounds: int | None, string: str | None) -> None:
    """Print the hash of STRING, or of each line of standard input."""
    try:
        if string is not None:
            click.echo(ARGUMENT_WARNING, err=True)
            click.echo(hash_password(string, scheme, rounds))
            return
        for raw in sys.stdin.buffer:
            line = raw[:-1] if raw.endswith(b"\n") else raw
            click.echo(hash_password(line, scheme, rounds))
            sys.stdout.flush()
    except PasswordSchemeError as error:
        raise click.UsageError(str(error)) from None
