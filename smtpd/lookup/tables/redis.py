"""`redis:` tables: the configuration files of table-redis (opensmtpd-extras), answered by the daemon itself.

OpenSMTPD runs `table NAME redis:/etc/mail/redis.conf` through the external program table-redis; we read the same
file and send the same commands to the same Redis server with redis-py. docs/tables.md has the details; in short,
as table-redis's manual and source say (checked against the packaged program under OpenSMTPD 6.8,
tests/test_tables_redis.py):

* the file holds `master` (an address or `unix:/path`, 127.0.0.1 by default), `master_port` (6379), `slave` and
  `slave_port` (6380), `database` (0), `password`, and `query_SERVICE COMMAND ARGS` lines, each key apart from
  its value by spaces, tabs or a colon; `#` lines and blank lines are skipped;
* a query is a Redis command whose `%s` become the key, each word one argument (the key stays one argument, spaces
  and all); a service without its line asks `GET service:%s` (`GET alias:%s`, `GET domain:%s`, ...);
* answers: a string is the value; an array is its strings joined with `, ` for alias (LRANGE, SMEMBERS) and with
  `:` for credentials and userinfo (`HMGET user:%s login passwd` answers `login:passwd`); a match question
  (domain, netaddr, mailaddr) holds on a string, an array with a non-nil element or an integer above zero
  (SISMEMBER, EXISTS);
* a server that does not answer is a temporary failure; the next question connects again, and with a `slave` the
  question goes to the slave while the master is down.

Where we differ, on purpose (the packaged table-redis, opensmtpd-extras 6.7.1, is broken in ways no one relies
on): it reads nothing of its file (its read loop ends before the first line) and always asks 127.0.0.1:6379
with no password; it takes a missing key (nil) for a failure, so every unknown recipient of a `virtual <redis>`
table gets 424 and an unknown user's AUTH fails temporarily: for us nil, an empty array and an array of nils
(HMGET of a missing hash) are "not found". It fills only the first `%s`; we fill them all, as its manual says.
The file's mistakes are `FILE:LINE: message`, and when the server answers at load the password, the database and
each query's command and number of arguments are checked too. `query_mailaddrmap` (for `senders <redis>`) is ours:
table-redis answers no mailaddrmap question.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.settings import bound_seconds, setting_lines
from smtpd.lookup.tables.static import read_table_file

if TYPE_CHECKING:
    import redis

BACKEND = "redis"
QUERIES = {f"query_{service.value.lower()}": service for service in (
    Service.ALIAS, Service.DOMAIN, Service.CREDENTIALS, Service.NETADDR, Service.USERINFO, Service.SOURCE,
    Service.MAILADDR, Service.ADDRNAME, Service.MAILADDRMAP)}
# table-redis's queries for the services its file does not name (its source, not its manual, says so).
# mailaddrmap has none: table-redis cannot answer it, and `senders` must not read keys nobody meant for it.
DEFAULT_QUERIES = {service: f"GET {service.value.lower()}:%s" for service in QUERIES.values()
                   if service is not Service.MAILADDRMAP}
JOINERS = {Service.ALIAS: ", ", Service.MAILADDRMAP: ", ", Service.CREDENTIALS: ":", Service.USERINFO: ":"}
SERVER_KEYS = ("master", "master_port", "slave", "slave_port", "database", "password")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MASTER_PORT = 6379
DEFAULT_SLAVE_PORT = 6380
MAX_DATABASE = 256  # table-redis's bound; the server's own (16 by default) is checked when it answers
UNIX_PREFIX = "unix:"
CONNECT_TIMEOUT = bound_seconds(5)  # seconds: a server that does not answer is a temporary failure, not a stuck delivery
COMMAND_TIMEOUT = bound_seconds(10)
PERCENT = re.compile(r"%(.|$)")


@dataclass(frozen=True)
class Server:
    role: str  # "master" or "slave", as the file names them
    host: str | None
    port: int
    socket_path: str | None
    line: int  # where the file names it (0: the default)

    @property
    def label(self) -> str:
        return f"{UNIX_PREFIX}{self.socket_path}" if self.socket_path else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Query:
    words: tuple[str, ...]  # the command and its arguments, each with its `%s` still in
    line: int  # 0: table-redis's default

    def command(self, key: str) -> list[str]:
        """The arguments sent for key: every `%s` becomes the key (inside one argument, spaces and all)."""
        return [PERCENT.sub(lambda found: key if found.group(1) == "s" else "%", word) for word in self.words]

    def __str__(self) -> str:
        return " ".join(self.words)


@dataclass
class RedisConfig:
    path: str
    master: Server
    slave: Server | None
    database: int = 0
    password: str | None = None
    queries: dict[Service, Query] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line, for messages

    def where(self, *keys: str) -> str:
        """`FILE:LINE` of the first of keys the file gives (`FILE` alone when none)."""
        for key in keys:
            if key in self.lines:
                return f"{self.path}:{self.lines[key]}"
        return self.path


def parse_config(text: str, path: str) -> RedisConfig:
    """Parse a table-redis configuration file. Raises TableLoadError(`PATH:N: ...`)."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, key, value in setting_lines(text):
        if key not in QUERIES and key not in SERVER_KEYS:
            raise TableLoadError(f"{path}:{number}: unknown key {key!r} (" + ", ".join(SERVER_KEYS) + ", "
                                 + ", ".join(QUERIES) + ")")
        if key in lines:
            raise TableLoadError(f"{path}:{number}: {key} given twice (first on line {lines[key]})")
        if not value:
            raise TableLoadError(f"{path}:{number}: {key} needs a value")
        values[key], lines[key] = value, number
    if "slave_port" in values and "slave" not in values:
        raise TableLoadError(f"{path}:{lines['slave_port']}: slave_port given without slave")
    config = RedisConfig(path, _server("master", values, lines, path, DEFAULT_MASTER_PORT),
                         _server("slave", values, lines, path, DEFAULT_SLAVE_PORT) if "slave" in values else None,
                         lines=lines)
    if "database" in values:
        config.database = _number(values["database"], 0, MAX_DATABASE, f"{path}:{lines['database']}: database")
    config.password = values.get("password")
    for key, service in QUERIES.items():
        if key in values:
            config.queries[service] = _query(values[key], f"{path}:{lines[key]}: {key}", lines[key])
        elif service in DEFAULT_QUERIES:
            config.queries[service] = Query(tuple(DEFAULT_QUERIES[service].split()), 0)
    return config


def _server(role: str, values: dict[str, str], lines: dict[str, int], path: str, default_port: int) -> Server:
    address = values.get(role, DEFAULT_HOST)
    port_key = f"{role}_port"
    port = default_port
    if port_key in values:
        port = _number(values[port_key], 1, 65535, f"{path}:{lines[port_key]}: {port_key}")
    if address.startswith(UNIX_PREFIX):
        socket_path = address[len(UNIX_PREFIX):]
        if not socket_path:
            raise TableLoadError(f"{path}:{lines[role]}: {role}: unix: needs the socket's path")
        return Server(role, None, port, socket_path, lines.get(role, 0))
    return Server(role, address, port, None, lines.get(role, 0))


def _number(value: str, low: int, high: int, where: str) -> int:
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
        raise TableLoadError(f"{where}: {value!r} is not a number from {low} to {high}")
    return int(value)


def _query(value: str, where: str, line: int) -> Query:
    # hiredis splits a command at spaces; we take tabs too (a tab inside a Redis argument is no one's intent).
    words = tuple(value.split())
    for word in words:
        for found in PERCENT.finditer(word):
            if found.group(1) not in ("s", "%"):
                raise TableLoadError(f"{where}: {found.group(0)!r}: a query has `%s` for the key and `%%` for a "
                                     "percent sign, nothing else after `%`")
    return Query(words, line)


def _driver() -> ModuleType:
    """redis-py, imported when a redis table is first opened: it takes a sixth of a second, which every daemon
    start and smtpctl run would pay otherwise."""
    import redis
    import redis.backoff
    import redis.exceptions
    import redis.retry

    return redis


def _unreachable_errors() -> tuple[type[Exception], ...]:
    exceptions = _driver().exceptions
    return exceptions.ConnectionError, exceptions.TimeoutError, OSError


class RedisTable:
    """`table NAME redis:/path/to/redis.conf`."""

    backend_name = BACKEND
    shape = TableShape.ANY  # as every external backend in 6.8: any use is accepted by the parser

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self._lock = threading.Lock()  # guards the swap of servers on reload and close
        # (server, its client) for the master and the slave; redis-py's clients are thread-safe (a pool of
        # connections, one per asking thread) and connect again after a server restarts.
        self._servers: tuple[tuple[Server, redis.Redis], ...] = ()
        self._answering = 0  # the server that answered last is asked first, as table-redis stays on its slave
        self._closed = False
        self.load_warnings: list[str] = []  # the servers that did not answer when loaded (said by smtpd -n)
        self.config = self._load()

    # -- loading ----------------------------------------------------------------------------------------------
    def _load(self) -> RedisConfig:
        config = parse_config(read_table_file(self.path), self.path)
        servers = tuple((server, _client(config, server)) for server in (config.master, config.slave)
                        if server is not None)
        try:
            self.load_warnings = _check(config, servers, self.name)
        except TableLoadError:
            _disconnect(servers)
            raise
        with self._lock:
            old, self._servers, self._answering, self._closed = self._servers, servers, 0, False
        _disconnect(old)
        return config

    def reload(self) -> None:
        self.config = self._load()  # raises, keeping the old configuration and connections, on failure

    def close(self) -> None:
        with self._lock:
            old, self._servers, self._closed = self._servers, (), True
        _disconnect(old)

    # -- questions ------------------------------------------------------------------------------------------------
    def _reply(self, service: Service, key: str) -> object:
        query = self.config.queries.get(service)
        if query is None:
            if service in QUERIES.values():
                raise TableError(f"redis table {self.name}: {self.path} has no query_{service.value.lower()}")
            raise TableError(f"redis table {self.name}: answers no {service} question")
        command = query.command(key)
        with self._lock:
            servers, first = self._servers, self._answering
        if self._closed or not servers:
            raise TableError(f"redis table {self.name}: closed")
        exceptions = _driver().exceptions
        failures = []
        for index in [first, *(other for other in range(len(servers)) if other != first)]:
            server, client = servers[index]
            try:
                reply = client.execute_command(*command)
            except exceptions.AuthenticationError as error:
                failures.append(f"{server.role} {server.label} refused the password: {error}")
            except _unreachable_errors() as error:
                failures.append(f"{server.role} {server.label}: {error}")
            except exceptions.ResponseError as error:  # WRONGTYPE and the like: the query is wrong, not the server
                raise TableError(f"redis table {self.name}: {query} for {key!r}: {error}") from None
            except exceptions.RedisError as error:  # a reply that is no Redis reply (another service's port)
                failures.append(f"{server.role} {server.label} does not answer as a Redis server: {error}")
            else:
                self._answering = index
                return reply
        raise TableError(f"redis table {self.name}: " + "; ".join(failures))

    def lookup(self, service: Service, key: str) -> str | None:
        reply = self._reply(service, key)
        if reply is None:
            return None
        if isinstance(reply, bytes):
            return _text(reply)
        joiner = JOINERS.get(service)
        if isinstance(reply, list) and joiner is not None:
            if all(item is None for item in reply):
                return None  # an empty list or set, or HMGET of a hash that is not there
            if all(isinstance(item, bytes) for item in reply):
                return joiner.join(_text(item) for item in reply)
        raise TableError(f"redis table {self.name}: {self.config.queries[service]} for {key!r} answered "
                         f"{_kind(reply)}, which is no {service} value")

    def match(self, service: Service, candidate: str) -> bool:
        if service is Service.REGEX:
            raise TableError(f"redis table {self.name}: a regex question cannot be asked of Redis")
        reply = self._reply(service, candidate)
        if isinstance(reply, int):
            return reply > 0  # SISMEMBER, EXISTS, SCARD: a count
        if isinstance(reply, list):
            return any(item is not None for item in reply)
        return reply is not None  # a string

    def fetch(self, service: Service) -> str | None:
        raise TableError(f"redis table {self.name}: hands out no {service} entries (table-redis fetches nothing)")


def _client(config: RedisConfig, server: Server) -> redis.Redis:
    driver = _driver()
    client = driver.Redis(host=server.host or DEFAULT_HOST, port=server.port, unix_socket_path=server.socket_path,
                         db=config.database, password=config.password, protocol=2,
                         # a key that is not UTF-8 (an AUTH user name from a Latin-1 client): as the client sent it
                         encoding_errors="surrogateescape",
                         socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
                         # once more at once: a connection the server closed when it restarted is opened again.
                         # Not after a timeout: a server that did not answer within COMMAND_TIMEOUT is not asked
                         # for as long again (redis-py retries timeouts too by default).
                         retry=driver.retry.Retry(driver.backoff.NoBackoff(), 1,
                                                  supported_errors=(driver.exceptions.ConnectionError,)))
    # Replies as the server sent them (hiredis's view, which table-redis answers from): SISMEMBER an integer,
    # not redis-py's bool, HMGET a list.
    client.response_callbacks.clear()
    return client


def _check(config: RedisConfig, servers: tuple[tuple[Server, redis.Redis], ...], name: str) -> list[str]:
    """What the servers that answer now can tell of the file: the password, the database, and each query's
    command and number of arguments. A server that does not answer is no mistake of the file (a temporary
    failure until it does): the warnings returned say which."""
    exceptions = _driver().exceptions
    commands_checked = False
    warnings = []
    for server, client in servers:
        try:
            client.execute_command("PING")
        except exceptions.AuthenticationError as error:
            if config.password is None:
                raise TableLoadError(f"{config.path}: {server.role} {server.label} wants a password ({error}): "
                                     "give it a password line") from None
            raise TableLoadError(f"{config.where('password')}: {server.role} {server.label} refused the "
                                 f"password: {error}") from None
        except exceptions.ResponseError as error:  # the one command of the connection's set-up besides AUTH: SELECT
            raise TableLoadError(f"{config.where('database')}: {server.role} {server.label} refused database "
                                 f"{config.database}: {error}") from None
        except _unreachable_errors() as error:
            warnings.append(f"{config.where(f'{server.role}_port', server.role)}: warning: {server.role} "
                            f"{server.label} does not answer ({error}); the table {name} is checked, and answers, "
                            "once a server does")
            continue
        except exceptions.RedisError as error:  # a reply that is no Redis reply: the port of another service
            raise TableLoadError(f"{config.where(f'{server.role}_port', server.role)}: {server.role} {server.label} "
                                 f"does not answer as a Redis server ({error})") from None
        if not commands_checked:
            _check_commands(config, client)
            commands_checked = True
    return warnings


def _check_commands(config: RedisConfig, client: redis.Redis) -> None:
    for service, query in config.queries.items():
        name = query.words[0]
        try:
            info = client.execute_command("COMMAND", "INFO", name)
        except (_driver().exceptions.ResponseError, *_unreachable_errors()):
            return  # a server that will not describe its commands (an ACL, an old version): asked as it comes
        key = f"query_{service.value.lower()}"
        where = f"{config.path}:{query.line}: {key}" if query.line else f"{config.path}: {key} (by default {query})"
        if not isinstance(info, list) or not info or not isinstance(info[0], list):
            raise TableLoadError(f"{where}: the server knows no command {name!r}")
        arity, given = info[0][1], len(query.words)
        if isinstance(arity, int) and (given != arity if arity > 0 else given < -arity):
            wanted = abs(arity) - 1
            raise TableLoadError(f"{where}: {name.upper()} takes {'' if arity > 0 else 'at least '}{wanted} "
                                 f"argument{'' if wanted == 1 else 's'}, the query gives {given - 1}")


def _disconnect(servers: tuple[tuple[Server, redis.Redis], ...]) -> None:
    for _, client in servers:
        client.connection_pool.disconnect()


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _kind(reply: object) -> str:
    if isinstance(reply, int):
        return f"the integer {reply}"
    if isinstance(reply, list):
        return "an array with an element that is not a string" if reply else "an empty array"
    return f"a {type(reply).__name__}"
