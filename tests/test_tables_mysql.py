"""`mysql:` tables, the configuration files of table-mysql (opensmtpd-extras), against a MariaDB server the test
runs: side by side with OpenSMTPD 6.8 running the real table-mysql on the same file and server (the virtual-domain
example: domains, virtual users, aliases of several rows), then ours alone for AUTH (6.8's TLS fails on Debian
12), senders, mistakes said with their line, the server going away and coming back, and `smtpctl update table`.

table-mysql has no key for the server's port: libmariadb takes it from MYSQL_TCP_PORT (and a `localhost` socket's
path from MYSQL_UNIX_PORT), and so do we; the tests set it for both daemons."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess
from helpers_smtp import SmtpDaemon, make_certificate
from helpers_sqlservers import (
    DATABASE,
    TABLE_PASSWORD,
    MariadbServer,
    accepted,
    assert_answered_as_the_program,
    assert_credentials_and_senders,
    check_frozen_server_is_a_bounded_4xx,
    check_server_down_and_back,
    shared_folder,
    side_by_side,
)
from helpers_tables import auth_listener_config, checked_domains_table

from smtpd.lookup.tables import sql
from smtpd.lookup.tables.base import Service, TableError
from smtpd.lookup.tables.mysql import MysqlTable

QUERIES = """query_alias SELECT destination FROM virtuals WHERE email=?;
query_credentials SELECT email, password FROM credentials WHERE email=?;
query_domain SELECT domain FROM domains WHERE domain=?;
query_mailaddrmap SELECT address FROM senders WHERE login=?;
"""


@pytest.fixture(scope="module")
def server() -> Iterator[MariadbServer]:
    with MariadbServer() as running, pytest.MonkeyPatch.context() as environment:
        environment.setenv("MYSQL_TCP_PORT", str(running.port))  # (OpenSMTPD and our daemon inherit it)
        yield running


@pytest.fixture()
def folder(server: MariadbServer) -> Iterator[Path]:
    made = shared_folder()
    (made / "mysql.conf").write_text(f"# as table-mysql(5)'s example\n{server.settings()}{QUERIES}")
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def test_virtual_domains_in_mysql_answer_as_under_opensmtpd(folder: Path) -> None:
    assert_answered_as_the_program(side_by_side(f"mysql:{folder}/mysql.conf", folder))


def tls_config(folder: Path, certificates: Path) -> str:
    return auth_listener_config(f"mysql:{folder}/mysql.conf", certificates)


def test_credentials_and_senders_from_mysql(folder: Path, tmp_path: Path) -> None:
    """AUTH against query_credentials (the server's user logged in with its password), and `senders` against
    query_mailaddrmap, whose rows are joined as table-mysql joins them."""
    make_certificate(tmp_path)
    with SmtpDaemon(tmp_path / "daemon", tls_config(folder, tmp_path)) as daemon:
        assert_credentials_and_senders(daemon.port)


def check(folder: Path, conf_text: str) -> subprocess.CompletedProcess[str]:
    conf = folder / "broken.conf"
    conf.write_text(conf_text)
    return checked_domains_table(folder, f"mysql:{conf}")


@pytest.mark.parametrize(("lines", "message"), [
    ("{settings}query_domain SELECT domain FROM domainz WHERE domain=?\n",
     "{conf}:5: query_domain: Table 'mail.domainz' doesn't exist"),
    ("{settings}# the hash, without the user\nquery_credentials SELECT password FROM credentials WHERE email=?\n",
     "{conf}:6: query_credentials returns 1 column, 2 expected"),
    ("{settings}query_alias SELECT destination FROM virtuals\n",
     "{conf}:5: query_alias takes 0 parameters, 1 expected (the key is the query's one `?`)"),
    ("{settings}query_alias: SELECT destination FROM virtuals WHERE email=? OR email=?\n",
     "{conf}:5: query_alias takes 2 parameters, 1 expected (the key is the query's one `?`)"),
    ("{settings}fetch_source SELECT address FROM sources WHERE address=?\n",
     "{conf}:5: fetch_source takes 1 parameter, 0 expected (it is asked without a key)"),
    ("{settings}query_userinfo SELEC uid, gid, home FROM users WHERE name=?\n",
     "{conf}:5: query_userinfo: You have an error in your SQL syntax"),
    ("{settings}port 3306\n", "{conf}:5: unknown key 'port'"),
    ("{settings}query_alias SELECT 1\nquery_alias SELECT 2\n", "{conf}:6: query_alias given twice (first on line 5)"),
])
def test_mistakes_in_the_file_are_said_with_their_line(server: MariadbServer, folder: Path, lines: str,
                                                        message: str) -> None:
    result = check(folder, lines.format(settings=server.settings()))
    assert result.returncode != 0
    assert message.format(conf=folder / "broken.conf") in result.stderr


def test_a_wrong_database_password_is_a_temporary_failure_said_at_check(folder: Path,
                                                                       server: MariadbServer) -> None:
    result = check(folder, f"{server.settings(password='not-' + TABLE_PASSWORD)}{QUERIES}")
    assert result.returncode == 0, result.stderr
    assert (f"{folder}/broken.conf: warning: cannot reach the database: Access denied for user "
            "'smtpd'@'127.0.0.1' (using password: YES)") in result.stderr


def test_server_down_is_a_temporary_failure_and_the_table_answers_once_it_is_back(server: MariadbServer,
                                                                                  folder: Path) -> None:
    check_server_down_and_back(server, f"mysql:{folder}/mysql.conf", folder,
                               "warning: cannot reach the database: Can't connect to MySQL server")


def statements_running(server: MariadbServer) -> int:
    """How many statements of the tables' user the server is running now."""
    with server.connect() as admin, admin.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM information_schema.processlist WHERE user = 'smtpd' "
                       "AND command <> 'Sleep'")
        found = cursor.fetchone()
    return int(found[0]) if found else 0


def test_a_server_that_does_not_answer_is_a_temporary_failure_in_bounded_time(server: MariadbServer,
                                                                              folder: Path) -> None:
    """A statement waiting for a table another session holds locked, and a server that does not answer at all
    (its host hung): each question is a temporary failure within the bound, never a session waiting for ever;
    the server is told to give the statement up too (none of ours is left waiting there); and the table answers
    as soon as the server does."""
    text = (f"table domains mysql:{folder}/mysql.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with SmtpdProcess(folder / "daemon", text) as daemon:
        assert accepted(daemon.port, "x@example.com") == 250
        with server.connect(DATABASE) as admin, admin.cursor() as cursor:
            cursor.execute("LOCK TABLES domains WRITE")
            assert accepted(daemon.port, "x@example.com", within=sql.QUERY_TIMEOUT + 3) == 451  # (a bound, not for ever)
            assert statements_running(server) == 0
            cursor.execute("UNLOCK TABLES")
        assert accepted(daemon.port, "x@example.com") == 250
        check_frozen_server_is_a_bounded_4xx(daemon.port, server, sql.REPLY_TIMEOUT)
        assert "no answer within" in daemon.log()


def test_update_table_reads_the_file_again_and_keeps_the_table_on_a_mistake(folder: Path, tmp_path: Path) -> None:
    text = (f"table domains mysql:{folder}/mysql.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    conf = folder / "mysql.conf"
    with SmtpdProcess(tmp_path / "daemon", text) as daemon:
        assert accepted(daemon.port, "x@example.org") == 550
        conf.write_text(conf.read_text().replace("FROM domains WHERE domain=?", "FROM domainz WHERE domain=?"))
        result = daemon.smtpctl("update", "table", "domains")
        assert result.returncode != 0
        assert f"{conf}:8: query_domain: Table 'mail.domainz' doesn't exist" in result.stderr
        assert accepted(daemon.port, "x@example.com") == 250  # the table as it was
        conf.write_text(conf.read_text().replace(
            "SELECT domain FROM domainz WHERE domain=?",
            "SELECT domain FROM (SELECT domain FROM domains UNION SELECT 'example.org') AS d WHERE domain=?"))
        assert daemon.smtpctl("update", "table", "domains").returncode == 0
        assert accepted(daemon.port, "x@example.com") == 250
        assert accepted(daemon.port, "x@example.org") == 250


def test_userinfo_and_fetch_source_answer_as_table_mysql_forms_them(server: MariadbServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """userinfo's three columns (integers, as the server's text) as `uid:gid:home`; fetch_source's distinct
    values in sorted order, in turn. `host localhost` is the unix socket (MYSQL_UNIX_PORT), as for libmariadb."""
    monkeypatch.setenv("MYSQL_UNIX_PORT", server.socket)
    monkeypatch.setenv("MYSQL_TCP_PORT", "9")  # (not asked: localhost is the socket)
    conf = tmp_path / "mysql.conf"
    conf.write_text(f"{server.settings(host='localhost')}"
                    "query_userinfo SELECT uid, gid, home FROM users WHERE name=?\n"
                    "fetch_source SELECT address FROM sources\n")
    table = MysqlTable("users", str(conf))
    try:
        assert table.load_warnings == []
        assert table.lookup(Service.USERINFO, "bob") == "65534:65534:/nonexistent"
        assert table.lookup(Service.USERINFO, "carol") is None
        assert [table.fetch(Service.SOURCE) for _ in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]
        with pytest.raises(TableError, match="has no query_alias"):
            table.lookup(Service.ALIAS, "bob")
    finally:
        table.close()
