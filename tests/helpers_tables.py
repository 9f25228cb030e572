"""Helpers for the tables tests: configs with hand-made table declarations, a trace recorder, and what the tests
of the tables that ask a server share (a folder OpenSMTPD's processes can read, an AUTH listener over STARTTLS)."""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon import ROOT

from smtpd import trace
from smtpd.config.model import Config, Location, SmtpOptions, TableDecl, TableShape
from smtpd.lookup.tables import Tables


def file_decl(name: str, path: Path | str, backend: str = "file", line: int = 1) -> TableDecl:
    return TableDecl(name, backend, str(path), location=Location("smtpd.conf", line))


def inline_list(name: str, *items: str) -> TableDecl:
    return TableDecl(name, "file", None, TableShape.LIST, items=items, inline=True)


def inline_map(name: str, **pairs: str) -> TableDecl:
    return TableDecl(name, "file", None, TableShape.MAPPING, mapping=tuple(pairs.items()), inline=True)


def config_with(*decls: TableDecl, delimiter: str = "+", **fields: object) -> Config:
    return Config(path="smtpd.conf", tables={decl.name: decl for decl in decls},
                  smtp=SmtpOptions(sub_addr_delim=delimiter), **fields)  # type: ignore[arg-type]


def tables_with(*decls: TableDecl, delimiter: str = "+") -> Tables:
    return Tables(config_with(*decls, delimiter=delimiter), mailname="mx.example.org",
                  addresses=["127.0.0.1", "192.0.2.7", "::1"])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def recorded_lookups() -> Iterator[list[str]]:
    """The `lookup` trace lines emitted inside the block, as `smtpd -T lookup` prints them."""
    subscription = trace.BUS.subscribe(["lookup", "table"], capacity=100_000)
    lines: list[str] = []
    try:
        yield lines
    finally:
        events, _ = subscription.drain()
        lines.extend(event.to_line() for event in events)
        subscription.close()


def shared_folder(prefix: str = "pysmtpd-table-") -> Path:
    """A folder outside pytest's private (0700) tree, which OpenSMTPD's unprivileged processes can read (its table
    programs, its maildir deliveries), with a maildir folder for each side ("ours", "theirs")."""
    made = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(made, 0o755)
    for side in ("ours", "theirs"):
        (made / side).mkdir(mode=0o755)
        shutil.chown(made / side, "nobody")
    return made


def auth_listener_config(table: str, certificates: Path) -> str:
    """A STARTTLS-required listener whose `auth` credentials and `senders` both come from ``table``
    (`postgres:/path/postgres.conf`, ...), for a test's SmtpDaemon (`{port}` left in), with the certificate
    make_certificate wrote to ``certificates``."""
    return (f'pki mx.test.example cert "{certificates}/mx.test.example.crt"\n'
            f'pki mx.test.example key "{certificates}/mx.test.example.key"\n'
            f"table credentials {table}\ntable sendermap {table}\n"
            "listen on 127.0.0.1 port {port} tls-require pki mx.test.example auth <credentials> "
            "senders <sendermap>\n"
            'action "out" relay\nmatch auth from any for any action "out"\n')


def check_non_utf8_login(table: str, folder: Path, login: bytes) -> None:
    """A user name that is not UTF-8 (``login``, whose password in ``table`` is `secret`): AUTH fails with the
    wrong password and succeeds with the right one, the session going on either way, and nothing crashes."""
    from helpers_smtp import SmtpDaemon, auth_plain_codes, make_certificate

    make_certificate(folder)
    with SmtpDaemon(folder / "daemon", auth_listener_config(table, folder)) as daemon:
        assert auth_plain_codes(daemon.port, login, b"wrong") == (535, 250)
        assert auth_plain_codes(daemon.port, login, b"secret") == (235, 250)
        assert "Traceback" not in daemon.log()


@contextmanager
def starttls_client(port: int) -> Iterator[smtplib.SMTP]:
    """A client of the daemon on ``port``, its session under TLS (the test certificate is not checked)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        yield client



def domains_relay_config(table: str, listen: bool = True) -> str:
    """A config relaying mail for the domains of the table `domains` (``table``: `file:/path`, `ldap:/path/conf`,
    ...), listening on `{port}` (SmtpdProcess fills it in) unless told not to."""
    return (f"table domains {table}\n" + ("listen on 127.0.0.1 port {port}\n" if listen else "")
            + 'action "out" relay\nmatch from any for domain <domains> action "out"\n')


def checked_domains_table(folder: Path, table: str) -> subprocess.CompletedProcess[str]:
    """`smtpd -n` on a config whose `domains` table is ``table`` (`redis:/path/redis.conf`, ...), written in
    ``folder``: what an administrator sees of a mistake in the table's file or server."""
    smtpd_conf = folder / "smtpd.conf"
    smtpd_conf.write_text(domains_relay_config(table, listen=False))
    return subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(smtpd_conf)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)


def rcpt_code(port: int, rcpt: str = "x@example.com") -> int | str:
    """The reply code to RCPT TO:<rcpt> in a fresh session with the daemon on port, or the error's name when the
    session itself failed (a daemon that hung up)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("sender@example.org")
            return client.rcpt(rcpt)[0]
    except (OSError, smtplib.SMTPException) as error:
        return type(error).__name__
