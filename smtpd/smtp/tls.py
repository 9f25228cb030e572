"""TLS for listeners: one server context per listener, certificates chosen by SNI among its pkis.

`pki` names a certificate/key pair declared with `pki NAME cert/key`. A listener without `pki` uses the pki
named after its hostname (or the mailname), else the `*` one, else the only one there is. As in OpenSMTPD, the
client's SNI name picks among every declared pki by its exact name (in any case); without SNI, or for a name no
pki has, the listener's own pki is used (not `*`: the certificate the listener names is its default). `ca` names the CA file
that client certificates are checked against; `verify` makes a valid client certificate mandatory (the
handshake fails and the session is dropped otherwise). Without `verify` no client certificate is asked for.
"""

from __future__ import annotations

import ssl
import sys
from typing import Any

from smtpd import trace
from smtpd.config.model import Config, Listener, TlsMode


class TlsSetupError(Exception):
    pass


def listener_pkis(config: Config, listener: Listener, default_name: str) -> list[str]:
    if listener.pki:
        return list(listener.pki)
    for name in ((listener.hostname or default_name).lower(), "*"):
        if name in config.pkis:
            return [name]
    if len(config.pkis) == 1:
        return list(config.pkis)
    return []


def _context_for(config: Config, listener: Listener, pki_name: str) -> ssl.SSLContext:
    pki = config.pkis.get(pki_name)
    if pki is None or not pki.cert or not pki.key:
        raise TlsSetupError(f"pki name not found: {pki_name}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.set_ciphers(config.smtp.ciphers)
    except ssl.SSLError as error:
        raise TlsSetupError(f"invalid ciphers {config.smtp.ciphers!r}: {_ssl_message(error)}") from None
    try:
        context.load_cert_chain(pki.cert, pki.key)
    except (OSError, ssl.SSLError) as error:
        raise TlsSetupError(f"pki {pki_name}: cannot load {pki.cert} / {pki.key}: {error}") from None
    if listener.ca is not None:
        ca = config.cas.get(listener.ca)
        if ca is None:
            raise TlsSetupError(f"ca name not found: {listener.ca}")
        try:
            context.load_verify_locations(cafile=ca.cert)
        except (OSError, ssl.SSLError) as error:
            raise TlsSetupError(f"ca {listener.ca}: cannot load {ca.cert}: {error}") from None
    elif listener.verify:
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    # Only `verify` asks for a client certificate. OpenSMTPD asks on every TLS listener and accepts any
    # certificate unless `verify` is set; OpenSSL under Python cannot accept one that fails verification (the
    # handshake is aborted), so asking without `verify` would refuse the mail of every client whose
    # certificate is not from the `ca` (self-signed ones: Exim, Postfix with a cert file) for nothing.
    context.verify_mode = ssl.CERT_REQUIRED if listener.verify else ssl.CERT_NONE
    return context


def _ssl_message(error: ssl.SSLError) -> str:
    """OpenSSL's words: set_ciphers' error carries only its message, which str() shows as a tuple."""
    return str(error.args[0]) if len(error.args) == 1 else str(error)


def server_context(config: Config, listener: Listener, default_name: str) -> ssl.SSLContext | None:
    """The listener's context, or None when it does no TLS. Raises TlsSetupError on a bad pki/ca."""
    if listener.tls is TlsMode.NONE:
        return None
    names = listener_pkis(config, listener, default_name)
    if not names:
        raise TlsSetupError(f"listener on {listener.interface}: no pki for TLS")
    contexts = {name: _context_for(config, listener, name) for name in names}
    for name, pki in config.pkis.items():
        if name not in contexts and pki.cert and pki.key:
            contexts[name] = _context_for(config, listener, name)
    first = contexts[names[0]]
    if len(contexts) > 1:
        def choose_by_sni(sock: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
            if server_name:
                chosen = contexts.get(server_name.lower())  # else keep the listener's
                if chosen is not None:
                    sock.context = chosen
        first.sni_callback = choose_by_sni
        _quiet_sni_decode_errors()
    return first


def _quiet_sni_decode_errors() -> None:
    """An SNI name that is not ASCII (RFC 6066 wants A-labels; a client may send UTF-8) fails in Python's ssl
    before our callback is called: the handshake is refused, and Python writes the decoding error with its
    traceback to stderr, our log, for every such client. It becomes one `smtp` trace line instead."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_sni", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(unraisable.object, bytes):
            trace.emit("smtp", f"TLS handshake refused: the client's SNI name {unraisable.object!r} is not ASCII")
            return
        previous(unraisable)

    hook.quiets_sni = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def describe(ssl_object: ssl.SSLObject | None) -> str | None:
    """`TLSv1.3:TLS_AES_256_GCM_SHA384:256:YES|NO` for the Received header (verified client certificate?)."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    name, version, bits = cipher
    verified = "YES" if ssl_object.getpeercert() else "NO"
    return f"{ssl_object.version() or version}:{name}:{bits}:{verified}"
