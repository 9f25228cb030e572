"""How smtpctl reads queue files stored encrypted (smtpd.conf's `queue encryption`; docs/queue.md, "show
envelope / show message").

The key comes from smtpd.conf when it names one (`queue encryption KEY`). Otherwise `show envelope` and `show
message` ask for it on the terminal (`key> `, three tries), as OpenSMTPD's smtpctl does; without a terminal
they fail with a line that says how to give it. The offline `show queue` never asks (scripts pipe mailq): it
uses smtpd.conf's key or leaves the encrypted envelopes out.

Compressed files need nothing: the codec recognises gzip by its magic bytes whatever the configuration says.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smtpd.queue.codec import ENCRYPTED_MARK, WRONG_KEY, QueueCodec, QueueCodecError, parse_key

if TYPE_CHECKING:
    from smtpd.config.model import Config

PROMPT = "key> "
TRIES = 3


class KeyProblem(Exception):
    """No key that decrypts the file: the one line smtpctl prints before it exits 1."""


@dataclass(frozen=True)
class ConfiguredKey:
    key: bytes | None
    missing: str  # why there is no key, said after "encrypted, and ..." ("" when there is one)


def configured_key(config_path: str) -> ConfiguredKey:
    """The literal key of `queue encryption KEY` in the configuration smtpd would read."""
    # Imported here: parsing smtpd.conf costs about 0.1 s of imports, paid only once a file is encrypted.
    import smtpd.config

    result = smtpd.config.load(config_path, check_files=False)
    if result.config is None:
        first = result.errors[0] if result.errors else "invalid"
        return ConfiguredKey(None, f"{config_path} cannot be used ({first})")
    queue = result.config.queue
    if not queue.encryption or queue.encryption_key in (None, "stdin"):
        return ConfiguredKey(None, f"{config_path} names no queue encryption key")
    try:
        return ConfiguredKey(parse_key(queue.encryption_key), "")
    except QueueCodecError:
        return ConfiguredKey(None, f"the queue encryption key in {config_path} is not 32 characters long")


def is_encrypted(path: str) -> bool:
    """Whether the file at ``path`` is stored encrypted (OSError when it cannot be opened)."""
    with open(path, "rb") as handle:
        return handle.read(1) == ENCRYPTED_MARK


def decrypted[T](path: str, config_path: str, decode: Callable[[QueueCodec], T]) -> T:
    """``decode(codec)`` with a codec holding the key of the encrypted file ``path``: smtpd.conf's, else one
    typed on the terminal. KeyProblem when no key is had or none decrypts it; the codec's other errors
    (damaged data) pass through."""
    found = configured_key(config_path)
    if found.key is not None:
        try:
            return decode(QueueCodec(key=found.key))
        except QueueCodecError as error:
            if str(error) != WRONG_KEY:
                raise
        # No prompt then: the key the daemon uses is the one that should work; asking for another would hide
        # that smtpd.conf and the spool disagree.
        raise KeyProblem(f"{path}: cannot be decrypted with the queue encryption key in {config_path} "
                         "(another key, or a damaged file)")
    if not sys.stdin.isatty():
        raise KeyProblem(f"{path}: encrypted, and {found.missing}; give the key with `queue encryption KEY` "
                         f"in {config_path}, or run smtpctl on a terminal to type it")
    return _asked(path, decode)


def _asked[T](path: str, decode: Callable[[QueueCodec], T]) -> T:
    import getpass

    for _ in range(TRIES):
        try:
            text = getpass.getpass(PROMPT)
        except EOFError:
            raise KeyProblem(f"{path}: encrypted, and no key was typed") from None
        try:
            codec = QueueCodec(key=parse_key(text))
        except QueueCodecError:
            _note("a queue encryption key is 32 characters long")
            continue
        try:
            return decode(codec)
        except QueueCodecError as error:
            if str(error) != WRONG_KEY:
                raise
        _note("this key does not decrypt the file")
    raise KeyProblem(f"{path}: cannot be decrypted with the keys typed ({TRIES} tries: another key, or a "
                     "damaged file)")


def _note(text: str) -> None:
    sys.stderr.write(f"smtpctl: {text}\n")
    sys.stderr.flush()


class OfflineKey:
    """smtpd.conf's key for the offline `show queue`: looked up once, and only when a message has files that
    cannot be read (a queue stored clear never pays for parsing the configuration). Never asks."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.found: ConfiguredKey | None = None
        self.config: Config | None = None  # smtpd.conf, parsed only for an envelope of OpenSMTPD 6.8 (ttl_for)

    def settle(self) -> bool:
        """Look the key up (the first time only) and decode with it from now on. True when that may read
        files that could not be read before."""
        if self.found is not None:
            return False
        self.found = configured_key(self.config_path)
        if self.found.key is None:
            return False
        from smtpd.queue import codec

        codec.configure(QueueCodec(key=self.found.key))
        return True

    def ttl_for(self, dispatcher: str) -> int:
        """An OpenSMTPD 6.8 envelope's time to live (it stores 0: docs/queue.md, "Coming from OpenSMTPD"), as the
        daemon gives it: from smtpd.conf, read once; the default `queue ttl` when smtpd.conf cannot be read."""
        if self.config is None:
            import smtpd.config
            from smtpd.config.model import Config

            self.config = smtpd.config.load(self.config_path, check_files=False).config or Config(self.config_path)
        return self.config.ttl_for(dispatcher)

    def note(self, count: int) -> str:
        """The stderr line for ``count`` envelopes left out because they could not be decrypted."""
        shown = f"{count} envelope{'s' if count != 1 else ''} not shown"
        if self.found is None or self.found.key is None:
            missing = self.found.missing if self.found is not None else "no key was looked for"
            return f"{shown}: encrypted, and {missing}"
        return (f"{shown}: they cannot be decrypted with the queue encryption key in {self.config_path} "
                "(another key, or damaged)")
