"""db tables: the indexed on-disk format our `makemap` writes, read without loading the whole file.

The format is an SQLite 3 database (the stdlib's sqlite3), documented in docs/tables.md:

* ``PRAGMA application_id`` = 0x50595442 ("PYTB") and ``PRAGMA user_version`` = 1 identify it;
* ``meta(name TEXT PRIMARY KEY, value TEXT)`` holds ``format`` = ``pysmtpd-table``, ``type`` (``map``,
  ``aliases`` or ``set``), ``source`` (the file it was made from) and ``entries`` (the count);
* ``entries(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID`` holds one row per entry, keys
  lowercased; a set's entries have the value ``<set>``, as OpenSMTPD's makemap writes;
* ``scan(kind, key)`` lists the keys a match question has to try one by one: ``wild`` (contains `*`),
  ``net4`` and ``net6`` (CIDR blocks and other spellings an IPv4 / IPv6 address can match).

A key question is one B-tree look-up. A match question (domain, netaddr, mailaddr) looks up the keys that can
match literally, then tries only the keys its ``scan`` kind lists; a regex question streams every row in key
order (a regex can match anything).

The file is opened read-only. `makemap` replaces it by renaming a new file over it, so before each question we
check whether the path now names another file and reopen if so: the table follows `newaliases` at once, and a
question sees either the old file or the new one, never a mix. A path that names no file any more leaves the open
file answering.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from smtpd.config.model import TableShape
from smtpd.lookup.tables import matching
from smtpd.lookup.tables.base import MATCH_SERVICES, Service, TableError, TableLoadError

APPLICATION_ID = 0x50595442  # "PYTB"
FORMAT_NAME = "pysmtpd-table"
FORMAT_VERSION = 1
SET_VALUE = "<set>"
DB_TYPES = ("map", "aliases", "set")

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE scan (kind TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
"""
# Which keys a match question must try one by one, found by makemap once (see ``scan_kinds``).
SCAN_KINDS = ("wild", "net4", "net6")


def scan_kinds(key: str) -> list[str]:
    """wild: a glob (domain, mailaddr); net4/net6: entries an IPv4/IPv6 address can match other than literally."""
    kinds = []
    if "*" in key:
        kinds.append("wild")
    if matching.is_netaddr_pattern(key, ipv6=False):
        kinds.append("net4")
    if matching.is_netaddr_pattern(key, ipv6=True):
        kinds.append("net6")
    return kinds


def write_db(path: str, entries: Iterable[tuple[str, str]], db_type: str, source: str) -> int:
    """Write a new table database at path (which must not hold another database). Returns the entry count.

    The caller writes to a temporary name and renames it into place; this only builds the file and syncs it.
    """
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = OFF")  # a half-written temporary file is simply removed
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        connection.executescript(_SCHEMA)
        connection.execute("BEGIN")
        rows = sorted(entries)  # in key order the B-tree is built by appending
        connection.executemany("INSERT INTO entries (key, value) VALUES (?, ?)", rows)
        connection.executemany("INSERT INTO scan (kind, key) VALUES (?, ?)",
                               sorted((kind, key) for key, _ in rows for kind in scan_kinds(key)))
        meta = {"format": FORMAT_NAME, "type": db_type, "source": source, "entries": str(len(rows))}
        connection.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", meta.items())
        connection.execute("COMMIT")
    finally:
        connection.close()
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
    return len(rows)


def _strerror(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


# The magic numbers of Berkeley DB's hash and btree files (at byte 12, in the writer's byte order): what
# OpenSMTPD's makemap writes.
BERKELEY_MAGICS = {0x061561, 0x053162}


def _not_ours(path: str) -> str:
    """Why a db file cannot be read, saying what to do when it is one of OpenSMTPD's makemap."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        head = b""
    if len(head) == 16 and {int.from_bytes(head[12:16], order) for order in ("little", "big")} & BERKELEY_MAGICS:
        source = path[:-3] if path.endswith(".db") else path
        return (f"{path}: dbopen: a Berkeley DB file, as OpenSMTPD's makemap writes; ours are SQLite: "
                f"rebuild it from its source with our makemap (makemap {source}, with -t aliases or -t set as "
                "it was made)")
    return f"{path}: dbopen: not a table database made by makemap"


class DbReader:
    """One open database file, checked to be ours."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.identity = _identity(os.stat(path))
        except OSError as error:
            raise TableLoadError(f"{path}: dbopen: {_strerror(error)}") from None
        uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
        try:
            self.connection = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            application_id = self.connection.execute("PRAGMA application_id").fetchone()[0]
            row = self.connection.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            type_row = self.connection.execute("SELECT value FROM meta WHERE name = 'type'").fetchone()
        except sqlite3.Error:
            raise TableLoadError(_not_ours(path)) from None
        if application_id != APPLICATION_ID or row is None or row[0] != FORMAT_NAME:
            self.connection.close()
            raise TableLoadError(_not_ours(path))
        self.db_type = type_row[0] if type_row else "map"
        self.lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.connection.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def get_many(self, keys: list[str]) -> list[tuple[str, str]]:
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        with self.lock:
            return self.connection.execute(
                f"SELECT key, value FROM entries WHERE key IN ({marks}) ORDER BY key", keys).fetchall()

    def scan(self, where: str = "", parameters: tuple[str, ...] = (), batch: int = 512) -> Iterator[tuple[str, str]]:
        """Rows in key order, fetched in batches (never the whole file at once)."""
        last: str | None = None
        while True:
            clause = " AND ".join(part for part in (where, "key > ?" if last is not None else "") if part)
            query = "SELECT key, value FROM entries" + (f" WHERE {clause}" if clause else "")
            query += f" ORDER BY key LIMIT {batch}"
            arguments = parameters + ((last,) if last is not None else ())
            with self.lock:
                rows = self.connection.execute(query, arguments).fetchall()
            yield from rows
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def scan_kind(self, kind: str) -> list[tuple[str, str]]:
        """The entries makemap listed under a scan kind, in key order."""
        with self.lock:
            return self.connection.execute(
                "SELECT entries.key, entries.value FROM scan JOIN entries ON entries.key = scan.key "
                "WHERE scan.kind = ? ORDER BY scan.key", (kind,)).fetchall()

    def key_after(self, key: str | None) -> str | None:
        """The first key greater than key (the first key when key is None)."""
        with self.lock:
            if key is None:
                row = self.connection.execute("SELECT key FROM entries ORDER BY key LIMIT 1").fetchone()
            else:
                row = self.connection.execute(
                    "SELECT key FROM entries WHERE key > ? ORDER BY key LIMIT 1", (key,)).fetchone()
        return None if row is None else row[0]

    def count(self) -> int:
        with self.lock:
            return self.connection.execute("SELECT count(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        self.connection.close()


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    return (status.st_dev, status.st_ino, status.st_mtime_ns)


def _scan_kind(service: Service, candidate: str) -> str | None:
    """The ``scan`` kind a match question tries one by one ("" for every row, None for none)."""
    if service in (Service.DOMAIN, Service.MAILADDR):
        return "wild"
    if service is Service.NETADDR:
        return "net6" if ":" in candidate else "net4"
    if service is Service.REGEX:
        return ""
    return None


class DbTable:
    backend_name = "db"
    shape = TableShape.ANY

    def __init__(self, name: str, path: str, delimiter: str = "+") -> None:
        self.name = name
        self.path = path
        self.delimiter = delimiter
        self.reader = DbReader(path)
        self._next_key: str | None = None
        self._swap_lock = threading.Lock()

    def _current(self) -> DbReader:
        """The reader of the file the path names now (reopened if makemap replaced it)."""
        reader = self.reader
        try:
            identity = _identity(os.stat(self.path))
        except FileNotFoundError:
            # Removed (by hand, or by a script that deletes before it runs makemap): the open file still answers,
            # as OpenSMTPD's open handle does, until a new file takes the name; `update table` keeps it too.
            return reader
        except OSError as error:
            raise TableError(f"{self.path}: {_strerror(error)}") from None
        if identity != reader.identity:
            try:
                self.reload()
            except TableLoadError as error:
                raise TableError(str(error)) from None
        return self.reader

    def _matching_rows(self, service: Service, candidate: str, first_only: bool) -> list[tuple[str, str]]:
        reader = self._current()
        try:
            found = reader.get_many(matching.exact_keys(service, candidate, self.delimiter))
            if found and first_only:
                return found[:1]
            kind = _scan_kind(service, candidate)
            rows = reader.scan() if kind == "" else reader.scan_kind(kind) if kind else iter(())
            for key, value in rows:
                if matching.entry_matches(service, candidate, key, self.delimiter):
                    found.append((key, value))
                    if first_only:
                        break
        except sqlite3.Error as error:
            raise TableError(f"{self.path}: {error}") from None
        return found

    def lookup(self, service: Service, key: str) -> str | None:
        if service not in MATCH_SERVICES:
            try:
                return self._current().get(key)
            except sqlite3.Error as error:
                raise TableError(f"{self.path}: {error}") from None
        rows = self._matching_rows(service, key, first_only=False)
        return min(rows)[1] if rows else None

    def match(self, service: Service, candidate: str) -> bool:
        if service not in MATCH_SERVICES:
            return self.lookup(service, candidate) is not None
        return bool(self._matching_rows(service, candidate, first_only=True))

    def fetch(self, service: Service) -> str | None:
        """The next key after the last one fetched, wrapping around (round-robin, one row read)."""
        reader = self._current()
        with self._swap_lock:
            try:
                key = reader.key_after(self._next_key)
                if key is None and self._next_key is not None:
                    key = reader.key_after(None)
            except sqlite3.Error as error:
                raise TableError(f"{self.path}: {error}") from None
            self._next_key = key
        return key

    def reload(self) -> None:
        fresh = DbReader(self.path)  # raises and keeps the old reader on failure
        with self._swap_lock:
            # The old connection is not closed here: a question running in another thread may still be
            # using it; it closes when the last reference goes.
            self.reader = fresh

    def close(self) -> None:
        self.reader.close()

    def entries(self) -> Iterator[tuple[str, str]]:
        return self._current().scan()


def dump_db(path: str) -> Iterator[tuple[str, str]]:
    """Every entry of a database file, in key order (makemap -U)."""
    reader = DbReader(path)
    try:
        yield from reader.scan(batch=4096)
    finally:
        reader.close()
