"""The queue component: receiving messages, the group commit, envelope updates and removal, background loading.

Every write to the spool runs on a few writer threads ("I/O threads") fed by one line of jobs. A commit is
durable before its future resolves: message file, envelope files, their folder and incoming/ flushed (round 1);
then the folder is renamed under queue/XX/ and the rename flushed (round 2), after which the scheduler takes the
envelopes. Commits that arrive while a batch is being flushed go into the next batch and share its syncs
(group commit): one syncfs(2) per batch (or per-file flushes for a lone commit, or everywhere with
SMTPD_QUEUE_SYNC=fsync). docs/queue.md has the whole story.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import queue as thread_queue
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.ids import format_msgid, new_evpid, new_msgid
from smtpd import log, trace
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
from smtpd.queue.format import dump_envelope
from smtpd.queue.spool import CorruptEntry, Spool, remove_path
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

LOG = log.get("queue")
LOAD_CHUNK = 500  # messages handed to the scheduler at once while loading in the background
LOAD_THREADS = int(os.environ.get("SMTPD_QUEUE_LOAD_THREADS", "16"))
MAX_BATCH = 256  # commits flushed together at most
IO_THREADS = int(os.environ.get("SMTPD_QUEUE_IO_THREADS", "2"))
# A message is held in memory while it arrives up to this size, and written by the I/O thread at commit (no
# file, no system call on the event loop); a bigger one goes on to a file in temporary/.
MEMORY_LIMIT = int(os.environ.get("SMTPD_QUEUE_MEMORY_LIMIT", str(256 * 1024)))
FLUSH_THREADS = int(os.environ.get("SMTPD_QUEUE_FLUSH_THREADS", "8"))
# How a batch is made durable: "syncfs" (one syncfs(2) of the spool's filesystem per round) or "fsync" (every
# file and folder flushed on its own, in parallel). Default: syncfs where it exists and the spool is one fs.
SYNC_MODE = os.environ.get("SMTPD_QUEUE_SYNC", "syncfs")
# Smaller batches are flushed file by file even in syncfs mode: a lone commit then waits only for its own files,
# not for whatever else is dirty on the filesystem.
SYNCFS_MIN_BATCH = int(os.environ.get("SMTPD_QUEUE_SYNCFS_MIN_BATCH", "2"))


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


class QueueError(Exception):
    pass


@dataclass
class _Commit:
    message: IncomingMessage
    future: asyncio.Future[None]  # durable: the 250 may be sent
    placed: asyncio.Future[None]  # moved under queue/: the scheduler may take it
    files: list[int] = field(default_factory=list)  # open fds to flush


@dataclass
class _Operation:
    function: Callable[[], Any]
    future: asyncio.Future[Any] | None


class IOThread:
    """The single thread that writes the spool; commits are batched, other operations run in order."""

    def __init__(self, spool: Spool, loop: asyncio.AbstractEventLoop) -> None:
        self.spool = spool
        self.loop = loop
        self.jobs: thread_queue.SimpleQueue[_Commit | _Operation | None] = thread_queue.SimpleQueue()
        # Several writer threads take batches from one line of jobs: while one waits for the disk to flush its
        # batch, another prepares and flushes the next, and the disk merges their flushes.
        self.threads = [threading.Thread(target=self._run, name=f"queue-io-{number}", daemon=True)
                        for number in range(IO_THREADS)]
        self.batches = 0
        self.committed = 0
        self.flusher = ParallelFlusher(FLUSH_THREADS)
        self.filesystem: FilesystemSync | None = None
        if SYNC_MODE == "syncfs" and SYNCFS is not None and same_filesystem(
                [spool.root, spool.temporary, spool.incoming, spool.queue]):
            self.filesystem = FilesystemSync(spool.root)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(timeout=30)
        self.flusher.shutdown()
        if self.filesystem is not None:
            self.filesystem.close()

    def submit_commit(self, message: IncomingMessage) -> tuple[asyncio.Future[None], asyncio.Future[None]]:
        """(durable, placed) futures of one commit."""
        durable: asyncio.Future[None] = self.loop.create_future()
        placed: asyncio.Future[None] = self.loop.create_future()
        self.jobs.put(_Commit(message, durable, placed))
        return durable, placed

    def submit(self, function: Callable[[], Any], wait: bool = True) -> asyncio.Future[Any] | None:
        future = self.loop.create_future() if wait else None
        self.jobs.put(_Operation(function, future))
        return future

    # -- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        # Folders renamed under queue/ whose rename is not flushed yet (syncfs mode): the next batch's syncfs
        # covers them, or, when no job waits, one of their own.
        unflushed: list[_Commit] = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except thread_queue.Empty:
                unflushed = self._flush_placed(unflushed)
                job = self.jobs.get()
            if job is None:
                self._flush_placed(unflushed)
                return
            batch: list[_Commit] = []
            operations: list[_Operation] = []
            stopping = False
            while job is not None:
                (batch if isinstance(job, _Commit) else operations).append(job)  # type: ignore[arg-type]
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    job = self.jobs.get_nowait()
                except thread_queue.Empty:
                    break
                if job is None:
                    stopping = True
            if batch:
                unflushed = self._commit_batch(batch, unflushed)
            for operation in operations:
                self._run_operation(operation)
            if stopping:
                self._flush_placed(unflushed)
                return

    def _resolve(self, future: asyncio.Future[Any] | None, result: Any = None,
                 error: BaseException | None = None) -> None:
        if future is None:
            return

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _resolve_all(self, futures: list[asyncio.Future[None]]) -> None:
        """Settle many futures with one wake-up of the event loop (one call per batch, not per commit)."""
        if not futures:
            return

        def settle() -> None:
            for future in futures:
                if not future.done():
                    future.set_result(None)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _run_operation(self, operation: _Operation) -> None:
        try:
            result = operation.function()
        except Exception as error:  # noqa: BLE001 — reported to the waiter or logged, never kills the thread
            if operation.future is None:
                LOG.warning("queue: %s", error)
            self._resolve(operation.future, error=error)
        else:
            self._resolve(operation.future, result)

    def _commit_batch(self, batch: list[_Commit], unflushed: list[_Commit]) -> list[_Commit]:
        """Round 1 (the 250 waits for it): every file, message folder and incoming/ flushed, all at once.
        Round 2 (after the 250): the folders renamed under queue/ and the renames flushed; only then does the
        scheduler take the envelopes. A crash between the two rounds leaves complete folders in incoming/,
        which the next start verifies (size, checksum, envelope count) and moves under queue/.

        With syncfs, round 2 of one batch rides on round 1 of the next (one syncfs flushes the new files and
        the earlier renames): ``unflushed`` are the earlier batch's renamed commits, the result this batch's."""
        prepared: list[_Commit] = []
        whole_filesystem = self.filesystem is not None and len(batch) >= SYNCFS_MIN_BATCH
        for commit in batch:
            try:
                self._write_files(commit, whole_filesystem)
                prepared.append(commit)
            except OSError as error:
                self._fail(commit, error)
        failed, shared_error = self._flush_prepared(prepared, whole_filesystem)
        if unflushed and whole_filesystem and shared_error is None:
            self._resolve_placed(unflushed)  # this batch's syncfs flushed their renames too
        else:
            self._flush_placed(unflushed)  # a syncfs of their own (none ran, or it failed)
        durable: list[_Commit] = []
        for commit in prepared:
            _close_all(commit)
            error = failed.get(id(commit)) or shared_error
            if error is not None:
                self._fail(commit, error if isinstance(error, OSError) else OSError(str(error)))
            else:
                durable.append(commit)
        self.batches += 1
        self.committed += len(durable)
        self._resolve_all([commit.future for commit in durable])
        renamed = self._rename(durable)
        if not whole_filesystem:
            return self._flush_placed(renamed)
        return renamed

    def _flush_prepared(self, prepared: list[_Commit], whole_filesystem: bool
                        ) -> tuple[dict[int, BaseException], BaseException | None]:
        """Make the written files and folders durable: (errors by commit id, error shared by all)."""
        if not prepared:
            return {}, None
        if whole_filesystem and self.filesystem is not None:
            try:
                self.filesystem.sync()
            except OSError as error:
                return {}, error
            return {}, None
        calls: list[Callable[[], None]] = []
        owners: list[_Commit | None] = []
        for commit in prepared:
            for fd in commit.files:
                calls.append(functools.partial(os.fdatasync, fd))
                owners.append(commit)
            calls.append(functools.partial(fsync_directory, self.spool.incoming_dir(commit.message.msgid)))
            owners.append(commit)
        calls.append(functools.partial(fsync_directory, self.spool.incoming))
        owners.append(None)  # every commit of the batch depends on this one
        failed: dict[int, BaseException] = {}
        shared_error: BaseException | None = None
        for owner, error in zip(owners, self.flusher.run(calls), strict=True):
            if error is None:
                continue
            if owner is None:
                shared_error = error
            else:
                failed.setdefault(id(owner), error)
        return failed, shared_error

    def _rename(self, durable: list[_Commit]) -> list[_Commit]:
        """Move durable folders from incoming/ under queue/ (not flushed yet)."""
        placed: list[_Commit] = []
        for commit in durable:
            msgid = commit.message.msgid
            try:
                os.rename(self.spool.incoming_dir(msgid), self.spool.message_dir(msgid))
                placed.append(commit)
            except OSError as error:  # it stays in incoming/, complete: the next start places it
                LOG.warning("queue: message %s could not be moved into the queue: %s", format_msgid(msgid),
                            error)
        return placed

    def _flush_placed(self, placed: list[_Commit]) -> list[_Commit]:
        """Flush the renames of placed folders, then hand them to the scheduler. Returns [] (none left)."""
        if not placed:
            return []
        buckets = {self.spool.bucket(commit.message.msgid): None for commit in placed}
        error: BaseException | None = None
        if self.filesystem is not None and len(buckets) >= SYNCFS_MIN_BATCH:
            try:
                self.filesystem.sync()
            except OSError as sync_error:
                error = sync_error
        else:
            errors = self.flusher.run([functools.partial(fsync_directory, bucket) for bucket in buckets])
            error = next((error for error in errors if error is not None), None)
        if error is not None:
            LOG.warning("queue: flushing the queue folders failed: %s", error)
        return self._resolve_placed(placed)

    def _resolve_placed(self, placed: list[_Commit]) -> list[_Commit]:
        self._resolve_all([commit.placed for commit in placed])
        return []

    def _write_files(self, commit: _Commit, whole_filesystem: bool) -> None:
        message = commit.message
        directory = self.spool.incoming_dir(message.msgid)
        os.mkdir(directory, 0o700)
        message_path = os.path.join(directory, "message")
        if message.spilled:
            os.rename(message.temporary_path, message_path)
            commit.files.append(message.take_fd())
        else:
            fd = os.open(message_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            commit.files.append(fd)
            write_all(fd, message.take_buffer())
        # Per-file flushes: start each file's write-back at once, so the batch's data goes out together.
        start_writeback = _no_writeback if whole_filesystem else _START_WRITEBACK
        start_writeback(commit.files[0])
        for envelope in message.envelopes:
            # What the next start checks if it finds this folder still in incoming/ (see _commit_batch).
            envelope.commit_size = message.size
            envelope.commit_crc32 = message.crc32
            envelope.commit_envelopes = len(message.envelopes)
            path = os.path.join(directory, f"{envelope.evpid:016x}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            commit.files.append(fd)
            data = dump_envelope(envelope)
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
            start_writeback(fd)

    def _fail(self, commit: _Commit, error: OSError) -> None:
        _close_all(commit)
        msgid = commit.message.msgid
        LOG.warning("queue: commit of message %s failed: %s", format_msgid(msgid), error)
        remove_path(self.spool.incoming_dir(msgid))
        remove_path(commit.message.temporary_path)
        failure = QueueError(f"queue write failed: {error.strerror or error}")
        self._resolve(commit.future, error=failure)
        self._resolve(commit.placed, error=failure)


def _close_all(commit: _Commit) -> None:
    for fd in commit.files:
        try:
            os.close(fd)
        except OSError:
            pass
    commit.files.clear()


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
        self._state = "open"

    async def write(self, data: bytes) -> None:
        if self._state != "open":
            raise QueueError("message is not open")
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
        evpid = new_evpid(self.msgid)
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
        self._state = "committing"
        durable, placed = self.store.io.submit_commit(self)
        self.placed = placed
        # The scheduler learns of the message once it is under queue/, whether or not anyone still waits
        # for the 250 (a client that went away during the commit: at least once, never lost).
        placed.add_done_callback(self._placed)
        try:
            await asyncio.shield(durable)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"

    def _placed(self, future: asyncio.Future[None]) -> None:
        self.store.receiving.discard(self.msgid)
        if future.cancelled() or future.exception() is not None:
            return
        self.store.committed(self)

    async def abort(self) -> None:
        if self._state in ("committed", "committing", "aborted"):
            return
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


class Queue:
    """daemon.queue: the spool, its I/O thread, and the background loading of a big queue at start."""

    def __init__(self, daemon: Daemon | None, spool_root: str, mailname: str = "localhost") -> None:
        self.daemon = daemon
        self.spool = Spool(spool_root)
        self.mailname = mailname
        self.io: IOThread = None  # type: ignore[assignment]  # created in start() with the running loop
        self.loading_done = asyncio.Event()
        self.loaded_envelopes = 0
        self.load_seconds = 0.0
        self.corrupt_found: list[CorruptEntry] = []
        self.receiving: set[int] = set()  # msgids of messages being received or committed
        self._loader: asyncio.Task[None] | None = None
        # Envelope consumer: the scheduler, or (in tests without one) None.
        self.on_envelopes: Callable[[list[Envelope], bool], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.spool.create_layout()
        dropped, placed, _ = await asyncio.to_thread(self.spool.recover)
        if dropped:
            LOG.info("queue: dropped %d unacknowledged message(s) left by a crash", dropped)
        if placed:
            LOG.info("queue: placed %d acknowledged message(s) left in incoming/ by a crash", placed)
        # The messages to load are the ones present now: listing later would also find messages committed
        # (and maybe already delivered) since, and deliver them twice.
        msgids = await asyncio.to_thread(lambda: list(self.spool.message_ids()))
        self.io = IOThread(self.spool, asyncio.get_running_loop())
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
            await asyncio.to_thread(self.io.stop)

    # -- receiving ------------------------------------------------------------------------------------
    def new_message(self) -> IncomingMessage:
        # No file yet (see MEMORY_LIMIT): the id must be free in memory and on disk; the commit's exclusive
        # mkdir in incoming/ catches the rest.
        for _ in range(100):
            msgid = new_msgid()
            if msgid in self.receiving or os.path.exists(self.spool.message_dir(msgid)):
                continue
            self.receiving.add(msgid)
            return IncomingMessage(self, msgid)
        raise QueueError("no free message id")

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
        action = config.actions.get(envelope.dispatcher)
        if action is not None and action.ttl:
            return action.ttl
        return config.queue.ttl

    def committed(self, message: IncomingMessage) -> None:
        STATS.increment("queue.ram.message.size", message.size)
        if trace.wants("queue"):
            trace.emit("queue", f"queue: message {format_msgid(message.msgid)} committed "
                       f"({len(message.envelopes)} envelope(s), {message.size} bytes)",
                       msgid=format_msgid(message.msgid), size=message.size, envelopes=len(message.envelopes))
        if self.on_envelopes is not None:
            self.on_envelopes(list(message.envelopes), False)

    async def inject(self, data: bytes, envelopes: list[Envelope]) -> int:
        """Queue a message made by the daemon itself (a bounce). Returns its msgid once durable."""
        message = self.new_message()
        try:
            await message.write(data)
            for envelope in envelopes:
                message.add_envelope(envelope)
            await message.commit()
        except BaseException:
            await message.abort()
            raise
        return message.msgid

    # -- paths and reading ------------------------------------------------------------------------------
    def message_path(self, msgid: int) -> str:
        return self.spool.message_path(msgid)

    def envelope_path(self, evpid: int) -> str:
        return self.spool.envelope_path(evpid)

    # -- changing stored envelopes ------------------------------------------------------------------------
    async def update_envelope(self, envelope: Envelope) -> None:
        """Durably rewrite one envelope (retry count, error line, last try)."""
        data = dump_envelope(envelope)
        path = self.spool.envelope_path(envelope.evpid)

        def rewrite() -> None:
            if os.path.exists(path):  # removed meanwhile: do not resurrect it
                replace_file(path, data)

        future = self.io.submit(rewrite)
        assert future is not None
        await future

    async def remove_envelope(self, evpid: int) -> bool:
        future = self.io.submit(lambda: self.spool.remove_envelope_file(evpid))
        assert future is not None
        return bool(await future)

    async def discover(self, msgid: int) -> list[Envelope]:
        """Read a message's envelopes from disk (smtpctl discover)."""
        loaded = await asyncio.to_thread(self.spool.load_message, msgid)
        self._note_corrupt(loaded.corrupt)
        return loaded.envelopes

    def corrupt_entries(self) -> list[CorruptEntry]:
        return self.spool.corrupt_entries()

    def _note_corrupt(self, entries: list[CorruptEntry]) -> None:
        for entry in entries:
            LOG.warning("queue: corrupt queue file moved aside to corrupt/%s: %s", entry.name, entry.reason)
            trace.emit("queue", f"queue: corrupt file moved aside: {entry.name}: {entry.reason}",
                       name=entry.name, reason=entry.reason)
        self.corrupt_found.extend(entries)

    # -- loading at start -------------------------------------------------------------------------------
    async def _load_in_background(self, msgids: list[int]) -> None:
        """Hand the stored envelopes to the scheduler in chunks, reading files off the event loop."""
        started = time.monotonic()
        # Several readers: with a cold cache each file costs a disk round trip, and threads keep many in flight.
        readers = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="queue-load")
        try:
            await self._load_chunks(msgids, readers)
        finally:
            readers.shutdown(wait=False, cancel_futures=True)
        self.load_seconds = time.monotonic() - started
        LOG.info("queue: %d envelope(s) of %d message(s) loaded in %.2fs", self.loaded_envelopes, len(msgids),
                 self.load_seconds)
        trace.emit("queue", f"queue: loaded {self.loaded_envelopes} envelope(s)", envelopes=self.loaded_envelopes)
        self.loading_done.set()

    async def _load_chunks(self, msgids: list[int], readers: ThreadPoolExecutor) -> None:
        for start in range(0, len(msgids), LOAD_CHUNK):
            chunk = msgids[start:start + LOAD_CHUNK]
            loaded = await asyncio.to_thread(lambda ids=chunk: list(readers.map(self.spool.load_message, ids)))
            envelopes: list[Envelope] = []
            for message in loaded:
                envelopes.extend(message.envelopes)
                self._note_corrupt(message.corrupt)
            self.loaded_envelopes += len(envelopes)
            if self.on_envelopes is not None and envelopes:
                self.on_envelopes(envelopes, True)


def build(daemon: Daemon) -> Queue:
    queue = Queue(daemon, daemon.paths.spool, daemon.mailname)
    daemon.queue = queue
    return queue
