"""The envelope: one recipient of one message, everything the queue keeps about it (reference §8.3).

The on-disk format (versioned text) lives in the queue package; this module only holds the shape that the
SMTP session, expansion, scheduler, MDA and MTA pass between them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntFlag, StrEnum


class EnvelopeType(StrEnum):
    MDA = "mda"
    MTA = "mta"
    BOUNCE = "bounce"


class DsnNotify(IntFlag):
    NONE = 0
    SUCCESS = 1
    FAILURE = 2
    DELAY = 4
    NEVER = 8


# The envelope whose success stands for its recipient's: that address was expanded to several targets, and its
# sender asked NOTIFY=SUCCESS (one `expanded` report for the address, none per target: smtpd/bounce.py).
EXPANDED_FLAG = "dsn-expanded"

_FLAG_SETS: dict[frozenset[str], frozenset[str]] = {}
_FLAG_SETS_KEPT = 64  # (there are five flags; an envelope file could hold any words)


def shared_flags(names: Iterable[str]) -> frozenset[str]:
    """The flags as one frozenset shared by every envelope that has the same ones."""
    flags = frozenset(names)
    if len(_FLAG_SETS) >= _FLAG_SETS_KEPT:
        return _FLAG_SETS.get(flags, flags)
    return _FLAG_SETS.setdefault(flags, flags)


# slots: a queue of 50,000 envelopes lives in the scheduler's memory; without them each instance carries a
# full dict (31 fields is more than Python shares keys for), about 1.2 KB.
@dataclass(slots=True)
class Envelope:
    evpid: int = 0
    dispatcher: str = ""  # the action's name
    type: EnvelopeType = EnvelopeType.MDA
    tag: str = ""
    smtpname: str = ""
    helo: str = ""
    hostname: str = ""  # the client's reverse name
    username: str = ""  # the authenticated user
    errorline: str = ""
    sockaddr: str = ""  # "local", "1.2.3.4", "[::1]"
    sender: str = ""  # "" is the null sender
    rcpt: str = ""  # as given at RCPT TO
    dest: str = ""  # after expansion
    ctime: int = 0
    last_try: int = 0
    last_bounce: int = 0
    ttl: int = 0
    retry: int = 0
    # authenticated, bounce, internal, suspend, hold. Frozen, so that envelopes share their sets: an empty set()
    # each cost 216 bytes (11 MB of a queue of 50,000), and a copy of an envelope could not change its original's.
    flags: frozenset[str] = frozenset()
    dsn_notify: DsnNotify = DsnNotify.NONE
    dsn_ret: str = ""  # "", FULL, HDRS
    dsn_envid: str = ""
    dsn_orcpt: str = ""
    esc_class: int = 0
    esc_code: int = 0
    mda_exec: str = ""  # a |command or /file from an alias or .forward
    mda_subaddress: str = ""
    mda_user: str = ""
    bounce_ttl: int = 0
    bounce_delay: int = 0
    bounce_type: str = ""  # failed | delayed | delivered | relayed
    # Written at commit so that a folder found in incoming/ after a crash can be checked for completeness:
    # the message's size and CRC-32, and how many envelopes the commit had.
    commit_size: int = 0
    commit_crc32: int = 0
    commit_envelopes: int = 0

    @property
    def msgid(self) -> int:
        return self.evpid >> 32
