"""Checking a user name and password (SMTP AUTH) against a credentials table or the system's passwords.

``authenticate`` is what the SMTP session calls. It never blocks the event loop: the table lookup and the
hash check (a quarter of a second for bcrypt at cost 12) run in a worker thread. An unknown user costs the
same time as a wrong password, so that the two cannot be told apart.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum

from shared.passwords import dummy_verify, verify_password
from smtpd.lookup.tables import values
from smtpd.lookup.tables.base import Service, TableError

SHADOW_FILE = "/etc/shadow"


class AuthResult(StrEnum):
    # The words of the maillog line `smtp authentication user=U result=ok|permfail|tempfail`.
    OK = "ok"
    PERMFAIL = "permfail"
    TEMPFAIL = "tempfail"


def system_password_hash(username: str, shadow_file: str = SHADOW_FILE) -> str | None:
    """The user's hash from the shadow file (readable by root only), or None if there is no such user."""
    with open(shadow_file, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            fields = line.rstrip("\n").split(":")
            if len(fields) >= 2 and fields[0] == username:
                return fields[1]
    return None


def check_credentials(tables: object, table_name: str | None, username: str, password: str | bytes) -> AuthResult:
    """Synchronous check; ``table_name`` None means the system user database."""
    try:
        if table_name is None:
            stored = system_password_hash(username)
        else:
            value = tables.lookup(table_name, Service.CREDENTIALS, username)  # type: ignore[attr-defined]
            stored = None if value is None else values.credentials(username.lower(), value).secret
    except (TableError, OSError, ValueError):
        return AuthResult.TEMPFAIL
    if stored is None:
        dummy_verify(password)
        return AuthResult.PERMFAIL
    return AuthResult.OK if verify_password(password, stored) else AuthResult.PERMFAIL


async def authenticate(tables: object, table_name: str | None, username: str,
                       password: str | bytes) -> AuthResult:
    """``check_credentials`` in a worker thread."""
    return await asyncio.to_thread(check_credentials, tables, table_name, username, password)
