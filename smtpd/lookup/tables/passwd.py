"""The system user database as a table (`<getpwnam>`, the default userbase).

It answers USERINFO questions only: `user` -> `UID:GID:/home/dir` (reference §5.2). Names are looked up as the
caller gives them, lowercased (as every table key is), so an account with capitals in its name is not found,
as in OpenSMTPD.
"""

from __future__ import annotations

import pwd

from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service


class GetpwnamTable:
    backend_name = "getpwnam"
    shape = TableShape.ANY

    def __init__(self, name: str = "getpwnam") -> None:
        self.name = name

    def lookup(self, service: Service, key: str) -> str | None:
        if service is not Service.USERINFO or not key or "\0" in key:
            return None
        try:
            entry = pwd.getpwnam(key)
        except KeyError:
            return None
        return f"{entry.pw_uid}:{entry.pw_gid}:{entry.pw_dir}"

    def match(self, service: Service, candidate: str) -> bool:
        return self.lookup(service, candidate) is not None

    def fetch(self, service: Service) -> str | None:
        return None

    def reload(self) -> None:
        """The system database is asked afresh every time: nothing to reload."""

    def close(self) -> None:
        """Nothing held open."""
