"""RFC 5321 paths and the MAIL/RCPT parameters, with OpenSMTPD's rules (reference §7.5).

A path is `<local@domain>`. Quoted local parts and a second `@` are refused as syntax errors, as OpenSMTPD
does: they are classic relay tricks, and a server that never parses them cannot be fooled by them. A source
route (`<@a,@b:user@dom>`) is dropped, as RFC 5321 asks and OpenSMTPD does: what is left is an ordinary
address, matched against the rules like any other. The local part is dot-atoms of letters, digits and ``!#$%&'*/?^`{|}~+-=_``
(so backticks, `$` and `|` are legal: envelope data never reaches a shell anywhere in this program). With
SMTPUTF8 the local part and the domain may also hold UTF-8 characters (RFC 6531).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from shared.numbers import ascii_digits
from smtpd.lookup.tables.matching import ascii_lower, mailaddr_match

MAX_PART = 255  # local part, domain, and the whole address (reference §10)
MAX_ENVID = 100
MAX_HOST_NAME = 253  # a host name fits DNS's 255 octets (res_hnok, as OpenSMTPD checks names)

_ATOM_CHARS = "!#$%&'*/?^`{|}~+-=_"
_ATOM_RE = re.compile(r"[A-Za-z0-9" + re.escape(_ATOM_CHARS) + r"]+")
# Non-ASCII: any character but the surrogates, which stand for bytes that are not UTF-8 (the session decodes with
# surrogateescape): RFC 6531 allows UTF-8 only, and such an address in the queue broke `smtpctl show queue`.
_NON_ASCII = r"\u0080-\ud7ff\ue000-\U0010ffff"
_ATOM_UTF8_RE = re.compile(r"[A-Za-z0-9" + re.escape(_ATOM_CHARS) + _NON_ASCII + r"]+")
_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
_LABEL_UTF8_RE = re.compile(r"[A-Za-z0-9_\-" + _NON_ASCII + r"]{1,63}")


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class Mailaddr:
    user: str
    domain: str

    def __str__(self) -> str:
        return f"{self.user}@{self.domain}" if self.user or self.domain else ""

    @property
    def is_null(self) -> bool:
        return not self.user and not self.domain


NULL_SENDER = Mailaddr("", "")


def valid_local_part(local: str, utf8: bool = False) -> bool:
    if not local or len(local) > MAX_PART:
        return False
    pattern = _ATOM_UTF8_RE if utf8 else _ATOM_RE
    return all(pattern.fullmatch(atom) for atom in local.split("."))


def valid_domain(domain: str, utf8: bool = False) -> bool:
    """res_hnok-style host names (no trailing dot, no empty label, no leading '-'), or an address literal."""
    if not domain or len(domain) > MAX_PART:
        return False
    if domain.startswith("["):
        return valid_address_literal(domain)
    if domain.startswith("-") or len(domain) > MAX_HOST_NAME:
        return False
    pattern = _LABEL_UTF8_RE if utf8 else _LABEL_RE
    return all(pattern.fullmatch(label) for label in domain.split("."))


def valid_address_literal(literal: str) -> bool:
    if not literal.endswith("]"):
        return False
    inner = literal[1:-1]
    if "%" in inner:  # a zone (`fe80::1%eth0`), which Python's parser takes: no address literal has one (RFC 5321)
        return False
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def split_path(argument: str) -> tuple[str, str]:
    """Split `<addr> PARAMS` into the text inside the brackets and the parameter text. Raises AddressError."""
    argument = argument.lstrip(" ")
    if not argument.startswith("<"):
        raise AddressError("path must be in <...>")
    end = argument.find(">")
    if end < 0:
        raise AddressError("unterminated path")
    # Text glued to the closing bracket (`<a@b>x`) is a parameter like any other, as OpenSMTPD reads it: it is
    # refused as `Unsupported option x`.
    inner, rest = argument[1:end], argument[end + 1:]
    return inner, rest.strip(" ")


def parse_path_address(inner: str, *, allow_null: bool, default_domain: str, utf8: bool = False) -> Mailaddr:
    """The address inside `<...>`; empty is the null sender where allowed. A missing domain gets
    ``default_domain`` (the server name), as OpenSMTPD fills it in."""
    if inner == "":
        if not allow_null:
            raise AddressError("empty path")
        return NULL_SENDER
    return parse_mailaddr(inner, default_domain=default_domain, utf8=utf8)


def parse_mailaddr(text: str, *, default_domain: str, utf8: bool = False) -> Mailaddr:
    if len(text) > MAX_PART:
        raise AddressError("address too long")
    if text.startswith("@"):
        text = _strip_source_route(text)
    if '"' in text or "\\" in text:
        raise AddressError("quoted local parts are not supported")
    local, at, domain = text.partition("@")
    if not at:
        domain = default_domain
    if not valid_local_part(local, utf8):
        raise AddressError(f"invalid local part: {local!r}")
    if not valid_domain(domain, utf8):
        raise AddressError(f"invalid domain: {domain!r}")
    return Mailaddr(local, domain)


def _strip_source_route(text: str) -> str:
    """`@a,@b:user@dom` -> `user@dom`: RFC 5321 §C says a server ignores the route, as OpenSMTPD does."""
    route, colon, rest = text.partition(":")
    if not colon or not all(hop.startswith("@") and valid_domain(hop[1:]) for hop in route.split(",")):
        raise AddressError("invalid source route")
    return rest


def valid_helo(name: str) -> bool:
    """HELO/EHLO argument: a host name or an address literal (OpenSMTPD accepts any res_hnok-ish name)."""
    return valid_domain(name, utf8=False)


# -- parameters ---------------------------------------------------------------------------------------------------
@dataclass
class MailParameters:
    body: str = ""  # "", 7BIT, 8BITMIME
    ret: str = ""  # "", FULL, HDRS
    envid: str = ""
    smtputf8: bool = False
    size: int | None = None
    auth: str = ""


@dataclass
class RcptParameters:
    notify: set[str] = field(default_factory=set)
    orcpt: str = ""


class ParameterError(ValueError):
    """A parameter problem; ``kind`` picks the reply (unsupported, too-large, never-combined, orcpt)."""

    def __init__(self, kind: str, value: str) -> None:
        super().__init__(f"{kind}: {value}")
        self.kind = kind
        self.value = value


def parse_mail_parameters(text: str, *, dsn: bool, smtputf8_offered: bool) -> MailParameters:
    parameters = MailParameters()
    for word in text.split(" "):
        if not word:
            continue
        name, equals, value = word.partition("=")
        upper = name.upper()
        if upper == "AUTH" and equals:
            parameters.auth = value
        elif upper == "SIZE" and equals:
            # Accepted and ignored, whatever its value, as the reference does (the limit is enforced at the end
            # of the data); a value of ASCII digits is kept.
            parameters.size = int(value) if ascii_digits(value) else None
        elif upper == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
            parameters.body = value.upper()
        elif upper == "RET" and dsn and equals:
            if value.upper() in ("FULL", "HDRS"):
                parameters.ret = value.upper()
            # other RET values are silently ignored, as the reference does
        elif upper == "ENVID" and dsn and equals:
            if len(value) > MAX_ENVID:
                raise ParameterError("too-large", value)
            parameters.envid = value
        elif upper == "SMTPUTF8" and not equals and smtputf8_offered:
            parameters.smtputf8 = True
        else:
            raise ParameterError("unsupported", word)
    return parameters


def asks_smtputf8(text: str) -> bool:
    """Whether MAIL's parameter text holds the SMTPUTF8 keyword (the one parameter the address depends on)."""
    return any(word.upper() == "SMTPUTF8" for word in text.split(" "))


NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY", "NEVER")


def parse_rcpt_parameters(text: str, *, dsn: bool, utf8: bool, default_domain: str) -> RcptParameters:
    parameters = RcptParameters()
    for word in text.split(" "):
        if not word:
            continue
        name, equals, value = word.partition("=")
        upper = name.upper()
        if upper == "NOTIFY" and dsn and equals:
            words = {item.upper() for item in value.split(",")}
            parameters.notify = {item for item in words if item in NOTIFY_WORDS}  # unknown words ignored
            if "NEVER" in parameters.notify and len(parameters.notify) > 1:
                raise ParameterError("never-combined", value)
        elif upper == "ORCPT" and dsn and equals:
            address = value
            if address[:7].lower() == "rfc822;":
                address = address[7:]
            if not utf8 and not address.isascii():  # UTF-8 is for SMTPUTF8 transactions only, as in the address
                raise ParameterError("orcpt", value)
            try:
                parse_mailaddr(xtext_decode(address), default_domain=default_domain, utf8=True)
            except (AddressError, ValueError):
                raise ParameterError("orcpt", value) from None
            parameters.orcpt = address
        else:
            raise ParameterError("unsupported", word)
    return parameters


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext: `+XX` is a hex-encoded byte."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda match: chr(int(match.group(1), 16)), text)


# -- mailaddr patterns (listen `senders`) ------------------------------------------------------------------------
def senders_patterns(value: str | None) -> list[str]:
    """The addresses a `senders <table>` value lets a user send as (`a@x, @y` -> ["a@x", "@y"])."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def may_send_as(patterns: list[str], sender: Mailaddr, sub_addr_delim: str) -> bool:
    """Whether the sender is one of the `senders` table's patterns (the session's check and explain's)."""
    return any(mailaddr_pattern_matches(pattern, sender, sub_addr_delim) for pattern in patterns)


def mailaddr_pattern_matches(pattern: str, address: Mailaddr, delimiter: str = "+") -> bool:
    """Reference §5.1 MAILADDR matching: `user`, `@domain`, `user@domain`; the domain is OpenSMTPD's glob.

    The same function as the `mail-from`/`rcpt-to` tables use, so that a `senders` pattern means what it means
    in any other mailaddr table (a shell-style glob would let `@*.example.org` cover `a.b.example.org`)."""
    candidate = f"{address.user}@{address.domain}" if address.domain else address.user
    return mailaddr_match(ascii_lower(candidate), ascii_lower(pattern.strip()), delimiter)
