"""What a looked-up value means, per use (reference §5.2).

Backends store text; these functions turn one value into what its user needs, and raise ``ValueError`` (with
a message naming the problem, never the secret) when it is malformed. OpenSMTPD treats a malformed value as a
temporary failure of the lookup; callers do the same.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from smtpd.lookup.items import Item, ItemError, parse_items
from smtpd.lookup.tables import matching
from smtpd.lookup.userinfo import UserInfo, UserInfoError, parse_userinfo

LINE_MAX = 2048  # OpenSMTPD's limit for a credentials value


def aliases(value: str) -> list[Item]:
    """An alias or virtual value: its expansion items (§6.1). Raises ValueError on an invalid item."""
    try:
        return parse_items(value)
    except ItemError as error:
        raise ValueError(str(error)) from None


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str  # a password hash (listener auth) or a plaintext password (relay auth)

    def __repr__(self) -> str:  # never show the secret in logs or tracebacks
        return f"Credentials(username={self.username!r}, secret=<hidden>)"


def credentials(key: str, value: str) -> Credentials:
    """A listener credentials value: `HASH` (the user name is the key) or `name:HASH`."""
    if len(value) < 3 or len(value) >= LINE_MAX:
        raise ValueError(f"invalid credentials for {key}: the value is too short or too long")
    name, colon, secret = value.partition(":")
    if not colon:
        return Credentials(key, value)
    if not name or not secret:
        raise ValueError(f"invalid credentials for {key}: empty user name or hash")
    return Credentials(name, secret)


def relay_secret(label: str, value: str) -> Credentials:
    """A relay `auth` table value: `username:password`, in plain text; both parts required."""
    name, colon, password = value.partition(":")
    if not colon or not name or not password:
        raise ValueError(f"invalid relay secret for label {label}: expected username:password")
    return Credentials(name, password)


def userinfo(username: str, value: str) -> UserInfo:
    """A userbase value: `UID:GID:/home/dir`."""
    try:
        return parse_userinfo(username, value)
    except UserInfoError as error:
        raise ValueError(str(error)) from None


def ip_address(text: str) -> str:
    """An address (source tables, addrname keys) in its canonical text; accepts `ipv6:` and `[...]`."""
    candidate = text.strip()
    if candidate[:5].lower() == "ipv6:":
        candidate = candidate[5:]
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
        if candidate[:5].lower() == "ipv6:":
            candidate = candidate[5:]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        raise ValueError(f"invalid address: {text}") from None


def addrname(key: str, value: str) -> tuple[str, str]:
    """A hostnames/helo-src entry: `ADDRESS  NAME` -> (address, name)."""
    name = value.strip()
    if not name:
        raise ValueError(f"invalid addrname entry for {key}: empty name")
    return ip_address(key), name


def source(value: str) -> str:
    """A relay `src` table entry: an address."""
    return ip_address(value)


def mailaddr_list(value: str) -> list[str]:
    """A senders (mailaddrmap) value: comma-separated mailaddr patterns (`user`, `@domain`, `user@domain`)."""
    patterns = [part.strip().lower() for part in value.split(",")]
    return [pattern for pattern in patterns if pattern]


def mailaddrmap_allows(value: str, sender: str, delimiter: str = "+") -> bool:
    """Whether a senders value lets its key use sender as MAIL FROM."""
    return any(matching.mailaddr_match(sender.lower(), pattern, delimiter) for pattern in mailaddr_list(value))


def relayhost(value: str) -> str:
    """A relay domain map value: a relay URL such as `smtp+tls://label@mx.example.net`."""
    url = value.strip()
    if not url:
        raise ValueError("empty relay host")
    return url
