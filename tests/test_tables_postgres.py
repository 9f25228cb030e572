"""`postgres:` tables, the configuration files of table-postgres (opensmtpd-extras), against a PostgreSQL server the
test runs: side by side with OpenSMTPD 6.8 running the real table-postgres on the same file and server (the
virtual-domain example: domains, virtual users, aliases of several rows), then ours alone for AUTH (6.8's TLS
fails on Debian 12), senders, mistakes said with their line, the server going away and coming back, and
`smtpctl update table`."""

from __future__ import annotations

import base64
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import ROOT, SmtpdProcess
from helpers_mta import maildir_messages
from helpers_smtp import SmtpDaemon, make_certificate
from helpers_sqlservers import (
    AUTH_PASSWORD,
    AUTH_USER,
    DATABASE,
    TABLE_PASSWORD,
    TABLE_USER,
    BannerWatch,
    PostgresServer,
    accepted,
    assert_answered_as_the_program,
    assert_credentials_and_senders,
    check_frozen_server_is_a_bounded_4xx,
    check_server_down_and_back,
    shared_folder,
    side_by_side,
)
from helpers_tables import auth_listener_config, checked_domains_table, starttls_client
from waiting import wait_until as wait_bounded

from smtpd.lookup.tables import sql
from smtpd.lookup.tables.base import Service, TableError
from smtpd.lookup.tables.postgres import PostgresTable

# (query_alias returns a column more than it needs: table-postgres reads the first and ignores the others)
QUERIES = """query_alias SELECT destination, email FROM virtuals WHERE email=$1;
query_credentials SELECT email, password FROM credentials WHERE email=$1;
query_domain SELECT domain FROM domains WHERE domain=$1;
query_mailaddrmap SELECT address FROM senders WHERE login=$1;
"""


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with PostgresServer() as running:
        yield running


@pytest.fixture()
def folder(server: PostgresServer) -> Iterator[Path]:
    made = shared_folder()
    (made / "postgres.conf").write_text(f"# as table-postgres(5)'s example\nconninfo {server.conninfo()}\n{QUERIES}")
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def test_virtual_domains_in_postgres_answer_as_under_opensmtpd(folder: Path) -> None:
    assert_answered_as_the_program(side_by_side(f"postgres:{folder}/postgres.conf", folder))


def tls_config(folder: Path, certificates: Path) -> str:
    return auth_listener_config(f"postgres:{folder}/postgres.conf", certificates)


def test_credentials_and_senders_from_postgres(folder: Path, tmp_path: Path) -> None:
    """AUTH against query_credentials (the server's user logged in with its password), and `senders` against
    query_mailaddrmap, whose rows are joined as table-postgres joins them."""
    make_certificate(tmp_path)
    with SmtpDaemon(tmp_path / "daemon", tls_config(folder, tmp_path)) as daemon:
        assert_credentials_and_senders(daemon.port)


def test_a_login_with_a_nul_byte_is_not_taken_for_the_name_before_it(folder: Path, tmp_path: Path) -> None:
    """PostgreSQL text holds no NUL, and libpq cuts a parameter at one: `bob@example.com<NUL>x` (AUTH LOGIN's user
    name is any bytes) must not be asked as `bob@example.com`, whose password would then let it in under a name
    that is not in the table. It is no user (535), as for sqlite: and mysql: tables and OpenSMTPD's file tables."""
    make_certificate(tmp_path)
    with SmtpDaemon(tmp_path / "daemon", tls_config(folder, tmp_path)) as daemon:
        with starttls_client(daemon.port) as client:
            client.ehlo("client.test")
            login = base64.b64encode(AUTH_USER.encode() + b"\0x").decode()
            assert client.docmd("AUTH", f"LOGIN {login}")[0] == 334
            assert client.docmd(base64.b64encode(AUTH_PASSWORD.encode()).decode())[0] == 535
            assert client.login(AUTH_USER, AUTH_PASSWORD)[0] == 235  # (the user's own name still logs in)


def check(folder: Path, conf_text: str) -> subprocess.CompletedProcess[str]:
    conf = folder / "broken.conf"
    conf.write_text(conf_text)
    return checked_domains_table(folder, f"postgres:{conf}")


@pytest.mark.parametrize(("lines", "message"), [
    ("conninfo {conninfo}\nquery_domain SELECT domain FROM domainz WHERE domain=$1\n",
     '{conf}:2: query_domain: relation "domainz" does not exist'),
    ("conninfo {conninfo}\n# the hash, without the user\nquery_credentials SELECT password FROM credentials "
     "WHERE email=$1\n", "{conf}:3: query_credentials returns 1 column, 2 expected"),
    ("conninfo {conninfo}\nquery_alias SELECT destination FROM virtuals\n",
     "{conf}:2: query_alias: could not determine data type of parameter $1 (the key is the query's one `$1`)"),
    ("conninfo {conninfo}\nquery_alias: SELECT destination FROM virtuals WHERE email=$1 OR email=$2\n",
     "{conf}:2: query_alias takes 2 parameters, 1 expected (the key is the query's one `$1`)"),
    ("conninfo host=127.0.0.1 dbname\n", "{conf}:1: conninfo: missing \"=\" after \"dbname\""),
    ("query_alias SELECT 1\n", "{conf}: no conninfo: the server must be named"),
    ("conninfo {conninfo}\nquery_aliases SELECT 1\n", "{conf}:2: unknown key 'query_aliases'"),
    ("conninfo {conninfo}\nfetch_source_expire 1m\n",
     "{conf}:2: fetch_source_expire takes a number of 0 to 2147483647, not '1m'"),
])
def test_mistakes_in_the_file_are_said_with_their_line(server: PostgresServer, folder: Path, lines: str,
                                                        message: str) -> None:
    result = check(folder, lines.format(conninfo=server.conninfo()))
    assert result.returncode != 0
    assert message.format(conf=folder / "broken.conf") in result.stderr


def test_a_wrong_database_password_is_a_temporary_failure_said_at_check(folder: Path,
                                                                       server: PostgresServer) -> None:
    result = check(folder, f"conninfo {server.conninfo(password='not-' + TABLE_PASSWORD)}\n{QUERIES}")
    assert result.returncode == 0, result.stderr
    assert (f"{folder}/broken.conf: warning: cannot reach the database: connection to server at \"127.0.0.1\", "
            f"port {server.port} failed: FATAL: password authentication failed for user \"smtpd\"") in result.stderr


def test_server_down_is_a_temporary_failure_and_the_table_answers_once_it_is_back(server: PostgresServer,
                                                                                  folder: Path) -> None:
    check_server_down_and_back(server, f"postgres:{folder}/postgres.conf", folder,
                               "warning: cannot reach the database: connection to server at")


def connections(server: PostgresServer, state: str = "%") -> int:
    """How many connections the tables' user has open (in a state: 'active' is running a statement)."""
    with server.connect() as connection:
        found = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'smtpd' "
                                   "AND state LIKE %s", (state,)).fetchone()
    return int(found[0]) if found else 0


def test_a_server_that_does_not_answer_is_a_temporary_failure_in_bounded_time(server: PostgresServer,
                                                                              folder: Path) -> None:
    """A statement waiting for a lock another transaction holds (a migration left open), and a server that does
    not answer at all (its host hung): each question is a temporary failure within the bound, never a session
    waiting for ever; the server is told to give the statement up too (none of ours is left waiting there);
    and the table answers as soon as the server does."""
    text = (f"table domains postgres:{folder}/postgres.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with SmtpdProcess(folder / "daemon", text) as daemon:
        assert accepted(daemon.port, "x@example.com") == 250
        with server.connect(DATABASE) as admin, admin.transaction():
            admin.execute("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
            assert accepted(daemon.port, "x@example.com", within=sql.QUERY_TIMEOUT + 3) == 451  # (a bound, not for ever)
            assert connections(server, "active") == 0
        assert accepted(daemon.port, "x@example.com") == 250
        check_frozen_server_is_a_bounded_4xx(daemon.port, server, sql.REPLY_TIMEOUT)
        assert "no answer within" in daemon.log()


def test_a_server_that_does_not_answer_is_waited_for_once_not_once_a_table(server: PostgresServer,
                                                                           folder: Path) -> None:
    """A database host whose packets are lost (down, or a firewall) makes a connection attempt wait out its
    timeout. Three tables on it cost `smtpd -n`, and the start, one such wait, not three (or six: the start checks
    the configuration, then opens the tables); questions meanwhile are temporary failures at once, not a wait
    each; and the table answers once the server does."""
    conf = f"postgres:{folder}/postgres.conf"
    text = (f"table domains {conf}\ntable virtuals {conf}\ntable sendermap {conf}\n"
            "listen on 127.0.0.1 port {port} senders <sendermap>\n"
            f'action "vmail" maildir "{folder}/ours" virtual <virtuals>\n'
            'match from any for domain <domains> action "vmail"\n')
    (folder / "smtpd.conf").write_text(text.replace("{port}", "25"))
    server.freeze()
    try:
        # (the client's bounds: one connection wait in all, not one a table, nor a wait a question)
        checked = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(folder / "smtpd.conf")],
                                 capture_output=True, text=True, cwd=ROOT, timeout=sql.CONNECT_TIMEOUT + 5,
                                 check=False)
        assert checked.returncode == 0, checked.stderr
        assert checked.stderr.count("warning: cannot reach the database") == 3
        assert checked.stderr.count("(not tried again for") == 2  # the second and third table did not wait
        with SmtpdProcess(folder / "daemon", text) as daemon:
            assert accepted(daemon.port, "bob@example.com", within=2) == 451
            server.thaw()
            wait_bounded(lambda: accepted(daemon.port, "bob@example.com") == 250, sql.UNANSWERED_PAUSE + 5,
                         interval=1)
    finally:
        server.thaw()


def test_connecting_to_a_server_that_does_not_answer_leaves_the_daemon_answering(server: PostgresServer,
                                                                                  folder: Path) -> None:
    """psycopg's libpq connection call keeps every other thread of the process from running while it waits: a
    postgres: table connecting to a server that does not answer (at `smtpctl update table`, or for a question
    after its connection was dropped) held the whole daemon, and every session, for the connect timeout. The
    other clients get their banner at once meanwhile, and the update fails and keeps the table."""
    text = (f"table domains postgres:{folder}/postgres.conf\nlisten on 127.0.0.1 port {{port}}\n"
            "listen on 127.0.0.1 port {port2}\n" 'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with SmtpdProcess(folder / "daemon", text) as daemon:
        assert accepted(daemon.port, "x@example.com") == 250
        server.freeze()
        try:
            with BannerWatch(daemon.port2) as watch:
                update = daemon.smtpctl("update", "table", "domains")
            assert update.returncode != 0
            assert "cannot reach the database" in update.stderr and "no answer within" in update.stderr
            assert watch.longest < 1.0, f"a banner waited {watch.longest:.1f} s"
        finally:
            server.thaw()
        assert accepted(daemon.port, "x@example.com") == 250  # (on the connection kept)


def test_update_table_reads_the_file_again_and_keeps_the_table_on_a_mistake(folder: Path, tmp_path: Path) -> None:
    text = (f"table domains postgres:{folder}/postgres.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    conf = folder / "postgres.conf"
    with SmtpdProcess(tmp_path / "daemon", text) as daemon:
        assert accepted(daemon.port, "x@example.org") == 550
        conf.write_text(conf.read_text().replace("FROM domains WHERE domain=$1", "FROM domainz WHERE domain=$1"))
        result = daemon.smtpctl("update", "table", "domains")
        assert result.returncode != 0
        assert f'{conf}:5: query_domain: relation "domainz" does not exist' in result.stderr
        assert accepted(daemon.port, "x@example.com") == 250  # the table as it was
        conf.write_text(conf.read_text().replace(
            "SELECT domain FROM domainz WHERE domain=$1",
            "SELECT $1 WHERE $1 IN (SELECT domain FROM domains) OR $1 = 'example.org'"))
        assert daemon.smtpctl("update", "table", "domains").returncode == 0
        assert accepted(daemon.port, "x@example.com") == 250
        assert accepted(daemon.port, "x@example.org") == 250


def test_userinfo_and_fetch_source_answer_as_table_postgres_forms_them(server: PostgresServer,
                                                                      tmp_path: Path) -> None:
    """userinfo's three columns (integers, as the server's text) as `uid:gid:home`; fetch_source's distinct
    values in sorted order, in turn."""
    conf = tmp_path / "postgres.conf"
    conf.write_text(f"conninfo {server.conninfo()}\n"
                    "query_userinfo SELECT uid, gid, home FROM users WHERE name=$1\n"
                    "fetch_source SELECT address FROM sources\n")
    table = PostgresTable("users", str(conf))
    try:
        assert table.load_warnings == []
        assert table.lookup(Service.USERINFO, "bob") == "65534:65534:/nonexistent"
        assert table.lookup(Service.USERINFO, "carol") is None
        assert [table.fetch(Service.SOURCE) for _ in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]
        with pytest.raises(TableError, match="has no query_alias"):
            table.lookup(Service.ALIAS, "bob")
    finally:
        table.close()


def test_a_reload_while_a_delivery_asks_the_userbase_leaves_the_daemon_answering(server: PostgresServer,
                                                                                 folder: Path) -> None:
    """A reload retires the old configuration's tables; closing one whose question is in flight (a delivery
    asking a slow userbase query) must not hold the event loop until the answer comes: new clients get their
    banner at once, the reload is done at once, and the delivery still gets its answer."""
    (folder / "users.conf").write_text(f"conninfo {server.conninfo()}\nquery_userinfo SELECT 65534, 65534, "
                                       "'/nonexistent'::text FROM pg_sleep(3) WHERE $1::text IS NOT NULL\n")
    text = (f"table users postgres:{folder}/users.conf\nlisten on 127.0.0.1 port {{port}}\n"
            f'action "vmail" maildir "{folder}/ours" userbase <users>\nmatch from any for local action "vmail"\n')
    with SmtpdProcess(folder / "daemon", text) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:  # (its RCPT waits for the query too)
            client.sendmail("sender@example.org", ["nobody@localhost"], b"Subject: slow userbase\r\n\r\nhi\r\n")
        wait_bounded(lambda: connections(server, "active") == 1, 10)  # the delivery's question
        with BannerWatch(daemon.port) as watch:
            # (the query takes 3 s: a reload that waited for it would outlast smtpctl's bound)
            assert daemon.smtpctl("reload", timeout=2.5).returncode == 0
            time.sleep(0.5)
        assert watch.longest < 1.0, f"a banner waited {watch.longest:.1f} s"
        wait_bounded(lambda: len(maildir_messages(f"{folder}/ours")) == 1, 20)
        wait_bounded(lambda: connections(server) == 1, 10)  # the retired table's, closed once answered


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        return client.recv(512)


def test_a_reload_with_a_slow_hostnames_table_leaves_the_daemon_answering(server: PostgresServer,
                                                                          folder: Path) -> None:
    """`listen on ... hostnames <t>` asks the table for each address when the listeners are set up again at a
    reload: a slow answer must not hold the event loop meanwhile (the other listener's clients get their banner
    at once), and the name it gives is the listener's."""
    server.execute(["CREATE TABLE names (address VARCHAR(64), name VARCHAR(255), delay FLOAT)",
                    "INSERT INTO names VALUES ('127.0.0.1', 'mx.sql.example', 0)",
                    f"GRANT SELECT ON names TO {TABLE_USER}"])
    try:
        (folder / "names.conf").write_text(f"conninfo {server.conninfo()}\nquery_addrname SELECT name FROM names, "
                                           "pg_sleep(delay) WHERE address=$1\n")
        text = (f"table names postgres:{folder}/names.conf\nlisten on 127.0.0.1 port {{port}} hostnames <names>\n"
                "listen on 127.0.0.1 port {port2}\n" 'action "out" relay\nmatch from any action "out"\n')
        with SmtpdProcess(folder / "daemon", text) as daemon:
            assert greeting(daemon.port).startswith(b"220 mx.sql.example ")
            server.execute(["UPDATE names SET delay = 2"])  # (below the tests' statement limit, conftest.py)
            with BannerWatch(daemon.port2) as watch:
                assert daemon.smtpctl("reload").returncode == 0
            assert watch.longest < 1.0, f"a banner waited {watch.longest:.1f} s"
            assert greeting(daemon.port).startswith(b"220 mx.sql.example ")
    finally:
        server.execute(["DROP TABLE names"])
