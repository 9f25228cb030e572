"""TLS policy of a relay and the client SSL contexts that carry it out.

| relay                          | TLS                                   | certificate checked |
|--------------------------------|---------------------------------------|---------------------|
| MX delivery, `smtp://`         | STARTTLS if offered (opportunistic)   | no                  |
| `tls` option                   | STARTTLS required                     | yes                 |
| `tls no-verify` option         | STARTTLS required                     | no                  |
| `smtp+tls://`                  | STARTTLS required                     | with `tls`, or a `ca` (not `tls no-verify`) |
| `smtps://`                     | TLS on connect                        | with `tls`, or a `ca` (not `tls no-verify`) |
| `smtp+notls://`, `lmtp://`     | never                                 | -                   |

A checked certificate must chain to the action's `ca` file (or the system's CAs) and name the host we
connected to (the relay host name, or the MX name). With opportunistic TLS a failed handshake makes the
session start again in plain text, as OpenSMTPD does, so a broken TLS stack does not stop mail.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import StrEnum

from smtpd.config.model import DEFAULT_CIPHERS


class TlsMode(StrEnum):
    NONE = "none"  # never (smtp+notls, lmtp)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS if offered
    STARTTLS = "starttls"  # STARTTLS required
    SMTPS = "smtps"  # TLS on connect


@dataclass(frozen=True)
class TlsPolicy:
    mode: TlsMode
    verify: bool
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (pki)
    key_file: str | None = None
    ciphers: str = DEFAULT_CIPHERS

    @property
    def required(self) -> bool:
        return self.mode in (TlsMode.STARTTLS, TlsMode.SMTPS)

    def describe(self) -> str:
        if self.mode is TlsMode.NONE:
            return "no TLS"
        return f"{self.mode.value}{', verified' if self.verify else ''}"


class TlsSetupError(Exception):
    """A pki or ca file of the config could not be loaded: a temporary failure of the relay."""


def client_context(policy: TlsPolicy) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.set_ciphers(policy.ciphers)
    except ssl.SSLError:
        context.set_ciphers(DEFAULT_CIPHERS)
    if policy.verify:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            if policy.ca_file:
                context.load_verify_locations(cafile=policy.ca_file)
            else:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as error:
            raise TlsSetupError(f"cannot load CA file {policy.ca_file}: {error}") from None
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if policy.cert_file:
        try:
            context.load_cert_chain(policy.cert_file, policy.key_file)
        except (OSError, ssl.SSLError) as error:
            raise TlsSetupError(f"cannot load client certificate {policy.cert_file}: {error}") from None
    return context
