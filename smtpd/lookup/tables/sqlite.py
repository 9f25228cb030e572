"""`sqlite:` tables: the configuration files of table-sqlite (opensmtpd-extras), answered by the daemon itself.

OpenSMTPD runs `table NAME sqlite:/etc/mail/sqlite.conf` through the external program table-sqlite; we read the
same configuration file and ask the same SQLite database with the stdlib's sqlite3, so a virtual-domain setup
built on it (the OpenSMTPD FAQ's, table-sqlite(5)'s example) works unchanged. The file's keys, the answers made
of the rows and the checks are those of every SQL table (sql.py; docs/tables.md has the details, checked against
table-sqlite under OpenSMTPD 6.8 in tests/test_tables_sqlite.py). The key of table-sqlite's own is `dbpath FILE`;
each query takes the key as its one `?`.

Where we differ, on purpose: the database is opened read-only when the file is loaded (a missing or unreadable
database is a `FILE:LINE:` mistake of its `dbpath` line), and opened again when its path names a new file (a
database replaced by a rename). Keys come lowercased, as OpenSMTPD 6.8 hands them to table-sqlite: rows are to
store them in lowercase, or queries to compare with `lower(column) = ?`.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from urllib.parse import quote

from smtpd.lookup.tables.base import TableError, TableLoadError
from smtpd.lookup.tables.sql import Row, SqlConfig, SqlTable, Statement, check_shape

BACKEND = "sqlite"


@dataclass
class _Database:
    connection: sqlite3.Connection
    identity: tuple[int, int]  # (st_dev, st_ino) of the file opened


class SqliteTable(SqlTable):
    """`table NAME sqlite:/path/to/sqlite.conf`."""

    backend_name = BACKEND
    settings_keys = ("dbpath",)
    required = {"dbpath": "the database file must be named"}

    def _connect(self, config: SqlConfig) -> _Database:
        database = _open(config)
        try:
            for statement in config.statements():
                _check(database.connection, config, statement)
        except TableLoadError:
            database.connection.close()
            raise
        return database

    def _disconnect(self, connection: _Database) -> None:
        connection.connection.close()

    def _run(self, connection: _Database, statement: Statement, parameters: tuple[str, ...],
             first_only: bool) -> list[Row]:
        try:
            cursor = connection.connection.execute(statement.sql, parameters)
            return cursor.fetchmany(1) if first_only else cursor.fetchall()
        except sqlite3.Error as error:
            raise TableError(f"{self.label}: {error}") from None

    def _refresh(self) -> None:
        """The database was replaced (a new file renamed over it): ask the new one, as a new table-sqlite
        started then would. A path that names no file any more leaves the open file answering."""
        current: _Database | None = self._connection
        try:
            status = os.stat(self.config.settings["dbpath"])
        except OSError:
            return
        if current is not None and (status.st_dev, status.st_ino) == current.identity:
            return
        try:
            self._connection = _open(self.config)
        except TableLoadError:
            return
        if current is not None:
            current.connection.close()


def _open(config: SqlConfig) -> _Database:
    path = config.settings["dbpath"]
    where = config.where("dbpath")
    try:
        status = os.stat(path)
        uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()  # is it a database at all?
    except OSError as error:
        raise TableLoadError(f"{where}: cannot open the database {path}: {error.strerror}") from None
    except sqlite3.Error as error:
        raise TableLoadError(f"{where}: cannot read the database {path}: {error}") from None
    return _Database(connection, (status.st_dev, status.st_ino))


def _check(connection: sqlite3.Connection, config: SqlConfig, statement: Statement) -> None:
    """Compile the statement once and check its columns and parameters, as table-sqlite prepares its
    statements; a mistake is said with the file and line."""
    where = config.where(statement.key)
    try:  # (run with an empty key: the columns are known before any row is read)
        cursor = connection.execute(statement.sql, ("",) * statement.parameters)
    except sqlite3.ProgrammingError as error:
        raise TableLoadError(f"{where}: {statement.key}: {error} (the key is the query's one `?`)"
                             if statement.parameters else f"{where}: {statement.key}: {error}") from None
    except sqlite3.Error as error:
        raise TableLoadError(f"{where}: {statement.key}: {error}") from None
    check_shape(config, statement, None, len(cursor.description or ()), "?")
