"""`ldap:` tables: the configuration files of table-ldap (opensmtpd-extras), answered by the daemon itself.

OpenSMTPD runs `table NAME ldap:/etc/mail/ldap.conf` through the external program table-ldap; we read the same
configuration file and ask the same directory server with ldap3, so a setup built on it works unchanged.
docs/tables.md has the details; in short, as table-ldap (checked against it under OpenSMTPD 6.8,
tests/test_tables_ldap.py):

* the file holds `url`, `username`, `password`, `basedn`, and for each service a `SERVICE_filter` (the key
  replaces `%s`) and `SERVICE_attributes` (comma-separated: one attribute, two for credentials, user and hash,
  three for userinfo, uid, gid and home); key and value are apart by spaces, tabs or a colon (`url: ...`);
* each question is a subtree search under `basedn`, bound as `username` (anonymously without one);
* an alias answer joins the attribute's values with `, `; credentials answer `user:hash`, userinfo
  `uid:gid:home`, from the first value of each attribute; a match question (domain, mailaddr) holds when an
  entry is found;
* a service without its filter is a temporary failure.

Where we differ, on purpose (docs/tables.md says why): the key is escaped as an LDAP filter value (RFC 4515:
table-ldap pastes it as it comes, so a recipient `*@example.com` matched every entry); every entry found
counts, in the server's order (table-ldap answers from the last one only, and fails when one of them lacks an
attribute); `SERVICE_attributes` may have blanks after its commas (`uid, userPassword`, as table-ldap's own
example writes it); every `%s` of a filter is the key; `mailaddrmap` (senders), `netaddr` and `addrname` are
served too; a `{CRYPT}` marker before a password hash is dropped; a down server is a temporary failure and is
asked again once back; mistakes in the file are `FILE:LINE: message`.
"""

from __future__ import annotations

import re
import threading
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter

from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.settings import bound_seconds, setting_lines
from smtpd.lookup.tables.static import read_table_file

BACKEND = "ldap"
SERVICES = {service.value.lower(): service for service in (
    Service.ALIAS, Service.DOMAIN, Service.CREDENTIALS, Service.NETADDR, Service.USERINFO, Service.MAILADDR,
    Service.ADDRNAME, Service.MAILADDRMAP)}
ATTRIBUTES = {Service.CREDENTIALS: ("user", "password hash"), Service.USERINFO: ("uid", "gid", "home")}
JOINED = frozenset({Service.ALIAS, Service.MAILADDRMAP})  # every value of every entry, joined with ", "
MATCHED = frozenset({Service.DOMAIN, Service.NETADDR, Service.MAILADDR})  # an entry found is the answer
SETTINGS = ("url", "username", "password", "basedn")
DEFAULT_PORT = 389
CONNECT_TIMEOUT = bound_seconds(5)  # seconds; table-ldap has none (it waits as long as the kernel does)
ANSWER_TIMEOUT = max(1, round(bound_seconds(10)))  # (ldap3 wants whole seconds)
QUESTION_WAIT = bound_seconds(10)  # seconds a question waits for the one before it on the table's connection
NO_SUCH_OBJECT = 32
SIZE_LIMIT_EXCEEDED = 4
CRYPT_MARKER = "{crypt}"  # RFC 2307's userPassword prefix of a crypt(3) hash
PERCENT = re.compile(r"%(.?)", re.DOTALL)
SURROGATE_BYTES = (0xDC80, 0xDCFF)  # surrogateescape's stand-ins for the bytes 0x80-0xff


@dataclass(frozen=True)
class Query:
    """One service's search: the filter around its `%s` holes, and the attributes its answer is made of."""

    filter_parts: tuple[str, ...]
    attributes: tuple[str, ...]

    def filter_for(self, key: str) -> str:
        return escape_value(key).join(self.filter_parts)


@dataclass
class LdapConfig:
    path: str
    settings: dict[str, str] = field(default_factory=dict)
    queries: dict[Service, Query] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line, for messages
    host: str = ""
    port: int = DEFAULT_PORT

    @property
    def basedn(self) -> str:
        return self.settings["basedn"]

    def where(self, *keys: str) -> str:
        """`FILE:LINE` of the first of keys the file gives (`FILE` alone when none)."""
        for key in keys:
            if key in self.lines:
                return f"{self.path}:{self.lines[key]}"
        return self.path


def escape_value(key: str) -> str:
    """The key as an LDAP filter assertion value: RFC 4515's `*`, `(`, `)`, `\\` and NUL as `\\2a`, `\\28`, `\\29`,
    `\\5c`, `\\00`, so that a key can only ever be compared, never change the filter. Blanks and control characters
    are escaped too (allowed by RFC 4515): ldap3's filter parser would strip blanks at a value's ends. A byte that
    was not UTF-8 (an AUTH user name from a Latin-1 client, decoded with surrogateescape) is sent as it came."""
    return "".join(_escaped(char) for char in key)


def _escaped(char: str) -> str:
    if char in "*()\\\0" or ord(char) < 0x21 or ord(char) == 0x7F:
        return f"\\{ord(char):02x}"
    if SURROGATE_BYTES[0] <= ord(char) <= SURROGATE_BYTES[1]:
        return f"\\{ord(char) - SURROGATE_BYTES[0] + 0x80:02x}"
    return char


def parse_config(text: str, path: str) -> LdapConfig:
    """Parse a table-ldap configuration file. Raises TableLoadError(`PATH:N: ...`)."""
    config = LdapConfig(path)
    filters: dict[Service, str] = {}
    attributes: dict[Service, tuple[str, ...]] = {}
    for number, key, value in setting_lines(text):
        where = f"{path}:{number}"
        service_name, _, kind = key.rpartition("_")
        service = SERVICES.get(service_name) if kind in ("filter", "attributes") else None
        if key not in SETTINGS and service is None:
            raise TableLoadError(f"{where}: unknown key {key!r} (" + ", ".join(SETTINGS) + ", SERVICE_filter, "
                                 "SERVICE_attributes; services: " + ", ".join(SERVICES) + ")")
        if key in config.lines:
            raise TableLoadError(f"{where}: {key} given twice (first on line {config.lines[key]})")
        if not value:
            raise TableLoadError(f"{where}: {key} needs a value")
        config.lines[key] = number
        if service is None:
            config.settings[key] = value
        elif kind == "filter":
            filters[service] = value
        else:
            attributes[service] = _attribute_names(value, service, f"{where}: {key}")
    _check_settings(config)
    for service, text_filter in filters.items():
        config.queries[service] = _query(config, service, text_filter, attributes.get(service, ()))
    for service in attributes.keys() - filters.keys():
        name = service.value.lower()
        raise TableLoadError(f"{config.where(f'{name}_attributes')}: {name}_attributes without {name}_filter")
    return config


def _check_settings(config: LdapConfig) -> None:
    for required in ("url", "basedn"):
        if required not in config.settings:
            raise TableLoadError(f"{config.path}: no {required}: the file must give the server's "
                                 + ("URL (url ldap://HOST[:PORT])" if required == "url" else "search base (basedn)"))
    if "password" in config.settings and "username" not in config.settings:
        raise TableLoadError(f"{config.where('password')}: a password without a username (the DN to bind as)")
    url = config.settings["url"]
    where = config.where("url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TableLoadError(f"{where}: url {url!r}: {error}") from None
    if parts.scheme.lower() != "ldap":
        raise TableLoadError(f"{where}: url {url!r}: only ldap://HOST[:PORT] is served, as by table-ldap "
                             "(no ldaps://, ldapi:// nor StartTLS)")
    if not parts.hostname:
        raise TableLoadError(f"{where}: url {url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise TableLoadError(f"{where}: url {url!r}: give only ldap://HOST[:PORT]; the search base is basedn")
    config.host, config.port = parts.hostname, port or DEFAULT_PORT


def _attribute_names(value: str, service: Service, where: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(","))
    meaning = ATTRIBUTES.get(service, ("value",))
    if len(names) != len(meaning) or not all(names):
        count = len(meaning)
        raise TableLoadError(f"{where}: {count} attribute{'s' if count > 1 else ''} expected "
                             f"({', '.join(meaning)}), comma-separated")
    return names


def _query(config: LdapConfig, service: Service, text: str, attributes: tuple[str, ...]) -> Query:
    name = service.value.lower()
    where = f"{config.where(f'{name}_filter')}: {name}_filter"
    parts: list[str] = []
    current: list[str] = []
    position = 0
    for found in PERCENT.finditer(text):
        current.append(text[position:found.start()])
        position = found.end()
        if found.group(1) == "%":
            current.append("%")
        elif found.group(1) == "s":
            parts.append("".join(current))
            current = []
        else:
            raise TableLoadError(f"{where}: %{found.group(1)} in the filter: only %s (the key) and %% (a %)")
    current.append(text[position:])
    parts.append("".join(current))
    query = Query(tuple(parts), attributes)
    try:
        parse_filter(query.filter_for("key"), None, False, True, None, False)
    except LDAPException as error:
        raise TableLoadError(f"{where}: not an LDAP filter (RFC 4515: `(attribute=%s)`, `(&(...)(...))`): "
                             f"{error}") from None
    if not attributes and service not in MATCHED:
        raise TableLoadError(f"{where} without {name}_attributes (the attribute{'s' if service in ATTRIBUTES else ''}"
                             " the answer is made of)")
    return query


class _Refused(Exception):
    """The server answered the bind with an error (wrong DN or password): a mistake in the file."""


class LdapTable:
    """`table NAME ldap:/path/to/ldap.conf`."""

    backend_name = BACKEND
    shape = TableShape.ANY  # as every external backend in 6.8: any use is accepted by the parser

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self._lock = threading.Lock()  # one connection, asked from the event loop and from expansion threads
        self._connection: ldap3.Connection | None = None
        self._closed = False
        self.load_warnings: list[str] = []  # why the file could not be checked on the server (said by smtpd -n)
        self.config = LdapConfig(path)
        self._load()

    # -- loading ----------------------------------------------------------------------------------------------
    def _load(self) -> None:
        config = parse_config(read_table_file(self.path), self.path)
        connection, warnings = _checked_connection(config, self.name)
        self.load_warnings = warnings
        with self._lock:
            old, self._connection, self.config = self._connection, connection, config
        _close(old)

    def reload(self) -> None:
        self._load()  # raises, keeping the old configuration and connection, on failure

    def close(self) -> None:
        """Close the connection. Never waits (a retired snapshot's tables are closed on the event loop): a
        question in flight keeps the connection, and it is closed once that question is answered."""
        self._closed = True
        self._drop_if_idle()

    def _drop_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                old, self._connection = self._connection, None
            finally:
                self._lock.release()
            _close(old)

    # -- questions ------------------------------------------------------------------------------------------------
    def _query(self, config: LdapConfig, service: Service) -> Query:
        query = config.queries.get(service)
        if query is None:
            raise TableError(f"ldap table {self.name}: {self.path} has no {service.value.lower()}_filter")
        return query

    def _entries(self, config: LdapConfig, query: Query, key: str, attributes: tuple[str, ...],
                 limit: int) -> list[dict[str, list[str]]]:
        """The entries the query finds for key, each as {lowercased attribute: values}. A connection that broke
        (the server restarted, or closed it when idle) is opened again once before the question fails; a server
        that did not answer in time is not asked again (the wait would double). Questions take turns on the one
        connection: one waits QUESTION_WAIT at most for the one before it, so that sessions asking a server that
        hangs each get their temporary failure in bounded time, not after every question before theirs."""
        search_filter = query.filter_for(key)
        if not self._lock.acquire(timeout=QUESTION_WAIT):
            raise TableError(f"ldap table {self.name}: {config.host}:{config.port} is still busy with an earlier "
                             "question")
        try:
            if self._closed:  # (a reload replaced the table: no new connection for it)
                raise TableError(f"ldap table {self.name}: closed")
            for attempt in (1, 2):
                connection = self._connection
                if connection is None or connection.closed:
                    connection = self._connection = _connect(config, self.name)
                try:
                    connection.search(config.basedn, search_filter, search_scope=ldap3.SUBTREE,
                                      attributes=list(attributes) or ldap3.NO_ATTRIBUTES, size_limit=limit,
                                      time_limit=ANSWER_TIMEOUT)
                except LDAPException as error:
                    self._connection = None
                    _close(connection)
                    if attempt == 2 or isinstance(error, TimeoutError):  # (ldap3's socket errors are both)
                        raise TableError(f"ldap table {self.name}: {config.host}:{config.port}: {error}") from None
                    continue
                return _found(connection, self.name, config, limit)
        finally:
            self._lock.release()
            if self._closed:  # closed while this question was asked: close the connection now
                self._drop_if_idle()
        raise AssertionError("unreachable")

    def lookup(self, service: Service, key: str) -> str | None:
        config = self.config  # (one snapshot: a reload replaces it whole)
        query = self._query(config, service)
        entries = self._entries(config, query, key, query.attributes, 0)
        if service in JOINED:
            values = [value for entry in entries for value in entry.get(query.attributes[0].lower(), ())]
            return ", ".join(values) if values else None
        if not query.attributes:  # a match service without attributes: the key itself, when an entry holds it
            return key if entries else None
        for entry in entries:  # the first entry holding every attribute, in the server's order
            firsts = [entry[name.lower()][0] for name in query.attributes if entry.get(name.lower())]
            if len(firsts) == len(query.attributes):
                return self._answer(service, key, firsts)
        return None

    def _answer(self, service: Service, key: str, values: list[str]) -> str:
        if service is Service.CREDENTIALS:
            user, secret = values
            if secret[:len(CRYPT_MARKER)].lower() == CRYPT_MARKER:
                secret = secret[len(CRYPT_MARKER):]
            return f"{user}:{secret}"
        if service is Service.USERINFO:
            uid, gid, home = values
            if not (uid.isdigit() and gid.isdigit()):
                raise TableError(f"ldap table {self.name}: userinfo of {key!r} has no numeric uid and gid: "
                                 f"{uid!r}, {gid!r}")
            return f"{int(uid)}:{int(gid)}:{home}"
        return values[0]

    def match(self, service: Service, candidate: str) -> bool:
        if service is Service.REGEX:
            raise TableError(f"ldap table {self.name}: a regex question cannot be asked in an LDAP filter")
        config = self.config
        return bool(self._entries(config, self._query(config, service), candidate, (), 1))

    def fetch(self, service: Service) -> str | None:
        raise TableError(f"ldap table {self.name}: an ldap table cannot hand out {service.value.lower()} "
                         "entries in turn (table-ldap cannot either)")


def _server(config: LdapConfig) -> ldap3.Server:
    return ldap3.Server(config.host, port=config.port, get_info=ldap3.NONE, connect_timeout=CONNECT_TIMEOUT)


def _bound_connection(config: LdapConfig) -> ldap3.Connection:
    """A connection bound as the file's username (anonymously without one). Raises _Refused when the server
    refuses the bind, LDAPException when it cannot be reached."""
    username = config.settings.get("username")
    connection = ldap3.Connection(
        _server(config), user=username, password=config.settings.get("password", ""),
        authentication=ldap3.SIMPLE if username else ldap3.ANONYMOUS, client_strategy=ldap3.SYNC,
        raise_exceptions=False, receive_timeout=ANSWER_TIMEOUT, auto_referrals=False, read_only=True,
        check_names=False)
    connection.open()
    if not connection.bind():
        result = connection.result or {}
        _close(connection)
        raise _Refused(f"{result.get('description', 'refused')}"
                       + (f" ({result['message']})" if result.get("message") else ""))
    return connection


def _connect(config: LdapConfig, name: str) -> ldap3.Connection:
    try:
        return _bound_connection(config)
    except _Refused as refused:
        raise TableError(f"ldap table {name}: the server refused the bind as "
                         f"{config.settings.get('username', 'anonymous')}: {refused}") from None
    except LDAPException as error:
        raise TableError(f"ldap table {name}: cannot reach {config.host}:{config.port}: {error}") from None


def _checked_connection(config: LdapConfig, name: str) -> tuple[ldap3.Connection | None, list[str]]:
    """Bind once when the file is loaded, so that a wrong username, password or basedn is said with its line.
    A server that cannot be reached does not stop the loading: its questions fail (temporarily) until it
    answers, as when it goes away later; the warning returned says so."""
    def unreachable(error: LDAPException) -> list[str]:
        return [f"{config.where('url')}: warning: cannot reach {config.host}:{config.port} ({error}); the bind and "
                f"basedn are checked, and the table {name} answers, once it can be reached"]

    try:
        connection = _bound_connection(config)
    except _Refused as refused:
        who = config.settings.get("username", "anonymous")
        raise TableLoadError(f"{config.where('password', 'username', 'url')}: the server at "
                             f"{config.settings['url']} refuses the bind as {who}: {refused}") from None
    except LDAPException as error:
        return None, unreachable(error)
    try:
        connection.search(config.basedn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=ldap3.NO_ATTRIBUTES)
    except LDAPException as error:
        _close(connection)
        return None, unreachable(error)
    if (connection.result or {}).get("result") == NO_SUCH_OBJECT:
        _close(connection)
        raise TableLoadError(f"{config.where('basedn')}: basedn {config.basedn!r}: no such entry on the server "
                             f"at {config.settings['url']}")
    return connection, []


def _found(connection: ldap3.Connection, name: str, config: LdapConfig, limit: int) -> list[dict[str, list[str]]]:
    result: dict[str, Any] = connection.result or {}
    code = result.get("result")
    if code != 0 and not (code == SIZE_LIMIT_EXCEEDED and limit):  # (a match asks for one entry at most)
        detail = f"{result.get('description', code)}" + (f" ({result['message']})" if result.get("message") else "")
        if code == NO_SUCH_OBJECT:
            detail = f"basedn {config.basedn!r}: {detail}"
        raise TableError(f"ldap table {name}: search failed: {detail}")
    return [{attribute.lower(): [_text(value) for value in values]
             for attribute, values in (item.get("raw_attributes") or {}).items()}
            for item in connection.response or () if item.get("type") == "searchResEntry"]


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _close(connection: ldap3.Connection | None) -> None:
    if connection is not None:
        with suppress(LDAPException, OSError):
            connection.unbind()
