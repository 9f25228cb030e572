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


class EncryptCommand(Leaf):
    """A word starting with `-` that is none of our options is the string to hash, as for OpenSMTPD's encrypt
    (`smtpctl encrypt "$PASSWORD"` with a password like `-Xy7...`; Click would refuse it as an unknown option)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        options = {name: param for param in self.get_params(ctx) if isinstance(param, click.Option)
                   for name in (*param.opts, *param.secondary_opts)}
        index = 0
        while index < len(args) and args[index] != "--":
            word = args[index]
            option = options.get(word.partition("=")[0]) if word.startswith("--") else options.get(word)
            if option is None and word.startswith("-") and word != "-":
                args = [*args[:index], "--", *args[index:]]
                break
            # (an option's value, the next word, is no string even when it starts with `-`)
            index += 2 if option is not None and not option.is_flag and "=" not in word else 1
        return super().parse_args(ctx, args)


@click.command(cls=EncryptCommand)
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
