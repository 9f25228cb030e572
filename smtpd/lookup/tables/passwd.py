"""The system user database as a table (`<getpwnam>`, the default userbase).

It answers USERINFO questions only: `user` -> `UID:GID:/home/dir` (reference §5.2). Names are looked up as the
caller gives them, lowercased (as every table key is), so an account with capitals in its name is not found,
as in OpenSMTPD.
"""

from __future__ import annotations

import functools
import os
import pwd
import time

from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service


class GetpwnamTable:
    backend_name = "getpwnam"
    shape = TableShape.ANY

    ANSWER_SECONDS = 1.0

    def __init__(self, name: str = "getpwnam") -> None:
        self.name = name
        # Accounts found, for ANSWER_SECONDS: a message is looked up at RCPT and again at delivery, a burst of
        # mail for one user many times (getpwnam reads and parses /etc/passwd each time: about 20 µs). A user
        # not found is asked again every time, so a new account receives mail at once.
        self._found: dict[str, tuple[float, str]] = {}

    def lookup(self, service: Service, key: str) -> str | None:
        if service is not Service.USERINFO or not key or "\0" in key:
            return None
        now = time.monotonic()
        known = self._found.get(key)
        if known is not None and now - known[0] < self.ANSWER_SECONDS:
            return known[1]
        try:
            entry = pwd.getpwnam(key)
        except KeyError:
            self._found.pop(key, None)
            return None
        answer = f"{entry.pw_uid}:{entry.pw_gid}:{entry.pw_dir}"
        if len(self._found) > 10_000:
            self._found.clear()
        self._found[key] = (now, answer)
        return answer

    def match(self, service: Service, candidate: str) -> bool:
        return self.lookup(service, candidate) is not None

    def fetch(self, service: Service) -> str | None:
        return None

    def reload(self) -> None:
        """Forget the accounts found (the system database itself is asked afresh after a second anyway)."""
        self._found.clear()

    def close(self) -> None:
        """Nothing held open."""


NSSWITCH = "/etc/nsswitch.conf"
# Sources of the user database that answer from this machine (a file, or systemd's local lookup service).
_LOCAL_SOURCES = frozenset({"files", "compat", "systemd"})


def system_users_are_local(nsswitch: str = NSSWITCH) -> bool:
    """Whether getpwnam() answers from this machine only (nsswitch.conf's passwd sources are files, compat or
    systemd), so that a lookup takes microseconds and cannot wait on a network server (LDAP, NIS, sss). The
    SMTP session then expands local recipients on the event loop (smtpd/lookup/tables/__init__.py).
    SMTPD_EXPAND_IN_THREAD=1 asks for the worker thread all the same (home directories on a slow network
    filesystem: ~/.forward is read during the expansion)."""
    if os.environ.get("SMTPD_EXPAND_IN_THREAD") == "1":
        return False
    return _passwd_sources_are_local(nsswitch)


@functools.cache
def _passwd_sources_are_local(nsswitch: str) -> bool:
    try:
        with open(nsswitch, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return True  # the C library's default: files
    except OSError:
        return False
    for line in lines:
        database, colon, sources = line.partition("#")[0].partition(":")
        if colon and database.strip() == "passwd":
            names = {word for word in sources.split() if not word.startswith("[") and not word.endswith("]")}
            return bool(names) and names <= _LOCAL_SOURCES
    return True
