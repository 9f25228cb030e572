"""What the three SQL tables of opensmtpd-extras have in common, for `sqlite:`, `postgres:` and `mysql:` tables.

table-sqlite, table-postgres and table-mysql read one configuration file format and answer alike; only the way
to reach the database differs. This module holds the common part, and sqlite.py, postgres.py and mysql.py the
drivers:

* the file: `KEY VALUE` lines, the key ending at the first space, tab or colon (`dbpath: FILE`), `#` lines and
  blank lines skipped, each key once; `query_SERVICE SQL` for alias, domain, credentials, netaddr, userinfo,
  source, mailaddr, addrname and mailaddrmap, `fetch_source SQL` for relay `src` tables, `fetch_source_expire`
  and `fetch_source_refresh` (numbers), and the backend's own keys (dbpath; conninfo; host, username, ...);
* the queries: each takes the key as its one parameter and returns one column, two for credentials (user and
  hash: `user:HASH`), three for userinfo (`uid:gid:home`); alias and mailaddrmap answers join every row's value
  with `, `, the other services take the first row, and a match question (domain, netaddr, mailaddr) holds when
  a row comes back: the SQL decides, there is no glob nor CIDR matching;
* fetch_source hands out the distinct values in sorted order, in turn from the first;
* a service without its query is a temporary failure.

Where we differ from the programs, on purpose and alike for the three: every mistake in the file is said with
its line (`FILE:LINE: message`) when it is loaded, including a query the database refuses or whose columns or
parameters are not what its service needs, where the programs exit with `error parsing config file` or fail
when first asked; an unknown key is such a mistake (table-postgres and table-mysql ignore it: a misspelt
`query_credential` would silently leave AUTH failing).

A table whose database is a server (postgres, mysql) holds one connection, used by one question at a time. A
lost connection is opened again and the question asked once more, as the programs do; when the server cannot be
reached, or does not answer in time (QUERY_TIMEOUT, REPLY_TIMEOUT: the programs wait for ever), the question is a
temporary failure (TableError), and the next one tries again (after UNANSWERED_PAUSE when the server let the
connection attempt time out). A server that cannot be reached when the daemon starts does not stop it
(docs/tables.md says why): the file is read, the queries are checked when the server first answers, and until
then questions are temporary failures.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from smtpd import log
from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.settings import bound_seconds, setting_lines
from smtpd.lookup.tables.static import read_table_file

QUERY_KEYS = {f"query_{service.value.lower()}": service for service in (
    Service.ALIAS, Service.DOMAIN, Service.CREDENTIALS, Service.NETADDR, Service.USERINFO, Service.SOURCE,
    Service.MAILADDR, Service.ADDRNAME, Service.MAILADDRMAP)}
COLUMNS = {Service.CREDENTIALS: 2, Service.USERINFO: 3}  # the others: 1
JOINED = frozenset({Service.ALIAS, Service.MAILADDRMAP})  # every row's value, joined with ", "
FETCH_KEY = "fetch_source"
NUMBER_KEYS = ("fetch_source_expire", "fetch_source_refresh")  # taken, checked, not needed: we ask each time
NUMBER_MAX = 2**31 - 1  # the programs' INT_MAX
# Time bounds of a question to a server (the programs have none: a table locked by a transaction left open, or a
# server whose host hung, held every session asking it, and the threads they were asked in, for ever).
CONNECT_TIMEOUT = bound_seconds(10)  # seconds for a connection to be made
QUERY_TIMEOUT = bound_seconds(10)  # seconds the server is told a statement may run (it gives up itself: nothing left waiting)
REPLY_TIMEOUT = QUERY_TIMEOUT + bound_seconds(5)  # seconds we wait for an answer of any kind (a server that says nothing at all)
WAIT_TIMEOUT = CONNECT_TIMEOUT + REPLY_TIMEOUT  # seconds a question waits for the one before it on the connection
# A server that let a connection attempt wait out CONNECT_TIMEOUT (its host down, its packets dropped) is not tried
# again for UNANSWERED_PAUSE seconds, by any table of the process that names it: each table (three on one server
# are common) and each question would wait as long again, the start, which opens every table twice (checked,
# then opened), would wait for each, and the questions of a table wait for one another.
UNANSWERED_PAUSE = CONNECT_TIMEOUT
_unanswered: dict[tuple[str, ...], tuple[float, str]] = {}  # server -> (when to try again, why it failed)
_unanswered_lock = threading.Lock()

_log = log.get("table")

Row = Sequence[object]


@dataclass(frozen=True)
class Statement:
    """One SQL statement of the file: a service's query (the key is its one parameter) or fetch_source."""

    key: str  # as the file names it: query_alias, fetch_source
    sql: str
    columns: int
    parameters: int


@dataclass
class SqlConfig:
    path: str
    settings: dict[str, str] = field(default_factory=dict)  # the backend's own keys: dbpath, conninfo, host...
    queries: dict[Service, Statement] = field(default_factory=dict)
    fetch_source: Statement | None = None
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line, for messages

    def where(self, key: str) -> str:
        """`FILE:LINE` of a key, for messages."""
        return f"{self.path}:{self.lines.get(key, 0)}"

    def statements(self) -> list[Statement]:
        found = list(self.queries.values())
        return [*found, self.fetch_source] if self.fetch_source is not None else found


def parse_config(text: str, path: str, settings_keys: Sequence[str], required: dict[str, str]) -> SqlConfig:
    """Parse an SQL table's configuration file. ``settings_keys`` are the backend's own keys, ``required`` those
    it cannot do without (key -> why). Raises TableLoadError(`PATH:N: ...`)."""
    config = SqlConfig(path)
    known = (*settings_keys, FETCH_KEY, *NUMBER_KEYS, *QUERY_KEYS)
    for number, key, value in setting_lines(text):
        if key not in known:
            raise TableLoadError(f"{path}:{number}: unknown key {key!r} ("
                                 + ", ".join((*settings_keys, FETCH_KEY, *QUERY_KEYS)) + ")")
        if key in config.lines:
            raise TableLoadError(f"{path}:{number}: {key} given twice (first on line {config.lines[key]})")
        if not value:
            raise TableLoadError(f"{path}:{number}: {key} needs a value")
        config.lines[key] = number
        if key in QUERY_KEYS:
            service = QUERY_KEYS[key]
            config.queries[service] = Statement(key, value, COLUMNS.get(service, 1), parameters=1)
        elif key == FETCH_KEY:
            config.fetch_source = Statement(key, value, columns=1, parameters=0)
        elif key in NUMBER_KEYS:
            if not value.isascii() or not value.isdigit() or int(value) > NUMBER_MAX:
                raise TableLoadError(f"{path}:{number}: {key} takes a number of 0 to {NUMBER_MAX}, not {value!r}")
        else:
            config.settings[key] = value
    for key, why in required.items():
        if key not in config.settings:
            raise TableLoadError(f"{path}: no {key}: {why}")
    return config


def check_shape(config: SqlConfig, statement: Statement, parameters: int | None, columns: int,
                placeholder: str, more_columns: bool = False) -> None:
    """Say a statement's mistake with its line when the database's description of it (its parameters, when the
    driver knows them, and its columns) is not what its service needs. ``more_columns``: columns after those
    needed are ignored (table-postgres reads the first ones and never counts them)."""
    where = config.where(statement.key)
    if parameters is not None and parameters != statement.parameters:
        hint = (f" (the key is the query's one `{placeholder}`)" if statement.parameters
                else " (it is asked without a key)")
        raise TableLoadError(f"{where}: {statement.key} takes {_count(parameters, 'parameter')}, "
                             f"{statement.parameters} expected{hint}")
    if columns < statement.columns or (columns > statement.columns and not more_columns):
        raise TableLoadError(f"{where}: {statement.key} returns {_count(columns, 'column')}, "
                             f"{statement.columns} expected")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def text(value: object) -> str:
    """A column's value as the programs hand it on: text, and NULL as the empty string."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def answer(service: Service, key: str, rows: Sequence[Row]) -> str | None:
    """The answer to a lookup from the rows its query returned. Raises ValueError for a userinfo row without
    numbers for uid and gid (6.8 would refuse it when parsing the answer)."""
    if not rows:
        return None
    if service in JOINED:
        return ", ".join(text(row[0]) for row in rows)
    row = rows[0]
    if service is Service.CREDENTIALS:
        return f"{text(row[0])}:{text(row[1])}"
    if service is Service.USERINFO:
        uid, gid = _number(row[0]), _number(row[1])
        if uid is None or gid is None:
            raise ValueError(f"userinfo of {key!r} has no numeric uid and gid: {tuple(text(v) for v in row)!r}")
        return f"{uid}:{gid}:{text(row[2])}"
    return text(row[0])


def _number(value: object) -> int | None:
    """A uid or gid column: an integer, or text of digits (as PostgreSQL and MySQL hand numbers over)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    digits = text(value).strip()
    return int(digits) if digits.isascii() and digits.isdigit() else None


class ServerUnavailable(TableError):
    """The database server cannot be reached (or refuses us) right now: a temporary failure, never a mistake in
    the file."""


class ConnectionLost(TableError):
    """The connection broke under a question: open another one and ask again."""


class QueryTimeout(TableError):
    """No answer within REPLY_TIMEOUT: the connection is out of step (the answer may still come) and is dropped;
    the question is not asked again (it would wait as long once more)."""


class SqlTable(ABC):
    """A `table NAME BACKEND:/path/to/FILE.conf` of one of the SQL backends. Subclasses say how to connect (and
    check every statement while connecting), how to run a statement, and how to disconnect."""

    backend_name: ClassVar[str]
    settings_keys: ClassVar[tuple[str, ...]]
    required: ClassVar[dict[str, str]] = {}
    placeholder: ClassVar[str] = "?"  # how the queries name the key, for messages
    shape = TableShape.ANY  # as every external backend in 6.8: any use is accepted by the parser

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self._lock = threading.Lock()  # lookups come from the event loop and from worker threads
        self._connection: Any = None
        self._failing = False  # the last try to reach the database failed (say so when it answers again)
        self._closed = False
        self._next_source = 0
        self.load_warnings: list[str] = []  # why the statements could not be checked when loaded (smtpd -n)
        self.config = SqlConfig(path)
        self._load(strict=False)

    # -- what a backend provides -----------------------------------------------------------------------------
    @abstractmethod
    def _connect(self, config: SqlConfig) -> Any:
        """A connection to the database, every statement of config checked on it. Raises TableLoadError
        (`FILE:LINE: ...`) for a mistake in the file, ServerUnavailable when the server cannot be reached."""

    @abstractmethod
    def _run(self, connection: Any, statement: Statement, parameters: tuple[str, ...],
             first_only: bool) -> list[Row]:
        """The rows of a statement (only the first is needed when ``first_only``). Raises ConnectionLost when the
        connection broke, TableError for any other failure."""

    @abstractmethod
    def _disconnect(self, connection: Any) -> None:
        """Close a connection (without raising)."""

    def _refresh(self) -> None:  # noqa: B027 - most backends have nothing to do
        """Called, under the lock, before each question (sqlite follows a replaced database file)."""

    # -- loading ----------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return f"{self.backend_name} table {self.name}"

    def _load(self, strict: bool) -> None:
        """Read the file and connect. A server that cannot be reached is a TableLoadError when ``strict`` (an
        update of the table: the old one stays); otherwise the file is taken unchecked, with a warning, and
        checked when the server first answers."""
        config = parse_config(read_table_file(self.path), self.path, self.settings_keys, self.required)
        warnings: list[str] = []
        try:
            connection = self._open(config)
        except ServerUnavailable as error:
            if strict:
                raise TableLoadError(f"{self.path}: cannot reach the database: {error}; the table is kept as it "
                                     "was") from None
            # (said by `smtpd -n` and at start as a warning of the configuration: smtpd.lookup.tables.validate)
            warnings = [f"{self.path}: warning: cannot reach the database: {error}; the queries are checked, "
                        f"and the table {self.name} answers, once it can be reached"]
            connection, self._failing = None, True
        with self._lock:
            old, self._connection, self.config = self._connection, connection, config
            self.load_warnings = warnings
        if old is not None:
            self._disconnect(old)
        if self._closed:  # (closed while this connection was made)
            self._close_if_idle()

    def reload(self) -> None:
        self._load(strict=True)  # raises, keeping the old configuration and connection, on failure

    def close(self) -> None:
        """Close the connection. Never waits: the tables of a configuration replaced by a reload are closed on the
        event loop, and a question in flight (a delivery's, on a slow query) would hold it until answered; that
        question closes the connection when it is done instead."""
        self._closed = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        """Once closed: close the connection unless a question holds it (whoever holds it calls this again when it
        lets it go, so the last one closes it)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            old, self._connection = self._connection, None
        finally:
            self._lock.release()
        if old is not None:
            self._disconnect(old)

    def _open(self, config: SqlConfig) -> Any:
        """_connect, unless the server did not answer a moment ago (UNANSWERED_PAUSE)."""
        server = (self.backend_name, *(f"{key} {value}" for key, value in sorted(config.settings.items())))
        with _unanswered_lock:
            retry_at, why = _unanswered.get(server, (0.0, ""))
        if time.monotonic() < retry_at:
            raise ServerUnavailable(f"{why} (not tried again for {UNANSWERED_PAUSE:g} s)")
        started = time.monotonic()
        try:
            return self._connect(config)
        except ServerUnavailable as error:
            if time.monotonic() - started >= CONNECT_TIMEOUT:
                with _unanswered_lock:
                    _unanswered[server] = (time.monotonic() + UNANSWERED_PAUSE, str(error))
            raise

    # -- questions ------------------------------------------------------------------------------------------------
    def _connected(self) -> Any:
        """The open connection, or a new one. Raises TableError when there is none to be had."""
        if self._connection is not None:
            return self._connection
        try:
            self._connection = self._open(self.config)
        except ServerUnavailable as error:
            self._failing = True
            _log.warning("%s: cannot reach the database: %s", self.label, error)
            raise TableError(f"{self.label}: cannot reach the database: {error}") from None
        except TableLoadError as error:  # the server answers again, and refuses a statement of the file
            self._failing = True
            _log.warning("%s: %s", self.label, "; ".join(error.lines))
            raise TableError(f"{self.label}: " + "; ".join(error.lines)) from None
        if self._failing:
            _log.info("%s: the database answers again", self.label)
            self._failing = False
        return self._connection

    def _rows(self, statement: Statement, parameters: tuple[str, ...], first_only: bool) -> list[Row]:
        try:
            return self._ask(statement, parameters, first_only)
        finally:
            if self._closed:  # (closed while asked: close() left the connection to us)
                self._close_if_idle()

    def _ask(self, statement: Statement, parameters: tuple[str, ...], first_only: bool) -> list[Row]:
        if not self._lock.acquire(timeout=WAIT_TIMEOUT):
            raise TableError(f"{self.label}: the database is still busy with an earlier question")
        try:
            if self._closed:  # (a reload replaced the table: no new connection for it)
                raise TableError(f"{self.label}: closed")
            self._refresh()
            retried = self._connection is None  # a connection opened for this question gets one try
            while True:
                connection = self._connected()
                try:
                    return self._run(connection, statement, parameters, first_only)
                except ConnectionLost as error:
                    # As the programs: connect again and ask once more (a restarted server answers at once).
                    self._drop(connection, f"connection lost: {error}")
                    if retried:
                        raise TableError(f"{self.label}: {error}") from None
                    retried = True
                except QueryTimeout as error:
                    self._drop(connection, str(error))
                    raise TableError(f"{self.label}: {error}") from None
        finally:
            self._lock.release()

    def _drop(self, connection: Any, why: str) -> None:
        """Give up the connection a question failed on (under the lock)."""
        self._connection = None
        self._disconnect(connection)
        _log.warning("%s: %s", self.label, why)
        self._failing = True

    def _statement(self, service: Service) -> Statement:
        statement = self.config.queries.get(service)
        if statement is None:
            raise TableError(f"{self.label}: {self.path} has no query_{service.value.lower()}")
        return statement

    def lookup(self, service: Service, key: str) -> str | None:
        rows = self._rows(self._statement(service), (key,), first_only=service not in JOINED)
        try:
            return answer(service, key, rows)
        except ValueError as error:
            raise TableError(f"{self.label}: {error}") from None

    def match(self, service: Service, candidate: str) -> bool:
        if service is Service.REGEX:
            raise TableError(f"{self.label}: a regex question cannot be asked in SQL")
        return bool(self._rows(self._statement(service), (candidate,), first_only=True))

    def fetch(self, service: Service) -> str | None:
        if service is not Service.SOURCE:  # (as the programs: fetch_source is no list of relay hosts)
            raise TableError(f"{self.label}: only a relay src table hands out entries (fetch_source), not {service}")
        statement = self.config.fetch_source
        if statement is None:
            raise TableError(f"{self.label}: {self.path} has no fetch_source")
        # As the programs hand them out: the distinct values in order, in turn from the first.
        values = sorted({text(row[0]) for row in self._rows(statement, (), first_only=False)})
        if not values:
            return None
        value = values[self._next_source % len(values)]
        self._next_source += 1
        return value
