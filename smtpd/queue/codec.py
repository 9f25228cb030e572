"""Queue compression and encryption: smtpd.conf's `queue compression` and `queue encryption` (docs/queue.md,
"Compression and encryption").

What the queue stores of a message and of each envelope goes through one codec: gzip when compression is on,
then AES-256-GCM when encryption is on, laid out as OpenSMTPD lays it out (reference §8.2): the byte 0x01, a
12-byte random nonce, the ciphertext, the 16-byte tag. Everything downstream (the commit journal, the file
writer, the rename under queue/) carries those bytes as they are, so no clear text of a committed message
reaches the spool.

Reading goes by what the bytes are, whatever the configuration says now: 0x01 is encrypted, 0x1f 0x8b is gzip,
anything else is clear text. A stored message starts with our Received: header and an envelope with `format:`,
so neither can be taken for the other; a message that a filter made begin otherwise, with one of those bytes,
is stored gzipped even when neither option is on (SELF_MARKING). A queue written before compression or encryption was turned
on (or off) is read all the same; only an encrypted file needs the key.

The crypto and the compression are cryptography's AESGCM/Cipher and zlib: nothing of either is our own.
cryptography is imported when a key is first used (14 ms: smtpctl and a daemon without encryption skip it).
"""

from __future__ import annotations

import functools
import io
import os
import secrets
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

ENCRYPTED_MARK = b"\x01"
GZIP_MAGIC = b"\x1f\x8b"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip stream, as zcat reads it
BLOCK = 1 << 20  # bytes read at a time from a big message's file
COMPRESS_LEVEL = 6
WRONG_KEY = "cannot be decrypted with the queue encryption key (another key, or damaged)"
NO_KEY = "encrypted, and no queue encryption key is configured"


class QueueCodecError(ValueError):
    """Stored bytes that cannot be turned back into clear text (no key, the wrong key, damaged data)."""


@dataclass(frozen=True)
class QueueCodec:
    """How the queue stores bytes. The default stores them as they are."""

    compress: bool = False
    key: bytes | None = None  # 32 bytes: AES-256

    @property
    def active(self) -> bool:
        return self.compress or self.key is not None

    # -- storing ---------------------------------------------------------------------------------------
    def encode(self, data: bytes) -> bytes:
        """What the spool stores for ``data``."""
        if self.compress:
            packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, GZIP_WBITS)
            data = packer.compress(data) + packer.flush()
        if self.key is not None:
            nonce = secrets.token_bytes(NONCE_BYTES)
            data = ENCRYPTED_MARK + nonce + _aesgcm(self.key).encrypt(nonce, data, None)
        return data

    def encode_file(self, source: int, target: int) -> tuple[int, int]:
        """Write what the spool stores for the file open at ``source`` (read from its start) into ``target``.
        Returns (bytes written, their CRC-32). A big message goes through in blocks, never whole in memory."""
        written = 0
        crc = 0

        def out(chunk: bytes) -> None:
            nonlocal written, crc
            if chunk:
                _write_all(target, chunk)
                written += len(chunk)
                crc = zlib.crc32(chunk, crc)

        packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, GZIP_WBITS) if self.compress else None
        encryptor = None
        if self.key is not None:
            nonce = secrets.token_bytes(NONCE_BYTES)
            encryptor = _gcm(self.key, nonce).encryptor()
            out(ENCRYPTED_MARK + nonce)
        offset = 0
        while block := os.pread(source, BLOCK, offset):
            offset += len(block)
            if packer is not None:
                block = packer.compress(block)
            if encryptor is not None:
                block = encryptor.update(block)
            out(block)
        tail = packer.flush() if packer is not None else b""
        if encryptor is not None:
            tail = encryptor.update(tail) + encryptor.finalize() + encryptor.tag
        out(tail)
        return written, crc

    # -- reading ---------------------------------------------------------------------------------------
    def decode(self, data: bytes, limit: int | None = None) -> bytes:
        """The clear text of stored bytes (clear text is returned as it is). ``limit``: refuse clear text
        longer than that (a small compressed file must not unpack into gigabytes)."""
        if data[:1] == ENCRYPTED_MARK:
            data = self._decrypt(data)
        if data[:2] == GZIP_MAGIC:
            data = _gunzip(data, limit)
        return data

    def _decrypt(self, data: bytes) -> bytes:
        if self.key is None:
            raise QueueCodecError(NO_KEY)
        if len(data) < 1 + NONCE_BYTES + TAG_BYTES:
            raise QueueCodecError("encrypted file too short")
        nonce = data[1:1 + NONCE_BYTES]
        from cryptography.exceptions import InvalidTag

        try:
            return _aesgcm(self.key).decrypt(nonce, data[1 + NONCE_BYTES:], None)
        except InvalidTag:
            raise QueueCodecError(WRONG_KEY) from None

    def open_message(self, path: str) -> BinaryIO:
        """The message file at ``path`` for reading, as clear text: the file itself when it is stored clear,
        else a copy decoded into memory (a memfd: the clear text never reaches a disk; delivery children read
        it as they read a file). Raises OSError, or QueueCodecError when it cannot be decoded."""
        return _open_clear(path, self._decoded_copy)

    def _decoded_copy(self, source: int, head: bytes) -> BinaryIO:
        copy = os.memfd_create("smtpd-message", os.MFD_CLOEXEC)
        result = open(copy, "rb+")  # noqa: SIM115 — returned, or closed below
        try:
            self._decode_stream(source, head, lambda chunk: _write_all(copy, chunk))
            result.seek(0)
            return result
        except BaseException:
            result.close()
            raise

    def _decode_stream(self, source: int, head: bytes, out: Callable[[bytes], None]) -> None:
        """Decode the stored file open at ``source`` block by block into ``out``."""
        size = os.fstat(source).st_size
        offset, end = 0, size
        decryptor = None
        if head[:1] == ENCRYPTED_MARK:
            if self.key is None:
                raise QueueCodecError(NO_KEY)
            if size < 1 + NONCE_BYTES + TAG_BYTES:
                raise QueueCodecError("encrypted file too short")
            nonce = os.pread(source, NONCE_BYTES, 1)
            tag = os.pread(source, TAG_BYTES, size - TAG_BYTES)
            decryptor = _gcm(self.key, nonce, tag).decryptor()
            offset, end = 1 + NONCE_BYTES, size - TAG_BYTES
        unpacker: Any = None
        decided = decryptor is None and head == GZIP_MAGIC
        if decided:
            unpacker = zlib.decompressobj(GZIP_WBITS)
        pending = b""  # clear text whose compression is not known yet (fewer than two bytes decrypted)
        while offset < end:
            block = os.pread(source, min(BLOCK, end - offset), offset)
            if not block:
                raise QueueCodecError("file shrank while it was read")
            offset += len(block)
            if decryptor is not None:
                block = decryptor.update(block)
            if not decided:
                pending += block
                if len(pending) < 2:
                    continue
                block, pending, decided = pending, b"", True
                if block[:2] == GZIP_MAGIC:
                    unpacker = zlib.decompressobj(GZIP_WBITS)
            try:
                out(_unpack(unpacker, block))
            except QueueCodecError:
                # Decrypted bytes are not verified before the tag: damage there is a tag failure first.
                if decryptor is not None:
                    _verify_rest(source, offset, end, decryptor)
                raise
        if decryptor is not None:
            _finalize(decryptor)
        out(pending)
        if unpacker is not None:
            out(unpacker.flush())
            if not unpacker.eof:
                raise QueueCodecError("compressed data cut short")


def _finalize(decryptor: Any) -> None:
    from cryptography.exceptions import InvalidTag

    try:
        decryptor.finalize()
    except InvalidTag:
        raise QueueCodecError(WRONG_KEY) from None


def _verify_rest(source: int, offset: int, end: int, decryptor: Any) -> None:
    """Decrypt what is left of the file at ``source`` only to check its tag (QueueCodecError if it fails)."""
    while offset < end:
        block = os.pread(source, min(BLOCK, end - offset), offset)
        if not block:
            raise QueueCodecError("file shrank while it was read")
        offset += len(block)
        decryptor.update(block)
    _finalize(decryptor)


def _open_clear(path: str, decoded: Callable[[int, bytes], BinaryIO]) -> BinaryIO:
    """The stored file at ``path`` for reading as clear text: the file itself when it is clear, else what
    ``decoded(its descriptor, its first two bytes)`` makes of it (the file is closed once that returns)."""
    handle = open(path, "rb")  # noqa: SIM115 — returned, or closed below
    try:
        head = handle.read(2)
        if not is_encoded(head):
            handle.seek(0)
            return handle
        with handle:
            return decoded(handle.fileno(), head)
    except BaseException:
        handle.close()
        raise


def is_encoded(head: bytes) -> bool:
    """Whether stored bytes beginning with ``head`` (their first two) are compressed or encrypted."""
    return head[:1] == ENCRYPTED_MARK or head[:2] == GZIP_MAGIC


@functools.lru_cache(maxsize=4)
def _aesgcm(key: bytes) -> Any:
    """One AESGCM per key, kept: each call encrypts with its own nonce, and the object holds no other state."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _gcm(key: bytes, nonce: bytes, tag: bytes | None = None) -> Any:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.GCM(nonce, tag))


def _unpack(unpacker: Any, block: bytes) -> bytes:
    if unpacker is None:
        return block
    try:
        return unpacker.decompress(block)
    except zlib.error as error:
        raise QueueCodecError(f"damaged compressed data ({error})") from None


def _gunzip(data: bytes, limit: int | None) -> bytes:
    unpacker = zlib.decompressobj(GZIP_WBITS)
    try:
        clear = unpacker.decompress(data, limit + 1 if limit is not None else 0)
    except zlib.error as error:
        raise QueueCodecError(f"damaged compressed data ({error})") from None
    if limit is not None and len(clear) > limit:
        raise QueueCodecError(f"more than {limit} bytes once uncompressed")
    if not unpacker.eof:
        raise QueueCodecError("compressed data cut short")
    return clear


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def parse_key(text: str) -> bytes:
    """The AES-256 key of `queue encryption KEY`: its 32 characters as they are, as OpenSMTPD takes them."""
    key = text.encode("utf-8", "surrogateescape")
    if len(key) != KEY_BYTES:
        raise QueueCodecError("invalid key for queue encryption")
    return key


PLAIN = QueueCodec()
SELF_MARKING = QueueCodec(compress=True)  # for clear text that begins like encoded bytes (readable without a key)
_current = PLAIN


def current() -> QueueCodec:
    """The codec of this process: set once at the daemon's start (configure), PLAIN elsewhere."""
    return _current


def configure(codec: QueueCodec) -> None:
    global _current
    _current = codec


def stored(data: bytes) -> bytes:
    """What the spool stores for ``data`` under this process's codec (clear text when neither is on)."""
    return _current.encode(data) if _current.active else data


def clear(data: bytes, limit: int | None = None) -> bytes:
    """The clear text of stored bytes under this process's codec (QueueCodecError when it cannot be had)."""
    if is_encoded(data):
        return _current.decode(data, limit)
    return data


def open_message(path: str) -> BinaryIO:
    """The message file at ``path`` as clear text (see QueueCodec.open_message). The daemon's deliveries of one
    message read one clear copy between them (_SharedCopies)."""
    return _SHARED.open(_current, path)


class _SharedCopies:
    """The clear copies of the stored messages being read in this process, one per stored file, shared by
    every reader at the same time. Each delivery decoding its own copy kept as many copies in memory as
    deliveries of the message ran or waited: a 20 MB message to 40 local users took 750 MB. A reader gets a
    descriptor of its own on the copy (its own offset); the copy goes when its last reader is closed (or, for
    the descriptors handed on to children, when they are)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[tuple[int, ...], _Copy] = {}

    def open(self, queue_codec: QueueCodec, path: str) -> BinaryIO:
        return _open_clear(path, lambda source, head: self._shared(queue_codec, source, head))

    def _shared(self, queue_codec: QueueCodec, source: int, head: bytes) -> BinaryIO:
        info = os.fstat(source)  # (a stored file is never changed in place: a new one is a new inode)
        key = (id(queue_codec), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            copy = self._copies.setdefault(key, _Copy())
            copy.readers += 1
        try:
            with copy.lock:  # the first reader decodes; the others wait for its copy
                if copy.data is None:
                    copy.data = queue_codec._decoded_copy(source, head)
                fd = os.open(f"/proc/self/fd/{copy.data.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
            return _CopyReader(fd, lambda: self._release(key, copy))
        except BaseException:
            self._release(key, copy)
            raise

    def _release(self, key: tuple[int, ...], copy: _Copy) -> None:
        with self._lock:
            copy.readers -= 1
            if copy.readers:
                return
            if self._copies.get(key) is copy:
                del self._copies[key]
        if copy.data is not None:
            copy.data.close()


class _Copy:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.readers = 0
        self.data: BinaryIO | None = None


class _CopyReader(io.BufferedReader):
    """A reader of a shared clear copy: closing it lets the copy go once no other reader is left."""

    def __init__(self, fd: int, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release  # (set first: close() may run if the next fails)
        super().__init__(io.FileIO(fd, "rb"))

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


_SHARED = _SharedCopies()


def codec_for(compression: bool, encryption: bool, key_setting: str | None,
              read_key: Callable[[str | None], str]) -> QueueCodec:
    """The codec smtpd.conf's queue options ask for. ``key_setting`` is `queue encryption`'s word: the key,
    "stdin", or None (ask for it); ``read_key(key_setting)`` reads the key in the two last cases (the daemon
    and smtpctl read it each their own way). QueueCodecError for a key that is not 32 bytes."""
    key = None
    if encryption:
        text = key_setting if key_setting not in (None, "stdin") else read_key(key_setting)
        key = parse_key(text)
    return QueueCodec(compress=compression, key=key)
