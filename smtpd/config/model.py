"""The typed, immutable configuration.

The parser (modern or legacy grammar) produces one ``Config``; every other subsystem reads it and nothing
changes it. A reload parses a new ``Config`` and swaps it in whole; a session keeps the one it began with.

Table references are by name: ``"aliases"``, ``"<dynamic:3>"`` for an anonymous table written at a use site
(a bare word or ``{..}``), or a built-in such as ``"<localhost>"`` (OpenSMTPD's own names; the angle brackets
keep them apart from user tables, which cannot refer to them). ``Config.tables`` holds the declarations,
built-ins included. Durations are seconds, sizes bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

DEFAULT_MAX_MESSAGE_SIZE = 36_700_160
DEFAULT_QUEUE_TTL = 4 * 86400
DEFAULT_SRS_TTL = 4 * 86400
DEFAULT_WARN_INTERVALS: tuple[int, ...] = (4 * 3600,)
DEFAULT_CIPHERS = "HIGH:!aNULL:!MD5"
DEFAULT_SUBADDRESS_DELIMITER = "+"
DEFAULT_MAX_RCPT = 1000
DEFAULT_MAX_MAILS = 100

BUILTIN_TABLES = ("<localhost>", "<anyhost>", "<localnames>", "<anydestination>", "<getpwnam>")
SOCKET = "socket"


@dataclass(frozen=True)
class Location:
    """Where a statement came from, for FILE:LINE: messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def without_locations(items: Any) -> Any:
    """Declarations (a tuple, or a dict by name) without their places in the file, to compare what they say: a
    line added above a listener or a pki changes nothing."""
    if isinstance(items, dict):
        return {name: replace(item, location=None) for name, item in items.items()}
    return tuple(replace(item, location=None) for item in items)


class TableShape(StrEnum):
    LIST = "list"
    MAPPING = "mapping"
    # The shape is known only once the backend has loaded (file tables detect it from their content;
    # db, getpwnam and external backends answer both kinds of question).
    ANY = "any"


@dataclass(frozen=True)
class TableDecl:
    name: str
    backend: str  # "file" (also inline tables), "db", "getpwnam", or an external backend's name
    source: str | None = None  # the path (file, db) or backend configuration; None for inline tables
    shape: TableShape = TableShape.ANY
    # Inline content. For a list, ``items``; for a mapping, ``mapping`` (key lowercased, value as written).
    items: tuple[str, ...] = ()
    mapping: tuple[tuple[str, str], ...] = ()
    inline: bool = False
    builtin: bool = False
    location: Location | None = None


@dataclass(frozen=True)
class Pki:
    name: str  # lowercased; "*" is the fallback
    cert: str | None = None
    key: str | None = None
    dhe: str | None = None  # none | auto | legacy
    location: Location | None = None


@dataclass(frozen=True)
class Ca:
    name: str
    cert: str
    location: Location | None = None


class TlsMode(StrEnum):
    NONE = ""
    STARTTLS = "tls"
    REQUIRE = "tls-require"
    SMTPS = "smtps"


class AuthMode(StrEnum):
    NONE = ""
    REQUIRED = "auth"
    OPTIONAL = "auth-optional"


@dataclass(frozen=True)
class Listener:
    """One `listen on` statement (or the implicit socket listener)."""

    interface: str  # "socket", an interface name, an address or a host name, as written
    location: Location | None = None  # None for the implicit socket listener
    # The addresses to bind, resolved at config time (interface addresses, the literal, or the host's
    # addresses), in OpenSMTPD's order; empty for the socket listener.
    addresses: tuple[str, ...] = ()
    family: str | None = None  # "inet4" | "inet6" | None
    port: int = 25  # the default already applied (465 with smtps)
    port_explicit: bool = False
    tls: TlsMode = TlsMode.NONE
    verify: bool = False
    pki: tuple[str, ...] = ()
    ca: str | None = None
    auth: AuthMode = AuthMode.NONE
    auth_table: str | None = None  # None: system passwords
    tag: str | None = None
    hostname: str | None = None
    hostnames_table: str | None = None
    mask_src: bool = False
    no_dsn: bool = False
    received_auth: bool = False
    senders_table: str | None = None
    masquerade: bool = False
    proxy_v2: bool = False
    filter: str | None = None  # a filter or chain name ("<dynchain:00000001>" for an inline list)

    @property
    def is_socket(self) -> bool:
        return self.interface == SOCKET

    @property
    def is_local(self) -> bool:
        """Socket and loopback listeners add missing Date/Message-ID headers (reference §7.6)."""
        if self.is_socket:
            return True
        try:
            return all(ipaddress.ip_address(address).is_loopback for address in self.addresses) and bool(
                self.addresses)
        except ValueError:
            return False


class Method(StrEnum):
    MBOX = "mbox"
    MAILDIR = "maildir"
    LMTP = "lmtp"
    MDA = "mda"
    FORWARD_ONLY = "forward-only"
    EXPAND_ONLY = "expand-only"
    RELAY = "relay"


@dataclass(frozen=True)
class Relay:
    """The options of a relay action (reference §3.5)."""

    host: str | None = None  # a URL, as written
    host_table: str | None = None
    domain_table: str | None = None
    backup: bool = False
    backup_mx: str | None = None
    tls: str | None = None  # None | "tls" (required, verified) | "no-verify" (required, not verified)
    auth_table: str | None = None
    helo: str | None = None
    helo_src_table: str | None = None
    src: str | None = None  # an address
    src_table: str | None = None
    pki: str | None = None
    ca: str | None = None
    mail_from: str | None = None
    srs: bool = False
    filter: str | None = None


@dataclass(frozen=True)
class Action:
    name: str
    method: Method
    location: Location | None = None
    maildir_path: str | None = None  # None: ~/Maildir
    junk: bool = False
    lmtp_destination: str | None = None
    lmtp_rcpt_to: bool = False
    mda_command: str | None = None
    alias_table: str | None = None
    virtual_table: str | None = None
    userbase_table: str | None = None  # None: the system user database
    user: str | None = None
    wrapper: str | None = None
    ttl: int | None = None  # None: the queue ttl
    relay: Relay | None = None

    @property
    def is_local(self) -> bool:
        return self.method is not Method.RELAY


@dataclass(frozen=True)
class Condition:
    """One test of a match rule.

    family: "from", "for", "tag", "helo", "auth", "tls", "mail-from", "rcpt-to".
    variant, by family — from: "any" | "local" | "socket" | "src" | "rdns" | "auth" | "mail-from";
    for: "any" | "local" | "domain" | "rcpt-to"; the others: "" (the family is the test).
    ``table`` is the table it consults (None for any/local/socket, bare rdns, bare auth, tls).
    ``negated`` negates the test (for `from auth X` / `from mail-from X` / `for rcpt-to X` only the test).
    A rule always has a `from` and a `for` condition (the parser adds `from local` / `for local` when the text
    has none); a rule's conditions are kept in the order from, for, tag, helo, auth, tls, mail-from, rcpt-to.
    """

    family: str
    variant: str = ""
    table: str | None = None
    regex: bool = False
    negated: bool = False


@dataclass(frozen=True)
class MatchRule:
    conditions: tuple[Condition, ...]
    action: str | None  # the action's name; None when ``reject``
    reject: bool = False
    location: Location | None = None
    number: int = 0  # 1-based position in the ruleset, as traces show it

    def condition(self, family: str) -> Condition | None:
        for condition in self.conditions:
            if condition.family == family:
                return condition
        return None


@dataclass(frozen=True)
class SmtpOptions:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    sub_addr_delim: str = DEFAULT_SUBADDRESS_DELIMITER
    ciphers: str = DEFAULT_CIPHERS
    max_rcpt: int = DEFAULT_MAX_RCPT
    max_mails: int = DEFAULT_MAX_MAILS


@dataclass(frozen=True)
class QueueOptions:
    ttl: int = DEFAULT_QUEUE_TTL
    compression: bool = False
    encryption: bool = False
    encryption_key: str | None = None  # 32 hex digits, "stdin", or None (prompt)


@dataclass(frozen=True)
class SrsOptions:
    key: str | None = None
    backup_key: str | None = None
    ttl: int = DEFAULT_SRS_TTL


@dataclass(frozen=True)
class MtaLimit:
    domain: str | None  # None: the defaults for every domain
    family: str | None  # "inet4" | "inet6" | None
    values: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Filter:
    """A filter, proc or chain declaration. Builtin (phase) filters run in sessions (smtpd/smtp/filters.py);
    processes (proc, proc-exec) run beside the daemon (smtpd/smtp/processes.py)."""

    name: str
    kind: str  # "phase" | "proc" | "proc-exec" | "chain" (an inline listen/relay list is a chain too)
    phase: str | None = None
    conditions: tuple[Condition, ...] = ()
    decision: str | None = None  # reject | disconnect | rewrite | report | junk | bypass
    decision_arg: str | None = None
    proc: str | None = None
    command: str | None = None
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    chain: tuple[str, ...] = ()
    location: Location | None = None


@dataclass(frozen=True)
class Proc:
    name: str
    command: str
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    location: Location | None = None


@dataclass(frozen=True)
class Config:
    path: str
    listeners: tuple[Listener, ...] = ()
    tables: dict[str, TableDecl] = field(default_factory=dict)  # by name; treat as read-only
    pkis: dict[str, Pki] = field(default_factory=dict)
    cas: dict[str, Ca] = field(default_factory=dict)
    actions: dict[str, Action] = field(default_factory=dict)
    rules: tuple[MatchRule, ...] = ()
    smtp: SmtpOptions = SmtpOptions()
    queue: QueueOptions = QueueOptions()
    srs: SrsOptions = SrsOptions()
    bounce_warn_intervals: tuple[int, ...] = DEFAULT_WARN_INTERVALS
    mda_wrappers: dict[str, str] = field(default_factory=dict)
    mda_limits: tuple[tuple[str, int], ...] = ()
    mta_limits: tuple[MtaLimit, ...] = ()
    mta_max_deferred: int = 100
    scheduler_limits: tuple[tuple[str, int], ...] = ()
    filters: dict[str, Filter] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    admd: str | None = None
    legacy: bool = False  # written in the pre-6.4 grammar

    @property
    def socket_listener(self) -> Listener:
        """The local enqueue listener: always there, declared (`listen on socket`) or implicit."""
        for listener in self.listeners:
            if listener.is_socket:
                return listener
        return Listener(interface=SOCKET)

    @property
    def network_listeners(self) -> tuple[Listener, ...]:
        return tuple(listener for listener in self.listeners if not listener.is_socket)

    def action(self, name: str) -> Action:
        return self.actions[name]

    def ttl_for(self, dispatcher: str) -> int:
        """How long mail for the action named dispatcher may stay queued: its `ttl`, else `queue ttl`."""
        action = self.actions.get(dispatcher)
        return action.ttl if action is not None and action.ttl else self.queue.ttl

    def table(self, name: str) -> TableDecl:
        return self.tables[name]
