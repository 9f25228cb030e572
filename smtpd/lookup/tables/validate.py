"""`smtpd -n` checks of tables against their uses.

OpenSMTPD parses a value only when it is looked up, so a bad alias line or a plain-text password in a
credentials table shows up as a temporary failure in the middle of the night. We check every entry of every
table against each use the configuration makes of it, and report problems as warnings with the table file's
FILE:LINE (the configuration stays valid, as it is for OpenSMTPD). Tables that cannot be opened at all are
errors. File-table parse errors are reported by the configuration parser at the `table` statement, so they
are not repeated here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from smtpd.config.errors import Diagnostic, Severity
from smtpd.config.model import Config, Location, TableDecl
from smtpd.lookup.tables import Tables, values
from smtpd.lookup.tables.base import TableError
from smtpd.lookup.tables.db import DbTable
from smtpd.lookup.tables.matching import regex_error
from smtpd.lookup.tables.passwd_file import PasswdFileTable
from smtpd.lookup.tables.static import FileTable, _StaticTable

# A value that looks like a hash one of the schemes we verify: bcrypt, crypt(3) `$id$`, or traditional DES.
_HASH_SHAPE = re.compile(r"^(\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}|\$[0-9a-z]+\$.+|[./A-Za-z0-9]{13})$")

Checker = Callable[[str, str], str | None]  # (key, value) -> problem or None


def _check_aliases(key: str, value: str) -> str | None:
    try:
        values.aliases(value)
    except ValueError as error:
        return f"alias entry {key}: {error}"
    return None


def _check_userinfo(key: str, value: str) -> str | None:
    try:
        values.userinfo(key, value)
    except ValueError as error:
        return str(error)
    return None


def _check_credentials(key: str, value: str) -> str | None:
    try:
        found = values.credentials(key, value)
    except ValueError as error:
        return str(error)
    if not _HASH_SHAPE.match(found.secret):
        return f"credentials for {key}: the value is not a password hash (make one with `smtpctl encrypt`)"
    return None


def _check_relay_secret(key: str, value: str) -> str | None:
    try:
        values.relay_secret(key, value)
    except ValueError as error:
        return str(error)
    return None


def _check_addrname(key: str, value: str) -> str | None:
    try:
        values.addrname(key, value)
    except ValueError as error:
        return str(error)
    return None


def _check_source(key: str, value: str) -> str | None:
    try:
        values.source(key)
    except ValueError as error:
        return f"source entry: {error}"
    return None


def _check_regex(key: str, value: str) -> str | None:
    problem = regex_error(key)
    return None if problem is None else f'invalid regular expression "{key}": {problem}'


def _uses(config: Config) -> Iterator[tuple[str, str, Checker]]:
    """(table name, use, checker) for every table use whose values we can check."""
    for listener in config.listeners:
        if listener.auth_table:
            yield listener.auth_table, "auth", _check_credentials
        if listener.hostnames_table:
            yield listener.hostnames_table, "hostnames", _check_addrname
    for action in config.actions.values():
        for table in (action.alias_table, action.virtual_table):
            if table:
                yield table, "alias", _check_aliases
        if action.userbase_table:
            yield action.userbase_table, "userbase", _check_userinfo
        relay = action.relay
        if relay is not None:
            if relay.auth_table:
                yield relay.auth_table, "relay auth", _check_relay_secret
            if relay.helo_src_table:
                yield relay.helo_src_table, "helo-src", _check_addrname
            if relay.src_table:
                yield relay.src_table, "src", _check_source
    for rule in config.rules:
        for condition in rule.conditions:
            if condition.regex and condition.table:
                yield condition.table, "regex", _check_regex


def _all_uses(config: Config) -> Iterator[tuple[str, str]]:
    """(table name, use) for every table use of the configuration (the use named as in error messages)."""
    for listener in config.listeners:
        for table, use in ((listener.auth_table, "auth"), (listener.hostnames_table, "hostnames"),
                           (listener.senders_table, "senders")):
            if table:
                yield table, use
    for action in config.actions.values():
        for table, use in ((action.alias_table, "alias"), (action.virtual_table, "virtual"),
                           (action.userbase_table, "userbase")):
            if table:
                yield table, use
        relay = action.relay
        if relay is not None:
            for table, use in ((relay.host_table, "relay host"), (relay.domain_table, "relay domain"),
                               (relay.auth_table, "relay auth"), (relay.helo_src_table, "helo-src"),
                               (relay.src_table, "src")):
                if table:
                    yield table, use
    for rule in config.rules:
        for condition in rule.conditions:
            if condition.table:
                what = f"{condition.family} {condition.variant}".strip()
                yield condition.table, f"match {what}{' regex' if condition.regex else ''}"


# Uses that take a table's entries in turn (fetch), which a socketmap server cannot be asked for.
_FETCHED_USES = ("src", "relay host")


def _check_socketmap_uses(tables: Tables, config: Config) -> list[Diagnostic]:
    """A socketmap table only looks keys up: warn once per use that hands out entries in turn (relay `src`,
    `host`), where every question fails (a temporary failure, as with table-socketmap)."""
    diagnostics: list[Diagnostic] = []
    for name, use in dict.fromkeys(_all_uses(config)):
        if use not in _FETCHED_USES or name not in tables or name in tables.load_errors:
            continue
        if tables.backend(name).backend_name == "socketmap":
            decl = config.tables.get(name)
            location = decl.location if decl is not None else None
            text = (f'table "{name}" (socketmap) cannot hand out entries in turn; every use of it as {use} fails '
                    "(a temporary failure)")
            diagnostics.append(Diagnostic(text, location, Severity.WARNING if location else Severity.NOTE))
    return diagnostics


# Locked accounts, by passwd(5) convention: no warning for them, they are meant not to log in.
_LOCKED = ("*", "!")


def _check_passwd_table(decl: TableDecl | None, backend: PasswdFileTable, uses: list[str]) -> list[Diagnostic]:
    """A passwd table answers `auth` (credentials) and `userbase` (userinfo) only; check its entries for those
    uses, and warn once per other use (every lookup there is a temporary failure, as with table-passwd)."""
    diagnostics: list[Diagnostic] = []
    location = decl.location if decl is not None else None
    for use in uses:
        if use not in ("auth", "userbase"):
            text = (f'table "{backend.name}" (passwd) answers only auth and userbase lookups; every lookup of its '
                    f"use as {use} fails (a temporary failure)")
            diagnostics.append(Diagnostic(text, location, Severity.WARNING if location else Severity.NOTE))
    for entry in backend.entries():
        problems: list[str] = []
        if "auth" in uses and entry.password and not entry.password.startswith(_LOCKED):
            if entry.password.startswith("{"):
                problems.append(f"credentials for {entry.name}: the scheme {entry.password.partition('}')[0]}}} "
                                "is not supported (use a crypt hash, as `smtpctl encrypt` makes)")
            elif not _HASH_SHAPE.match(entry.password):
                problems.append(f"credentials for {entry.name}: the password field is not a password hash "
                                "(make one with `smtpctl encrypt`)")
        if "userbase" in uses:
            problem = entry.userinfo_problem()
            if problem is not None:
                problems.append(f"userinfo for {entry.name}: {problem} (needed by userbase)")
        diagnostics.extend(Diagnostic(text, Location(backend.path, entry.line), Severity.WARNING)
                           for text in problems)
    return diagnostics


def _entries(backend: object) -> Iterator[tuple[str, str]]:
    if isinstance(backend, _StaticTable):
        for key, value in backend.entries():
            yield backend.content.originals.get(key, key), value
    elif isinstance(backend, DbTable):
        yield from backend.entries()


def _line_numbers(path: str, keys: set[str]) -> dict[str, int]:
    """The line of each key in a table file (the last, since the last duplicate wins)."""
    found: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            for number, line in enumerate(handle, start=1):
                stripped = line.strip()
                if not stripped or stripped.startswith("#"):
                    continue
                key = re.split(r"[ \t:]", stripped, maxsplit=1)[0].lower()
                if key in keys:
                    found[key] = number
                elif stripped.lower() in keys:
                    found[stripped.lower()] = number
    except OSError:
        pass
    return found


def _report(decl: TableDecl | None, backend: object, problems: list[tuple[str, str]]) -> list[Diagnostic]:
    diagnostics: list[Diagnostic] = []
    if isinstance(backend, FileTable):
        lines = _line_numbers(backend.path, {key.lower() for key, _ in problems})
        for key, text in problems:
            line = lines.get(key.lower())
            location = Location(backend.path, line) if line else None
            diagnostics.append(Diagnostic(text if location else f"{backend.path}: {text}", location,
                                          Severity.WARNING if location else Severity.NOTE))
        return diagnostics
    where = getattr(backend, "path", None)
    location = decl.location if decl is not None and where is None else None
    for _key, text in problems:
        message = f"{where}: {text}" if where else f"table {getattr(backend, 'name', '?')}: {text}"
        diagnostics.append(Diagnostic(message, location, Severity.WARNING if location else Severity.NOTE))
    return diagnostics


def check_table_uses(tables: Tables) -> list[Diagnostic]:
    config = tables.config
    if config is None:
        return []
    diagnostics: list[Diagnostic] = _check_socketmap_uses(tables, config)
    passwd_uses: dict[str, list[str]] = {}
    for name, use in _all_uses(config):
        if name in tables and name not in tables.load_errors and isinstance(tables.backend(name), PasswdFileTable):
            if use not in passwd_uses.setdefault(name, []):
                passwd_uses[name].append(use)
    for name, uses in passwd_uses.items():
        backend = tables.backend(name)
        assert isinstance(backend, PasswdFileTable)
        diagnostics.extend(_check_passwd_table(config.tables.get(name), backend, uses))
    seen: set[tuple[str, str]] = set()
    for name, use, checker in _uses(config):
        if (name, use) in seen or name not in tables or name in tables.load_errors or name in passwd_uses:
            continue
        seen.add((name, use))
        backend = tables.backend(name)
        problems: list[tuple[str, str]] = []
        try:
            for key, value in _entries(backend):
                problem = checker(key, value)
                if problem is not None:
                    problems.append((key, problem))
        except TableError as error:
            problems.append(("", str(error)))
        diagnostics.extend(_report(config.tables.get(name), backend, problems))
    return diagnostics


def validate_config(config: Config) -> list[Diagnostic]:
    tables = Tables(config, strict=False)
    try:
        diagnostics: list[Diagnostic] = []
        for name, lines in tables.load_errors.items():
            decl = config.tables.get(name)
            if decl is not None and decl.backend in ("file", "static", "passwd"):
                continue  # the parser reported it at the table statement
            diagnostics.extend(Diagnostic(line, None, Severity.NOTE) for line in lines)
            source = decl.source if decl is not None else None
            shown = "(null)" if source is None else source  # C's printf of a missing path, never Python's None
            diagnostics.append(Diagnostic(f"invalid configuration file {shown} for table {name}",
                                          decl.location if decl is not None else None))
        for name in tables.names():  # tables loaded, and not checked in full (an SQL server not answering)
            diagnostics.extend(Diagnostic(warning, None, Severity.WARNING)
                               for warning in getattr(tables.backend(name), "load_warnings", ()))
        diagnostics.extend(tables.validate())
        return diagnostics
    finally:
        tables.close()
