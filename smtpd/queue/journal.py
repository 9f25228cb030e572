"""The commit journal: a round of small commits made durable by one append and one fdatasync.

Flushing a commit's own files takes a syncfs(2) of the spool's filesystem: every dirty file, inode and folder
block, then a cache flush of the device (0.3-0.5 ms here). Appending the same bytes to one file whose blocks
already exist, and flushing its data, is one write and one flush (0.13 ms). So a round of commits is made
durable by appending one record per commit to a journal file; the commits' files are written into the page
cache (before the record or after it: the record holds all they do), and made durable later by a *checkpoint*
(one syncfs for many rounds), which also tells the journal that its records up to there are no longer needed.
The scheduler takes a message only after the checkpoint that covers it, so a record that a restart replays is
never one of a message that was delivered.
The queue keeps two such files taking turns (JournalPair), so that commits go on while a checkpoint runs.

File layout (all integers little-endian):

* header, the first 4096 bytes: twice (at offsets 0 and 512, so that a torn write leaves one whole copy)
  ``PYJH``, version (u32), checkpoint (u64: the records with this sequence number or lower need no replay),
  salt (u64, new at every checkpoint), CRC-32 of the 24 bytes before it (u32). The copy with the higher
  checkpoint wins.
* records from offset 4096, each: ``PYJR``, sequence number (u64), msgid (u32), message length (u32), length
  of the envelope part (u32), CRC-32 of the message (u32), CRC-32 of the salt, of the 28 bytes before it and
  of the envelope part (u32); then the message; then the envelope part: per envelope its evpid (u64), length
  (u32) and the envelope file's bytes.

After a checkpoint, appends start again at offset 4096 with the following sequence numbers and the new salt.
At start, the journal is the records read from offset 4096 that carry the header's salt and whose sequence
numbers go up; it ends at the first record that is torn (a CRC does not match) or left from before the last
checkpoint (another salt: records of an earlier pass are never taken, even where one ends exactly where a new
one would start, and a message's body cannot pass for a record, as the salt is never shown). Records numbered
above the checkpoint are written back into the spool; then a checkpoint empties the journal.

The file is grown with zeros in steps of GROW_BYTES and flushed once, so that an append overwrites blocks that
exist and its fdatasync has no metadata to write.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from smtpd import log
from smtpd.queue.durable import fsync_directory

LOG = log.get("queue")

HEADER_BYTES = 4096
GROW_BYTES = 1 << 20
_HEADER = struct.Struct("<4sIQQI")
_HEADER_COPY = 512  # offset of the second copy
_HEADER_MAGIC = b"PYJH"
_VERSION = 1
_RECORD = struct.Struct("<4sQIIIII")
_RECORD_MAGIC = b"PYJR"
_ENVELOPE = struct.Struct("<QI")


@dataclass
class JournalRecord:
    seq: int
    msgid: int
    message: bytes
    envelopes: list[tuple[int, bytes]]  # (evpid, envelope file bytes)


def record_parts(seq: int, msgid: int, message: bytes, message_crc: int,
                 envelopes: list[tuple[int, bytes]]) -> list[bytes]:
    """One record as buffers (the message is not copied), less its last CRC, which takes the salt in force
    when it is appended (Journal.append)."""
    extra = b"".join(_ENVELOPE.pack(evpid, len(data)) + data for evpid, data in envelopes)
    head = _RECORD.pack(_RECORD_MAGIC, seq, msgid, len(message), len(extra), message_crc, 0)[:-4]
    return [head, message, extra]


def record_size(parts: list[bytes]) -> int:
    return sum(len(part) for part in parts) + 4


def _meta_crc(salt: int, head: bytes, extra: bytes) -> bytes:
    return zlib.crc32(extra, zlib.crc32(head, zlib.crc32(salt.to_bytes(8, "little")))).to_bytes(4, "little")


class Journal:
    """One journal file (``<spool>/journal.a`` or ``.b``). Its appends and its checkpoint never overlap: appends
    come from one round at a time (on the event loop or the queue's flusher thread), and its checkpoint runs
    only while appends go to the other file, or during a sync round, when none runs."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max(max_bytes, HEADER_BYTES + GROW_BYTES)
        self.fd = -1
        self.size = 0  # bytes the file has (zeros where nothing was appended yet)
        self.position = HEADER_BYTES  # where the next record goes
        self.salt: int | None = 0  # None: unknown (an unreadable header; see read_checkpoint)

    # -- start ------------------------------------------------------------------------------------------
    def open(self) -> None:
        created = not os.path.exists(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        if self.size < HEADER_BYTES + GROW_BYTES:
            self._grow(HEADER_BYTES + GROW_BYTES)
        if created:
            fsync_directory(os.path.dirname(self.path) or ".")

    def recover(self, restore: Callable[[JournalRecord], None]) -> int:
        """Replay what the last run acknowledged and never checkpointed, then empty the journal (this run's
        sequence numbers start again from 1, under a new salt). Returns the number of records replayed.
        ``restore`` must make each message durable in the spool before it returns."""
        checkpoint = self.read_checkpoint()
        replayed = 0
        for record in self.records():
            if record.seq > checkpoint:
                restore(record)
                replayed += 1
        self.mark(0)
        return replayed

    def read_checkpoint(self) -> int:
        """The checkpoint of the header (and its salt into self.salt); None for the salt when no copy of the
        header is whole: then every record found is replayed (a message may be delivered twice, none lost)."""
        copies = []
        for offset in (0, _HEADER_COPY):
            head = os.pread(self.fd, _HEADER.size, offset)
            if len(head) < _HEADER.size:
                continue
            magic, version, checkpoint, salt, crc = _HEADER.unpack(head)
            if magic == _HEADER_MAGIC and version == _VERSION and zlib.crc32(head[:-4]) == crc:
                copies.append((int(checkpoint), int(salt)))
        if not copies:
            self.salt = None
            if os.pread(self.fd, _HEADER.size, 0) != bytes(_HEADER.size):  # (all zeros: a new journal)
                LOG.warning("queue: the journal's header is unreadable; replaying every record in it")
            return 0
        checkpoint, self.salt = max(copies)
        return checkpoint

    def records(self) -> list[JournalRecord]:
        """The records from the start of the journal, as long as each is whole, carries the salt and has a
        higher sequence number than the one before."""
        found: list[JournalRecord] = []
        position = HEADER_BYTES
        while position + _RECORD.size <= self.size:
            record, length = self._read_record(position)
            if record is None or (found and record.seq <= found[-1].seq):
                break
            found.append(record)
            position += length
        return found

    def _read_record(self, position: int) -> tuple[JournalRecord | None, int]:
        head = os.pread(self.fd, _RECORD.size, position)
        magic, seq, msgid, message_len, extra_len, message_crc, meta_crc = _RECORD.unpack(head)
        length = _RECORD.size + message_len + extra_len
        if magic != _RECORD_MAGIC or position + length > self.size:
            return None, 0
        body = os.pread(self.fd, message_len + extra_len, position + _RECORD.size)
        message, extra = body[:message_len], body[message_len:]
        if len(body) != message_len + extra_len or zlib.crc32(message) != message_crc:
            return None, 0
        if self.salt is not None and _meta_crc(self.salt, head[:-4], extra) != head[-4:]:
            return None, 0
        envelopes = _parse_envelopes(extra)
        if envelopes is None:
            return None, 0
        return JournalRecord(seq, msgid, message, envelopes), length

    # -- appends and checkpoints ---------------------------------------------------------------------------
    def has_room(self, length: int) -> bool:
        return self.position + length <= self.max_bytes

    def append(self, records: list[list[bytes]]) -> None:
        """Write the records after the last one and flush them. Raises OSError: then none of them is
        acknowledged, and the queue asks for a checkpoint, which makes them void."""
        assert self.salt is not None  # (set by mark(), which recover() ends with)
        buffers = []
        for head, message, extra in records:
            buffers += [head, _meta_crc(self.salt, head, extra), message, extra]
        length = sum(len(part) for part in buffers)
        end = self.position + length
        if end > self.size:
            self._grow(min(self.max_bytes, -(-end // GROW_BYTES) * GROW_BYTES))
        written = 0
        while buffers:
            count = os.pwritev(self.fd, buffers[:512], self.position + written)
            written += count
            buffers = _skip(buffers, count)
        os.fdatasync(self.fd)
        self.position = end

    def mark(self, checkpoint: int) -> None:
        """Record that every record up to ``checkpoint`` is in the spool for good (the caller flushed it), and
        start appending from the beginning again, under a new salt."""
        salt = int.from_bytes(os.urandom(8), "little")
        head = _HEADER.pack(_HEADER_MAGIC, _VERSION, checkpoint, salt, 0)[:-4]
        copy = (head + zlib.crc32(head).to_bytes(4, "little")).ljust(_HEADER_COPY, b"\0")
        os.pwrite(self.fd, copy + copy, 0)
        os.fdatasync(self.fd)
        self.salt = salt
        self.position = HEADER_BYTES

    def _grow(self, size: int) -> None:
        """Extend the file with written zeros (not a hole, not fallocate's unwritten extents) and flush it once
        with its new size."""
        if size <= self.size:
            return
        zeros = bytes(GROW_BYTES)
        offset = self.size
        while offset < size:
            offset += os.pwrite(self.fd, zeros[:size - offset], offset)
        os.fsync(self.fd)
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _parse_envelopes(extra: bytes) -> list[tuple[int, bytes]] | None:
    envelopes = []
    offset = 0
    while offset < len(extra):
        if offset + _ENVELOPE.size > len(extra):
            return None
        evpid, length = _ENVELOPE.unpack_from(extra, offset)
        offset += _ENVELOPE.size
        if offset + length > len(extra):
            return None
        envelopes.append((evpid, extra[offset:offset + length]))
        offset += length
    return envelopes or None


def _skip(buffers: list[bytes], count: int) -> list[bytes]:
    """The buffers left after ``count`` bytes of them were written (a short pwritev)."""
    while buffers and count >= len(buffers[0]):
        count -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and count:
        buffers = [buffers[0][count:], *buffers[1:]]
    return buffers


class JournalPair:
    """Two journals taking turns, so that a checkpoint never holds up a commit.

    Appends go to the active one. A checkpoint switches: appends go on in the other one (emptied by the
    checkpoint before), while the flusher thread flushes the spool and then empties the one left. A checkpoint
    starts only once the one before it has ended, so the journal switched to is always empty."""

    def __init__(self, paths: tuple[str, str], max_bytes: int) -> None:
        self.active = Journal(paths[0], max_bytes)
        self.standby = Journal(paths[1], max_bytes)

    def open(self) -> None:
        self.active.open()
        self.standby.open()

    def recover(self, restore: Callable[[JournalRecord], None]) -> int:
        """Both written back (a record is in one of them only), both emptied."""
        return self.active.recover(restore) + self.standby.recover(restore)

    def switch(self) -> Journal:
        """Appends go to the other journal from now on; returns the one left, for the checkpoint to empty."""
        left, self.active, self.standby = self.active, self.standby, self.active
        return left

    def close(self) -> None:
        self.active.close()
        self.standby.close()
