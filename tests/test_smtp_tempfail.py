"""Table failures during a session, made to happen for real: a `db:` table (made by our makemap) whose file is
replaced by garbage while the daemon runs. The session must answer with the reference's 421 (§7.3) and go on.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_smtp import ROOT, SmtpDaemon, make_certificate

PASSWORD = "tempfail pass"

CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
table creds db:{dir}/creds.db
table sendermap db:{dir}/senders.db
table rcpts db:{dir}/rcpts.db
listen on 127.0.0.1 port {port} tls-require pki mx.test.example auth <creds> senders <sendermap>
action "relay" relay
match auth from any for rcpt-to <rcpts> action "relay"
match auth from any for any action "relay"
"""


def makemap(source: Path, text: str) -> Path:
    """Build `source`.db with our makemap, as an administrator would."""
    source.write_text(text)
    code = "import sys; from smtpctl.cli import main; main(sys.argv[1:], prog='makemap')"
    subprocess.run([sys.executable, "-c", code, str(source)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return source.with_name(source.name + ".db")


def spoil(database: Path) -> Path:
    """Replace the database by a file that is not one (a new inode, as an editor or a failed copy would leave);
    returns where the good copy was kept."""
    kept = database.with_name(database.name + ".good")
    shutil.copy2(database, kept)
    garbage = database.with_name(database.name + ".tmp")
    garbage.write_bytes(b"this is not an SQLite database\n" * 64)
    os.replace(garbage, database)
    return kept


def restore(database: Path, kept: Path) -> None:
    os.replace(kept, database)


@pytest.fixture
def daemon(tmp_path: Path):
    from shared.passwords import hash_password

    make_certificate(tmp_path)
    makemap(tmp_path / "creds", f"alice {hash_password(PASSWORD, 'sha512')}\n")
    makemap(tmp_path / "senders", "alice alice@example.org\n")
    makemap(tmp_path / "rcpts", "carol@example.net carol\n")
    server = SmtpDaemon(tmp_path, CONFIG, traces=("smtp",))
    server.start()
    yield server
    server.stop()


def submission(port: int) -> smtplib.SMTP:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("client.test")
    client.starttls(context=context)
    client.ehlo("client.test")
    return client


def auth_plain(client: smtplib.SMTP, user: str = "alice", password: str = PASSWORD) -> tuple[int, bytes]:
    token = base64.b64encode(f"{user}\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


def test_senders_table_failure_is_421_temporary_error_and_the_session_goes_on(daemon: SmtpDaemon) -> None:
    database = daemon.dir / "senders.db"
    client = submission(daemon.port)
    try:
        assert auth_plain(client)[0] == 235
        kept = spoil(database)
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (421, b"4.3.0 Temporary Error")
        # The transaction was discarded and the session is still open (the reference does not close it).
        assert client.docmd("RCPT", "TO:<bob@example.net>") == (
            503, b"5.5.1 Invalid command: Command not allowed at this point.")
        assert client.docmd("NOOP") == (250, b"2.0.0 Ok")
        restore(database, kept)
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (250, b"2.0.0 Ok")
        assert client.docmd("RSET") == (250, b"2.0.0 Reset state")
        # A sender the (healthy) table does not allow is refused permanently, not temporarily.
        assert client.docmd("MAIL", "FROM:<mallory@example.org>") == (530, b"Sender rejected")
        assert client.quit()[0] == 221
    finally:
        client.close()
    assert "Temporary Error" in daemon.log()
    # The client only hears "Temporary Error": the log says which table failed, and why.
    assert f"smtp: temporary failure of the senders table <sendermap>: {database}: dbopen:" in daemon.log()
    assert daemon.process is not None and daemon.process.poll() is None


def test_a_recipient_table_failure_is_451_and_the_log_says_why(daemon: SmtpDaemon) -> None:
    database = daemon.dir / "rcpts.db"
    client = submission(daemon.port)
    try:
        assert auth_plain(client)[0] == 235
        spoil(database)
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (250, b"2.0.0 Ok")
        assert client.docmd("RCPT", "TO:<carol@example.net>")[0] == 451
        assert client.quit()[0] == 221
    finally:
        client.close()
    lines = [line for line in daemon.log().splitlines() if "temporary failure for <carol@example.net>" in line]
    assert len(lines) == 1, daemon.log()
    assert f"table error: {database}: dbopen: not a table database made by makemap" in lines[0]


def test_senders_table_gone_is_a_temporary_error_too(daemon: SmtpDaemon) -> None:
    database = daemon.dir / "senders.db"
    client = submission(daemon.port)
    try:
        assert auth_plain(client)[0] == 235
        kept = database.with_name("senders.db.good")
        os.replace(database, kept)
        database.mkdir()  # a directory where the database was: not openable, even by root
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (421, b"4.3.0 Temporary Error")
        database.rmdir()
        restore(database, kept)
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (250, b"2.0.0 Ok")
    finally:
        client.close()


def test_credentials_table_failure_is_421_temporary_failure_and_the_session_goes_on(daemon: SmtpDaemon) -> None:
    database = daemon.dir / "creds.db"
    client = submission(daemon.port)
    try:
        kept = spoil(database)
        assert auth_plain(client) == (421, b"4.3.0 Temporary failure")
        # Not closed, not counted as a failed password: the client may try again once the table is back.
        assert client.docmd("NOOP") == (250, b"2.0.0 Ok")
        assert auth_plain(client) == (421, b"4.3.0 Temporary failure")
        assert auth_plain(client) == (421, b"4.3.0 Temporary failure")
        assert auth_plain(client) == (421, b"4.3.0 Temporary failure")  # a 4th: tempfails are not failures
        restore(database, kept)
        assert auth_plain(client, password="wrong") == (535, b"Authentication failed")
        assert auth_plain(client) == (235, b"2.0.0 Authentication succeeded")
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (250, b"2.0.0 Ok")
        assert client.quit()[0] == 221
    finally:
        client.close()
    assert "result=tempfail" in daemon.log()
