"""Sender Rewriting Scheme: how a relayed forward keeps SPF happy and its bounces reversible.

A forwarded message leaves with our domain in MAIL FROM, the original sender encoded in the local part:

    SRS0=HHHH=TT=orig.domain=orig.user@our.domain        (first forward)
    SRS1=HHHH=first.hop==HHHH=TT=orig.domain=orig.user@our.domain   (forwarding an SRS0 address again)

HHHH: the first 4 base64 characters of HMAC-SHA1(key, the lowercased text that follows); TT: the day number
modulo 1024 in two base32 characters. ``decode`` checks the hash (with the key or the backup key) and the age
(the `srs ttl`, 4 days by default), and gives back the address to bounce to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DAY = 86400
TIMESTAMP_CYCLE = 1024


def _hash(key: str, text: str) -> str:
    digest = hmac.new(key.encode(), text.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()[:4]


def _timestamp(now: float | None = None) -> str:
    day = int((time.time() if now is None else now) // DAY) % TIMESTAMP_CYCLE
    return BASE32[day >> 5] + BASE32[day & 31]


def _age_in_days(stamp: str, now: float | None = None) -> int | None:
    stamp = stamp.upper()
    if len(stamp) != 2 or any(char not in BASE32 for char in stamp):
        return None
    then = BASE32.index(stamp[0]) << 5 | BASE32.index(stamp[1])
    today = int((time.time() if now is None else now) // DAY) % TIMESTAMP_CYCLE
    return (today - then) % TIMESTAMP_CYCLE


def encode(sender: str, key: str, our_domain: str, now: float | None = None) -> str:
    """The SRS form of sender for relaying from our_domain. Addresses of our own domain stay as they are."""
    user, _, domain = sender.rpartition("@")
    if not user or not domain or domain.lower() == our_domain.lower():
        return sender
    if user[:5].upper() == "SRS0=":
        # Already rewritten by the previous hop: SRS1 names that hop and keeps its hash, stamp and address.
        rest = user[5:]
        text = f"{domain}=={rest}"
        return f"SRS1={_hash(key, text)}={text}@{our_domain}"
    if user[:5].upper() == "SRS1=":
        parts = user[5:].split("=", 2)
        if len(parts) == 3:
            first_hop, rest = parts[1], parts[2].lstrip("=")
            text = f"{first_hop}=={rest}"
            return f"SRS1={_hash(key, text)}={text}@{our_domain}"
    stamp = _timestamp(now)
    text = f"{stamp}={domain}={user}"
    return f"SRS0={_hash(key, stamp + domain + user)}={text}@{our_domain}"


def decode(address: str, keys: list[str], ttl: int, now: float | None = None) -> str | None:
    """The address an SRS address stands for (one hop back), or None if it is not a valid, fresh SRS address.

    keys: the key and the backup key; ttl in seconds."""
    user = address.rpartition("@")[0]
    prefix = user[:5].upper()
    if prefix == "SRS0=":
        parts = user[5:].split("=", 3)
        if len(parts) != 4:
            return None
        given, stamp, domain, local = parts
        age = _age_in_days(stamp, now)
        if age is None or age * DAY > ttl:
            return None
        if not any(hmac.compare_digest(given.lower(), _hash(key, stamp + domain + local).lower()) for key in keys):
            return None
        return f"{local}@{domain}"
    if prefix == "SRS1=":
        parts = user[5:].split("=", 2)
        if len(parts) != 3:
            return None
        given, first_hop, rest = parts[0], parts[1], parts[2].lstrip("=")
        text = f"{first_hop}=={rest}"
        if not any(hmac.compare_digest(given.lower(), _hash(key, text).lower()) for key in keys):
            return None
        return f"SRS0={rest}@{first_hop}"
    return None
