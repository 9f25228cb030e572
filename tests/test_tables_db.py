"""db tables: files made by our makemap, looked up by index, following makemap's atomic replacement."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers_tables import file_decl, recorded_lookups, tables_with, write

from smtpctl.commands.maps import makemap_main
from smtpd.config.model import TableShape
from smtpd.lookup.tables import Service, TableLoadError
from smtpd.lookup.tables.db import APPLICATION_ID, DbTable


def make_db(folder: Path, name: str, text: str, *options: str) -> Path:
    source = write(folder / name, text)
    assert makemap_main([*options, str(source)], "makemap") == 0
    return folder / f"{name}.db"


def test_key_lookups_and_trace(tmp_path: Path) -> None:
    database = make_db(tmp_path, "aliases", "Root: Bob, alice\npostmaster: root\n", "-t", "aliases")
    tables = tables_with(file_decl("aliases", database, backend="db"))
    assert tables.shape("aliases") is TableShape.ANY
    with recorded_lookups() as lines:
        assert tables.lookup("aliases", Service.ALIAS, "ROOT") == "Bob, alice"
        assert tables.lookup("aliases", Service.ALIAS, "nobody") is None
    assert lines == ['lookup: lookup "ROOT" as ALIAS in table db:aliases -> "Bob, alice"',
                     'lookup: lookup "nobody" as ALIAS in table db:aliases -> none']


def test_match_services_on_a_set(tmp_path: Path) -> None:
    domains = make_db(tmp_path, "domains", "example.org\n*.example.net\n", "-t", "set")
    nets = make_db(tmp_path, "nets", "192.0.2.1\n10.0.0.0/8\nipv6:2001:db8::/32\n::1\n", "-t", "set")
    senders = make_db(tmp_path, "senders", "bob@example.org\n@*.example.com\ncarol+x\n", "-t", "set")
    regexes = make_db(tmp_path, "rx", "^admin[[:digit:]]+@\n", "-t", "set")
    tables = tables_with(file_decl("d", domains, "db"), file_decl("n", nets, "db"), file_decl("m", senders, "db"),
                         file_decl("r", regexes, "db"))
    assert tables.match("d", Service.DOMAIN, "EXAMPLE.org") and tables.match("d", Service.DOMAIN, "mx.example.net")
    assert not tables.match("d", Service.DOMAIN, "example.com")
    assert tables.match("n", Service.NETADDR, "192.0.2.1") and tables.match("n", Service.NETADDR, "10.9.8.7")
    assert tables.match("n", Service.NETADDR, "2001:db8::77") and tables.match("n", Service.NETADDR, "0::1")
    assert not tables.match("n", Service.NETADDR, "192.0.2.2")
    assert tables.match("m", Service.MAILADDR, "bob+tag@example.org")
    assert tables.match("m", Service.MAILADDR, "x@a.example.com") and tables.match("m", Service.MAILADDR, "carol+x@y.z")
    assert not tables.match("m", Service.MAILADDR, "carol@y.z")
    assert tables.match("r", Service.REGEX, "admin7@x") and not tables.match("r", Service.REGEX, "admin@x")
    assert tables.match("d", Service.STRING, "example.org")


def test_getting_a_db_file_that_makemap_did_not_make_is_an_error(tmp_path: Path) -> None:
    text_file = write(tmp_path / "plain", "a b\n")
    foreign = tmp_path / "foreign.db"
    connection = sqlite3.connect(foreign)
    connection.execute("CREATE TABLE entries (key TEXT, value TEXT)")
    connection.close()
    for path in (text_file, foreign, tmp_path / "missing.db"):
        with pytest.raises(TableLoadError, match="dbopen"):
            tables_with(file_decl("t", path, "db"))


def test_format_is_identified(tmp_path: Path) -> None:
    database = make_db(tmp_path, "t", "a b\n")
    connection = sqlite3.connect(database)
    assert connection.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert dict(connection.execute("SELECT name, value FROM meta")) == {
        "format": "pysmtpd-table", "type": "map", "source": str(tmp_path / "t"), "entries": "1"}
    connection.close()


def test_table_follows_makemap_replacing_the_file(tmp_path: Path) -> None:
    database = make_db(tmp_path, "aliases", "root: bob\n", "-t", "aliases")
    tables = tables_with(file_decl("aliases", database, "db"))
    assert tables.lookup("aliases", Service.ALIAS, "root") == "bob"
    make_db(tmp_path, "aliases", "root: alice\n", "-t", "aliases")
    assert tables.lookup("aliases", Service.ALIAS, "root") == "alice"
    tables.reload("aliases")
    assert tables.lookup("aliases", Service.ALIAS, "root") == "alice"


def test_failed_reload_keeps_the_old_database(tmp_path: Path) -> None:
    database = make_db(tmp_path, "t", "a b\n")
    tables = tables_with(file_decl("t", database, "db"))
    backend = tables.backend("t")
    assert isinstance(backend, DbTable)
    database.rename(tmp_path / "moved.db")
    with pytest.raises(TableLoadError):
        tables.reload("t")
    # the path names nothing now: the open file keeps answering (as OpenSMTPD's open handle does)
    assert tables.lookup("t", Service.ALIAS, "a") == "b"
    (tmp_path / "moved.db").rename(database)
    assert tables.lookup("t", Service.ALIAS, "a") == "b"


def test_fetch_round_robin(tmp_path: Path) -> None:
    database = make_db(tmp_path, "src", "192.0.2.2\n192.0.2.1\n", "-t", "set")
    tables = tables_with(file_decl("src", database, "db"))
    assert [tables.fetch("src", Service.SOURCE) for _ in range(3)] == ["192.0.2.1", "192.0.2.2", "192.0.2.1"]


def test_hundred_thousand_entry_db(tmp_path: Path) -> None:
    lines = [f"key{index}  value-{index}" for index in range(100_000)]
    lines += [f"*.wild{index}.example" + "  w" for index in range(50)]
    database = make_db(tmp_path, "big", "\n".join(lines) + "\n")
    tables = tables_with(file_decl("big", database, "db"))
    for index in (0, 7, 55_555, 99_999):
        assert tables.lookup("big", Service.ALIAS, f"KEY{index}") == f"value-{index}"
    assert tables.lookup("big", Service.ALIAS, "key100000") is None
    assert tables.match("big", Service.DOMAIN, "mx.wild42.example")
    assert not tables.match("big", Service.DOMAIN, "mx.wild50.example")
    assert tables.lookup("big", Service.DOMAIN, "mx.wild3.example") == "w"


def test_a_removed_db_file_keeps_answering_from_the_open_file(tmp_path: Path) -> None:
    """A script that deletes the .db before it runs makemap again must not make every recipient 451 meanwhile:
    the open file answers (as OpenSMTPD's open handle) until a new file takes the name."""
    path = make_db(tmp_path, "users", "alice@example.org\n", "-t", "set")
    table = DbTable("users", str(path))
    path.unlink()
    assert table.match(Service.MAILADDR, "alice@example.org")
    make_db(tmp_path, "users", "bob@example.org\n", "-t", "set")
    assert table.match(Service.MAILADDR, "bob@example.org")
    assert not table.match(Service.MAILADDR, "alice@example.org")
