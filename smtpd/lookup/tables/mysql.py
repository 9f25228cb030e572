"""`mysql:` tables: the configuration files of table-mysql (opensmtpd-extras), answered by the daemon itself.

OpenSMTPD runs `table NAME mysql:/etc/mail/mysql.conf` through the external program table-mysql; we read the same
file and ask the same MariaDB or MySQL server with PyMySQL. The keys, the answers and the checks are those of every
SQL table (sql.py, docs/tables.md); the keys of table-mysql's own are `host`, `username`, `password` and
`database`, and each query takes the key as its one `?`.

The server is reached as libmariadb (table-mysql's client library) reaches it: no `host`, or `host localhost`,
means the unix socket (MYSQL_UNIX_PORT, or /run/mysqld/mysqld.sock), another host is asked over TCP on port 3306
(or MYSQL_TCP_PORT): table-mysql has no key for a port or a socket. Sessions run in autocommit, the server's
default (otherwise a long-lived session would answer from one old snapshot and never see new rows).

As table-mysql, each statement is prepared by the server when the connection opens, and its parameters and
columns are checked then (PyMySQL prepares nothing: we send the prepare command ourselves to learn them, and run
the statements as server-side `PREPARE`d ones, the key passed in a session variable). A connection that broke
(the server restarted) is opened again and the question asked once more. The server is told to give a statement
up after QUERY_TIMEOUT, and an answer is waited for at most REPLY_TIMEOUT (table-mysql waits for ever).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pymysql
from pymysql import converters
from pymysql.constants import COMMAND

from smtpd.lookup.tables.base import TableError, TableLoadError
from smtpd.lookup.tables.sql import (
    CONNECT_TIMEOUT,
    QUERY_TIMEOUT,
    REPLY_TIMEOUT,
    ConnectionLost,
    QueryTimeout,
    Row,
    ServerUnavailable,
    SqlConfig,
    SqlTable,
    Statement,
    check_shape,
)

BACKEND = "mysql"
DEFAULT_SOCKET = "/run/mysqld/mysqld.sock"  # libmariadb's on Debian
DEFAULT_PORT = 3306
KEY_VARIABLE = "@pysmtpd_key"
# Values come back as the server's text (as table-mysql binds every column as a string): no decoders, only
# PyMySQL's encoders for the key.
ENCODERS_ONLY = {kind: encoder for kind, encoder in converters.conversions.items() if not isinstance(kind, int)}
# Server errors after which the connection is gone: shutdown in progress, connection killed, disconnected for
# inactivity (MySQL 8). Client errors (2000-2999: server gone, lost connection, cannot connect) are all so.
LOST_CONNECTION_ERRORS = frozenset({1053, 1927, 4031})
UNKNOWN_VARIABLE = 1193
# How the server is told to give a statement up after QUERY_TIMEOUT (waiting for a table's lock included), so that
# a question we stop waiting for is not left running there: MariaDB's variable (seconds), else MySQL's (ms).
STATEMENT_LIMITS = (f"SET SESSION max_statement_time = {QUERY_TIMEOUT}",
                    f"SET SESSION max_execution_time = {round(QUERY_TIMEOUT * 1000)}")


class MysqlTable(SqlTable):
    """`table NAME mysql:/path/to/mysql.conf`."""

    backend_name = BACKEND
    settings_keys = ("host", "username", "password", "database")
    placeholder = "?"

    def _connect(self, config: SqlConfig) -> pymysql.connections.Connection[Any]:
        try:
            connection = pymysql.connect(**_connect_arguments(config))
        except pymysql.MySQLError as error:
            raise ServerUnavailable(_message(error)) from None
        try:
            _limit_statements(connection)
            for statement in config.statements():
                _prepare(connection, config, statement)
        except BaseException:
            connection.close()
            raise
        return connection

    def _disconnect(self, connection: pymysql.connections.Connection[Any]) -> None:
        try:
            connection.close()
        except pymysql.MySQLError:
            pass  # (already closed by a lost connection)

    def _run(self, connection: pymysql.connections.Connection[Any], statement: Statement,
             parameters: tuple[str, ...], first_only: bool) -> list[Row]:
        try:
            with connection.cursor() as cursor:
                if parameters:
                    cursor.execute(f"SET {KEY_VARIABLE} = %s", parameters)
                    cursor.execute(f"EXECUTE {_name(statement)} USING {KEY_VARIABLE}")
                else:
                    cursor.execute(f"EXECUTE {_name(statement)}")
                rows = list(cursor.fetchall())
        except pymysql.MySQLError as error:
            if isinstance(error.__context__, TimeoutError):  # (PyMySQL's read_timeout: the connection is closed)
                raise QueryTimeout(f"no answer within {REPLY_TIMEOUT:g} s") from None
            if _lost(error):
                raise ConnectionLost(_message(error)) from None
            raise TableError(f"{self.label}: {statement.key}: {_message(error)}") from None
        return rows[:1] if first_only else rows


def _connect_arguments(config: SqlConfig) -> dict[str, Any]:
    settings = config.settings
    host = settings.get("host")
    arguments: dict[str, Any] = {
        "user": settings.get("username"), "password": settings.get("password", ""),
        "database": settings.get("database"), "autocommit": True, "charset": "utf8mb4", "conv": ENCODERS_ONLY,
        "connect_timeout": CONNECT_TIMEOUT, "read_timeout": REPLY_TIMEOUT, "write_timeout": REPLY_TIMEOUT}
    if host is None or host == "localhost":
        arguments["unix_socket"] = os.environ.get("MYSQL_UNIX_PORT") or DEFAULT_SOCKET
    else:
        port = os.environ.get("MYSQL_TCP_PORT", "")
        arguments.update(host=host, port=int(port) if port.isascii() and port.isdigit() else DEFAULT_PORT)
    return arguments


def _limit_statements(connection: pymysql.connections.Connection[Any]) -> None:
    for setting in STATEMENT_LIMITS:
        try:
            with connection.cursor() as cursor:
                cursor.execute(setting)
            return
        except pymysql.MySQLError as error:
            if _code(error) != UNKNOWN_VARIABLE:
                raise ServerUnavailable(_message(error)) from None


def _name(statement: Statement) -> str:
    return f"pysmtpd_{statement.key}"


def _prepare(connection: pymysql.connections.Connection[Any], config: SqlConfig, statement: Statement) -> None:
    """Have the server prepare the statement, check its parameters and columns as table-mysql does, and keep it
    prepared for the questions."""
    try:
        parameters, columns = _prepared_shape(connection, statement.sql)
    except pymysql.MySQLError as error:
        if _lost(error):
            raise ServerUnavailable(_message(error)) from None
        raise TableLoadError(f"{config.where(statement.key)}: {statement.key}: {_message(error)}") from None
    check_shape(config, statement, parameters, columns, "?")
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"PREPARE {_name(statement)} FROM %s", (statement.sql,))
    except pymysql.MySQLError as error:
        raise ServerUnavailable(_message(error)) from None  # (it was prepared a moment ago)


def _prepared_shape(connection: pymysql.connections.Connection[Any], sql: str) -> tuple[int, int]:
    """(parameters, columns) of a statement as the server prepares it: the binary protocol's prepare command,
    which is what table-mysql sends. PyMySQL has no call for it, so it is sent on the connection's own packet
    layer; the statement is closed at once."""
    connection._execute_command(COMMAND.COM_STMT_PREPARE, sql)  # noqa: SLF001 (see above)
    reply = connection._read_packet().get_all_data()  # noqa: SLF001 (raises the server's error)
    identifier, columns, parameters = struct.unpack_from("<IHH", reply, 1)
    # Then a definition packet per parameter and per column, each list ended by an EOF packet.
    for _ in range(parameters + (parameters > 0) + columns + (columns > 0)):
        connection._read_packet()  # noqa: SLF001
    connection._execute_command(COMMAND.COM_STMT_CLOSE, struct.pack("<I", identifier))  # noqa: SLF001 (no reply)
    return parameters, columns


def _code(error: pymysql.MySQLError) -> int | None:
    return error.args[0] if error.args and isinstance(error.args[0], int) else None


def _lost(error: pymysql.MySQLError) -> bool:
    code = _code(error)
    return (isinstance(error, pymysql.err.InterfaceError) or code is None or 2000 <= code < 3000
            or code in LOST_CONNECTION_ERRORS)


def _message(error: pymysql.MySQLError) -> str:
    return str(error.args[1]) if len(error.args) > 1 else str(error) or type(error).__name__
