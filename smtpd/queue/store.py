"""The queue component: receiving messages, the group commit, envelope updates and removal, background loading.

A commit's files (message, one envelope per recipient, in a folder of incoming/) are written into the page
cache, on the event loop when it is asked or by its round (SpoolWriter._files_with_round); one flusher thread
makes commits durable in rounds: one append to the commit journal and one fdatasync per round
(smtpd/queue/journal.py), or one syncfs(2) per round (SMTPD_QUEUE_SYNC=syncfs, and for messages too big for the
journal), or per-file flushes (SMTPD_QUEUE_SYNC=fsync). Commits asked while a round runs share the next one
(group commit). After its round a commit is acknowledged (the 250), its files written if they were not, and its
folder renamed under queue/; a checkpoint (one syncfs, while appends go to the journal's other file) or a sync
round flushes the renames and files, and then the scheduler takes the envelopes. Other spool writes (envelope
updates, removals) run in order on one writer thread. docs/queue.md has the whole story.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import functools
import os
import queue as thread_queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.ids import format_msgid, new_evpid, new_msgid
from smtpd import log, trace
from smtpd.queue import codec
from smtpd.queue.durable import (
    SYNCFS,
    FilesystemSync,
    ParallelFlusher,
    fsync_directory,
    replace_file,
    same_filesystem,
    write_all,
)
from smtpd.queue.envelope import Envelope
from smtpd.queue.file_writer import make_folder
from smtpd.queue.format import dump_envelope
from smtpd.queue.journal import Journal, JournalPair, JournalRecord, record_parts, record_size
from smtpd.queue.loading import load_queue
from smtpd.queue.spool import (
    ID_TAKEN,
    MESSAGE_FILE,
    CorruptEntry,
    Spool,
    SpoolPermissionError,
    message_size_problem,
    remove_path,
)
from smtpd.queue.writer_client import FileWriterProcess
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

LOG = log.get("queue")
# Reader processes at start (smtpd/queue/loading.py): with a cold cache, each keeps its own disk reads in flight.
LOAD_THREADS = int(os.environ.get("SMTPD_QUEUE_LOAD_THREADS", "8"))
MAX_BATCH = 256  # commits flushed together at most
# Empty message folders kept ready in temporary/ (named FOLDER_PREFIX...), so that a commit renames instead of
# making a directory on the event loop.
SPARE_FOLDERS = int(os.environ.get("SMTPD_QUEUE_SPARE_FOLDERS", "64"))
FOLDER_PREFIX = "folder-"
# Folders of delivered messages kept in purge/ for reuse at most (see SpoolWriter.retire); beyond, deleted.
RETIRED_FOLDERS = int(os.environ.get("SMTPD_QUEUE_RETIRED_FOLDERS", "256"))
# A rename under queue/ is flushed by the next commit round; without one within this delay, by a round of its own.
RENAME_FLUSH_DELAY = 0.01
# A message is held in memory while it arrives up to this size, and written by the I/O thread at commit (no
# file, no system call on the event loop); a bigger one goes on to a file in temporary/.
MEMORY_LIMIT = int(os.environ.get("SMTPD_QUEUE_MEMORY_LIMIT", str(256 * 1024)))
FLUSH_THREADS = int(os.environ.get("SMTPD_QUEUE_FLUSH_THREADS", "8"))
# Message ids found free on disk ahead of the messages that will take them (see Queue.new_message).
FREE_MSGIDS_AHEAD = 4
# How a batch is made durable: "journal" (one append to the commit journal and one fdatasync per round, and a
# syncfs(2) of the spool's filesystem per checkpoint), "syncfs" (one syncfs per round) or "fsync" (every file
# and folder flushed on its own, in parallel). Default: journal where syncfs exists and the spool is one fs.
SYNC_MODE = os.environ.get("SMTPD_QUEUE_SYNC", "journal")
# Journal mode: a message goes through the journal up to this size (bigger ones: a syncfs round), the journal
# file grows up to JOURNAL_BYTES (then a checkpoint empties it), and durable commits wait at most
# CHECKPOINT_DELAY for the checkpoint after which the scheduler takes them.
JOURNAL_MESSAGE_LIMIT = int(os.environ.get("SMTPD_QUEUE_JOURNAL_LIMIT", str(256 * 1024)))
JOURNAL_FILES = ("journal.a", "journal.b")
JOURNAL_BYTES = int(os.environ.get("SMTPD_QUEUE_JOURNAL_BYTES", str(16 << 20)))
# A journal round of up to this many bytes is written and flushed on the event loop itself (see _start_round):
# by default every one.
INLINE_JOURNAL_BYTES = int(os.environ.get("SMTPD_QUEUE_INLINE_JOURNAL_BYTES", str(JOURNAL_BYTES)))
CHECKPOINT_DELAY = float(os.environ.get("SMTPD_QUEUE_CHECKPOINT_DELAY", "0.02"))
# A round that would run on the loop waits up to this many turns of the loop for more commits (see _gather).
# A message held in memory up to this size is compressed or encrypted on the event loop (under 2 ms with gzip).
ENCODE_ON_LOOP_BYTES = 64 * 1024
GATHER_TURNS = int(os.environ.get("SMTPD_QUEUE_GATHER_TURNS", "6"))
# An acknowledged commit whose files could not be written is tried again after this many seconds (see _strand).
STRANDED_RETRY_DELAY = float(os.environ.get("SMTPD_QUEUE_STRANDED_RETRY", "1"))
# Journal mode: acknowledged commits' files are written by a helper process (smtpd/queue/file_writer.py), not on
# the event loop ("0": on the loop).
FILE_WRITER = os.environ.get("SMTPD_QUEUE_FILE_WRITER", "1") != "0"
# A commit bigger than this has its files written by its round, not when it is asked, and not by the file writer
# process (see _files_with_round, _has_big): by default none that goes through the journal.
ROUND_FILES_BYTES = int(os.environ.get("SMTPD_QUEUE_ROUND_FILES_BYTES", str(JOURNAL_MESSAGE_LIMIT)))


def _sync_file_range() -> Callable[[int], None]:
    """Start writeback of a whole file without waiting (Linux), so one batch's data goes out together."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd: None
    write_flag = 2  # SYNC_FILE_RANGE_WRITE
    return lambda fd: function(fd, 0, 0, write_flag) and None


_START_WRITEBACK = _sync_file_range()


def _no_writeback(fd: int) -> None:
    return None


def syncfs_usable(spool: Spool) -> bool:
    """Whether rounds flush with syncfs(2): asked for (journal or syncfs mode), there, and one filesystem."""
    return SYNC_MODE in ("journal", "syncfs") and SYNCFS is not None and same_filesystem(
        [spool.root, spool.temporary, spool.incoming, spool.queue])


def open_journal(spool: Spool) -> tuple[JournalPair | None, int]:
    """The commit journal (journal mode), with what the last run left in it written back into the spool.
    Returns it and the number of messages written back. In the other modes a journal left by an earlier run is
    written back all the same (it may hold acknowledged mail), and then not used."""
    paths = (os.path.join(spool.root, JOURNAL_FILES[0]), os.path.join(spool.root, JOURNAL_FILES[1]))
    wanted = SYNC_MODE == "journal" and syncfs_usable(spool)
    if not wanted and not any(os.path.exists(path) for path in paths):
        return None, 0
    journal = JournalPair(paths, JOURNAL_BYTES)
    try:
        journal.open()
    except OSError as error:
        journal.close()
        raise JournalUnusable(error) from error

    def restore(record: JournalRecord) -> None:
        spool.restore_message(record.msgid, record.message, record.envelopes)

    try:
        restored = journal.recover(restore)
    except BaseException:
        journal.close()
        raise
    if not wanted:
        journal.close()
        return None, restored
    return journal, restored


class QueueError(Exception):
    pass


class JournalUnusable(Exception):
    """The journal files could not be opened (or made): nothing of them was read yet."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _where(error: OSError) -> str:
    """`PATH: reason` of an error on a spool file."""
    return f"{error.filename}: {error.strerror or error}" if error.filename else str(error.strerror or error)


@dataclass
class _Commit:
    message: IncomingMessage
    future: asyncio.Future[None]  # durable: the 250 may be sent
    placed: asyncio.Future[None]  # moved under queue/: the scheduler may take it
    files: list[int] = field(default_factory=list)  # open fds to flush
    record: list[bytes] | None = None  # its journal record (journal mode, small messages), made at its round
    # The message (None: spilled to a file) and its dumped envelopes (evpid, text): what its journal record and
    # its files are made of, the files now or by its round (SpoolWriter._files_with_round).
    data: bytes | None = None
    dumped: list[tuple[int, bytes]] = field(default_factory=list)
    written: bool = False  # its folder and files are in incoming/
    journaled: bool = False  # its record was appended to the journal (a journal round acknowledged it)
    spare: Spare | None = None  # a folder made ahead, for a round whose files the flusher thread writes


@dataclass(frozen=True)
class Spare:
    """A message folder made ahead in temporary/: new and empty, or a delivered message's folder taken back
    (see SpoolWriter.retire) that still holds its message file and its one envelope file, named ``envelope``,
    both emptied by the writer thread. A commit into a taken-back folder renames that envelope file and writes
    both files: no inode is freed and none allocated."""

    path: str
    envelope: str | None = None


@dataclass
class _FlushOutcome:
    failed: dict[int, BaseException] = field(default_factory=dict)  # by id() of the commit
    shared_error: BaseException | None = None  # every commit of the round failed with it
    rename_error: BaseException | None = None  # the earlier round's renames could not be flushed
    checkpoint_error: BaseException | None = None  # the journal could not be told of a checkpoint


class _Worker:
    """One thread running jobs in order; each result is handed back on the event loop.

    The thread runs almost no Python between its system calls, so it seldom competes with the event loop for
    the GIL (several Python threads doing file work cost more in GIL hand-offs than the work itself)."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.jobs: thread_queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]
                                            | None] = thread_queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def run(self, function: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        self.jobs.put((function, done))

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            function, done = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = function()
            except Exception as failure:  # noqa: BLE001 — handed to the caller, never kills the thread
                error = failure
            try:
                self.loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more


class SpoolWriter:
    """queue.io: the group commit, and the other spool writes (envelope updates, removals) in order.

    A commit's files are written on the event loop as soon as it is asked (into the page cache: no waiting), or
    by its round (_files_with_round), and made durable by flush rounds run by one flusher thread. Commits asked
    while a round runs wait for the next one and share it (group commit). A round is either a *journal round*
    (the commits' records appended to the journal, one fdatasync) or a *sync round* (one syncfs(2) of the spool;
    or per-file flushes with SMTPD_QUEUE_SYNC=fsync). After its round, a commit is acknowledged and its folder
    renamed under queue/. The renames are flushed by the next sync round or, with a journal, by a *checkpoint*
    (_start_checkpoint), at most CHECKPOINT_DELAY (RENAME_FLUSH_DELAY without a journal) later; then the
    scheduler takes the envelopes.
    """

    def __init__(self, spool: Spool, loop: asyncio.AbstractEventLoop,
                 receiving: Callable[[], int] = lambda: 2,  # (default: never alone)
                 journal: JournalPair | None = None, arriving: Callable[[], int] = lambda: 0) -> None:
        self.spool = spool
        self.loop = loop
        self.receiving = receiving  # how many messages are being received or committed (see _alone)
        self.arriving = arriving  # how many messages are being received, not committed yet (see _gather)
        self.syncer = _Worker("queue-flush", loop)
        self.writer = _Worker("queue-io", loop)
        self.batches = 0
        self.committed = 0
        self.written: list[_Commit] = []  # asked, waiting for a round
        self.renamed: list[_Commit] = []  # under queue/, the rename not flushed yet
        self.flushing = False
        self._round_soon = False
        self._rename_timer: asyncio.TimerHandle | None = None
        self.journal = journal  # opened and replayed by the queue (None: every round is a sync round)
        self._journal_files = journal  # (closed at stop, even after _give_up_journal)
        self.rename_delay = CHECKPOINT_DELAY if journal is not None else RENAME_FLUSH_DELAY
        self.last_seq = 0  # sequence number of the last commit written (journal records carry theirs)
        self._sync_due = False  # without a journal: the renames get a round of their own now
        self._checkpoint_due = False  # with a journal: a checkpoint starts once none runs and no thread round does
        self.checkpointing = False  # a checkpoint runs on the flusher thread (journal rounds go on meanwhile)
        self.stranded: list[_Commit] = []  # acknowledged, files not written: only in the journal (see _strand)
        self._stranded_timer: asyncio.TimerHandle | None = None
        self.unmoved: list[_Commit] = []  # written, complete in incoming/, not yet moved under queue/ (_not_moved)
        # Journaled commits under queue/ (flushed) that are not placed while a commit is stranded: their records
        # stay in the journal until the next checkpoint, and a start would write them back (see _placeable).
        self.held: list[_Commit] = []
        self._unmoved_timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Folders made ahead in temporary/ (see _make_folder); a start removes leftovers with the rest.
        self.folders: list[Spare] = []
        # Delivered messages' folders in purge/ (see retire): (path, envelope file name, filesystem.started then).
        self.retired: collections.deque[tuple[str, str, int]] = collections.deque()
        self.folders_wanted = SPARE_FOLDERS
        self._folders_coming = False
        self._folder_counter = 0
        self.filesystem: FilesystemSync | None = None
        if syncfs_usable(spool):
            self.filesystem = FilesystemSync(spool.root)
        # Per-file flushes run side by side, so that the disk merges them.
        self.flusher = ParallelFlusher(FLUSH_THREADS) if self.filesystem is None else None
        self.file_writer: FileWriterProcess | None = None
        self.loop_polls = bool(getattr(loop, "polls", False))  # (see _to_file_writer)
        self.files_writing = 0  # acknowledged commits whose files the file writer process is writing

    def start(self) -> None:
        self.syncer.start()
        self.writer.start()
        if FILE_WRITER and self.journal is not None:
            file_writer = FileWriterProcess(self.loop, self.spool.root)
            if file_writer.start():
                self.file_writer = file_writer

    def close_file_writer(self) -> None:
        """On the loop, after drain()."""
        if self.file_writer is not None:
            self.file_writer.close()

    async def drain(self) -> None:
        """Finish every round: all commits asked so far durable, acknowledged and placed."""
        self._draining = True  # (renames are flushed at once, not after a delay)
        try:
            while self._busy():
                if not (self.flushing or self.checkpointing):
                    self._sync_due = not self._checkpoints()
                    self._next_round()
                    if not (self.flushing or self.checkpointing or self.files_writing):
                        continue  # (done on the loop itself)
                waiter: asyncio.Future[None] = self.loop.create_future()
                self._idle_waiters.append(waiter)
                await waiter
        finally:
            self._draining = False

    def _busy(self) -> bool:
        """Whether a round or checkpoint has work left."""
        return self.flushing or self.checkpointing or bool(self.written or self.renamed or self.files_writing)

    def _checkpoints(self) -> bool:
        """Whether renames are flushed by checkpoints (a journal, and no stranded commit whose record a checkpoint
        would void: see _strand); otherwise by sync rounds."""
        return self.journal is not None and not self.stranded

    def stop(self) -> None:
        """Stop the threads (after drain(), from any thread)."""
        if self.stranded:
            LOG.error("queue: %d acknowledged message(s) could not be written; the commit journal keeps them "
                      "for the next start", len(self.stranded))
        if self._stranded_timer is not None:
            self._stranded_timer.cancel()
            self._stranded_timer = None
        if self._unmoved_timer is not None:
            self._unmoved_timer.cancel()  # (they stay complete in incoming/: the next start places them)
            self._unmoved_timer = None
        self.syncer.stop()
        self.writer.stop()
        if self.file_writer is not None:
            self.file_writer.close()  # (closed already by the queue's stop, on the loop: nothing more to do)
            self.file_writer.wait()
        self.remove_spare_folders()
        if self.flusher is not None:
            self.flusher.shutdown()
        if self.filesystem is not None:
            self.filesystem.close()
        if self._journal_files is not None:
            self._journal_files.close()

    # -- other writes ------------------------------------------------------------------------------------
    def submit(self, function: Callable[[], Any], wait: bool = True) -> asyncio.Future[Any] | None:
        """Run a spool write on the writer thread, after those asked before it."""
        future = self.loop.create_future() if wait else None

        def done(result: Any, error: BaseException | None) -> None:
            if future is None:
                if error is not None:
                    LOG.warning("queue: %s", error)
            elif not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

        self.writer.run(function, done)
        return future

    # -- the group commit --------------------------------------------------------------------------------
    def submit_commit(self, message: IncomingMessage) -> tuple[asyncio.Future[None], asyncio.Future[None]]:
        """(durable, placed) futures of one commit, made durable by the next round. Its files are written now,
        into the page cache, or by the round (see _files_with_round)."""
        commit = _Commit(message, self.loop.create_future(), self.loop.create_future())
        try:
            self._prepare(commit)
            if not self._files_with_round(commit):
                self._write_files(commit, self._make_folder)
        except OSError as error:
            self._fail(commit, error)
            return commit.future, commit.placed
        self.written.append(commit)
        if not self.flushing and not self._round_soon:
            if self._alone():
                # No other message on its way, so none could share the round: run it now. An inline round then
                # settles the future before it is awaited, and the 250 goes out in this same turn of the loop
                # (two turns and two polls fewer per message; with one client 0-7% more messages a second in
                # five side-by-side pairs, about the host's noise).
                self._start_round()
            else:
                # After this turn of the loop: commits finishing in the same turn share the round.
                self._round_soon = True
                self.loop.call_soon(self._gather, GATHER_TURNS)
        return commit.future, commit.placed

    def _gather(self, turns: int) -> None:
        """Start the round asked for, or first let the loop turn once more (``turns`` times at most) while it
        would run on the loop and other messages are still arriving: each turn reads the sessions whose data
        came meanwhile, and their commits share the round. An inline round stops the loop for its fdatasync;
        fewer and bigger ones leave it more time for the sessions (measured with 8 sessions: 2.5 commits a
        round without the wait, 6.9 with it at 6 turns, and 19-35% more messages a second). When nothing else
        is ready, the turns take microseconds."""
        if not self._round_soon:
            return  # (a round started meanwhile took these commits)
        if turns > 0 and self.arriving() > 0 and self._inline_sized():
            self.loop.call_soon(self._gather, turns - 1)
            return
        self._start_round()

    def _inline_sized(self) -> bool:
        """Whether the commits waiting would make a journal round run on the loop (see _start_round)."""
        if not self._checkpoints():
            return False
        size = 0
        for commit in self.written:
            size += len(commit.data) if commit.data is not None else INLINE_JOURNAL_BYTES + 1
            if size > INLINE_JOURNAL_BYTES:
                return False
        return True

    def _start_round(self) -> None:
        self._round_soon = False
        if self.flushing:
            return
        if self._checkpoint_due and self.files_writing and self._checkpoints():
            # The checkpoint waits for the file writer to finish; more rounds would keep it busy for ever. Its
            # answer starts the checkpoint, then this round (_next_round).
            return
        if not self.written and (self._checkpoints() or not self.renamed):
            self._sync_due = False  # (with a journal, renames alone wait for a checkpoint)
            return
        batch, self.written = self.written[:MAX_BATCH], self.written[MAX_BATCH:]
        self._number(batch)
        inline = len(batch) == 1 and self._alone()
        journal_bytes = self._journal_bytes(batch)
        checkpoint: int | None = None
        if journal_bytes is not None:
            renamed: list[_Commit] = []  # (they wait for the next checkpoint)
            inline = inline or journal_bytes <= INLINE_JOURNAL_BYTES
        else:
            # A sync round: it flushes everything written so far, the renames included, so every journal
            # record up to the last commit numbered is needed no more (each round writes its files before
            # the next starts) -- unless a stranded commit's record must stay (see _strand).
            if self._rename_timer is not None:
                self._rename_timer.cancel()
                self._rename_timer = None
            self._sync_due = False
            if not self.stranded and not self.files_writing:
                checkpoint = self.last_seq
            renamed, self.renamed = self._placeable(self.renamed, checkpoint)
        # The commits' files: a journal round writes them once its commits are acknowledged (their records hold
        # them, see _round_done); a sync round before it flushes. Both where the round runs: on the loop, or on
        # the flusher thread into folders made ahead (taken here).
        journal_round = journal_bytes is not None
        if not inline and not journal_round:
            self._give_spare_folders(batch)
        flush = functools.partial(self._flush, batch, renamed, journal_round, checkpoint, not inline)
        if inline:
            # One message, and none other on its way: nothing would run on the loop while the flusher thread
            # works, and the hand-off there and back costs more latency than the flush itself. Or a journal
            # round (by default every one, INLINE_JOURNAL_BYTES): its write and fdatasync (0.13 ms for small
            # rounds) cost the loop less than waking the flusher thread, handing the result back and sharing the
            # GIL with it (measured at 8 and 32 sessions: a quarter less CPU per message, 10-20% more messages per
            # second; at 100 KB, with the polling loop, 13-18% more in four pairs of five); sessions whose data
            # arrives meanwhile wait in their sockets and join the next round.
            try:
                outcome, error = flush(), None
            except Exception as failure:  # noqa: BLE001 — as in the thread: that round fails, nothing more
                outcome, error = None, failure
            self._round_done(batch, renamed, False, outcome, error)
            return
        self.flushing = True
        self.syncer.run(flush, functools.partial(self._round_done, batch, renamed, True))

    def _files_with_round(self, commit: _Commit) -> bool:
        """Whether the commit's files are left to its round (see _start_round) rather than written now: when it
        is alone (a journal round then acknowledges it before its files are written: with one client, 10% more
        messages a second) or over ROUND_FILES_BYTES (its round writes them; on the flusher thread, off the event
        loop), or when the file writer process writes the files of journal rounds. Without it, the other commits
        of busy rounds are written now: leaving them to the round measured 5% slower at 8 sessions. A message
        spilled to a file is always moved now."""
        if commit.data is None:
            return False
        return len(commit.data) > ROUND_FILES_BYTES or self._alone() or self._file_writer_usable()

    def _number(self, batch: list[_Commit]) -> None:
        """Give the round's commits their sequence numbers, and their records to those going through the journal.
        Numbered at the round, not when asked: every commit numbered has its files written once no round runs,
        so a checkpoint at the last number covers them all."""
        for commit in batch:
            self.last_seq += 1
            if self.journal is not None and commit.data is not None and len(commit.data) <= JOURNAL_MESSAGE_LIMIT:
                stored = commit.message.stored  # (the record holds the message as its file will)
                commit.record = record_parts(self.last_seq, commit.message.msgid, commit.data,
                                             stored.crc32 if stored else commit.message.crc32, commit.dumped)

    def _journal_bytes(self, batch: list[_Commit]) -> int | None:
        """The size of the batch's records when it goes through the journal (every commit has a record and there
        is room for them); None when it needs a sync round."""
        if not self._checkpoints() or not batch:
            return None
        sizes = [record_size(commit.record) for commit in batch if commit.record is not None]
        total = sum(sizes)
        if len(sizes) < len(batch) or not self.journal.active.has_room(total):
            return None
        return total

    def _alone(self) -> bool:
        """No message on its way besides the one asking (those acknowledged, only waiting for the file writer to
        write them or for their rename to be flushed, do not count)."""
        return self.receiving() - len(self.renamed) - self.files_writing <= 1

    def _flush(self, batch: list[_Commit], renamed: list[_Commit], journal_round: bool, checkpoint: int | None,
               on_thread: bool) -> _FlushOutcome:
        """In the flusher thread (or on the loop, see _start_round): make the batch durable: through the journal,
        or its files and folders (written first) and the earlier renames (a sync round), and then tell the
        journal of the checkpoint (None: no checkpoint)."""
        outcome = _FlushOutcome()
        if journal_round:
            assert self.journal is not None
            try:
                self.journal.active.append([commit.record for commit in batch if commit.record is not None])
            except OSError as error:
                outcome.shared_error = error
                return outcome
            for commit in batch:
                commit.journaled = True
            return outcome
        outcome.failed.update(self._write_commits(batch, on_thread))
        if self.filesystem is not None:
            try:
                self.filesystem.sync()
            except OSError as error:
                outcome.shared_error = outcome.rename_error = error
                return outcome
            if self.journal is not None and checkpoint is not None:
                try:  # (no append runs during a sync round: every record of the active journal is covered)
                    self.journal.active.mark(checkpoint)
                except OSError as error:
                    outcome.checkpoint_error = error
            return outcome
        assert self.flusher is not None
        calls: list[Callable[[], None]] = []
        owners: list[_Commit | None] = []
        for commit in batch:
            if id(commit) in outcome.failed:
                continue
            for fd in commit.files:
                calls.append(functools.partial(os.fdatasync, fd))
                owners.append(commit)
            calls.append(functools.partial(fsync_directory, self.spool.incoming_dir(commit.message.msgid)))
            owners.append(commit)
        if batch:
            calls.append(functools.partial(fsync_directory, self.spool.incoming))
            owners.append(None)  # every commit of the batch depends on this one
        buckets = {self.spool.bucket(commit.message.msgid): None for commit in renamed}
        results = self.flusher.run(calls + [functools.partial(fsync_directory, bucket) for bucket in buckets])
        for owner, error in zip(owners, results[:len(calls)], strict=True):
            if error is None:
                continue
            if owner is None:
                outcome.shared_error = error
            else:
                outcome.failed.setdefault(id(owner), error)
        outcome.rename_error = next((error for error in results[len(calls):] if error is not None), None)
        return outcome

    def _round_done(self, batch: list[_Commit], renamed: list[_Commit], on_thread: bool,
                    outcome: _FlushOutcome | None, error: BaseException | None) -> None:
        """On the event loop, after a round: acknowledge, rename, place; start the next round."""
        self.flushing = False
        if outcome is None:
            outcome = _FlushOutcome(shared_error=error, rename_error=error)
        if outcome.rename_error is not None and renamed:
            LOG.warning("queue: flushing the queue folders failed: %s", outcome.rename_error)
        if outcome.checkpoint_error is not None:
            self._give_up_journal(outcome.checkpoint_error)
        if outcome.shared_error is not None and self.journal is not None:
            self._checkpoint_due = True  # records of failed commits may be in the journal: make them void
        for commit in renamed:
            _settle(commit.placed)
        acknowledged: list[_Commit] = []
        for commit in batch:
            _close_all(commit)
            failure = outcome.failed.get(id(commit)) or outcome.shared_error
            if failure is not None:
                self._fail(commit, failure if isinstance(failure, OSError) else OSError(str(failure)))
            else:
                acknowledged.append(commit)
        if batch:
            self.batches += 1
            self.committed += len(acknowledged)
        for commit in acknowledged:
            _settle(commit.future)
        unwritten = [commit for commit in acknowledged if not commit.written]
        self._rename([commit for commit in acknowledged if commit.written])
        if not unwritten:
            self._next_round()
            return
        # A journal round: its records hold these commits; their files come now, after the 250s (the sessions
        # woken above run before the callback; a thread round's next job). No round or checkpoint starts until
        # they are written: a checkpoint must not cover a commit numbered and not written. With the file writer
        # process, rounds go on meanwhile and only checkpoints wait (see files_writing).
        if self._to_file_writer(unwritten, on_thread):
            self._give_spare_folders(unwritten)
            batch = [self._for_file_writer(commit) for commit in unwritten]
            self.files_writing += len(unwritten)
            self.file_writer.write(batch, functools.partial(self._written_by_process, unwritten))
            self._next_round()
            return
        self.flushing = True
        if on_thread:
            self._give_spare_folders(unwritten)
            self.syncer.run(functools.partial(self._write_commits, unwritten, True),
                            functools.partial(self._acknowledged_written, unwritten))
        else:
            self.loop.call_soon(self._write_on_loop, unwritten)

    def _to_file_writer(self, unwritten: list[_Commit], on_thread: bool) -> bool:
        """Whether the file writer process writes these acknowledged commits' files. A lone commit's stay on the
        loop unless the loop polls before it sleeps (smtpd/eventloop.py): otherwise the process's answer is one
        more wake-up of an idle CPU per message (with one client, 13% fewer messages a second), while a polling
        loop catches it awake (3-10% more than writing them on the loop). A commit over ROUND_FILES_BYTES (none
        by default) stays with its round (_has_big)."""
        if not self._file_writer_usable() or self._has_big(unwritten):
            return False
        return on_thread or len(unwritten) > 1 or not self._alone() or self.loop_polls

    def _file_writer_usable(self) -> bool:
        return self.file_writer is not None and self.file_writer.usable

    @staticmethod
    def _has_big(commits: list[_Commit]) -> bool:
        """Whether a commit is over ROUND_FILES_BYTES (by default none that the journal holds): then its round
        writes the files itself, on the flusher thread or the loop."""
        return any(commit.data is not None and len(commit.data) > ROUND_FILES_BYTES for commit in commits)

    @staticmethod
    def _for_file_writer(commit: _Commit) -> tuple[Any, ...]:
        """A commit as the file writer process takes it; the folder made ahead for it is its now."""
        spare, commit.spare = commit.spare, None
        return (commit.message.msgid, *_spare_parts(spare), commit.data, commit.dumped)

    def _written_by_process(self, commits: list[_Commit], results: list[tuple[int, int]] | None) -> None:
        """The file writer's answer (None: it was lost before answering): as _acknowledged_written, with the
        renames under queue/ done by the process."""
        self.files_writing -= len(commits)
        if results is None or len(results) != len(commits):
            results = [self._placed_already(commit) for commit in commits]
        for commit, (stage, number) in zip(commits, results, strict=True):
            if stage == 1:
                self._strand(commit, OSError(number, os.strerror(number)))
                continue
            commit.written = True
            if stage == 0:
                self.renamed.append(commit)
            else:
                self._not_moved(commit, number)
        self._next_round()

    def _placed_already(self, commit: _Commit) -> tuple[int, int]:
        """After the file writer was lost: whether it moved the commit's folder under queue/ before it went (it
        moves a folder only once its files are all written); otherwise the commit counts as not written."""
        if os.path.isdir(self.spool.message_dir(commit.message.msgid)):
            return 0, 0
        return 1, errno.EIO

    def _write_on_loop(self, commits: list[_Commit]) -> None:
        try:
            failures, error = self._write_commits(commits, False), None
        except Exception as failure:  # noqa: BLE001 — as on the thread: those commits wait, the queue goes on
            failures, error = None, failure
        self._acknowledged_written(commits, failures, error)

    def _write_commits(self, commits: list[_Commit], on_thread: bool) -> dict[int, OSError]:
        """Write the files of the commits that have none yet (on the flusher thread: into the folders made ahead
        for them); the failures, each of one commit alone, by id() of the commit."""
        failures: dict[int, OSError] = {}
        for commit in commits:
            if commit.written:
                continue
            make_folder = functools.partial(_folder_from_spare, commit) if on_thread else self._make_folder
            try:
                self._write_files(commit, make_folder)
            except OSError as error:
                failures[id(commit)] = error
        return failures

    def _acknowledged_written(self, commits: list[_Commit], failures: dict[int, OSError] | None,
                              error: BaseException | None) -> None:
        self.flushing = False
        written: list[_Commit] = []
        for commit in commits:
            failure = error if error is not None else (failures or {}).get(id(commit))
            if failure is not None:
                self._strand(commit, failure if isinstance(failure, OSError) else OSError(str(failure)))
            else:
                written.append(commit)
        self._rename(written)
        self._next_round()

    # -- stranded commits ---------------------------------------------------------------------------------
    def _strand(self, commit: _Commit, error: OSError) -> None:
        """An acknowledged commit whose files could not be written (a full disk): its journal record is the only
        copy on disk, so until its files are written no checkpoint or sync round empties a journal (renames are
        flushed by sync rounds meanwhile). Its files are tried again every STRANDED_RETRY_DELAY, from memory; a
        stop leaves it to the journal, and the next start writes it back."""
        self._clear_partial(commit)
        LOG.error("queue: message %s is acknowledged but its files could not be written (%s); the commit journal "
                  "keeps it, trying again every %gs", format_msgid(commit.message.msgid), error,
                  STRANDED_RETRY_DELAY)
        self.stranded.append(commit)
        self._free_retired()
        if self._stranded_timer is None:
            self._stranded_timer = self.loop.call_later(STRANDED_RETRY_DELAY, self._retry_stranded)

    def _clear_partial(self, commit: _Commit) -> None:
        """Undo what a commit's file writing left: open files, its folder made ahead, its folder in incoming/."""
        _close_all(commit)
        if commit.spare is not None:
            remove_path(commit.spare.path)
            commit.spare = None
        remove_path(self.spool.incoming_dir(commit.message.msgid))

    def _retry_stranded(self) -> None:
        self._stranded_timer = None
        failures = self._write_commits(self.stranded, False)
        written: list[_Commit] = []
        still: list[_Commit] = []
        for commit in self.stranded:
            if id(commit) in failures:
                self._clear_partial(commit)  # (logged once, when it was stranded)
                still.append(commit)
            else:
                LOG.info("queue: message %s written from memory after an earlier failure",
                         format_msgid(commit.message.msgid))
                written.append(commit)
        self.stranded = still
        if self.stranded:
            self._stranded_timer = self.loop.call_later(STRANDED_RETRY_DELAY, self._retry_stranded)
        self._rename(written)
        if not self.stranded:
            self._release_held()
        self._next_round()

    def _placeable(self, renamed: list[_Commit], checkpoint: int | None) -> tuple[list[_Commit], list[_Commit]]:
        """(those a sync round places, those left for the next checkpoint) of the renamed commits. A sync round
        that records no checkpoint (a commit is stranded, or the file writer holds commits not written yet)
        flushes their files but leaves the journal as it is: a commit that a journal round acknowledged still
        has its record there, and a start would write it back. Placed now, it could be delivered (or removed),
        then come back and be delivered a second time. So it waits for the checkpoint that voids its record:
        the next one, or, while a commit is stranded (no checkpoint runs), the first after the stranded commits
        are written (they wait in ``held``)."""
        if checkpoint is not None or self.journal is None:
            return renamed, []
        journaled = [commit for commit in renamed if commit.journaled]
        others = [commit for commit in renamed if not commit.journaled]
        if self.stranded:
            self.held += journaled
            return others, []
        return others, journaled

    def _release_held(self) -> None:
        """No commit stranded any more (or no journal): the held commits go to the next checkpoint (or sync
        round), which places them."""
        if self.held:
            self.renamed += self.held
            self.held = []

    def _next_round(self) -> None:
        """After a round or a checkpoint, or when asked: start what is due. A checkpoint that is due starts
        before the next round: under a steady flow of rounds on the flusher thread it would otherwise wait until
        the journal is full."""
        if self._checkpoints() and not (self.flushing or self.checkpointing or self.files_writing) and (
                self._checkpoint_due or (self._draining and self.renamed)):
            self._start_checkpoint()
        if self.written or (self._sync_due and not self._checkpoints()):
            self._start_round()
        waiting = (self._checkpoint_due or self.checkpointing) if self._checkpoints() else self._sync_due
        if self.renamed and self._rename_timer is None and not waiting:
            # Wait a little for a sync round or checkpoint to carry the renames (one flush for many commits).
            self._rename_timer = self.loop.call_later(self.rename_delay, self._flush_renames)
        if not self._busy():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                _settle(waiter)

    def _flush_renames(self) -> None:
        self._rename_timer = None
        if self._checkpoints():
            self._checkpoint_due = True
            self._next_round()
        else:
            self._sync_due = True
            self._start_round()

    # -- checkpoints (journal mode) ----------------------------------------------------------------------
    def _start_checkpoint(self) -> None:
        """Flush the folders and files of the commits renamed so far (one syncfs), then empty the journal that
        held their records; then those commits are placed. Appends switch to the other journal first, so that
        journal rounds go on while the syncfs runs (1.5 ms in the median and up to 16 ms while deliveries
        write, measured: 7% of the time, during which no commit could be acknowledged before)."""
        assert self.journal is not None
        self._checkpoint_due = False
        if self._rename_timer is not None:
            self._rename_timer.cancel()
            self._rename_timer = None
        renamed, self.renamed = self.renamed, []
        left = self.journal.switch()
        self.checkpointing = True
        # Every record in the journal left is of a commit written by now: the syncfs covers its files.
        self.syncer.run(functools.partial(self._checkpoint, left, self.last_seq),
                        functools.partial(self._checkpoint_done, renamed))

    def _checkpoint(self, left: Journal, checkpoint: int) -> None:
        """In the flusher thread."""
        assert self.filesystem is not None
        self.filesystem.sync()
        left.mark(checkpoint)

    def _checkpoint_done(self, renamed: list[_Commit], result: None, error: BaseException | None) -> None:
        self.checkpointing = False
        if error is not None:
            self._give_up_journal(error)
        for commit in renamed:
            _settle(commit.placed)  # (as after a failed flush of renames: placed, the failure logged)
        self._next_round()

    def _give_up_journal(self, error: BaseException) -> None:
        """A journal that could not record a checkpoint may have a header and records that disagree: it takes no
        more records. Its records stay: a crash would write them back (a duplicate at worst, never a loss);
        from now on every round is a sync round."""
        if self.journal is not None:
            LOG.warning("queue: the commit journal could not record a checkpoint (%s); every commit is flushed "
                        "with syncfs from now on", error)
            self.journal = None
            self.rename_delay = RENAME_FLUSH_DELAY
            self._release_held()  # (nothing can void the records now: a crash may duplicate, as for the others)

    def _rename(self, acknowledged: list[_Commit], again: bool = False) -> None:
        """Move durable folders from incoming/ under queue/ (flushed by the next round); ``again``: folders whose
        move failed before (see _not_moved)."""
        for commit in acknowledged:
            msgid = commit.message.msgid
            try:
                os.rename(self.spool.incoming_dir(msgid), self.spool.message_dir(msgid))
            except OSError as error:
                self._not_moved(commit, error.errno or errno.EIO, again)
                continue
            if again:
                LOG.info("queue: message %s moved into the queue after an earlier failure", format_msgid(msgid))
            self.renamed.append(commit)

    def _not_moved(self, commit: _Commit, number: int, again: bool = False) -> None:
        """A written commit whose folder could not go under queue/ (a full disk, say): it is complete in
        incoming/, and the move is tried again every STRANDED_RETRY_DELAY; a stop leaves it to the next start,
        which places it. If a folder of its id is there already (one put there by hand), it can never go: it
        is moved aside to corrupt/, as the next start would, and the mail is kept there for the administrator."""
        msgid = format_msgid(commit.message.msgid)
        if number in (errno.EEXIST, errno.ENOTEMPTY):
            entry = self.spool.set_aside(self.spool.incoming_dir(commit.message.msgid), msgid, ID_TAKEN)
            LOG.warning("queue: message %s could not be moved into the queue: a folder of its id is there; moved "
                        "aside to corrupt/%s", msgid, entry.name)
            if not commit.placed.done():
                commit.placed.set_exception(QueueError("its id is taken under queue/"))
            return
        if not again:  # (logged once, the first time)
            LOG.warning("queue: message %s could not be moved into the queue (%s); trying again every %gs", msgid,
                        os.strerror(number), STRANDED_RETRY_DELAY)
        self.unmoved.append(commit)
        self._free_retired()
        if self._unmoved_timer is None:
            self._unmoved_timer = self.loop.call_later(STRANDED_RETRY_DELAY, self._retry_unmoved)

    def _retry_unmoved(self) -> None:
        self._unmoved_timer = None
        waiting, self.unmoved = self.unmoved, []
        self._rename(waiting, again=True)  # (those that fail again are kept, and the timer set, by _not_moved)
        self._next_round()

    # -- message folders made ahead ------------------------------------------------------------------------
    def _make_folder(self, directory: str) -> str | None:
        """Create a message's folder in incoming/: by renaming one made ahead when there is one. A mkdir is the
        costliest call of a commit (on ext4 a new directory inode is searched for across the block groups, and
        right after many deletions that search is slow: 0.3 ms measured); made ahead by the writer thread, it
        costs the event loop only a rename. Returns the name of the envelope file a taken-back folder holds."""
        while self.folders:
            made = self.folders.pop()
            try:
                os.rename(made.path, directory)
            except OSError as error:
                remove_path(made.path)
                if error.errno == errno.EXDEV:  # temporary/ and incoming/ on different filesystems
                    self.folders_wanted = 0
                    self.folders.clear()
                continue
            self._refill_folders()
            return made.envelope
        os.mkdir(directory, 0o700)
        self._refill_folders()
        return None

    def _give_spare_folders(self, commits: list[_Commit]) -> None:
        """A folder made ahead for each commit whose files the flusher thread or the file writer writes, while there
        are any (see _folder_from_spare, _refill_folders)."""
        for commit in commits:
            if not commit.written and self.folders:
                commit.spare = self.folders.pop()
        self._refill_folders()

    def _refill_folders(self) -> None:
        """Have the writer thread make folders ahead: delivered messages' folders taken back, and new ones unless
        the file writer process makes those itself. It does, for the commits it writes (nearly all of them): its
        mkdir runs beside the event loop, while the writer thread's takes the GIL between its calls, from the loop
        (with 8 sessions, 5-9% more messages a second without it, measured)."""
        if self._folders_coming or len(self.folders) >= self.folders_wanted // 2:
            return
        wanted = self.folders_wanted - len(self.folders)
        reusable = self.take_reusable(wanted)
        if self._file_writer_usable():
            wanted = len(reusable)
            if not wanted:
                return
        self._folders_coming = True
        names = []
        for _ in range(wanted):
            self._folder_counter += 1
            names.append(os.path.join(self.spool.temporary, f"{FOLDER_PREFIX}{os.getpid()}-{self._folder_counter}"))
        self.writer.run(functools.partial(_make_folders, names, reusable), self._folders_made)

    def _folders_made(self, made: list[Spare] | None, error: BaseException | None) -> None:
        self._folders_coming = False
        self.folders.extend(made or [])

    # -- delivered messages' folders taken back ----------------------------------------------------------
    def retire_room(self) -> int:
        """How many more delivered messages' folders purge/ may keep for reuse (0: delete them as before)."""
        if self.filesystem is None or self.folders_wanted == 0 or self._short_of_space():
            return 0  # (reuse waits for a syncfs, see retire)
        return max(0, RETIRED_FOLDERS - len(self.retired))

    def _short_of_space(self) -> bool:
        """Whether acknowledged commits wait for the disk (files not written, or folders not moved): then the
        space of delivered or removed messages is given back at once, not kept for reuse."""
        return bool(self.stranded or self.unmoved)

    def _free_retired(self) -> None:
        """Delete the folders kept for reuse (see retire), on the writer thread: while commits wait for room, the
        old files they still hold may be what is missing. (No syncfs may have recorded their removal yet: a power
        cut could bring one back, delivered again at worst, never lost.)"""
        if not self.retired:
            return
        paths = [path for path, _, _ in self.retired]
        self.retired.clear()
        self.writer.run(functools.partial(_remove_paths, paths), lambda result, error: None)

    def retire(self, folders: list[tuple[str, str]], started: int) -> None:
        """Keep folders that delivered messages left by one rename each into purge/, with their message file and
        envelope file, to be made into new messages' folders: on ext4 without a journal, every inode freed makes
        each inode allocation of the next minutes in its block group search past it (`recently_deleted`), and
        a message's removal freed three (a third of the machine's CPU time once, delivering while accepting).

        Not before a syncfs that began after the renames (``started`` was filesystem.started after them) has
        completed: until the removal is on disk, a power cut could bring the old folder back under queue/ with
        a new message's data in its files."""
        self.retired.extend((path, envelope, started) for path, envelope in folders)
        if self._short_of_space():
            self._free_retired()

    def take_reusable(self, wanted: int) -> list[tuple[str, str]]:
        """Up to ``wanted`` retired folders whose removal is on disk (see retire; none without syncfs)."""
        reusable: list[tuple[str, str]] = []
        covered = self.filesystem.covered if self.filesystem is not None else 0
        while self.retired and len(reusable) < wanted and covered > self.retired[0][2]:
            path, envelope, _ = self.retired.popleft()
            reusable.append((path, envelope))
        return reusable

    def remove_spare_folders(self) -> None:
        for made in self.folders:
            remove_path(made.path)
        self.folders.clear()
        for path, _, _ in self.retired:
            remove_path(path)
        self.retired.clear()

    def _prepare(self, commit: _Commit) -> None:
        """Take the message from memory and dump its envelopes, with what the next start checks if it finds the
        folder still in incoming/ (see docs/queue.md)."""
        message = commit.message
        if message.stored is not None:  # compressed or encrypted (IncomingMessage.commit)
            commit.data = message.stored.data
        elif not message.spilled:
            commit.data = message.take_buffer()
        # What the file will hold: the message as it came, or as stored by the codec.
        size, crc32 = (message.stored.size, message.stored.crc32) if message.stored else (message.size, message.crc32)
        for envelope in message.envelopes:
            envelope.commit_size = size
            envelope.commit_crc32 = crc32
            envelope.commit_envelopes = len(message.envelopes)
            commit.dumped.append((envelope.evpid, codec.stored(dump_envelope(envelope))))

    def _write_files(self, commit: _Commit, make_folder: Callable[[str], str | None]) -> None:
        """The commit's folder in incoming/, its message and envelope files (into the page cache)."""
        message = commit.message
        directory = self.spool.incoming_dir(message.msgid)
        # A taken-back folder (Spare) holds an old message's two files, emptied (_make_folders): opened as they
        # are, without O_TRUNC (which would make ext4 flush them on close, see _empty_files).
        old_envelope = make_folder(directory)
        create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        reuse = os.O_WRONLY | os.O_CLOEXEC
        message_path = os.path.join(directory, MESSAGE_FILE)
        if commit.data is None:
            os.rename(message.temporary_path, message_path)
            commit.files.append(message.take_fd())
        else:
            fd = os.open(message_path, reuse if old_envelope else create, 0o600)
            commit.files.append(fd)
            write_all(fd, commit.data)
        # Per-file flushes: start each file's write-back at once, so the round's data goes out together.
        start_writeback = _no_writeback if self.filesystem is not None else _START_WRITEBACK
        start_writeback(commit.files[0])
        for evpid, envelope_data in commit.dumped:
            envelope_path = os.path.join(directory, f"{evpid:016x}")
            flags = create
            if old_envelope:
                os.rename(os.path.join(directory, old_envelope), envelope_path)
                old_envelope, flags = None, reuse
            fd = os.open(envelope_path, flags, 0o600)
            commit.files.append(fd)
            write_all(fd, envelope_data)
            start_writeback(fd)
        if self.filesystem is not None:
            _close_all(commit)  # syncfs needs no descriptor: fewer open files while a round runs
        commit.written = True

    def _fail(self, commit: _Commit, error: OSError) -> None:
        self._clear_partial(commit)
        LOG.warning("queue: commit of message %s failed: %s", format_msgid(commit.message.msgid), error)
        remove_path(commit.message.temporary_path)
        failure = QueueError(f"queue write failed: {error.strerror or error}")
        for future in (commit.future, commit.placed):
            if not future.done():
                future.set_exception(failure)


def _spare_parts(spare: Spare | None) -> tuple[str | None, str | None]:
    """(path, envelope file name) of a folder made ahead, as make_folder and the file writer take them."""
    return (spare.path, spare.envelope) if spare is not None else (None, None)


def _folder_from_spare(commit: _Commit, directory: str) -> str | None:
    """In the flusher thread: the commit's folder, from the one made ahead for it when there is one (returns the
    name of the envelope file a taken-back folder holds), as the file writer process makes it."""
    spare, commit.spare = commit.spare, None
    return make_folder(*_spare_parts(spare), directory)


def _make_folders(names: list[str], reusable: list[tuple[str, str]]) -> list[Spare]:
    """In the writer thread: message folders ahead of need, taken back from purge/ (``reusable``: path,
    envelope file name) or made empty; returns those ready."""
    made = []
    for name in names:
        if reusable:
            path, envelope = reusable.pop()
            try:
                os.rename(path, name)
                _empty_files(name, (MESSAGE_FILE, envelope))
                made.append(Spare(name, envelope))
                continue
            except OSError:
                remove_path(name)
                remove_path(path)
        try:
            os.mkdir(name, 0o700)
        except OSError:
            break
        made.append(Spare(name))
    for path, _ in reusable:  # (only if a mkdir failed)
        remove_path(path)
    return made


def _remove_paths(paths: list[str]) -> None:
    for path in paths:
        remove_path(path)


def _empty_files(directory: str, names: tuple[str, ...]) -> None:
    """Truncate files through a descriptor, closed here: ext4 flushes a file truncated to zero when it is next
    closed (auto_da_alloc), and that close would otherwise be the commit's, on the event loop."""
    for name in names:
        os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_all(commit: _Commit) -> None:
    for fd in commit.files:
        try:
            os.close(fd)
        except OSError:
            pass
    commit.files.clear()


@dataclass(frozen=True)
class _Stored:
    """A message as the queue's codec stores it (compressed, encrypted): in memory, or in its temporary file."""

    data: bytes | None  # None: in the temporary file (a big message)
    size: int
    crc32: int


class IncomingMessage:
    """One message being received (contract: write, add_envelope, commit, abort)."""

    def __init__(self, store: Queue, msgid: int) -> None:
        self.store = store
        self.msgid = msgid
        self.temporary_path = store.spool.temporary_path(msgid)
        self.envelopes: list[Envelope] = []
        self.size = 0
        self.crc32 = 0
        # Resolved once the message is under queue/ and handed to the scheduler (a moment after commit()).
        self.placed: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []  # the message while it is small (see MEMORY_LIMIT)
        self._fd: int | None = None  # the temporary file once it is not
        self.spilled = False
        self.stored: _Stored | None = None  # set at commit when the queue compresses or encrypts
        self._head = b""  # the message's first two bytes (see commit)
        self._state = "open"

    async def write(self, data: bytes) -> None:
        if self._state != "open":
            raise QueueError("message is not open")
        if len(self._head) < 2:
            self._head += data[:2 - len(self._head)]
        if not self.spilled and self.size + len(data) > MEMORY_LIMIT:
            self._spill()
        if self.spilled:
            assert self._fd is not None
            try:
                write_all(self._fd, data)
            except OSError as error:
                raise QueueError(f"queue write failed: {error.strerror}") from None
            self.crc32 = zlib.crc32(data, self.crc32)
        else:
            self._chunks.append(bytes(data))  # its CRC-32 is taken by the I/O thread (take_buffer)
        self.size += len(data)

    def _spill(self) -> None:
        """Move the message from memory to its file in temporary/ (it grew past MEMORY_LIMIT)."""
        try:
            self._fd = os.open(self.temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.spilled = True
            write_all(self._fd, self.take_buffer())
        except OSError as error:
            raise QueueError(f"cannot write message file: {error.strerror}") from None

    def take_buffer(self) -> bytes:
        """The message held in memory (now empty); its CRC-32 is added to ``crc32``."""
        data = b"".join(self._chunks)
        self._chunks = []
        self.crc32 = zlib.crc32(data, self.crc32)
        return data

    def add_envelope(self, envelope: Envelope) -> int:
        taken = {existing.evpid for existing in self.envelopes}
        # An evpid given ahead (a filter process was told it at RCPT, smtpd/smtp/processes.py) is kept.
        evpid = envelope.evpid if envelope.evpid >> 32 == self.msgid else new_evpid(self.msgid)
        while evpid in taken:
            evpid = new_evpid(self.msgid)
        envelope.evpid = evpid
        self.store.fill_defaults(envelope)
        self.envelopes.append(envelope)
        return evpid

    def take_fd(self) -> int:
        fd, self._fd = self._fd, None
        if fd is None:
            raise OSError(9, "message file already closed")
        return fd

    async def commit(self) -> None:
        if self._state != "open":
            raise QueueError(f"message already {self._state}")
        if not self.envelopes:
            raise QueueError("message has no envelope")
        queue_codec = codec.current()
        if not queue_codec.active and codec.is_encoded(self._head):
            # Readers take a file starting with 0x01 or 1f 8b for encoded (codec.py): a message that begins so
            # (a filter took our Received: line away) is stored gzipped, which any reader turns back into it.
            queue_codec = codec.SELF_MARKING
        if queue_codec.active:
            await self._encode(queue_codec)
        self._state = "committing"
        self.store.arriving -= 1
        durable, placed = self.store.io.submit_commit(self)
        self.placed = placed
        # The scheduler learns of the message once it is under queue/, whether or not anyone still waits
        # for the 250 (a client that went away during the commit: at least once, never lost).
        placed.add_done_callback(self._placed)
        try:
            # Awaited directly (a shield would cost a turn of the loop): if this task is cancelled, so is this
            # future, and the round that makes the commit durable goes on all the same (it settles only
            # futures not done; the placement has its own future).
            await durable
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"

    async def _encode(self, queue_codec: codec.QueueCodec) -> None:
        """Compress or encrypt the message before its commit (`queue compression`, `queue encryption`): what the
        commit writes, into the journal and into its file, is then no clear text. A small message is encoded on
        the loop; a bigger one (gzip takes about 15 ms a MiB here) or one in its file in a worker thread."""
        if not self.spilled:
            data = self.take_buffer()
            if len(data) > ENCODE_ON_LOOP_BYTES:
                data = await asyncio.to_thread(queue_codec.encode, data)
            else:
                data = queue_codec.encode(data)
            self.stored = _Stored(data, len(data), zlib.crc32(data))
            return
        work = asyncio.ensure_future(asyncio.to_thread(_encode_file, queue_codec, self.temporary_path))
        try:
            fd, size, crc32 = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The session's abort() removes the clear file; the encoded one goes once made.
            work.add_done_callback(functools.partial(_drop_encoded, _encoded_path(self.temporary_path)))
            raise
        except OSError as error:
            raise QueueError(f"cannot write message file: {error.strerror}") from None
        try:
            os.rename(_encoded_path(self.temporary_path), self.temporary_path)  # the clear file goes with it
        except OSError as error:
            os.close(fd)
            raise QueueError(f"cannot write message file: {error.strerror}") from None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.stored = _Stored(None, size, crc32)

    def _placed(self, future: asyncio.Future[None]) -> None:
        self.store.receiving.discard(self.msgid)
        if future.cancelled() or future.exception() is not None:
            return
        self.store.committed(self)

    async def abort(self) -> None:
        if self._state in ("committed", "committing", "aborted"):
            return
        if self._state == "open":
            self.store.arriving -= 1
        self._state = "aborted"
        self.store.receiving.discard(self.msgid)
        self._chunks = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.spilled:
            try:
                os.unlink(self.temporary_path)
            except FileNotFoundError:
                pass


def _encoded_path(temporary_path: str) -> str:
    return temporary_path + ".stored"  # (in temporary/: a crash leaves it to be dropped at the next start)


def _encode_file(queue_codec: codec.QueueCodec, temporary_path: str) -> tuple[int, int, int]:
    """Encode a big message's temporary file into a file beside it: (its descriptor, size, CRC-32)."""
    target_path = _encoded_path(temporary_path)
    target = os.open(target_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        source = os.open(temporary_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size, crc32 = queue_codec.encode_file(source, target)
        finally:
            os.close(source)
    except BaseException:
        os.close(target)
        remove_path(target_path)
        raise
    return target, size, crc32


def _drop_encoded(path: str, work: asyncio.Future[tuple[int, int, int]]) -> None:
    """The encoded file of a commit cancelled while it was made (its session went away)."""
    if work.cancelled() or work.exception() is not None:
        return
    fd, _, _ = work.result()
    os.close(fd)
    remove_path(path)


class _RemovalBatch:
    """Envelope removals that run as one job on the queue's writer thread.

    The job is queued with the first removal; the ones asked until the thread starts it join it. The thread
    removes them in order and hands every result back to the event loop in one call."""

    def __init__(self, spool: Spool, writer: SpoolWriter) -> None:
        self.spool = spool
        self.writer = writer
        self.loop = writer.loop
        self.retire_room = writer.retire_room()  # folders it may keep for reuse (see SpoolWriter.retire)
        self.evpids: list[int] = []
        self.futures: list[asyncio.Future[bool]] = []
        self.started = False  # set by the thread: from then on, new removals go to a new batch
        self.lock = threading.Lock()

    def add(self, evpid: int) -> asyncio.Future[bool] | None:
        """This removal's future; None when the thread has already taken the batch."""
        with self.lock:
            if self.started:
                return None
            future: asyncio.Future[bool] = self.loop.create_future()
            self.evpids.append(evpid)
            self.futures.append(future)
            return future

    def run(self) -> None:
        """In the writer thread."""
        with self.lock:
            self.started = True
        results: list[bool | BaseException] = []
        retired: list[tuple[str, str]] = []
        for evpid in self.evpids:
            try:
                results.append(self.spool.remove_envelope_file(
                    evpid, retired if len(retired) < self.retire_room else None))
            except Exception as error:  # noqa: BLE001 — handed to that removal's caller
                results.append(error)
        filesystem = self.writer.filesystem
        started = filesystem.started if filesystem is not None else 0  # (read after the renames)
        try:
            self.loop.call_soon_threadsafe(self._settle, results, retired, started)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _settle(self, results: list[bool | BaseException], retired: list[tuple[str, str]], started: int) -> None:
        if retired:
            self.writer.retire(retired, started)
        for future, result in zip(self.futures, results, strict=False):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class Queue:
    """daemon.queue: the spool, its I/O thread, and the background loading of a big queue at start."""

    def __init__(self, daemon: Daemon | None, spool_root: str, mailname: str = "localhost") -> None:
        self.daemon = daemon
        self.spool = Spool(spool_root)
        self.mailname = mailname
        self.io: SpoolWriter = None  # type: ignore[assignment]  # created in start() with the running loop
        self.loading_done = asyncio.Event()
        self.loaded_envelopes = 0
        self.load_seconds = 0.0
        self.corrupt_found: list[CorruptEntry] = []
        self.receiving: set[int] = set()  # msgids of messages being received or committed
        self.arriving = 0  # messages being received, not yet asked to commit
        self._loader: asyncio.Task[None] | None = None
        # Envelope consumer: the scheduler, or (in tests without one) None.
        self.on_envelopes: Callable[[list[Envelope], bool], None] | None = None
        self._removals: _RemovalBatch | None = None  # the removal batch still open for more envelopes
        # Message ids with no folder on disk, checked ahead and kept for new messages (see new_message).
        self._free_msgids: list[int] = []
        self._msgids_to_check = 0
        self._msgid_check_soon = False

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        # A spool that cannot be written (a read-only filesystem, a file where a folder should be) stops the start
        # with one line naming the file and the reason (not Python's `[Errno 30] ...`, nor, for the journal, "holds
        # acknowledged mail ... make room" when it held nothing and no room was missing).
        try:
            self.spool.create_layout()
        except SpoolPermissionError as error:
            raise QueueError(f"queue: the spool cannot be used ({error})") from error
        except FileExistsError as error:  # (create_layout makes only the folders that are not there)
            raise QueueError(f"queue: the spool cannot be used ({error.filename}: not a folder)") from error
        except OSError as error:
            raise QueueError(f"queue: the spool cannot be used ({_where(error)})") from error
        if self.spool.taken_over:
            LOG.info("queue: OpenSMTPD's spool taken over: %d folders and files of its queue account now belong "
                     "to the daemon", self.spool.taken_over)
        try:
            warning = await asyncio.to_thread(self.spool.check_encryption_key, codec.current())
        except codec.QueueCodecError as error:
            raise QueueError(f"queue: {error}") from error
        except OSError as error:
            raise QueueError(f"queue: the spool cannot be used ({_where(error)})") from error
        if warning:
            LOG.warning("%s", warning)
        # First the journal: it may write back messages whose folders a crash left incomplete.
        try:
            journal, restored = await asyncio.to_thread(open_journal, self.spool)
        except JournalUnusable as unusable:
            raise QueueError(f"queue: the commit journal cannot be opened ({_where(unusable.error)})") from unusable
        except OSError as error:
            # Typically a spool still full after a stop while a commit waited for room: say what to do. The journal
            # stays as it is (what was written back so far is written again at the next start).
            advice = ("make room on the spool's filesystem and start again"
                      if error.errno in (errno.ENOSPC, errno.EDQUOT) else "mend that and start again")
            raise QueueError(f"queue: the commit journal holds acknowledged mail that cannot be written back "
                             f"({_where(error)}); nothing is lost, the journal is kept: {advice}") from error
        if restored:
            LOG.info("queue: wrote back %d acknowledged message(s) from the commit journal", restored)
        dropped, placed, _, aside = await asyncio.to_thread(self.spool.recover)
        self._note_corrupt(aside)
        if dropped:
            LOG.info("queue: dropped %d unacknowledged message(s) left by a crash", dropped)
        if placed:
            LOG.info("queue: placed %d acknowledged message(s) left in incoming/ by a crash", placed)
        # The messages to load are the ones present now: listing later would also find messages committed
        # (and maybe already delivered) since, and deliver them twice.
        # Sorted by the folders' inodes: with a cold cache, neighbouring inodes and blocks are read together.
        msgids = [msgid for _, msgid in sorted(await asyncio.to_thread(self.spool.message_entries))]
        self.io = SpoolWriter(self.spool, asyncio.get_running_loop(), receiving=lambda: len(self.receiving),
                              journal=journal, arriving=lambda: self.arriving)
        self.io.start()
        self._loader = asyncio.create_task(self._load_in_background(msgids), name="queue-loader")

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            try:
                await self._loader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.io is not None:
            await self.io.drain()
            self.io.close_file_writer()
            await asyncio.to_thread(self.io.stop)

    # -- receiving ------------------------------------------------------------------------------------
    def reserve_msgid(self) -> int:
        """A free msgid held for a message whose DATA is still to come (filter processes are told a
        transaction's msgid at MAIL FROM, as OpenSMTPD does); ``new_message(msgid)`` takes it, or
        ``release_msgid`` gives it back."""
        msgid = self._take_free_msgid()
        self.receiving.add(msgid)
        self._check_msgid_ahead_soon()
        return msgid

    def release_msgid(self, msgid: int) -> None:
        self.receiving.discard(msgid)

    def new_message(self, msgid: int | None = None) -> IncomingMessage:
        if msgid is not None:  # reserved at MAIL FROM
            self.arriving += 1
            return IncomingMessage(self, msgid)
        # No file yet (see MEMORY_LIMIT): the id must be free in memory and on disk; the commit's exclusive
        # mkdir in incoming/ catches the rest. The disk check (a stat of a name not there: 24-40 us here) is
        # made ahead, for a later message, in a turn of the loop of its own: with one client it runs while the
        # client reads our 354, not between its DATA and our reply (one client: 4-14% more messages a second).
        msgid = self._take_free_msgid()
        self.receiving.add(msgid)
        self.arriving += 1
        self._check_msgid_ahead_soon()
        return IncomingMessage(self, msgid)

    def _take_free_msgid(self) -> int:
        while self._free_msgids:
            msgid = self._free_msgids.pop()
            if msgid not in self.receiving:
                return msgid
        for _ in range(100):
            msgid = self._free_msgid_candidate()
            if msgid is not None:
                return msgid
        raise QueueError("no free message id")

    def _free_msgid_candidate(self) -> int | None:
        """A random msgid that no message uses nor was kept for one, and that has no folder on disk; or None."""
        msgid = new_msgid()
        if msgid in self.receiving or msgid in self._free_msgids or os.path.exists(self.spool.message_dir(msgid)):
            return None
        return msgid

    def _check_msgid_ahead_soon(self) -> None:
        self._msgids_to_check = min(self._msgids_to_check + 1, FREE_MSGIDS_AHEAD)
        if self._msgid_check_soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (no loop: the next message checks its id itself)
        self._msgid_check_soon = True
        loop.call_soon(self._check_msgids_ahead)

    def _check_msgids_ahead(self) -> None:
        """Find free msgids for the messages to come: one for each message that took one since the last time
        (so that no turn of the loop makes many checks), up to FREE_MSGIDS_AHEAD kept."""
        self._msgid_check_soon = False
        wanted = min(self._msgids_to_check, FREE_MSGIDS_AHEAD - len(self._free_msgids))
        self._msgids_to_check = 0
        for _ in range(wanted):
            msgid = self._free_msgid_candidate()
            if msgid is not None:
                self._free_msgids.append(msgid)

    def fill_defaults(self, envelope: Envelope) -> None:
        if not envelope.ctime:
            envelope.ctime = int(time.time())
        if not envelope.smtpname:
            envelope.smtpname = self.mailname
        if not envelope.ttl:
            envelope.ttl = self.ttl_for(envelope)

    def ttl_for(self, envelope: Envelope) -> int:
        config = self.daemon.config if self.daemon is not None else None
        if config is None:
            from smtpd.config.model import DEFAULT_QUEUE_TTL

            return DEFAULT_QUEUE_TTL
        return config.ttl_for(envelope.dispatcher)

    def committed(self, message: IncomingMessage) -> None:
        STATS.increment("queue.ram.message.size", message.size)
        if trace.wants("queue"):
            trace.emit("queue", f"queue: message {format_msgid(message.msgid)} committed "
                       f"({len(message.envelopes)} envelope(s), {message.size} bytes)",
                       msgid=format_msgid(message.msgid), size=message.size, envelopes=len(message.envelopes))
        if self.on_envelopes is not None:
            self.on_envelopes(list(message.envelopes), False)

    async def inject(self, data: bytes, envelopes: list[Envelope]) -> int:
        """Queue a message made by the daemon itself (a bounce). Returns its msgid once durable and in the
        scheduler's hands: the caller deletes the envelope the bounce reports on next, and `show queue` must
        never be empty in between (a script waiting for an empty queue would stop before the bounce is out)."""
        message = self.new_message()
        try:
            await message.write(data)
            for envelope in envelopes:
                message.add_envelope(envelope)
            await message.commit()
        except BaseException:
            await message.abort()
            raise
        if message.placed is not None:
            try:
                await asyncio.shield(message.placed)
            except QueueError:
                pass  # durable but not moved under queue/ (logged): the next start places it
        return message.msgid

    # -- paths and reading ------------------------------------------------------------------------------
    def message_path(self, msgid: int) -> str:
        return self.spool.message_path(msgid)

    def envelope_path(self, evpid: int) -> str:
        return self.spool.envelope_path(evpid)

    # -- changing stored envelopes ------------------------------------------------------------------------
    async def update_envelope(self, envelope: Envelope) -> None:
        """Durably rewrite one envelope (retry count, error line, last try)."""
        data = codec.stored(dump_envelope(envelope))
        path = self.spool.envelope_path(envelope.evpid)

        def rewrite() -> None:
            if os.path.exists(path):  # removed meanwhile: do not resurrect it
                replace_file(path, data)

        future = self.io.submit(rewrite)
        assert future is not None
        await future

    async def remove_envelope(self, evpid: int) -> bool:
        """Delete one envelope file (and its message after the last one). False if it was not there.

        Removals asked close together share one job on the writer thread (see _RemovalBatch): one hand-off to the
        thread and back per batch rather than per envelope, in order with the other spool writes."""
        future = self._removals.add(evpid) if self._removals is not None else None
        if future is None:  # none open, or the thread has started it
            self._removals = _RemovalBatch(self.spool, self.io)
            future = self._removals.add(evpid)
            assert future is not None
            self.io.submit(self._removals.run, wait=False)
        return await future

    async def discover(self, msgid: int) -> list[Envelope]:
        """Read a message's envelopes from disk (smtpctl discover)."""
        loaded = await asyncio.to_thread(self.spool.load_message, msgid)
        self._note_corrupt(loaded.corrupt)
        return loaded.envelopes

    def message_problem(self, envelope: Envelope) -> str:
        """"" if the envelope's message file is as its commit wrote it; else why it must not be delivered."""
        return message_size_problem(self.spool.message_path(envelope.msgid), envelope)

    async def set_message_aside(self, msgid: int, reason: str) -> None:
        """Move a committed message's folder (message and envelopes) to corrupt/, logged and listed."""
        entry = await asyncio.to_thread(self.spool.set_aside, self.spool.message_dir(msgid), format_msgid(msgid),
                                        reason)
        self._note_corrupt([entry])

    def corrupt_entries(self) -> list[CorruptEntry]:
        return self.spool.corrupt_entries()

    def waiting_for_disk(self) -> list[int]:
        """Acknowledged messages not in the scheduler yet because the disk had no room for their files or their
        move under queue/ (see SpoolWriter._strand, _not_moved); the journal or incoming/ keeps them."""
        if self.io is None:
            return []
        return sorted({commit.message.msgid for commit in (*self.io.stranded, *self.io.unmoved, *self.io.held)})

    def _note_corrupt(self, entries: list[CorruptEntry]) -> None:
        for entry in entries:
            LOG.warning("queue: corrupt queue file moved aside to corrupt/%s: %s", entry.name, entry.reason)
            trace.emit("queue", f"queue: corrupt file moved aside: {entry.name}: {entry.reason}",
                       name=entry.name, reason=entry.reason)
        self.corrupt_found.extend(entries)

    # -- loading at start -------------------------------------------------------------------------------
    async def wait_loaded(self) -> None:
        """Return once the queue found at start is in the scheduler's hands (or its loading ended otherwise)."""
        loader = self._loader
        if loader is not None and not loader.done():
            # (asyncio.wait: a waiter cancelled, say its client gone, leaves the loading alone)
            await asyncio.wait((loader,))

    async def _load_in_background(self, msgids: list[int]) -> None:
        """Hand the stored envelopes to the scheduler in chunks, reading files off the event loop."""
        started = time.monotonic()
        await self._load_chunks(msgids)
        self.load_seconds = time.monotonic() - started
        LOG.info("queue: %d envelope(s) of %d message(s) loaded in %.2fs", self.loaded_envelopes, len(msgids),
                 self.load_seconds)
        trace.emit("queue", f"queue: loaded {self.loaded_envelopes} envelope(s)", envelopes=self.loaded_envelopes)
        self.loading_done.set()

    async def _load_chunks(self, msgids: list[int]) -> None:
        """Read by the spool reader process, parsed here batch by batch (smtpd/queue/loading.py)."""

        def take(envelopes: list[Envelope], corrupt: list[CorruptEntry]) -> None:
            self._note_corrupt(corrupt)
            self.loaded_envelopes += len(envelopes)
            if self.on_envelopes is not None and envelopes:
                self.on_envelopes(envelopes, True)

        await load_queue(self.spool, msgids, LOAD_THREADS, take)


def build(daemon: Daemon) -> Queue:
    queue = Queue(daemon, daemon.paths.spool, daemon.mailname)
    daemon.queue = queue
    return queue
