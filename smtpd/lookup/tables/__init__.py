"""The table registry: every table of one configuration, asked by name.

``Tables(config)`` opens every declared table (file, inline, db, getpwnam, passwd) and the built-ins. Callers ask::

    tables.lookup("aliases", Service.ALIAS, "root")      -> "bob, alice" | None
    tables.match("localnames", Service.DOMAIN, "example.org") -> True | False
    tables.fetch("sources", Service.SOURCE)              -> the next entry, round-robin
    tables.reload("aliases")                             # atomic; raises TableLoadError, keeping the old content

Keys are lowercased here, once, for every backend (reference §5.1). Every question emits a `lookup` trace event
in OpenSMTPD's words (`lookup "KEY" as SERVICE in table BACKEND:NAME -> RESULT`); credentials values are shown
masked. A backend failure raises TableError (a temporary failure for the caller).
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from smtpd import trace
from smtpd.config.model import Config, TableDecl, TableShape
from smtpd.lookup.tables import matching
from smtpd.lookup.tables.base import (
    MATCH_SERVICES,
    Service,
    TableBackend,
    TableError,
    TableLoadError,
)
from smtpd.lookup.tables.builtin import BUILTIN_NAMES, builtin_table, local_addresses
from smtpd.lookup.tables.db import DbTable
from smtpd.lookup.tables.passwd import GetpwnamTable, system_users_are_local
from smtpd.lookup.tables.passwd_file import PasswdFileTable
from smtpd.lookup.tables.static import FileTable, InlineTable

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

__all__ = [
    "MATCH_SERVICES", "Service", "TableBackend", "TableError", "TableLoadError", "Tables", "open_table",
    "asked_off_the_loop", "validate_tables",
]

FILE_BACKENDS = ("file", "static")
# opensmtpd-extras' table programs that take a configuration file (`table NAME BACKEND:/etc/mail/FILE.conf`) or,
# for socketmap, the server's socket, answered by the daemon itself: backend name -> "module:class", the class
# called with (table name, the path after `BACKEND:`). Imported when such a table is opened: the database
# drivers cost 20-120 ms each to import, which every start and every smtpctl run would pay otherwise.
CONFIGURED_BACKENDS: dict[str, str] = {
    "sqlite": "smtpd.lookup.tables.sqlite:SqliteTable",
    "socketmap": "smtpd.lookup.tables.socketmap:SocketmapTable",
    "redis": "smtpd.lookup.tables.redis:RedisTable",
    "ldap": "smtpd.lookup.tables.ldap:LdapTable",
    "postgres": "smtpd.lookup.tables.postgres:PostgresTable",
    "mysql": "smtpd.lookup.tables.mysql:MysqlTable",
}
SOCKET_BACKENDS = frozenset({"socketmap"})  # their path names a socket, not a configuration file
MASK = "********"


async def asked_off_the_loop[T](tables: Any, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, which asks ``tables``: in a worker thread when one of them may block
    (lookups_may_block: a file, the system, an SQLite database whose writer holds its lock for
    seconds), on the event loop otherwise. The delivery agents ask the userbase, the relay's
    source, helo and auth tables so."""
    may_block = getattr(tables, "lookups_may_block", None)
    if may_block is not None and may_block():
        return await asyncio.to_thread(function, *args)
    return function(*args)


def open_table(decl: TableDecl, delimiter: str = "+") -> TableBackend:
    """The backend for one declaration, loaded. Raises TableLoadError with the messages to show."""
    if decl.inline or (decl.source is None and decl.backend in FILE_BACKENDS):
        return InlineTable.from_decl(decl, delimiter)
    if decl.backend in FILE_BACKENDS:
        assert decl.source is not None
        return FileTable(decl.name, decl.source, delimiter)
    if decl.backend == "db":
        if not decl.source:
            raise TableLoadError(f"table {decl.name}: the db backend needs a file path")
        return DbTable(decl.name, decl.source, delimiter)
    if decl.backend == "getpwnam":
        return GetpwnamTable(decl.name)
    if decl.backend == "passwd":
        if not decl.source:
            raise TableLoadError(f"table {decl.name}: the passwd backend needs a file path")
        return PasswdFileTable(decl.name, decl.source)
    where = CONFIGURED_BACKENDS.get(decl.backend)
    if where is not None:
        if not decl.source:
            needed = "its server's socket path" if decl.backend in SOCKET_BACKENDS else "its configuration file's path"
            raise TableLoadError(f"table {decl.name}: the {decl.backend} backend needs {needed}")
        module_name, class_name = where.split(":")
        opener: Callable[[str, str], TableBackend] = getattr(importlib.import_module(module_name), class_name)
        return opener(decl.name, decl.source)
    raise TableLoadError(f'table_create: backend "{decl.backend}" is not supported')


def _display_name(name: str, builtin: bool) -> str:
    # OpenSMTPD names built-in and anonymous tables `<localhost>`, `<dynamic:3>`; traces show them so.
    if name.startswith("<"):
        return name
    if builtin or name.startswith("dynamic:"):
        return f"<{name}>"
    return name


class Tables:
    """Every table of one configuration snapshot. Safe to use from several threads."""

    def __init__(self, config: Config | None = None, *, mailname: str | None = None,
                 addresses: Iterable[str] | None = None, strict: bool = True) -> None:
        """Open every table. With ``strict`` (the daemon) any table that fails to load raises TableLoadError
        with every message; otherwise the failures are kept in ``load_errors`` (by table name)."""
        self.config = config
        self.delimiter = config.smtp.sub_addr_delim if config is not None else "+"
        self.mailname = mailname if mailname is not None else _default_mailname()
        self.addresses = list(addresses) if addresses is not None else local_addresses()
        self._tables: dict[str, TableBackend] = {}
        self._builtin: set[str] = set()
        self._reload_lock = threading.Lock()
        self._immediate: bool | None = None  # expansion_is_immediate(), once known
        # Sessions holding this snapshot (hold/release), and whether a reload replaced it (retire): the backends
        # are closed when both say it is no longer used.
        self._holders = 0
        self._retired = False
        problems: list[str] = []
        self.load_errors: dict[str, list[str]] = {}
        declared = dict(config.tables) if config is not None else {}
        for name in BUILTIN_NAMES:
            # Built-ins answer to `localhost` and to `<localhost>` (the parser's name for them), unless the
            # configuration declares a table of its own under the bare name.
            backend = builtin_table(name, self.mailname, self.addresses, self.delimiter)
            for alias in (name, f"<{name}>"):
                decl = declared.get(alias)
                if decl is None or decl.builtin:
                    self._tables[alias] = backend
                    self._builtin.add(alias)
        for name, decl in declared.items():
            if decl.builtin or decl.backend == "builtin":
                continue
            try:
                self._tables[name] = open_table(decl, self.delimiter)
            except TableLoadError as error:
                self.load_errors[name] = list(error.lines)
                problems.extend(error.lines)
                if decl.location is not None and decl.source:
                    problems.append(f"{decl.location}: invalid configuration file {decl.source} for table {name}")
        if problems and strict:
            raise TableLoadError(*problems)

    # -- the registry ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tables)

    def __contains__(self, name: str) -> bool:
        return name in self._tables

    def backend(self, name: str) -> TableBackend:
        try:
            return self._tables[name]
        except KeyError:
            raise TableError(f'Lookup table not found: "{name}"') from None

    def shape(self, name: str) -> TableShape:
        return self.backend(name).shape

    def add(self, name: str, backend: TableBackend, builtin: bool = False) -> None:
        """Register a table made elsewhere (an external backend, a test's own)."""
        self._tables[name] = backend
        self._immediate = None
        if builtin:
            self._builtin.add(name)

    def lookups_may_block(self) -> bool:
        """Whether some declared table reads a file, a database or the system on lookup (db, getpwnam, external
        ones). Static and passwd tables answer from memory; of the built-ins only <getpwnam> reads the system,
        and only local actions use it (as their default user base)."""
        return any(backend.backend_name != "static" and not getattr(backend, "in_memory", False)
                   for name, backend in self._tables.items() if name not in self._builtin)

    def expansion_is_immediate(self) -> bool:
        """Whether expanding any recipient takes no waiting: every table answers from memory, and either every
        action relays or the system user database is local (files, see system_users_are_local: then a local
        recipient costs a getpwnam and a look for ~/.forward, microseconds, as in the delivery agent, which
        runs on the loop too). Then the SMTP session expands on the event loop instead of paying a thread
        hand-off per RCPT: with a maildir action, accepting went from about 1,420 to about 1,880 msg/s at 8
        sessions."""
        if self._immediate is None:
            config = self.config
            self._immediate = (config is not None and not self.lookups_may_block()
                               and (all(not action.is_local for action in config.actions.values())
                                    or system_users_are_local()))
        return self._immediate

    def _label(self, name: str, backend: TableBackend) -> str:
        return f"{backend.backend_name}:{_display_name(name, name in self._builtin)}"

    # -- questions ------------------------------------------------------------------------------------
    def lookup(self, name: str, service: Service, key: str) -> str | None:
        """The value for key (for match services: of the first matching entry), or None."""
        backend = self.backend(name)
        try:
            value = backend.lookup(service, matching.ascii_lower(key))
        except TableError as error:
            self._trace("lookup", name, backend, service, key, f"error: {error}", found=None)
            raise
        if value is None:
            self._trace("lookup", name, backend, service, key, "none", found=False)
        else:
            shown = MASK if service is Service.CREDENTIALS else value
            self._trace("lookup", name, backend, service, key, f'"{shown}"', found=True)
        return value

    def match(self, name: str, service: Service, key: str) -> bool:
        backend = self.backend(name)
        try:
            found = backend.match(service, matching.ascii_lower(key))
        except TableError as error:
            self._trace("match", name, backend, service, key, f"error: {error}", found=None)
            raise
        self._trace("match", name, backend, service, key, "true" if found else "false", found=found)
        return found

    def fetch(self, name: str, service: Service) -> str | None:
        backend = self.backend(name)
        label = self._label(name, backend)
        try:
            value = backend.fetch(service)
        except TableError as error:
            trace.emit("lookup", f"fetch {service} from table {label} -> error: {error}", table=name,
                       service=str(service), found=None)
            raise
        result = "none" if value is None else f'"{value}"'
        trace.emit("lookup", f"fetch {service} from table {label} -> {result}", table=name, service=str(service),
                   found=value is not None)
        return value

    def _trace(self, verb: str, name: str, backend: TableBackend, service: Service, key: str, result: str,
               found: bool | None) -> None:
        if not trace.wants("lookup"):
            return
        trace.emit("lookup", f'{verb} "{key}" as {service} in table {self._label(name, backend)} -> {result}',
                   table=name, service=str(service), key=key, found=found)

    # -- reload ---------------------------------------------------------------------------------------
    def reload(self, name: str) -> None:
        """Re-read one table's source, atomically. Raises TableLoadError (old content kept) or TableError."""
        backend = self.backend(name)
        with self._reload_lock:
            try:
                backend.reload()
            except TableLoadError as error:
                trace.emit("table", f'Failed to update table "{name}"', table=name, errors=error.lines)
                raise
        trace.emit("table", f'Table "{name}" successfully updated', table=name)

    def close(self) -> None:
        for backend in self._tables.values():
            backend.close()

    # -- the snapshot's users -------------------------------------------------------------------------
    def hold(self) -> None:
        """A session began with these tables (its config snapshot's): they stay open until it releases them."""
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._retired and self._holders <= 0:
            self.close()

    def retire(self) -> None:
        """A reload replaced these tables: close them now, or when the last session holding them ends."""
        self._retired = True
        if self._holders <= 0:
            self.close()

    # -- checks (smtpd -n) ----------------------------------------------------------------------------
    def validate(self):  # -> list[Diagnostic]
        """Deeper checks of the loaded tables against their uses in the configuration (see validate.py)."""
        from smtpd.lookup.tables.validate import check_table_uses

        return check_table_uses(self)


def _default_mailname() -> str:
    from shared.paths import Paths, read_mailname

    try:
        return read_mailname(Paths.from_environment().mailname)
    except Exception:  # noqa: BLE001 - a broken mailname must not stop table loading; the daemon reports it
        return "localhost"


def validate_tables(config: Config):  # -> list[Diagnostic]
    """The `smtpd -n` hook: load every table of config and check it against its uses.

    Returns Diagnostic objects (smtpd.config.errors): errors for tables that cannot be opened (a db file that
    is missing or not ours, a file that fails to parse), warnings for entries that would fail at lookup time
    (alias items, credentials, userinfo, regexes, addresses) with their FILE:LINE.
    """
    from smtpd.lookup.tables.validate import validate_config

    return validate_config(config)


class TablesComponent:
    """The daemon's tables: opened before every other subsystem, replaced whole on reload."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._previous: Tables | None = None  # the tables a reload in progress replaced

    async def start(self) -> None:
        pass  # opened in build(), so that every later builder finds daemon.tables ready

    async def stop(self) -> None:
        if self.daemon.tables is not None:
            self.daemon.tables.close()

    async def reconfigure(self, old: Config, new: Config) -> list[str]:
        """Open the new configuration's tables; raises TableLoadError (keeping the old ones) if one fails."""
        replacement = await asyncio.to_thread(Tables, new, mailname=self.daemon.mailname)
        self._previous, self.daemon.tables = self.daemon.tables, replacement
        return []  # the tables added or removed are among the config's changes (smtpd.control.diff)


    def commit(self) -> None:
        """The reload succeeded. Sessions that began before it go on with the previous tables (their snapshot):
        they are closed when the last of those sessions ends."""
        previous, self._previous = self._previous, None
        if previous is not None:
            previous.retire()

    def rollback(self) -> None:
        """The reload failed after the tables were swapped: the previous tables, as they were, are back in force
        (not read again: their files may have changed or gone since)."""
        previous, self._previous = self._previous, None
        if previous is not None:
            replacement, self.daemon.tables = self.daemon.tables, previous
            replacement.retire()


def build(daemon: Daemon) -> TablesComponent:
    """Open the tables (raises TableLoadError with FILE:LINE messages when one cannot be loaded)."""
    daemon.tables = Tables(daemon.config, mailname=daemon.mailname)
    return TablesComponent(daemon)
