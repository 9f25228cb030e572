"""The one Protocol every table backend implements, and the lookup services (reference §5).

Callers never talk to a backend directly: they ask ``lookup.tables.Tables`` by table name, which emits
``lookup`` trace events and applies the case rules. A backend only answers questions about its own data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


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


class TableError(Exception):
    """A backend could not answer (unreadable file, broken database): a temporary failure."""


class TableBackend(Protocol):
    name: str

    def lookup(self, service: Service, key: str) -> str | None:
        """The value stored under key (already lowercased by the caller), or None. Raises TableError."""

    def match(self, service: Service, candidate: str) -> bool:
        """Whether any entry matches candidate by the service's match rule (glob, CIDR, mailaddr, regex)."""

    def fetch(self, service: Service) -> str | None:
        """The next entry, round-robin (relay `src` tables)."""

    def reload(self) -> None:
        """Re-read the source. Atomic: on failure the old content stays and TableError is raised."""
