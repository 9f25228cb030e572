"""The match functions of the lookup services (reference §5.1), shared by every backend.

In each function ``candidate`` comes from the session (a domain, an address, a client IP) and ``entry`` from
the table. Both are already lowercased (A-Z only, ``ascii_lower``) by the caller, except regex patterns,
which keep their case.

A backend answers a match question in two steps, so that it never has to try every entry of a big table:
``exact_keys`` lists the only entry texts that can match without a wildcard, CIDR or regex (one indexed
look-up each), and ``needs_scan`` says which other entries are worth trying with ``entry_matches``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string

from smtpd.lookup.tables.base import Service

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    """Lowercase A-Z only, as OpenSMTPD's C-locale tolower does. ``str.lower`` also folds Unicode letters into
    ASCII ones (the KELVIN SIGN U+212A becomes `k`), which would let an SMTPUTF8 domain equal an ASCII entry."""
    return text.translate(_ASCII_LOWER)


# -- DOMAIN ------------------------------------------------------------------------------------------------
def hostname_match(hostname: str, pattern: str) -> bool:
    """OpenSMTPD's glob: case-insensitive; a `*` skips candidate characters up to the next pattern character.

    It does not backtrack: `*.example.org` matches `www.example.org` but not `a.b.example.org` (the `*` stops
    at the first dot), exactly as OpenSMTPD 6.8 matches. A lone `*` matches everything.
    """
    if "*" not in pattern:
        return ascii_lower(hostname) == ascii_lower(pattern)
    return glob_regex(pattern).fullmatch(hostname) is not None


@functools.lru_cache(maxsize=65536)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regex equivalent of ``hostname_match`` for one pattern.

    The C loop turns `*c` into "skip everything up to the first c", which is `[^c]*c`; a trailing `*` eats the
    rest but at least one character; consecutive stars count as one.
    """
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char != "*":
            parts.append(re.escape(char))
            index += 1
            continue
        while index < len(pattern) and pattern[index] == "*":
            index += 1
        if index == len(pattern):
            # The C loop only reaches a trailing star while characters remain, so it needs at least one.
            parts.append(".+")
        else:
            following = pattern[index]
            parts.append(f"[^{re.escape(following.lower())}{re.escape(following.upper())}]*")
    return re.compile("".join(parts), re.IGNORECASE | re.ASCII | re.DOTALL)


# -- NETADDR -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def parse_netaddr(text: str) -> IpNetwork | None:
    """A table entry or session address as a network: `1.2.3.4`, `10.0.0.0/8`, `::1`, `ipv6:::1`, `[::1]/64`."""
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    candidates = [text]
    if text.startswith("["):
        close = text.find("]")
        if close > 0:
            candidates.append(text[1:close] + text[close + 1:])
    for candidate in candidates:
        try:
            return ipaddress.ip_network(candidate, strict=False)
        except ValueError:
            continue
    return None


def netaddr_match(candidate: str, entry: str) -> bool:
    if candidate == entry:
        return True
    address = parse_netaddr(candidate)
    network = parse_netaddr(entry)
    if address is None or network is None or address.version != network.version:
        return False
    # The candidate is normally one address; OpenSMTPD compares its first address under the entry's mask.
    return address.network_address in network


class NetworkIndex:
    """Networks grouped by prefix length: a containment question costs one set look-up per length."""

    def __init__(self, entries: list[str]) -> None:
        self.by_length: dict[tuple[int, int], set[int]] = {}
        for entry in entries:
            network = parse_netaddr(entry)
            if network is not None:
                self.by_length.setdefault((network.version, network.prefixlen), set()).add(
                    int(network.network_address))

    def contains(self, candidate: str) -> bool:
        address = parse_netaddr(candidate)
        if address is None:
            return False
        value = int(address.network_address)
        width = address.max_prefixlen
        for (version, length), networks in self.by_length.items():
            if version == address.version:
                mask = ((1 << length) - 1) << (width - length) if length else 0
                if value & mask in networks:
                    return True
        return False


# -- MAILADDR ----------------------------------------------------------------------------------------------
def split_mailaddr(text: str) -> tuple[str, str]:
    """`user@domain` -> (user, domain); `@domain` -> ("", domain); `user` and `user@` -> (user, "")."""
    user, at, domain = text.rpartition("@")
    if not at:
        return text, ""
    return user, domain


def strip_subaddress(user: str, delimiter: str) -> str:
    if not delimiter:
        return user
    return user.split(delimiter[0], 1)[0]


def mailaddr_match(candidate: str, entry: str, delimiter: str = "+") -> bool:
    entry_user, entry_domain = split_mailaddr(entry)
    if not entry_user and not entry_domain:
        return True  # `@` or an empty entry: everything
    user, domain = split_mailaddr(candidate)
    if entry_domain and not hostname_match(domain, entry_domain):
        return False
    if entry_user:
        # An entry without a sub-address matches every sub-address of its user.
        if not delimiter or delimiter[0] not in entry_user:
            user = strip_subaddress(user, delimiter)
        if ascii_lower(user) != ascii_lower(entry_user):
            return False
    return True


# -- REGEX -------------------------------------------------------------------------------------------------
_POSIX_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r" \t\n\r\f\v", "blank": r" \t", "punct": r"!-/:-@\[-`{-~", "xdigit": "0-9A-Fa-f",
    "cntrl": r"\x00-\x1f\x7f", "print": r"\x20-\x7e", "graph": r"\x21-\x7e", "word": r"\w",
}
_POSIX_CLASS_RE = re.compile(r"\[:([a-z]+):\]")


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> re.Pattern[str] | None:
    """A POSIX extended regex as a Python one (None if it does not compile).

    Matching is case-insensitive: OpenSMTPD lowercases both the pattern and the string, which makes letters
    match either case (and, as a side effect, turns `\\S` into `\\s`; we keep escapes as written). A leading
    `(?i)` is accepted, as OpenSMTPD accepts it. Bracket classes such as `[[:digit:]]` are translated.
    """
    if pattern.startswith("(?i)"):
        pattern = pattern[4:]
    translated = _POSIX_CLASS_RE.sub(lambda m: _POSIX_CLASSES.get(m.group(1), m.group(0)), pattern)
    try:
        return re.compile(translated, re.IGNORECASE | re.ASCII)
    except (re.error, RecursionError, OverflowError):
        return None


def regex_error(pattern: str) -> str | None:
    """Why a regex pattern does not compile, or None."""
    if compile_regex(pattern) is not None:
        return None
    body = pattern[4:] if pattern.startswith("(?i)") else pattern
    try:
        re.compile(_POSIX_CLASS_RE.sub(lambda m: _POSIX_CLASSES.get(m.group(1), m.group(0)), body))
    except re.error as error:
        return str(error)
    return "invalid regular expression"


def regex_match(candidate: str, pattern: str) -> bool:
    compiled = compile_regex(pattern)
    return compiled is not None and compiled.search(candidate) is not None


# -- dispatch ----------------------------------------------------------------------------------------------
def entry_matches(service: Service, candidate: str, entry: str, delimiter: str = "+") -> bool:
    """Whether one table entry matches candidate under the service's rule (exact for the other services)."""
    if service is Service.DOMAIN:
        return hostname_match(candidate, entry)
    if service is Service.NETADDR:
        return netaddr_match(candidate, entry)
    if service is Service.MAILADDR:
        return mailaddr_match(candidate, entry, delimiter)
    if service is Service.REGEX:
        return regex_match(candidate, entry)
    return candidate == entry


def exact_keys(service: Service, candidate: str, delimiter: str = "+") -> list[str]:
    """The entry texts that match candidate literally: every match that needs no wildcard, CIDR or regex."""
    if service is Service.REGEX:
        return []
    if service is not Service.MAILADDR:
        return [candidate]
    user, domain = split_mailaddr(candidate)
    stripped = strip_subaddress(user, delimiter)
    # `user@` (a user at any domain) is an entry of its own shape: a user with an empty domain.
    keys = ["", "@", user, stripped, f"{user}@", f"{stripped}@"]
    if domain:
        keys += [f"@{domain}", f"{user}@{domain}", f"{stripped}@{domain}"]
    return list(dict.fromkeys(keys))


def needs_scan(service: Service, candidate: str, entry: str) -> bool:
    """Whether an entry could match candidate other than literally (so it must be tried one by one)."""
    if service is Service.REGEX:
        return True
    if service in (Service.DOMAIN, Service.MAILADDR):
        return "*" in entry
    if service is Service.NETADDR:
        return is_netaddr_pattern(entry, ipv6=":" in candidate)
    return False


def is_netaddr_pattern(entry: str, ipv6: bool = True) -> bool:
    """Entries that can match an address they do not spell out: CIDR blocks, the `ipv6:`/`[...]` forms and,
    for an IPv6 candidate, any IPv6 entry (the same address has many spellings)."""
    if "/" in entry or "[" in entry or entry[:5].lower() == "ipv6:":
        return True
    return ipv6 and ":" in entry
