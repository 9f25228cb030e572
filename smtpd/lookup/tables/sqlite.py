"""`sqlite:` tables: the configuration files of table-sqlite (opensmtpd-extras), answered by the daemon itself.

OpenSMTPD runs `table NAME sqlite:/etc/mail/sqlite.conf` through the external program table-sqlite; we read the
same configuration file and ask the same SQLite database with the stdlib's sqlite3, so a virtual-domain setup
built on it (the OpenSMTPD FAQ's, table-sqlite(5)'s example) works unchanged. docs/tables.md has the details;
in short, as table-sqlite (checked against it under OpenSMTPD 6.8, tests/test_tables_sqlite.py):

* the file holds `dbpath FILE` and `query_SERVICE SQL` lines (alias, domain, credentials, netaddr, userinfo,
  source, mailaddr, addrname, mailaddrmap), and `fetch_source SQL` for relay `src` tables, each key apart from
  its value by spaces, tabs or a colon (`dbpath: FILE`); `#` lines and blank lines are skipped;
* each query takes the key as its one `?` and returns one column, two for credentials (user, password: answered
  `user:password`) and three for userinfo (uid, gid, home: `uid:gid:home`);
* alias and mailaddrmap answers join every row's value with `, `; the other services answer from the first row,
  and a match question (domain, netaddr, mailaddr) holds when a row comes back: no glob nor CIDR matching, the
  SQL decides;
* a service without its query is a temporary failure.

Where we differ, on purpose: the file is checked when it is loaded, and its mistakes are `FILE:LINE: message`
(an unknown key, a query that does not compile or returns the wrong number of columns, a database that cannot be
opened), where table-sqlite says `error parsing config file` or exits when first asked. The database is opened
read-only, and opened again when its path names a new file. Keys come lowercased, as OpenSMTPD 6.8 hands them to
table-sqlite: rows are to store them in lowercase, or queries to compare with `lower(column) = ?`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from urllib.parse import quote

from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.static import read_table_file

BACKEND = "sqlite"
QUERIES = {f"query_{service.value.lower()}": service for service in (
    Service.ALIAS, Service.DOMAIN, Service.CREDENTIALS, Service.NETADDR, Service.USERINFO, Service.SOURCE,
    Service.MAILADDR, Service.ADDRNAME, Service.MAILADDRMAP)}
COLUMNS = {Service.CREDENTIALS: 2, Service.USERINFO: 3}  # the others: 1
JOINED = frozenset({Service.ALIAS, Service.MAILADDRMAP})  # every row's value, joined with ", "
MATCHED = frozenset({Service.DOMAIN, Service.NETADDR, Service.MAILADDR, Service.REGEX})
OTHER_KEYS = ("dbpath", "fetch_source", "fetch_source_expire", "fetch_source_refresh")
SEPARATOR = re.compile(r"[ \t:]")
VALUE_START = re.compile(r"^(?:\s|:(?=\s))+")


@dataclass
class SqliteConfig:
    path: str
    dbpath: str = ""
    queries: dict[Service, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line, for messages
    fetch_source: str | None = None


def parse_config(text: str, path: str) -> SqliteConfig:
    """Parse a table-sqlite configuration file. Raises TableLoadError(`PATH:N: ...`)."""
    config = SqliteConfig(path)
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # As table-sqlite: the key ends at the first space, tab or colon (`dbpath /x`, `dbpath\t/x`,
        # `dbpath: /x`, `dbpath:/x`); blanks and colons followed by a blank are skipped before the value.
        found = SEPARATOR.search(line)
        key, value = (line[:found.start()], line[found.end():]) if found else (line, "")
        value = VALUE_START.sub("", value)
        if key not in QUERIES and key not in OTHER_KEYS:
            raise TableLoadError(f"{path}:{number}: unknown key {key!r} (dbpath, fetch_source, "
                                 + ", ".join(QUERIES) + ")")
        if key in config.lines:
            raise TableLoadError(f"{path}:{number}: {key} given twice (first on line {config.lines[key]})")
        if not value:
            raise TableLoadError(f"{path}:{number}: {key} needs a value")
        config.lines[key] = number
        if key == "dbpath":
            config.dbpath = value
        elif key == "fetch_source":
            config.fetch_source = value
        elif key in QUERIES:
            config.queries[QUERIES[key]] = value
        # (fetch_source_expire and fetch_source_refresh: our fetch asks the database each time)
    if not config.dbpath:
        raise TableLoadError(f"{path}: no dbpath: the database file must be named")
    return config


class SqliteTable:
    """`table NAME sqlite:/path/to/sqlite.conf`."""

    backend_name = BACKEND
    shape = TableShape.ANY  # as every external backend in 6.8: any use is accepted by the parser

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self._lock = threading.Lock()  # lookups come from the event loop and from expansion threads
        self._connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._next_source = 0
        self.config = self._load()

    # -- loading ----------------------------------------------------------------------------------------------
    def _load(self) -> SqliteConfig:
        config = parse_config(read_table_file(self.path), self.path)
        connection, identity = _open(config)
        try:
            for service, query in config.queries.items():
                _check_query(connection, config, f"query_{service.value.lower()}", query, COLUMNS.get(service, 1),
                             parameters=1)
            if config.fetch_source is not None:
                _check_query(connection, config, "fetch_source", config.fetch_source, 1, parameters=0)
        except TableLoadError:
            connection.close()
            raise
        with self._lock:
            old, self._connection, self._identity = self._connection, connection, identity
        if old is not None:
            old.close()
        return config

    def reload(self) -> None:
        self.config = self._load()  # raises, keeping the old configuration and database, on failure

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # -- questions ------------------------------------------------------------------------------------------------
    def _rows(self, query: str, parameters: tuple[str, ...], limit: int | None) -> list[tuple[object, ...]]:
        with self._lock:
            self._follow_file()
            if self._connection is None:
                raise TableError(f"sqlite table {self.name}: closed")
            try:
                cursor = self._connection.execute(query, parameters)
                return cursor.fetchmany(limit) if limit is not None else cursor.fetchall()
            except sqlite3.Error as error:
                raise TableError(f"sqlite table {self.name}: {error}") from None

    def _follow_file(self) -> None:
        """The database was replaced (a new file renamed over it): ask the new one, as a new table-sqlite
        started then would. A path that names no file any more leaves the open file answering."""
        try:
            status = os.stat(self.config.dbpath)
        except OSError:
            return
        if (status.st_dev, status.st_ino) != self._identity:
            try:
                connection, identity = _open(self.config)
            except TableLoadError:
                return
            old, self._connection, self._identity = self._connection, connection, identity
            if old is not None:
                old.close()

    def _query(self, service: Service) -> str:
        query = self.config.queries.get(service)
        if query is None:
            raise TableError(f"sqlite table {self.name}: {self.path} has no query_{service.value.lower()}")
        return query

    def lookup(self, service: Service, key: str) -> str | None:
        query = self._query(service)
        rows = self._rows(query, (key,), None if service in JOINED else 1)
        if not rows:
            return None
        if service in JOINED:
            return ", ".join(_text(row[0]) for row in rows)
        row = rows[0]
        if service is Service.CREDENTIALS:
            return f"{_text(row[0])}:{_text(row[1])}"
        if service is Service.USERINFO:
            try:
                return f"{int(row[0])}:{int(row[1])}:{_text(row[2])}"  # type: ignore[call-overload]
            except (TypeError, ValueError):
                raise TableError(f"sqlite table {self.name}: userinfo of {key!r} has no numeric uid and gid: "
                                 f"{row!r}") from None
        return _text(row[0])

    def match(self, service: Service, candidate: str) -> bool:
        if service is Service.REGEX:
            raise TableError(f"sqlite table {self.name}: a regex question cannot be asked in SQL")
        return bool(self._rows(self._query(service), (candidate,), 1))

    def fetch(self, service: Service) -> str | None:
        query = self.config.fetch_source
        if query is None:
            raise TableError(f"sqlite table {self.name}: {self.path} has no fetch_source")
        # As table-sqlite hands them out: the distinct values in order, in turn from the first.
        values = sorted({_text(row[0]) for row in self._rows(query, (), None)})
        if not values:
            return None
        value = values[self._next_source % len(values)]
        self._next_source += 1
        return value


def _text(value: object) -> str:
    return "" if value is None else value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _open(config: SqliteConfig) -> tuple[sqlite3.Connection, tuple[int, int]]:
    path = config.dbpath
    where = f"{config.path}:{config.lines.get('dbpath', 0)}"
    try:
        status = os.stat(path)
        uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()  # is it a database at all?
    except OSError as error:
        raise TableLoadError(f"{where}: cannot open the database {path}: {error.strerror}") from None
    except sqlite3.Error as error:
        raise TableLoadError(f"{where}: cannot read the database {path}: {error}") from None
    return connection, (status.st_dev, status.st_ino)


def _check_query(connection: sqlite3.Connection, config: SqliteConfig, key: str, query: str, columns: int,
                 parameters: int) -> None:
    """Compile the query once and check its columns and parameters, as table-sqlite prepares its statements;
    a mistake is said with the file and line."""
    where = f"{config.path}:{config.lines.get(key, 0)}"
    try:  # (run with an empty key: the columns are known before any row is read)
        cursor = connection.execute(query, ("",) * parameters)
    except sqlite3.ProgrammingError as error:
        raise TableLoadError(f"{where}: {key}: {error} (the key is the query's one `?`)"
                             if parameters else f"{where}: {key}: {error}") from None
    except sqlite3.Error as error:
        raise TableLoadError(f"{where}: {key}: {error}") from None
    found = len(cursor.description or ())
    if found != columns:
        raise TableLoadError(f"{where}: {key} returns {found} column{'s' if found != 1 else ''}, "
                             f"{columns} expected")
