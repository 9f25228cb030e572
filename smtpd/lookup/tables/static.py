"""In-memory tables: file tables (`table t file:/path` or a bare path) and inline tables (`{ a, b }`).

A file is read whole into a ``StaticContent`` snapshot, which is never changed afterwards: a reload parses the
file into a new snapshot and swaps one reference, so a lookup sees all of the old content or all of the new,
and a failed reload leaves the old snapshot in place.

File format (reference §5.1): lines are trimmed, blank lines skipped, lines starting with `#` are comments
(only whole lines: a `#` later in a line is data). The first data line decides the shape: with a space, a TAB
or a `:` the file is a mapping, otherwise a list; a comment `# @list` before it forces a list; an empty file
is a mapping. In a mapping the key runs to the first space, TAB or `:`, and the value starts after the run of
whitespace and `:`-followed-by-whitespace that follows. Keys are lowercased, values keep their case, and the
last of duplicate keys wins. An indented line after a value that ends with a comma continues that value, as in
the aliases files of Sendmail, Postfix and Exim (`staff: alice,` then `  bob, carol`); OpenSMTPD reads it as an
entry of its own, `bob,` for `carol`, and staff lost bob and carol without a word.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

from smtpd.config.model import TableDecl, TableShape
from smtpd.lookup.tables import matching
from smtpd.lookup.tables.base import MATCH_SERVICES, Service, TableLoadError

_WHITESPACE = " \t\n\v\f\r"
# Only these decide the shape (a VT or FF in the first line does not make a mapping, as in 6.8).
_SHAPE_SEPARATOR = re.compile(r"[ \t:]")
_KEY_END = re.compile(r"[ \t:]")
# After the key: whitespace, and colons that are followed by whitespace (`key: value`, `key : value`).
_VALUE_LEAD = re.compile(r"(?:[ \t\n\v\f\r]|:(?=[ \t\n\v\f\r]))*")


class StaticContent:
    """One immutable snapshot of a table's entries, with the indexes that match questions need."""

    def __init__(self, shape: TableShape, entries: dict[str, str], originals: dict[str, str] | None = None,
                 source: str | None = None) -> None:
        self.shape = shape
        self.entries = entries  # lowercased key -> value as written ("" for list entries)
        self.originals = originals or {}  # lowercased key -> key as written, where they differ
        self.source = source
        self._sorted: list[str] | None = None
        self._scan_lists: dict[tuple[Service, bool], list[str]] = {}
        self._globs: re.Pattern[str] | None = None
        self._networks: dict[bool, matching.NetworkIndex] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def sorted_keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.entries)
        return self._sorted

    def _scan_list(self, service: Service, candidate: str) -> list[str]:
        """The entries of this content that a match question must try one by one, in sorted order."""
        ipv6 = ":" in candidate
        cache_key = (service, ipv6 if service is Service.NETADDR else False)
        found = self._scan_lists.get(cache_key)
        if found is None:
            with self._lock:
                if service is Service.REGEX:
                    found = self.sorted_keys()
                else:
                    found = [key for key in self.sorted_keys() if matching.needs_scan(service, candidate, key)]
                self._scan_lists[cache_key] = found
        return found

    def _entry_text(self, service: Service, key: str) -> str:
        # Regex patterns are matched as written (OpenSMTPD lowercases them, breaking escapes such as \S).
        return self.originals.get(key, key) if service is Service.REGEX else key

    def matching_keys(self, service: Service, candidate: str, delimiter: str, first_only: bool) -> list[str]:
        found = [key for key in matching.exact_keys(service, candidate, delimiter) if key in self.entries]
        if found and first_only and service is not Service.REGEX:
            return found[:1]
        for key in self._scan_list(service, candidate):
            if matching.entry_matches(service, candidate, self._entry_text(service, key), delimiter):
                found.append(key)
                if first_only:
                    break
        return found

    def lookup(self, service: Service, key: str, delimiter: str = "+") -> str | None:
        if service not in MATCH_SERVICES:
            return self.entries.get(key)
        # The first matching entry in sorted key order answers (reference §5.1).
        keys = self.matching_keys(service, key, delimiter, first_only=False)
        return self.entries[min(keys)] if keys else None

    def match(self, service: Service, candidate: str, delimiter: str = "+") -> bool:
        if service not in MATCH_SERVICES:
            return candidate in self.entries
        if service is Service.DOMAIN:
            return candidate in self.entries or self._domain_globs().fullmatch(candidate) is not None
        if service is Service.NETADDR:
            return candidate in self.entries or self._netaddr_index(candidate).contains(candidate)
        return bool(self.matching_keys(service, candidate, delimiter, first_only=True))

    def _domain_globs(self) -> re.Pattern[str]:
        """Every wildcard entry as one alternation, so a miss costs one regex run, not one per entry."""
        if self._globs is None:
            patterns = [matching.glob_regex(key).pattern for key in self._scan_list(Service.DOMAIN, "")]
            self._globs = re.compile("|".join(f"(?:{p})" for p in patterns) or r"(?!)", re.IGNORECASE | re.DOTALL)
        return self._globs

    def _netaddr_index(self, candidate: str) -> matching.NetworkIndex:
        family = ":" in candidate
        index = self._networks.get(family)
        if index is None:
            index = matching.NetworkIndex(self._scan_list(Service.NETADDR, candidate))
            self._networks[family] = index
        return index


def _strerror(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def read_table_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except IsADirectoryError:
        raise TableLoadError(f"{path}: getline: Is a directory") from None
    except OSError as error:
        raise TableLoadError(f"{path}: fopen: {_strerror(error)}") from None
    return decode_table_text(data)


def decode_table_text(data: bytes) -> str:
    """A table file's bytes as text, without the UTF-8 byte order mark some editors write first: it is never
    part of the first entry (OpenSMTPD 6.8 keeps it, and that entry silently never matches)."""
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


class InvalidMapEntry(TableLoadError):
    """A mapping line with a key and no value; ``number`` is its line."""

    def __init__(self, path: str, number: int) -> None:
        super().__init__(f"{path}:{number}: invalid map entry line {number}")
        self.path = path
        self.number = number


def continues_value(raw: str) -> bool:
    """Whether a data line (as read, not trimmed) after a value ending with a comma continues it: it is
    indented (a line starting with a blank continues the one before in the aliases files of other MTAs)."""
    return raw[:1] in (" ", "\t")


def parse_table_text(text: str, path: str) -> StaticContent:
    """Parse a table file's text. Raises TableLoadError(`PATH:N: invalid map entry line N`)."""
    shape: TableShape | None = None
    entries: dict[str, str] = {}
    originals: dict[str, str] = {}
    previous: str | None = None  # the key of the last mapping entry, while its value ends with a comma
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(_WHITESPACE)
        if not line:
            continue
        if previous is not None and line[0] == "#":
            continue  # (a comment inside a continued value, as those aliases files allow)
        if previous is not None and continues_value(raw):
            entries[previous] += " " + line
            if not line.endswith(","):
                previous = None
            continue
        previous = None
        if line[0] == "#":
            if shape is None and line[1:].lstrip(_WHITESPACE) == "@list":
                shape = TableShape.LIST
            continue
        if shape is None:
            shape = TableShape.MAPPING if _SHAPE_SEPARATOR.search(line) else TableShape.LIST
        if shape is TableShape.LIST:
            key, value = line, ""
        else:
            separator = _KEY_END.search(line)
            value = ""
            if separator is not None:
                rest = line[separator.end():]
                value = rest[_VALUE_LEAD.match(rest).end():]  # type: ignore[union-attr]
            if not value:
                raise InvalidMapEntry(path, number)
            key = line[:separator.start()]  # type: ignore[union-attr]
        lowered = matching.ascii_lower(key)
        entries[lowered] = value
        if shape is TableShape.MAPPING and value.endswith(","):
            previous = lowered
        if lowered != key:
            originals[lowered] = key
        elif originals:
            originals.pop(lowered, None)
    return StaticContent(shape or TableShape.MAPPING, entries, originals, source=path)


def load_table_file(path: str) -> StaticContent:
    return parse_table_text(read_table_file(path), path)


def content_from_items(items: Iterable[str], shape: TableShape = TableShape.LIST) -> StaticContent:
    entries: dict[str, str] = {}
    originals: dict[str, str] = {}
    for item in items:
        entries[matching.ascii_lower(item)] = ""
        if matching.ascii_lower(item) != item:
            originals[matching.ascii_lower(item)] = item
    return StaticContent(shape, entries, originals)


def content_from_mapping(pairs: Iterable[tuple[str, str]]) -> StaticContent:
    entries: dict[str, str] = {}
    originals: dict[str, str] = {}
    for key, value in pairs:
        entries[matching.ascii_lower(key)] = value
        if matching.ascii_lower(key) != key:
            originals[matching.ascii_lower(key)] = key
    return StaticContent(TableShape.MAPPING, entries, originals)


class _StaticTable:
    """What file and inline tables share: answering from the current snapshot, and round-robin fetch."""

    backend_name = "static"

    def __init__(self, name: str, content: StaticContent, delimiter: str = "+") -> None:
        self.name = name
        self.delimiter = delimiter
        self.content = content
        self._next = 0
        self._fetch_lock = threading.Lock()

    @property
    def shape(self) -> TableShape:
        return self.content.shape

    def lookup(self, service: Service, key: str) -> str | None:
        return self.content.lookup(service, key, self.delimiter)

    def match(self, service: Service, candidate: str) -> bool:
        return self.content.match(service, candidate, self.delimiter)

    def fetch(self, service: Service) -> str | None:
        keys = self.content.sorted_keys()
        if not keys:
            return None
        with self._fetch_lock:
            index = self._next % len(keys)
            self._next = index + 1
        return self.content.originals.get(keys[index], keys[index])

    def reload(self) -> None:
        """Nothing to re-read by default (inline tables change only with the configuration)."""

    def close(self) -> None:
        """Nothing held open."""

    def entries(self) -> list[tuple[str, str]]:
        return [(key, self.content.entries[key]) for key in self.content.sorted_keys()]


class FileTable(_StaticTable):
    def __init__(self, name: str, path: str, delimiter: str = "+") -> None:
        self.path = path
        super().__init__(name, load_table_file(path), delimiter)

    def reload(self) -> None:
        fresh = load_table_file(self.path)  # raises and keeps the old snapshot on failure
        self.content = fresh
        self._next = 0


class InlineTable(_StaticTable):
    @classmethod
    def from_decl(cls, decl: TableDecl, delimiter: str = "+") -> InlineTable:
        if decl.mapping or decl.shape is TableShape.MAPPING:
            content = content_from_mapping(decl.mapping)
        else:
            content = content_from_items(decl.items)
        return cls(decl.name, content, delimiter)
