"""Checking AUTH credentials, off the event loop.

With a credentials table (`auth <creds>`), the user's entry is `HASH` or `name:HASH` (reference §5.2). Without
one, the system's passwords are checked: the hash comes from /etc/shadow (readable when the daemon runs as root),
else from the passwd entry; locked or empty entries never match. Hashes are checked by shared.passwords (bcrypt
and every crypt(3) scheme). A failure is answered after a random delay of up to one second, so timing tells
nothing (reference: 0-999999 microseconds).
"""

from __future__ import annotations

import asyncio
import pwd
import secrets
from enum import Enum
from typing import Any

from shared.passwords import dummy_verify, verify_password
from smtpd import trace
from smtpd.lookup.tables.base import Service, TableError

SHADOW = "/etc/shadow"


class AuthResult(Enum):
    OK = "ok"
    PERMFAIL = "permfail"
    TEMPFAIL = "tempfail"


def _stored_from_table(tables: Any, table: str, user: str) -> str | None:
    value = tables.lookup(table, Service.CREDENTIALS, user)
    if value is None:
        return None
    if len(value) <= 3:
        raise TableError(f"credentials of {user} in table {table} are too short")
    # `user name:HASH`: the hash follows the first ':' (crypt hashes hold none).
    return value.split(":", 1)[1] if ":" in value else value


def _stored_from_system(user: str) -> str | None:
    try:
        entry = pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: a NUL in the name (AUTH LOGIN's user name is any bytes)
        return None
    try:
        with open(SHADOW, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields = line.rstrip("\n").split(":")
                if fields and fields[0] == user and len(fields) > 1:
                    return fields[1]
    except OSError:
        pass
    return entry.pw_passwd


def _usable_hash(stored: str | None) -> bool:
    # "!" / "*" prefixes lock an account; an empty hash would accept an empty password: never over SMTP.
    return bool(stored) and stored[0] not in "!*" and stored != "x"


def check_credentials(tables: Any, table: str | None, user: str, password: str) -> AuthResult:
    """Synchronous check (run it in a thread)."""
    try:
        stored = _stored_from_table(tables, table, user) if table else _stored_from_system(user)
    except TableError:
        return AuthResult.TEMPFAIL
    if not _usable_hash(stored):
        dummy_verify(password)
        return AuthResult.PERMFAIL
    assert stored is not None
    return AuthResult.OK if verify_password(password, stored) else AuthResult.PERMFAIL


async def authenticate(tables: Any, table: str | None, user: str, password: str) -> AuthResult:
    result = await asyncio.to_thread(check_credentials, tables, table, user, password)
    if result is AuthResult.PERMFAIL:
        delay = secrets.randbelow(1_000_000)
        trace.emit("smtp", f"timing-attack protection triggered, will defer answer for {delay} microseconds",
                   delay=delay)
        await asyncio.sleep(delay / 1_000_000)
    return result
