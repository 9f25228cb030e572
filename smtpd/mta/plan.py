"""From a relay action and an envelope to a delivery plan: where to connect, how, and as whom.

Everything that depends on the config and the tables is decided here, once per envelope; the session code
(session.py) only carries a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smtpd.config.model import Config, Relay
from smtpd.lookup.tables.base import Service, TableError
from smtpd.mta import srs
from smtpd.mta.routes import RelayHost, RelayUrlError, address_text, parse_relay_url
from smtpd.mta.tls import TlsMode, TlsPolicy
from smtpd.queue.envelope import Envelope


class PlanError(Exception):
    """The envelope cannot be relayed as configured. ``permanent`` → bounce, otherwise retry."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class Plan:
    domain: str  # the destination domain (MX delivery) or the smarthost's name
    smarthost: RelayHost | None
    tls: TlsPolicy
    lmtp: bool
    helo: str | None  # None: look it up in helo_table by source address, else the mailname
    helo_table: str | None
    source: str | None  # the local address to connect from
    auth_table: str | None
    auth_label: str | None
    backup: bool
    backup_name: str | None
    sender: str  # MAIL FROM, after the mail-from rewrite
    port: int
    source_table: str | None = None  # the `src <table>` the source came from (others of it may suit the MX better)
    report_filter: str | None = None  # the action's `filter`: its processes get the sessions' smtp-out reports

    @property
    def relay_key(self) -> str:
        """The `[relay:...]` text of `show relays`; envelopes with equal keys may share sessions."""
        parts = [f"relay:{self.domain}"]
        if self.smarthost is not None:
            parts.append(f"port={self.port}")
        # The scheme word, as OpenSMTPD prints it: relays that differ only in it (`smtp+notls://` and `smtp://` to
        # one host) are different relays, and never share a session (one in clear text where TLS was wanted).
        parts.append(self.scheme)
        if self.auth_label:
            parts.append(f"auth={self.auth_table}:{self.auth_label}")
        if self.tls.cert_file:
            parts.append(f"cert={self.tls.cert_file}")
        if self.smarthost is None:
            parts.append("mx")
        if self.backup:
            parts.append(f"backup={self.backup_name}")
        if self.source:
            parts.append(f"source={self.source}")
        if self.helo_table:
            parts.append(f"helotable={self.helo_table}")
        if self.helo:
            parts.append(f"heloname={self.helo}")
        if self.tls.verify:
            parts.append("verify")
            if self.tls.ca_file:  # (verified against another CA is not verified for this relay: no shared session)
                parts.append(f"ca={self.tls.ca_file}")
        return "[" + ",".join(parts) + "]"

    @property
    def scheme(self) -> str:
        """How the relay talks, as OpenSMTPD names it in `show relays` and `mta connecting address=`: smtp (STARTTLS
        if offered), smtp+tls (required; MX delivery with `tls` too), smtps, smtp+notls, lmtp."""
        if self.lmtp:
            return "lmtp"
        return {TlsMode.NONE: "smtp+notls", TlsMode.OPPORTUNISTIC: "smtp", TlsMode.STARTTLS: "smtp+tls",
                TlsMode.SMTPS: "smtps"}[self.tls.mode]

    @property
    def session_key(self) -> str:
        """What envelopes sharing a transaction or a session have in common: the relay, and whose processes
        hear of the session (not in `show relays`, which prints relay_key as 6.8 prints its relays)."""
        return self.relay_key + (f",filter={self.report_filter}" if self.report_filter else "")


def rewrite_sender(sender: str, mail_from: str | None) -> str:
    """`mail-from X`: the user and/or domain present in X replace the sender's (`@foo.bar`: the domain only).

    The null sender (bounces) is never rewritten."""
    if not mail_from or not sender:
        return sender
    user, _, domain = sender.rpartition("@") if "@" in sender else (sender, "", "")
    if "@" in mail_from:
        new_user, _, new_domain = mail_from.rpartition("@")
    else:
        new_user, new_domain = mail_from, ""
    user = new_user or user
    domain = new_domain or domain
    return f"{user}@{domain}" if domain else user


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def make_plan(config: Config, tables: Any, relay: Relay, envelope: Envelope, mx_port: int,
              mailname: str = "localhost") -> Plan:
    domain = domain_of(envelope.dest)
    smarthost = _smarthost(tables, relay, domain)
    tls = _tls_policy(config, relay, smarthost)
    auth_label = smarthost.label if smarthost is not None else None
    if auth_label and not relay.auth_table:
        raise PlanError(f"relay URL {smarthost} names a label but the action has no auth table")
    return Plan(
        domain=smarthost.host if smarthost is not None else domain,
        smarthost=smarthost,
        tls=tls,
        lmtp=smarthost.lmtp if smarthost is not None else False,
        helo=relay.helo,
        helo_table=relay.helo_src_table if not relay.helo else None,
        source=_source(tables, relay),
        auth_table=relay.auth_table if auth_label else None,
        auth_label=auth_label,
        backup=relay.backup,
        # `backup` alone: our own name is the one whose MX preference is the cut-off (and show relays names it)
        backup_name=(relay.backup_mx or mailname) if relay.backup else None,
        sender=_sender(config, relay, envelope, mailname),
        port=smarthost.port if smarthost is not None else mx_port,
        source_table=None if relay.src else relay.src_table,
        report_filter=relay.filter,
    )


def _sender(config: Config, relay: Relay, envelope: Envelope, mailname: str) -> str:
    if relay.mail_from:
        return rewrite_sender(envelope.sender, relay.mail_from)
    if relay.srs and envelope.sender and "internal" in envelope.flags:
        # A forward (the recipient came from an alias or .forward): our domain in MAIL FROM, the sender encoded.
        if not config.srs.key:
            raise PlanError("an srs key is required for srs to be specified in an action")
        return srs.encode(envelope.sender, config.srs.key, envelope.smtpname or mailname)
    return envelope.sender


def _smarthost(tables: Any, relay: Relay, domain: str) -> RelayHost | None:
    url = relay.host
    try:
        if url is None and relay.host_table:
            url = tables.fetch(relay.host_table, Service.RELAYHOST)
            if not url:
                raise PlanError(f"relay host table {relay.host_table} is empty")
        if url is None and relay.domain_table:
            url = tables.lookup(relay.domain_table, Service.RELAYHOST, domain)
            if not url:
                # Not MX delivery: that would go around the smarthosts the map is there for. The envelope waits
                # until the map names one (or expires), as in OpenSMTPD.
                raise PlanError(f"Cannot retrieve smarthost for {domain}")
    except TableError as error:
        raise PlanError(f"temporary failure in relay host lookup: {error}") from None
    if url is None:
        return None
    try:
        return parse_relay_url(url)
    except RelayUrlError as error:
        raise PlanError(str(error)) from None


def _tls_policy(config: Config, relay: Relay, smarthost: RelayHost | None) -> TlsPolicy:
    scheme_mode = TlsMode(smarthost.tls_mode) if smarthost is not None else TlsMode.OPPORTUNISTIC
    if relay.tls and scheme_mode is TlsMode.NONE:
        raise PlanError(f"relay URL {smarthost} forbids TLS but the action requires it")
    mode = scheme_mode
    if relay.tls and mode is TlsMode.OPPORTUNISTIC:
        mode = TlsMode.STARTTLS
    if relay.tls == "no-verify":
        verify = False
    elif relay.tls == "tls":
        verify = True
    else:
        # smtp+tls:// and smtps:// require TLS; the certificate is checked only with the action's `tls`, as in
        # OpenSMTPD 6.8 (and Postfix's `encrypt`): internal smarthosts with self-signed certificates keep working
        # after a migration. Our one addition: an action that names a `ca` is checked against it (6.8 ignores the
        # ca without `tls`; a CA given for nothing would leave the administrator believing the relay verified).
        verify = relay.ca is not None and mode in (TlsMode.STARTTLS, TlsMode.SMTPS)
    cert_file = key_file = ca_file = None
    if relay.pki:
        pki = config.pkis.get(relay.pki.lower())
        if pki is None:
            raise PlanError(f"pki name not found: {relay.pki}")
        cert_file, key_file = pki.cert, pki.key
    if relay.ca:
        ca = config.cas.get(relay.ca)
        if ca is None:
            raise PlanError(f"ca name not found: {relay.ca}")
        ca_file = ca.cert
    return TlsPolicy(mode, verify, ca_file, cert_file, key_file, config.smtp.ciphers)


def _source(tables: Any, relay: Relay) -> str | None:
    if relay.src:
        return address_text(relay.src)
    if relay.src_table:
        try:
            source = tables.fetch(relay.src_table, Service.SOURCE)
        except TableError as error:
            raise PlanError(f"temporary failure in source address lookup: {error}") from None
        if not source:
            raise PlanError(f"source table {relay.src_table} is empty")
        return address_text(source)
    return None


def helo_name(tables: Any, plan: Plan, local_address: str | None, mailname: str) -> str:
    if plan.helo:
        return plan.helo
    if plan.helo_table and local_address:
        try:
            found = tables.lookup(plan.helo_table, Service.ADDRNAME, local_address)
        except TableError as error:
            raise PlanError(f"temporary failure in helo-src lookup: {error}") from None
        if found:
            return found
    return mailname


def secret_for(tables: Any, plan: Plan) -> tuple[str, str]:
    """The (username, password) of the auth label: `label  username:password` in the auth table."""
    try:
        value = tables.lookup(plan.auth_table, Service.CREDENTIALS, plan.auth_label)
    except TableError as error:
        raise PlanError(f"temporary failure in credentials lookup: {error}") from None
    if value is None:
        raise PlanError(f"no credentials for label {plan.auth_label} in table {plan.auth_table}")
    username, separator, password = value.partition(":")
    if not separator or not username or not password:
        raise PlanError(f"invalid credentials for label {plan.auth_label} in table {plan.auth_table}")
    return username, password
