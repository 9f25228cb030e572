"""The one Protocol every table backend implements, and the lookup services (reference §5).

Callers never talk to a backend directly: they ask ``lookup.tables.Tables`` by table name, which emits
``lookup`` trace events and applies the case rules. A backend only answers questions about its own data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from smtpd.config.model import TableShape


class Service(StrEnum):
    ALIAS = "ALIAS"
    DOMAIN = "DOMAIN"
    CREDENTIALS = "CREDENTIALS"
    NETADDR = "NETADDR"
    USERINFO = "USERINFO"
    SOURCE = "SOURCE"
    MAILADDR = "MAILADDR"
    ADDRNAME = "ADDRNAME"
    MAILADDRMAP = "MAILADDRMAP"
    RELAYHOST = "RELAYHOST"
    STRING = "STRING"
    REGEX = "REGEX"


# Services whose questions are answered by a match function over the entries rather than by one key
# (reference §5.1): the first matching entry in sorted key order wins.
MATCH_SERVICES = frozenset({Service.DOMAIN, Service.NETADDR, Service.MAILADDR, Service.REGEX})


class TableError(Exception):
    """A backend could not answer (unreadable file, broken database): a temporary failure."""


class TableLoadError(TableError):
    """A table's source could not be (re)loaded. ``lines`` are the messages to show, one per line,
    ``FILE:LINE: message`` where a line is known."""

    def __init__(self, *lines: str) -> None:
        super().__init__("; ".join(lines) if lines else "table load failed")
        self.lines = list(lines)


class TableBackend(Protocol):
    name: str
    # How traces name the backend: "static" (file and inline tables), "db", "getpwnam" (OpenSMTPD's names), and
    # "passwd" (OpenSMTPD runs it as an external program and says "proc").
    backend_name: str
    # list, mapping, or any (db, getpwnam: they answer both kinds of question).
    shape: TableShape

    def lookup(self, service: Service, key: str) -> str | None:
        """The value stored under key (already lowercased by the caller), or None. Raises TableError."""

    def match(self, service: Service, candidate: str) -> bool:
        """Whether any entry matches candidate by the service's match rule (glob, CIDR, mailaddr, regex)."""

    def fetch(self, service: Service) -> str | None:
        """The next entry, round-robin (relay `src` tables)."""

    def reload(self) -> None:
        """Re-read the source. Atomic: on failure the old content stays and TableLoadError is raised."""

    def close(self) -> None:
        """Release files and connections."""
