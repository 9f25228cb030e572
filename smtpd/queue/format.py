"""The envelope file: versioned `key: value` text a person can read (docs/queue.md).

Like OpenSMTPD's version-3 envelope (reference §8.3) in spirit and key names, but with our own format marker
and version number, since the content differs (e.g. ``ttl`` holds the real time to live). A field whose value
is empty is left out, except ``dsn-notify`` which is always written. Values are one line: a backslash, CR or LF
inside a value is escaped as ``\\\\``, ``\\r``, ``\\n``.

Loading is strict: an unknown key, a duplicate key, a missing or different version, or a malformed value is an
EnvelopeFormatError (the queue then moves the file aside as corrupt).

OpenSMTPD 6.8's own envelope files (`version: 3` on the first line, reference §8.3) are read too, so that mail
left in its spool is delivered after a switch to PySMTPD (docs/queue.md, "Coming from OpenSMTPD"). They are
read by 6.8's rules: keys in any case, no escapes, an unknown key or a duplicate is an error.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from shared.numbers import ascii_digits
from smtpd.queue.envelope import DsnNotify, Envelope, EnvelopeType, shared_flags

FORMAT_MARKER = "pysmtpd-envelope"
FORMAT_VERSION = 1
MAX_ENVELOPE_BYTES = 64 * 1024
# An envelope file as stored: compressed or encrypted, a few bytes over its clear text (smtpd/queue/codec.py).
MAX_STORED_ENVELOPE_BYTES = MAX_ENVELOPE_BYTES + 1024


class EnvelopeFormatError(ValueError):
    pass


def _escape(value: str) -> str:
    if "\\" not in value and "\n" not in value and "\r" not in value:
        return value
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out: list[str] = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\" and index + 1 < len(value):
            following = value[index + 1]
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(following, "\\" + following))
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _int(text: str) -> int:
    """A count, a time or a code: ASCII digits only (int() would also take "-5", " 5", "1_0" and "٥")."""
    if not ascii_digits(text):
        raise EnvelopeFormatError(f"not a number: {text!r}")
    return int(text, 10)


def _fast_int(text: str) -> int:
    # ascii_digits() spelt out: this runs for every number of every envelope loaded at start
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(text)  # (the strict path then says why)


_DSN_NOTIFY_VALUES = range(16)  # every combination of SUCCESS, FAILURE, DELAY, NEVER
_DSN_RET_VALUES = ("", "FULL", "HDRS")


def _dsn_notify(text: str) -> DsnNotify:
    value = _int(text)
    if value not in _DSN_NOTIFY_VALUES:  # (a bad number: a value no NOTIFY gives)
        raise EnvelopeFormatError(f"not a NOTIFY value: {text!r}")
    return DsnNotify(value)


def _one_of(text: str, allowed: tuple[str, ...]) -> str:
    if text not in allowed:
        raise EnvelopeFormatError(f"not one of {', '.join(repr(word) for word in allowed)}: {text!r}")
    return text


def _address_out(address: str) -> str:
    return address or "@"


def _address_in(text: str) -> str:
    return "" if text == "@" else text


# key -> (attribute, to text, from text). The order is the order of the file.
_Field = tuple[str, Callable[[Any], str], Callable[[str], Any]]
_FIELDS: dict[str, _Field] = {
    "evpid": ("evpid", lambda v: f"{v:016x}" if v else "", lambda t: int(t, 16)),
    "dispatcher": ("dispatcher", str, str),
    "tag": ("tag", str, str),
    "type": ("type", str, EnvelopeType),
    "smtpname": ("smtpname", str, str),
    "helo": ("helo", str, str),
    "hostname": ("hostname", str, str),
    "username": ("username", str, str),
    "errorline": ("errorline", str, str),
    "sockaddr": ("sockaddr", str, str),
    "sender": ("sender", _address_out, _address_in),
    "rcpt": ("rcpt", str, str),
    "dest": ("dest", str, str),
    "ctime": ("ctime", str, _int),
    "last-try": ("last_try", str, _int),
    "last-bounce": ("last_bounce", str, _int),
    "ttl": ("ttl", str, _int),
    "retry": ("retry", str, _int),
    "flags": ("flags", lambda v: " ".join(sorted(v)), lambda t: shared_flags(t.split())),
    "dsn-notify": ("dsn_notify", lambda v: str(int(v)), lambda t: _dsn_notify(t)),
    "dsn-ret": ("dsn_ret", str, lambda t: _one_of(t, _DSN_RET_VALUES)),
    "dsn-envid": ("dsn_envid", str, str),
    "dsn-orcpt": ("dsn_orcpt", str, str),
    "esc-class": ("esc_class", lambda v: str(v) if v else "", _int),
    "esc-code": ("esc_code", lambda v: str(v) if v else "", _int),
    "mda-exec": ("mda_exec", str, str),
    "mda-subaddress": ("mda_subaddress", str, str),
    "mda-user": ("mda_user", str, str),
    "bounce-ttl": ("bounce_ttl", lambda v: str(v) if v else "", _int),
    "bounce-delay": ("bounce_delay", lambda v: str(v) if v else "", _int),
    "bounce-type": ("bounce_type", str, str),
    "commit-size": ("commit_size", str, _int),
    "commit-crc32": ("commit_crc32", lambda v: f"{v:08x}", lambda t: int(t, 16)),
    "commit-envelopes": ("commit_envelopes", lambda v: str(v) if v else "", _int),
}
_ALWAYS_WRITTEN = {"dsn-notify", "sender", "ctime", "last-try", "last-bounce", "ttl", "retry"}
# Values that repeat across envelopes: kept once in memory.
_SHARED_VALUES = {"dispatcher", "tag", "smtpname", "helo", "hostname", "username", "errorline", "sockaddr",
                  "sender", "dsn-ret", "mda-user", "bounce-type"}
# Flags that live only in the scheduler's memory are not written. `suspend` (smtpctl pause envelope) is
# written: a paused envelope stays paused across a restart, and `show queue` shows it offline too.
_VOLATILE_FLAGS = {"hold"}


# (key, attribute, to_text, always written, a commit-* key) in file order: what dump_envelope walks, once
# per envelope of every message received.
_DUMP_PLAN = [(key, attribute, to_text, key in _ALWAYS_WRITTEN, key.startswith("commit-"))
              for key, (attribute, to_text, _) in _FIELDS.items()]


def dump_envelope(envelope: Envelope) -> bytes:
    lines = [f"format: {FORMAT_MARKER}", f"version: {FORMAT_VERSION}"]
    committed = bool(envelope.commit_envelopes)
    for key, attribute, to_text, always, commit_key in _DUMP_PLAN:
        if commit_key and not committed:
            continue  # an envelope that was never committed by a queue (a test's, a tool's)
        value = getattr(envelope, attribute)
        if key == "flags":
            value = set(value) - _VOLATILE_FLAGS
        text = to_text(value)
        if text or always:
            lines.append(f"{key}: {_escape(text)}")
    lines.append("")
    return "\n".join(lines).encode("utf-8", errors="surrogateescape")


def _loaders() -> dict[str, tuple[str, Callable[[str], Any] | None, bool]]:
    """key -> (attribute, converter or None for plain text, shared value to intern)."""
    table: dict[str, tuple[str, Callable[[str], Any] | None, bool]] = {}
    for key, (attribute, _, from_text) in _FIELDS.items():
        table[key] = (attribute, None if from_text is str else from_text, key in _SHARED_VALUES)
    return table


_LOADERS = _loaders()


_HEADER = f"format: {FORMAT_MARKER}\nversion: {FORMAT_VERSION}\n"
# OpenSMTPD 6.8's envelope (reference §8.3): no format line, version 3, the evpid only in the file name.
OPENSMTPD_VERSION = "3"
_OPENSMTPD_KEYS = frozenset(key for key in _FIELDS if key != "evpid" and not key.startswith("commit-"))
# 6.8 keeps an alias's or .forward's file delivery as a command line of its helper, and a command bare.
OPENSMTPD_MBOXFILE = "/usr/libexec/opensmtpd/mail.mboxfile"
_KNOWN_KEYS = frozenset(_FIELDS)
_TYPES = {member.value: member for member in EnvelopeType}
_DSN_NOTIFY = {str(value): DsnNotify(value) for value in _DSN_NOTIFY_VALUES}
_DSN_RET = {value: value for value in _DSN_RET_VALUES}
_HEX = functools.partial(int, base=16)


def _fast_converter(key: str) -> Callable[[str], Any]:
    """The converter of a key for the fast path: C callables where the strict path has Python ones (same
    results; anything they reject makes the strict path decide, with its error message)."""
    _, convert, shared = _LOADERS[key]
    if key in ("evpid", "commit-crc32"):
        return _HEX
    if key == "type":
        return _TYPES.__getitem__
    if key == "dsn-notify":
        return _DSN_NOTIFY.__getitem__
    if key == "dsn-ret":
        return _DSN_RET.__getitem__
    if convert is _int:
        return _fast_int
    if key == "sender":
        return _sender_in
    if shared:
        return sys.intern  # the same few values in thousands of envelopes
    return str if convert is None else convert


def _sender_in(text: str) -> str:
    return "" if text == "@" else sys.intern(text)


_FAST: dict[str, tuple[str, Callable[[str], Any]]] = {key: (_LOADERS[key][0], _fast_converter(key))
                                                       for key in _LOADERS}


def load_envelope(data: bytes) -> Envelope:
    """Parse an envelope file. Raises EnvelopeFormatError with the reason.

    A restart loads every envelope of the queue, so the usual file (what dump_envelope writes: lowercase keys,
    `key: value`, no escapes) takes a fast path; anything else, and any doubt, goes the strict way."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeFormatError("envelope file too large")
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith(_HEADER) and text.endswith("\n") and "\\" not in text:
        envelope = _load_plain(text)
        if envelope is not None:
            return envelope
    if _first_key_value(text) == ("version", OPENSMTPD_VERSION):
        return _load_opensmtpd(text)
    return _load_strict(text)


def _first_key_value(text: str) -> tuple[str, str]:
    key, _, value = text.partition("\n")[0].partition(":")
    return key.strip().lower(), value.strip()


def _load_opensmtpd(text: str) -> Envelope:
    """An envelope file of OpenSMTPD 6.8 (reference §8.3). Its ``ttl`` is 0 (6.8 decides the expiry from its
    configuration): the scheduler gives such an envelope its action's ttl when it takes it."""
    if not text.endswith("\n"):
        raise EnvelopeFormatError("truncated envelope (no final newline)")
    envelope = Envelope()
    seen: set[str] = set()
    for number, line in enumerate(text[:-1].split("\n")[1:], 2):
        key, separator, value = line.partition(":")
        key, value = key.strip().lower(), value.lstrip(" \t")
        if not separator:
            raise EnvelopeFormatError(f"line {number}: not `key: value`")
        if key in seen or key == "version":
            raise EnvelopeFormatError(f"line {number}: duplicate key {key!r}")
        seen.add(key)
        if key not in _OPENSMTPD_KEYS:
            raise EnvelopeFormatError(f"unknown key {key!r} in an OpenSMTPD envelope")
        attribute, convert, _ = _LOADERS[key]
        _set_field(envelope, key, attribute, convert, value)
    _check_required(seen)
    if envelope.mda_exec:
        envelope.mda_exec = _opensmtpd_exec_item(envelope.mda_exec)
    return envelope


def _opensmtpd_exec_item(command: str) -> str:
    """6.8's mda-exec as ours: its file helper's command line becomes the file's path, and a command gets the
    `|` that marks one in ours (without it, a command starting with `/` would be taken for a file)."""
    file_prefix = f"{OPENSMTPD_MBOXFILE} -f %{{mbox.from}} "
    if command.startswith(file_prefix):
        return command[len(file_prefix):]
    return "|" + command


def _load_plain(text: str) -> Envelope | None:
    """The fast path, or None to let the strict path decide."""
    lines = text[len(_HEADER):-1].split("\n")
    try:
        fields = dict([line.split(": ", 1) for line in lines])  # a line without ": " raises ValueError
    except ValueError:
        return None
    if len(fields) != len(lines) or not fields.keys() <= _KNOWN_KEYS:  # a duplicate, an unknown key
        return None
    if "dsn-notify" not in fields or "ctime" not in fields:
        return None
    envelope = Envelope()
    try:
        for key, value in fields.items():
            attribute, convert = _FAST[key]
            setattr(envelope, attribute, convert(value))
    except (ValueError, TypeError, KeyError):
        return None
    return envelope


def _load_strict(text: str) -> Envelope:
    if not text.endswith("\n"):
        raise EnvelopeFormatError("truncated envelope (no final newline)")
    lines = text[:-1].split("\n")
    if len(lines) < 2 or lines[0] != f"format: {FORMAT_MARKER}":
        raise EnvelopeFormatError(f"not a {FORMAT_MARKER} file")
    if lines[1] != f"version: {FORMAT_VERSION}":
        version = lines[1].partition(":")[2].strip()
        raise EnvelopeFormatError(f"unsupported envelope version {version!r} (expected {FORMAT_VERSION})")
    envelope = Envelope()
    seen: set[str] = set()
    for number, line in enumerate(lines[2:], 3):
        key, separator, value = line.partition(": ")
        if not separator:
            key, separator, value = line.partition(":")
            if not separator:
                raise EnvelopeFormatError(f"line {number}: not `key: value`")
        if not key.islower():
            key = key.strip().lower()
        if key in seen:
            raise EnvelopeFormatError(f"line {number}: duplicate key {key!r}")
        seen.add(key)
        loader = _LOADERS.get(key)
        if loader is None:
            raise EnvelopeFormatError(f"unknown key {key!r}")
        attribute, convert, shared = loader
        if "\\" in value:
            value = _unescape(value)
        if shared:
            value = sys.intern(value)  # the same few values in thousands of envelopes
        _set_field(envelope, key, attribute, convert, value)
    _check_required(seen)
    return envelope


def _set_field(envelope: Envelope, key: str, attribute: str, convert: Callable[[str], Any] | None,
               value: str) -> None:
    try:
        setattr(envelope, attribute, value if convert is None else convert(value))
    except (ValueError, TypeError) as error:
        raise EnvelopeFormatError(f"bad value for {key}: {error}") from None


def _check_required(seen: set[str]) -> None:
    if "dsn-notify" not in seen or "ctime" not in seen:
        raise EnvelopeFormatError("missing required key (dsn-notify, ctime)")
