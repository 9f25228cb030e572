"""`postgres:` tables: the configuration files of table-postgres (opensmtpd-extras), answered by the daemon itself.

OpenSMTPD runs `table NAME postgres:/etc/mail/postgres.conf` through the external program table-postgres; we read
the same file and ask the same server through libpq (psycopg's, at its lowest level: the conninfo string goes to
libpq as table-postgres hands it over, and the queries are prepared and run as it does). The keys, the answers and
the checks are those of every SQL table (sql.py, docs/tables.md); the key of table-postgres's own is `conninfo`
(libpq's connection string: `host=... dbname=... user=... password=...`, or a `postgresql://` URI), and each query
takes the key as its `$1`.

As table-postgres, each statement is prepared when the connection opens, so the server checks it then; we also
ask the server to describe it and check its parameters and columns. A connection that broke (the server
restarted) is opened again and the question asked once more. Where we differ: a conninfo that names no
`connect_timeout` gets one of CONNECT_TIMEOUT seconds (libpq waits for ever for a server whose packets are lost,
and every question of the table would wait behind it); the server is told to give a statement up after
QUERY_TIMEOUT (`statement_timeout`), and an answer is waited for at most REPLY_TIMEOUT (libpq's own wait has no
end); the server not answering at start does not stop the daemon (sql.py).
"""

from __future__ import annotations

import os
import select
import time

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

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

BACKEND = "postgres"
# SQLSTATE classes after which a new connection may answer: connection exceptions (08), the server shutting
# down or starting (57P), and a prepared statement whose table changed shape (0A000, "cached plan must not
# change result type": prepared again on the new connection).
RECONNECT_STATES = (b"08", b"57P", b"0A000")
INDETERMINATE_DATATYPE = b"42P18"  # a `$1` the query does not use, or a `$2`


class PostgresTable(SqlTable):
    """`table NAME postgres:/path/to/postgres.conf`."""

    backend_name = BACKEND
    settings_keys = ("conninfo",)
    required = {"conninfo": "the server must be named (`conninfo host=... dbname=...`)"}
    placeholder = "$1"

    def _connect(self, config: SqlConfig) -> pq.abc.PGconn:
        connection = _connection(*_conninfo(config))
        try:
            _limit_statements(connection)
            for statement in config.statements():
                _prepare(connection, config, statement)
        except QueryTimeout as error:
            connection.finish()
            raise ServerUnavailable(str(error)) from None
        except BaseException:
            connection.finish()
            raise
        return connection

    def _disconnect(self, connection: pq.abc.PGconn) -> None:
        connection.finish()

    def _run(self, connection: pq.abc.PGconn, statement: Statement, parameters: tuple[str, ...],
             first_only: bool) -> list[Row]:
        if any("\0" in value for value in parameters):
            # No PostgreSQL text holds a NUL, and libpq would cut the key at it: `bob@example.com<NUL>x` (an AUTH
            # LOGIN name is any bytes) would be answered as `bob@example.com`. No row has such a key.
            return []
        try:
            connection.send_query_prepared(statement.key.encode(), [value.encode() for value in parameters])
            result = _result(connection)
        except psycopg.Error as error:  # (libpq gave no result at all: the connection is gone)
            raise ConnectionLost(_first_line(error)) from None
        if result.status == pq.ExecStatus.TUPLES_OK:
            count = min(result.ntuples, 1) if first_only else result.ntuples
            return [tuple(result.get_value(row, column) for column in range(result.nfields)) for row in range(count)]
        message = _result_message(result, connection)
        state = result.error_field(pq.DiagnosticField.SQLSTATE)
        if connection.status != pq.ConnStatus.OK or state is None or state.startswith(RECONNECT_STATES):
            raise ConnectionLost(message)
        raise TableError(f"{self.label}: {statement.key}: {message}")


def _conninfo(config: SqlConfig) -> tuple[str, float | None]:
    """The file's conninfo, and how long to wait for a connection: its connect_timeout (or PGCONNECT_TIMEOUT's),
    counted as libpq counts it (0 or less is no limit, less than 2 is 2), else CONNECT_TIMEOUT. A conninfo libpq
    cannot parse is a mistake of its line."""
    conninfo = config.settings["conninfo"]
    try:
        given = conninfo_to_dict(conninfo).get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")
    except psycopg.Error as error:
        raise TableLoadError(f"{config.where('conninfo')}: conninfo: {error}") from None
    try:
        seconds = int(str(given).strip()) if given is not None else CONNECT_TIMEOUT
    except ValueError:
        seconds = CONNECT_TIMEOUT  # (libpq refuses it, and says why, when connecting)
    return conninfo, (max(seconds, 2) if seconds > 0 else None)


def _connection(conninfo: str, timeout: float | None) -> pq.abc.PGconn:
    """A connection, made step by step, waiting for the server here: libpq's one-call connect, as psycopg's
    binary module calls it, keeps every other thread of the process (the event loop's too) from running until the
    server answers, for as long as connect_timeout when it does not. Raises ServerUnavailable."""
    try:
        connection = pq.PGconn.connect_start(conninfo.encode())
    except psycopg.Error as error:
        raise ServerUnavailable(_first_line(error)) from None
    deadline = None if timeout is None else time.monotonic() + timeout
    status = pq.PollingStatus.WRITING  # (libpq's first step: wait until the socket can be written)
    try:
        while status not in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
            event = select.POLLIN if status == pq.PollingStatus.READING else select.POLLOUT
            if not _ready(connection.socket, event, deadline):
                where = f'server at "{_text(connection.host)}", port {_text(connection.port)}'
                raise ServerUnavailable(f"connection to {where} failed: no answer within {timeout:g} s")
            status = connection.connect_poll()
    except psycopg.Error as error:
        connection.finish()
        raise ServerUnavailable(_first_line(error)) from None
    except ServerUnavailable:
        connection.finish()
        raise
    if status == pq.PollingStatus.FAILED:
        message = _text(connection.error_message.split(b"\n")[0])  # (not libpq's hint on the next line)
        connection.finish()
        raise ServerUnavailable(message)
    return connection


def _ready(socket: int, event: int, deadline: float | None) -> bool:
    """Whether the socket is ready for the event before the deadline (None: no limit)."""
    waiting = select.poll()
    waiting.register(socket, event)
    left = None if deadline is None else max(deadline - time.monotonic(), 0) * 1000
    return bool(waiting.poll(left))


def _prepare(connection: pq.abc.PGconn, config: SqlConfig, statement: Statement) -> None:
    """Prepare a statement under its key's name, as table-postgres does (one parameter of a type the server
    infers), then check what the server says it takes and returns."""
    name = statement.key.encode()
    where = f"{config.where(statement.key)}: {statement.key}"
    try:
        connection.send_prepare(name, statement.sql.encode(), [0] * statement.parameters)
        result = _result(connection)
        if result.status == pq.ExecStatus.COMMAND_OK:
            connection.send_describe_prepared(name)
            result = _result(connection)
    except psycopg.Error as error:
        raise ServerUnavailable(_first_line(error)) from None
    if result.status != pq.ExecStatus.COMMAND_OK:
        message = _result_message(result, connection)
        if connection.status != pq.ConnStatus.OK:
            raise ServerUnavailable(message)
        if result.error_field(pq.DiagnosticField.SQLSTATE) == INDETERMINATE_DATATYPE and statement.parameters:
            message += " (the key is the query's one `$1`)"
        raise TableLoadError(f"{where}: {message}")
    # (more columns than needed are ignored, as table-postgres ignores them: `SELECT * FROM domains ...` works)
    check_shape(config, statement, result.nparams, result.nfields, "$1", more_columns=True)


def _limit_statements(connection: pq.abc.PGconn) -> None:
    """Have the server give up a statement after QUERY_TIMEOUT (one waiting for a lock included), so that a
    question we stop waiting for is not left running there, holding a connection of the server's."""
    try:
        connection.send_query(f"SET statement_timeout = {round(QUERY_TIMEOUT * 1000)}".encode())
        result = _result(connection)
    except psycopg.Error as error:
        raise ServerUnavailable(_first_line(error)) from None
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise ServerUnavailable(_result_message(result, connection))


def _result(connection: pq.abc.PGconn) -> pq.abc.PGresult:
    """The result of the statement just sent, waited for at most REPLY_TIMEOUT (libpq's own wait has no end).
    Raises QueryTimeout, and psycopg.Error when the connection broke."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    results: list[pq.abc.PGresult] = []
    while True:
        while connection.is_busy():
            if not _ready(connection.socket, select.POLLIN, deadline):
                raise QueryTimeout(f"no answer within {REPLY_TIMEOUT:g} s")
            connection.consume_input()
        result = connection.get_result()
        if result is None:  # (the end of the statement's results)
            break
        results.append(result)
    if not results:
        raise psycopg.OperationalError(_text(connection.error_message) or "no result")
    return results[-1]


def _result_message(result: pq.abc.PGresult, connection: pq.abc.PGconn) -> str:
    primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
    return _text(primary if primary else result.error_message or connection.error_message)


def _first_line(error: psycopg.Error) -> str:
    """libpq's message, without its hints on the next lines (a log line stays one line)."""
    return " ".join(str(error).split("\n", 1)[0].split())


def _text(message: bytes) -> str:
    return " ".join(message.decode("utf-8", "replace").split())
