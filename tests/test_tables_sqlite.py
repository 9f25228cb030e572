"""`sqlite:` tables, the configuration files of table-sqlite (opensmtpd-extras): side by side with OpenSMTPD 6.8
running the real table-sqlite on the same files (the virtual-domain setup of table-sqlite(5)'s example: domains,
virtual users, aliases with several rows), and ours alone where 6.8 cannot be asked here (AUTH needs TLS, which
its Debian build cannot do) or where we do better (mistakes in the file said with their line)."""

from __future__ import annotations

import os
import shutil
import smtplib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess, free_port
from helpers_mta import OpenSmtpd, Remote, maildir_messages, wait_until
from helpers_smtp import SmtpDaemon, make_certificate
from helpers_sqlservers import (
    RECIPIENTS,
    assert_answered_as_the_program,
    assert_credentials_and_senders,
    side_by_side,
    virtual_domains_config,
)
from helpers_tables import auth_listener_config, checked_domains_table, shared_folder

from shared.passwords import hash_password

SCHEMA = """
CREATE TABLE virtuals (id INTEGER PRIMARY KEY AUTOINCREMENT, email VARCHAR(255) NOT NULL,
                       destination VARCHAR(255) NOT NULL);
CREATE TABLE credentials (id INTEGER PRIMARY KEY AUTOINCREMENT, email VARCHAR(255) NOT NULL,
                          password VARCHAR(255) NOT NULL);
CREATE TABLE domains (id INTEGER PRIMARY KEY AUTOINCREMENT, domain VARCHAR(255) NOT NULL);
CREATE TABLE senders (login VARCHAR(255), address VARCHAR(255));
INSERT INTO domains (domain) VALUES ('example.com'), ('example.net');
INSERT INTO virtuals (email, destination) VALUES
    ('abuse@example.com', 'bob@example.com'), ('postmaster@example.com', 'bob@example.com'),
    ('bob@example.com', 'nobody'), ('alice@example.net', 'nobody'),
    ('team@example.com', 'bob@example.com'), ('team@example.com', 'alice@example.net');
INSERT INTO senders VALUES ('bob@example.com', 'bob@example.com'), ('bob@example.com', 'team@example.com');
"""

CONF = """# as table-sqlite(5)'s example
dbpath {db}
query_alias SELECT destination FROM virtuals WHERE email=?;
query_credentials SELECT email, password FROM credentials WHERE email=?;
query_domain SELECT domain FROM domains WHERE domain=?;
query_mailaddrmap SELECT address FROM senders WHERE login=?;
"""


@pytest.fixture()
def folder() -> Iterator[Path]:
    made = shared_folder("pysmtpd-sqlite-")
    try:
        database = sqlite3.connect(made / "smtp.sqlite")
        database.executescript(SCHEMA)
        database.execute("INSERT INTO credentials (email, password) VALUES (?, ?)",
                         ("bob@example.com", hash_password("secret", "bcrypt")))
        database.commit()
        database.close()
        (made / "sqlite.conf").write_text(CONF.format(db=made / "smtp.sqlite"))
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def test_virtual_domains_in_sqlite_answer_as_under_opensmtpd(folder: Path) -> None:
    assert_answered_as_the_program(side_by_side(f"sqlite:{folder}/sqlite.conf", folder))


def test_credentials_and_senders_from_sqlite(folder: Path, tmp_path: Path) -> None:
    """AUTH against query_credentials and `senders` against query_mailaddrmap (6.8 cannot be asked: its
    STARTTLS fails on Debian 12)."""
    make_certificate(tmp_path)
    with SmtpDaemon(tmp_path / "daemon", auth_listener_config(f"sqlite:{folder}/sqlite.conf", tmp_path)) as daemon:
        assert_credentials_and_senders(daemon.port)


def test_a_replaced_database_is_asked_at_once(folder: Path, tmp_path: Path) -> None:
    text = (f"table domains sqlite:{folder}/sqlite.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with SmtpDaemon(tmp_path / "daemon", text) as daemon:
        def accepted(rcpt: str) -> bool:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("sender@example.org")
                return client.rcpt(rcpt)[0] == 250

        assert not accepted("x@example.org")
        new = folder / "new.sqlite"
        shutil.copy(folder / "smtp.sqlite", new)
        with sqlite3.connect(new) as database:
            database.execute("INSERT INTO domains (domain) VALUES ('example.org')")
        new.chmod(0o644)
        os.replace(new, folder / "smtp.sqlite")
        assert accepted("x@example.org")
        assert accepted("x@example.com")


@pytest.mark.parametrize(("lines", "message"), [
    ("dbpath {db}\nquery_alias SELECT destination FROM virtuals WHERE email=?\nquery_alias SELECT 1\n",
     "{conf}:3: query_alias given twice (first on line 2)"),
    ("dbpath {db}\nquery_domain SELECT domain FROM domainz WHERE domain=?\n",
     "{conf}:2: query_domain: no such table: domainz"),
    ("dbpath {db}\nquery_credentials SELECT email FROM credentials WHERE email=?\n",
     "{conf}:2: query_credentials returns 1 column, 2 expected"),
    ("dbpath {db}\nquery_alias SELECT destination FROM virtuals\n",
     "{conf}:2: query_alias: Incorrect number of bindings supplied. The current statement uses 0, and there are 1 "
     "supplied. (the key is the query's one `?`)"),
    ("dbpath {folder}/missing.sqlite\n", "{conf}:1: cannot open the database {folder}/missing.sqlite: "
                                          "No such file or directory"),
    ("dbpath {db}\nquery_aliases SELECT 1\n", "{conf}:2: unknown key 'query_aliases'"),
])
def test_mistakes_in_the_file_are_said_with_their_line(folder: Path, lines: str, message: str) -> None:


    conf = folder / "broken.conf"
    conf.write_text(lines.format(db=folder / "smtp.sqlite", folder=folder))
    result = checked_domains_table(folder, f"sqlite:{conf}")
    assert result.returncode != 0
    assert message.format(conf=conf, folder=folder) in result.stderr + result.stdout


def test_update_table_reads_the_file_again_and_keeps_the_table_on_a_mistake(folder: Path, tmp_path: Path) -> None:
    text = (f"table domains sqlite:{folder}/sqlite.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    conf = folder / "sqlite.conf"
    with SmtpdProcess(tmp_path / "daemon", text) as daemon:
        def accepted(rcpt: str) -> bool:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("sender@example.org")
                return client.rcpt(rcpt)[0] == 250

        conf.write_text(conf.read_text().replace("FROM domains WHERE domain=?", "FROM domainz WHERE domain=?"))
        result = daemon.smtpctl("update", "table", "domains")
        assert result.returncode != 0
        assert f"{conf}:5: query_domain: no such table: domainz" in result.stderr
        assert accepted("x@example.com")  # the table as it was
        conf.write_text(conf.read_text().replace(
            "SELECT domain FROM domainz WHERE domain=?",
            "SELECT ?1 WHERE ?1 IN (SELECT domain FROM domains) OR ?1 = 'example.org'"))
        assert daemon.smtpctl("update", "table", "domains").returncode == 0
        assert accepted("x@example.com") and accepted("x@example.org")


def test_keys_reach_the_queries_lowercased_under_opensmtpd_too(folder: Path) -> None:
    """OpenSMTPD 6.8 lowercases a key before table-sqlite gets it, as we do (docs/tables.md said it did not):
    `BOB@EXAMPLE.COM` finds the row stored as `bob@example.com`, on both sides."""
    results = {}
    for side in ("ours", "theirs"):
        port = free_port()
        text = virtual_domains_config(f"sqlite:{folder}/sqlite.conf", folder, side, port)
        daemon: SmtpdProcess | OpenSmtpd = (SmtpdProcess(folder / "daemon", text, port=port) if side == "ours"
                                            else OpenSmtpd(str(folder), text, port))
        with daemon, smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("sender@example.org")
            recipients = ("BOB@EXAMPLE.COM", "Team@Example.Com", "x@EXAMPLE.ORG")
            results[side] = [client.rcpt(rcpt) for rcpt in recipients]
    assert results["ours"] == results["theirs"]
    assert [code for code, _ in results["ours"]] == [250, 250, 550]


def test_a_writer_locking_the_database_does_not_stop_the_daemon_while_a_delivery_asks_it(folder: Path,
                                                                                          tmp_path: Path) -> None:
    """A delivery asks its `userbase <sqlite>`; a program writing the database held its lock (rollback journal),
    and the question waited for it (up to sqlite3's 5 s) on the event loop: no client got a banner meanwhile.
    It waits in a worker thread now, and the delivery goes through once the writer is done."""
    import socket
    import time

    mailbox = folder / "ours"  # (outside pytest's private tree: the delivery runs as nobody)
    database = folder / "users.sqlite"
    with sqlite3.connect(database) as writer:
        writer.executescript("CREATE TABLE users (name TEXT, uid, gid, home);"
                             "INSERT INTO users VALUES ('bob', 65534, 65534, '/nonexistent');")
    (folder / "users.conf").write_text(f"dbpath {database}\n"
                                       "query_userinfo SELECT uid, gid, home FROM users WHERE name=?\n")
    text = (f"table users sqlite:{folder}/users.conf\nlisten on 127.0.0.1 port {{port}}\n"
            f'action "vmail" maildir "{mailbox}" userbase <users>\n'
            'match from any for rcpt-to "bob@example.com" action "vmail"\n')
    with SmtpdProcess(tmp_path / "daemon", text) as daemon:
        assert daemon.smtpctl("pause", "mda").returncode == 0
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("sender@example.org", ["bob@example.com"], b"Subject: locked\r\n\r\nhello\r\n")
        writer = sqlite3.connect(database, isolation_level=None)
        try:
            writer.execute("BEGIN EXCLUSIVE")
            assert daemon.smtpctl("resume", "mda").returncode == 0
            time.sleep(0.3)
            slowest = 0.0
            for _ in range(6):
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as probe:
                    assert probe.recv(512).startswith(b"220 ")
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.2)
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        assert slowest < 1.0
        assert wait_until(lambda: len(maildir_messages(str(mailbox))) == 1, 20)


def test_keys_apart_from_their_values_by_tabs_or_colons_as_table_sqlite_takes_them(folder: Path) -> None:
    """table-sqlite ends a key at its first space, tab or colon: `query_domain<TAB>SELECT ...` (a value with
    spaces in it) and `dbpath: FILE` were refused as unknown keys."""
    conf = folder / "sqlite.conf"
    conf.write_text(f"dbpath: {folder}/smtp.sqlite\n"
                    "query_alias:SELECT destination FROM virtuals WHERE email=?\n"
                    "query_domain\tSELECT domain FROM domains WHERE domain=?\n")
    results = {}
    for side in ("ours", "theirs"):
        port = free_port()
        text = virtual_domains_config(f"sqlite:{folder}/sqlite.conf", folder, side, port)
        if side == "ours":
            daemon: SmtpdProcess | OpenSmtpd = SmtpdProcess(folder / "daemon", text, port=port)
        else:
            daemon = OpenSmtpd(str(folder), text, port)
        with daemon, smtplib.SMTP("127.0.0.1", port, timeout=30) as client:  # (no message: none left queued)
            client.ehlo("client.test")
            client.mail("sender@example.org")
            results[side] = [client.rcpt(rcpt) for rcpt in RECIPIENTS]
    assert results["ours"] == results["theirs"]
    assert results["ours"][:4] == [(250, b"2.1.5 Destination address valid: Recipient ok")] * 4


def test_fetch_source_hands_out_the_distinct_addresses_in_turn(tmp_path: Path) -> None:
    """A relay `src <t>` table: table-sqlite's order (the distinct values, sorted, from the first)."""
    from smtpd.lookup.tables.base import Service
    from smtpd.lookup.tables.sqlite import SqliteTable

    database = sqlite3.connect(tmp_path / "s.sqlite")
    database.executescript("CREATE TABLE src (a TEXT); INSERT INTO src VALUES ('127.0.0.3'), ('127.0.0.2'), "
                           "('127.0.0.3');")
    database.commit()
    database.close()
    (tmp_path / "c.conf").write_text(f"dbpath {tmp_path}/s.sqlite\nfetch_source SELECT a FROM src\n")
    table = SqliteTable("sources", str(tmp_path / "c.conf"))
    assert [table.fetch(Service.SOURCE) for _ in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]


def test_a_relay_host_table_is_not_handed_fetch_source_entries(tmp_path: Path) -> None:
    """fetch_source answers a relay `src <t>` only, as table-sqlite's (it fails every other fetch): a table used as
    `relay host <t>` by mistake must not relay the mail to whatever its fetch_source query returns. The delivery
    is deferred (a temporary failure)."""
    with Remote() as remote:
        database = sqlite3.connect(tmp_path / "s.sqlite")
        database.execute("CREATE TABLE src (a TEXT)")
        database.execute("INSERT INTO src VALUES (?)", (f"smtp://127.0.0.1:{remote.port}",))
        database.commit()
        database.close()
        (tmp_path / "c.conf").write_text(f"dbpath {tmp_path}/s.sqlite\nfetch_source SELECT a FROM src\n")
        text = (f"table hosts sqlite:{tmp_path}/c.conf\nlisten on 127.0.0.1 port {{port}}\n"
                f'action "r{remote.port}" relay host <hosts>\nmatch from any for any action "r{remote.port}"\n')
        with SmtpdProcess(tmp_path / "daemon", text) as daemon:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
            assert wait_until(lambda: "result=\"TempFail\"" in daemon.log() or remote.received, 20)
            assert remote.received == []
            assert "temporary failure in relay host lookup" in daemon.log()
