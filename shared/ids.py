"""Message, envelope and session ids as OpenSMTPD makes them.

msgid: a random nonzero 32-bit number, printed %08x. evpid: msgid in the upper 32 bits and a random nonzero
32-bit number in the lower half, printed %016x. Session ids: random 64-bit, printed %016x.
"""

from __future__ import annotations

import re
import secrets

MSGID_RE = re.compile(r"^[0-9a-fA-F]{8}$")
EVPID_RE = re.compile(r"^[0-9a-fA-F]{16}$")


def _nonzero_bits(bits: int) -> int:
    while True:
        value = secrets.randbits(bits)
        if value:
            return value


def new_msgid() -> int:
    return _nonzero_bits(32)


def new_evpid(msgid: int) -> int:
    return (msgid << 32) | _nonzero_bits(32)


def new_session_id() -> int:
    return _nonzero_bits(64)


def msgid_of(evpid: int) -> int:
    return evpid >> 32


def format_msgid(msgid: int) -> str:
    return f"{msgid:08x}"


def format_evpid(evpid: int) -> str:
    return f"{evpid:016x}"


def parse_msgid(text: str) -> int | None:
    """An 8-hex-digit nonzero msgid, or None."""
    if not MSGID_RE.match(text):
        return None
    value = int(text, 16)
    return value or None


def parse_evpid(text: str) -> int | None:
    """A 16-hex-digit nonzero evpid, or None."""
    if not EVPID_RE.match(text):
        return None
    value = int(text, 16)
    return value or None
