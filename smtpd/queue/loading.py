"""Loading the committed queue at start: the spool reader process reads, the event loop parses and hands over.

A restart with a big queue reads tens of thousands of folders and files. In the daemon those reads would take
turns with the event loop for the GIL, and with threads every system call becomes a hand-off of the GIL (a
16-thread pool made a warm 50,000-envelope restart take 9 s). So a helper process (smtpd/queue/spool_reader.py,
forking a few readers for a cold cache) does the system calls on the other CPU and streams the files' content
back over pipes; the daemon parses each batch as it arrives, on the event loop, and gives it to the scheduler.

Nothing changes for correctness: the reader sends only the plain case (message file present, envelope files
regular), and everything else (an odd folder, a file that does not parse, a batch the reader never sent because
it failed) is loaded here with Spool.load_message, which moves corrupt files aside as before. If the reader
cannot be started at all, everything is loaded here, one folder after the other, in a thread.
"""

from __future__ import annotations

import array
import asyncio
import marshal
import os
import subprocess
import sys
from collections.abc import Callable

from smtpd import log
from smtpd.queue.envelope import Envelope
from smtpd.queue.spool import CorruptEntry, LoadedMessage, Spool

LOG = log.get("queue")
READER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spool_reader.py")
MESSAGES_PER_READER = 64  # fewer readers for a small queue: a process per handful of folders is waste
CAREFUL_CHUNK = 500  # folders loaded at once by load_message (in a thread)
FRAME_LIMIT = 1 << 20  # the stream buffer of a reader's pipe (a frame is ~256 folders, ~150 KB)

# What loading hands over, batch by batch: envelopes, and the corrupt files moved aside meanwhile.
Take = Callable[[list[Envelope], list[CorruptEntry]], None]


async def load_queue(spool: Spool, msgids: list[int], readers: int, take: Take) -> None:
    """Load the given messages (in this order, roughly: the readers work side by side) and give their envelopes
    to ``take``. Returns when all of them are loaded."""
    if not msgids:
        return
    careful: list[int] = []
    try:
        received = await _read_with_helper(spool, msgids, readers, take, careful)
    except OSError as error:  # no process could be started (e.g. out of memory): the slow way, all of it
        LOG.warning("queue: the spool reader did not start (%s); loading in the daemon", error)
        received = set()
    if len(received) < len(msgids):
        careful.extend(msgid for msgid in msgids if msgid not in received)
    for start in range(0, len(careful), CAREFUL_CHUNK):
        chunk = careful[start:start + CAREFUL_CHUNK]
        loaded = await asyncio.to_thread(lambda ids=chunk: [_load_one(spool, msgid) for msgid in ids])
        envelopes: list[Envelope] = []
        corrupt: list[CorruptEntry] = []
        for message in loaded:
            envelopes.extend(message.envelopes)
            corrupt.extend(message.corrupt)
        take(envelopes, corrupt)


def _load_one(spool: Spool, msgid: int) -> LoadedMessage:
    """One folder the careful way; an error of its own is logged and the loading goes on with the others (one
    unreadable folder must not keep the rest of the queue from being loaded)."""
    try:
        return spool.load_message(msgid)
    except OSError as error:
        LOG.warning("queue: message %08x could not be loaded: %s", msgid, error)
        return LoadedMessage(msgid, [], [])


async def _read_with_helper(spool: Spool, msgids: list[int], readers: int, take: Take,
                            careful: list[int]) -> set[int]:
    """Run the spool reader; hand over what it sends. Returns the msgids it sent (those it found odd are added
    to ``careful``); the rest (it failed) are for the caller to load."""
    count = max(1, min(readers, (len(msgids) + MESSAGES_PER_READER - 1) // MESSAGES_PER_READER))
    pipes = [os.pipe() for _ in range(count)]
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", READER, spool.queue, *(str(write) for _, write in pipes)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=[write for _, write in pipes])
    except BaseException:
        for read, _ in pipes:
            os.close(read)
        raise
    finally:
        for _, write in pipes:
            os.close(write)  # the reader holds them now: each pipe ends when its reader is done
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    received: set[int] = set()
    try:
        streams = []
        for read, _ in pipes:
            stream = asyncio.StreamReader(limit=FRAME_LIMIT)
            transport, _ = await loop.connect_read_pipe(lambda stream=stream: asyncio.StreamReaderProtocol(stream),
                                                        os.fdopen(read, "rb", buffering=0))
            transports.append(transport)
            streams.append(stream)
        ids = array.array("I", msgids)
        if sys.byteorder != "little":
            ids.byteswap()
        await asyncio.gather(asyncio.to_thread(_feed, process, ids.tobytes()),
                             *(_drain(stream, spool, take, careful, received) for stream in streams))
        status = await asyncio.to_thread(process.wait)
        if status:
            LOG.warning("queue: the spool reader ended with status %d; loading the rest in the daemon", status)
    finally:
        for transport in transports:
            transport.close()
        if process.poll() is None:  # cancelled (the daemon stops): its readers end on their closed pipes
            process.kill()
            await asyncio.to_thread(process.wait)
    return received


def _feed(process: subprocess.Popen[bytes], data: bytes) -> None:
    assert process.stdin is not None
    try:
        process.stdin.write(data)
        process.stdin.close()
    except BrokenPipeError:
        pass  # it died; what it did not send is loaded by the daemon


async def _drain(stream: asyncio.StreamReader, spool: Spool, take: Take, careful: list[int],
                 received: set[int]) -> None:
    while True:
        try:
            header = await stream.readexactly(4)
            payload = await stream.readexactly(int.from_bytes(header, "little"))
        except asyncio.IncompleteReadError:
            return  # the end (or a reader that died mid-frame: its folders were not received)
        try:
            batch = marshal.loads(payload)
        except (ValueError, EOFError, TypeError):
            LOG.warning("queue: the spool reader sent a damaged batch; loading the rest in the daemon")
            return  # what was not received is loaded the careful way
        envelopes: list[Envelope] = []
        for msgid, files in batch:
            received.add(msgid)
            found = spool.envelopes_from_files(msgid, files) if files is not None else None
            if found is None:
                careful.append(msgid)
            else:
                envelopes.extend(found)
        take(envelopes, [])
