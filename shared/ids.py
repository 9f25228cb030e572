"""Message, envelope and session ids as OpenSMTPD makes them.

msgid: a random nonzero 32-bit number, printed %08x. evpid: msgid in the upper 32 bits and a random nonzero
32-bit number in the lower half, printed %016x. Session ids: random 64-bit, printed %016x.
"""

from __future__ import annotations

import os
import re
import secrets

MSGID_RE = re.compile(r"^[0-9a-fA-F]{8}$")
EVPID_RE = re.compile(r"^[0-9a-fA-F]{16}$")


class _RandomPool:
    """Random bits from the kernel, fetched 4 KiB at a time: one getrandom(2) per ~1000 ids, not one per id (a
    system call per id also hands the GIL to other threads and waits to get it back)."""

    SIZE = 4096

    def __init__(self) -> None:
        self.data = b""
        self.offset = 0

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            self.data, self.offset = secrets.token_bytes(self.SIZE), 0
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def forget(self) -> None:
        self.data, self.offset = b"", 0


_POOL = _RandomPool()
# A forked child must not hand out the ids its parent will.
os.register_at_fork(after_in_child=_POOL.forget)


def _nonzero_bits(bits: int) -> int:
    while True:
        value = int.from_bytes(_POOL.take(bits // 8))
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
