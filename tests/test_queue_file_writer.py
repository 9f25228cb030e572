"""The file writer process (smtpd/queue/file_writer.py): it writes the files of acknowledged journal commits;
when it fails or goes away, the daemon writes them itself and no acknowledged message is lost."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from pathlib import Path

import pytest
from helpers_queue import Harness, run

from smtpd.eventloop import PollingEventLoop
from smtpd.queue import store, writer_client
from smtpd.queue.envelope import Envelope, EnvelopeType
from smtpd.queue.store import IncomingMessage


async def open_messages(harness: Harness, bodies: list[bytes]) -> list[IncomingMessage]:
    """Messages opened together, as sessions that all reached DATA (their commits then share rounds)."""
    messages = []
    for number, body in enumerate(bodies):
        message = harness.queue.new_message()
        await message.write(body)
        message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                      rcpt=f"u{number}@x.test", dest=f"u{number}@x.test"))
        messages.append(message)
    return messages


async def commit_all(messages: list[IncomingMessage]) -> None:
    await asyncio.gather(*(message.commit() for message in messages))


def stored_body(spool: Path, msgid: int) -> bytes:
    return (spool / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}" / "message").read_bytes()


@pytest.fixture
def written_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item per commit whose files the daemon (its loop or a thread) writes itself."""
    written: list[int] = []
    original_write_files = store.SpoolWriter._write_files

    def write_files(self: store.SpoolWriter, commit: object, make_folder: object) -> None:
        written.append(1)
        original_write_files(self, commit, make_folder)  # type: ignore[arg-type]

    monkeypatch.setattr(store.SpoolWriter, "_write_files", write_files)
    return written


@pytest.mark.parametrize(("count", "size", "inline_bytes"), [(6, 10, None), (48, 2000, None), (48, 2000, 64 * 1024),
                                                         (6, 100 * 1024, None), (24, 250 * 1024, None)])
def test_files_of_busy_rounds_are_written_by_the_process(tmp_path: Path, written_here: list[int],
                                                         monkeypatch: pytest.MonkeyPatch, count: int, size: int,
                                                         inline_bytes: int | None) -> None:
    """Rounds on the loop (6 small messages, 48 of 2 KB, 6 of 100 KB, 24 of 250 KB) and one on the flusher
    thread (48 of 2 KB with SMTPD_QUEUE_INLINE_JOURNAL_BYTES at 64 KiB) alike: neither the loop nor the flusher
    thread writes their files. With the 250 KB messages, the socket to the process gets a small buffer: what it
    does not take at once is sent when it is writable."""
    if inline_bytes is not None:
        monkeypatch.setattr(store, "INLINE_JOURNAL_BYTES", inline_bytes)
    if size > 200 * 1024:
        monkeypatch.setattr(writer_client, "_SOCKET_BUFFER", 64 * 1024)
    sent_later: list[int] = []
    original_writable = writer_client.FileWriterProcess._writable

    def writable(self: writer_client.FileWriterProcess) -> None:
        sent_later.append(len(self._unsent))
        original_writable(self)

    monkeypatch.setattr(writer_client.FileWriterProcess, "_writable", writable)
    bodies = [f"Subject: {n}\n\n".encode() + bytes([65 + n % 26]) * size + b"\n" for n in range(count)]

    async def scenario() -> tuple[list[int], int | None, int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            io = harness.queue.io
            assert io.file_writer is not None and io.file_writer.usable
            pid = io.file_writer.pid
            messages = await open_messages(harness, bodies)
            async with asyncio.timeout(60):  # (a garbled request would leave the process waiting for bytes)
                await commit_all(messages)
                await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
            return [message.msgid for message in messages], pid, io.files_writing

    msgids, pid, writing = run(scenario())
    assert writing == 0
    assert written_here == []
    assert sent_later or size <= 200 * 1024
    for msgid, body in zip(msgids, bodies, strict=True):
        assert stored_body(tmp_path / "spool", msgid) == body
    assert pid is not None
    with pytest.raises(ProcessLookupError):  # the queue's stop ended it
        os.kill(pid, 0)


@pytest.mark.parametrize("polling", [True, False])
def test_a_lone_commit_goes_to_the_process_when_the_loop_polls(tmp_path: Path, written_here: list[int],
                                                               polling: bool) -> None:
    """One message at a time (a lone commit): on the daemon's polling loop the process writes its files (the
    loop catches the answer while polling); on a loop that sleeps at once, the loop writes them itself."""
    bodies = [f"Subject: alone {n}\n\nbody {n}\n".encode() for n in range(3)]

    async def scenario() -> list[int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            assert harness.queue.io.loop_polls is polling
            msgids = []
            for body in bodies:
                [message] = await open_messages(harness, [body])
                await message.commit()
                assert message.placed is not None
                await message.placed
                msgids.append(message.msgid)
            return msgids

    loop_factory = PollingEventLoop if polling else asyncio.SelectorEventLoop
    msgids = asyncio.run(scenario(), loop_factory=loop_factory)
    assert written_here == ([] if polling else [1, 1, 1])
    for msgid, body in zip(msgids, bodies, strict=True):
        assert stored_body(tmp_path / "spool", msgid) == body


def test_a_killed_file_writer_loses_no_acknowledged_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The process is killed right after rounds were acknowledged, with their files in its hands: every message
    is placed whole all the same (written by the process before it died, or by the daemon), and later mail is
    written by the daemon itself."""
    caplog.set_level(logging.WARNING, logger="smtpd.queue")
    first = [f"Subject: first {n}\n\n".encode() + b"x" * (n * 500) + b"\n" for n in range(8)]
    later = [f"Subject: later {n}\n\nlater body\n".encode() for n in range(4)]

    async def scenario() -> tuple[list[int], list[int], bool]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            io = harness.queue.io
            assert io.file_writer is not None and io.file_writer.pid is not None
            messages = await open_messages(harness, first)
            await commit_all(messages)  # acknowledged: their files go to the process now
            os.kill(io.file_writer.pid, signal.SIGKILL)
            await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
            after = await open_messages(harness, later)
            await commit_all(after)
            await asyncio.gather(*(message.placed for message in after if message.placed is not None))
            return [m.msgid for m in messages], [m.msgid for m in after], io.file_writer.usable

    msgids, later_msgids, usable = run(scenario())
    assert not usable
    assert "file writer process is lost" in caplog.text
    for msgid, body in zip(msgids + later_msgids, first + later, strict=True):
        assert stored_body(tmp_path / "spool", msgid) == body


def test_a_failed_write_in_the_process_leaves_the_message_to_the_journal_until_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The process cannot make one message's folder (something is in its way in incoming/): that message is
    acknowledged all the same (its record is in the journal), stranded, and written by the daemon from memory."""
    monkeypatch.setattr(store, "STRANDED_RETRY_DELAY", 0.05)
    caplog.set_level(logging.INFO, logger="smtpd.queue")
    bodies = [b"Subject: blocked\n\nblocked body\n", b"Subject: free\n\nfree body\n"]

    async def scenario() -> tuple[list[int], list[str]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            messages = await open_messages(harness, bodies)
            (harness.spool / "incoming" / f"{messages[0].msgid:08x}").write_bytes(b"in the way")
            await commit_all(messages)
            await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
            return [message.msgid for message in messages], sorted(os.listdir(harness.spool / "incoming"))

    msgids, incoming = run(scenario())
    assert incoming == []
    for msgid, body in zip(msgids, bodies, strict=True):
        assert stored_body(tmp_path / "spool", msgid) == body
    assert caplog.text.count("is acknowledged but its files could not be written") == 1
    assert "written from memory after an earlier failure" in caplog.text


def test_the_file_writer_and_the_spool_agree_on_the_message_file_name() -> None:
    """file_writer.py runs as a script without the daemon's modules: its copy of the name must match."""
    import re

    from smtpd.queue import spool, writer_client

    source = Path(writer_client.SCRIPT).read_text()
    found = re.search(r'^MESSAGE_FILE = "([^"]+)"', source, re.MULTILINE)
    assert found is not None and found.group(1) == spool.MESSAGE_FILE


def file_writer_of(pid: int) -> int | None:
    """The daemon's file writer process, found among its children."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"file_writer.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:
            continue
    return None


async def send_and_kill(port: int, helper: int, sessions: int, per_session: int, kill_at: int) -> set[str]:
    """Sessions sending at once (their commits share rounds, whose files go to the file writer); the writer is
    killed with SIGKILL after ``kill_at`` 250s. Returns the tokens of the messages that got their 250."""
    acked: set[str] = set()

    async def session(worker: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def reply() -> int:
            while True:
                line = await reader.readline()
                if line[3:4] != b"-":
                    return int(line[:3])

        assert await reply() == 220
        writer.write(b"EHLO writer.test\r\n")
        assert await reply() == 250
        for number in range(per_session):
            token = f"w{worker}n{number}"
            writer.write(f"MAIL FROM:<load@writer.test>\r\nRCPT TO:<{token}@relay.test>\r\nDATA\r\n".encode())
            assert [await reply() for _ in range(3)] == [250, 250, 354]
            writer.write(f"Subject: {token}\r\n\r\nbody of {token}\r\n.\r\n".encode())
            assert await reply() == 250
            acked.add(token)
            if len(acked) == kill_at:
                os.kill(helper, signal.SIGKILL)
        writer.write(b"QUIT\r\n")
        await reply()
        writer.close()

    await asyncio.gather(*(session(worker) for worker in range(sessions)))
    return acked


def test_the_real_daemon_keeps_every_accepted_message_when_its_file_writer_is_killed(tmp_path: Path) -> None:
    """`python -m smtpd` with 8 SMTP clients at once; its file writer is killed after 30 messages were accepted:
    the daemon says so, goes on accepting, and every accepted message is in the queue, whole; the writer does
    not outlive the daemon. (Commits handed over and not yet written when it died: the test above.)"""
    from helpers_control import free_port
    from helpers_queue import paused_daemon
    from waiting import wait_until

    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              'action "relay" relay\n'
              'match from any for any action "relay"\n')
    daemon = paused_daemon(tmp_path, config)
    daemon.start()
    try:
        assert daemon.process is not None
        helper = file_writer_of(daemon.process.pid)
        assert helper is not None, "no file writer process"
        acked = asyncio.run(send_and_kill(port, helper, sessions=8, per_session=12, kill_at=30))
        assert len(acked) == 96  # (the daemon went on accepting: it writes the files itself now)
        wait_until(lambda: "file writer process is lost" in daemon.log(), 10, explain=daemon.log)
        wait_until(lambda: len(daemon.smtpctl("show", "queue").stdout.splitlines()) == len(acked), 20,
                   explain=daemon.log)
    finally:
        daemon.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)
    queue = tmp_path / "spool" / "queue"
    stored = {}
    for message in queue.glob("*/*/message"):
        data = message.read_bytes()
        found = re.search(rb"\nSubject: (\S+)\n", data)
        assert found is not None
        stored[found.group(1).decode()] = data
    assert stored.keys() == acked
    for token, data in stored.items():
        assert data.endswith(f"\n\nbody of {token}\n".encode())


def test_a_sigterm_to_the_whole_process_group_stops_the_daemon_cleanly(tmp_path: Path) -> None:
    """systemd's stop (KillMode=control-group) and timeout(1) send SIGTERM to every process of the daemon at once:
    the file writer waits for the daemon to close it after the drain, so the stop logs no lost file writer,
    the daemon exits with 0, the writer is gone, and every accepted message is in the queue."""
    import smtplib

    from helpers_control import free_port
    from helpers_queue import paused_daemon

    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              'action "relay" relay\n'
              'match from any for any action "relay"\n')
    daemon = paused_daemon(tmp_path, config)
    daemon.own_group = True
    daemon.start()
    try:
        assert daemon.process is not None
        helper = file_writer_of(daemon.process.pid)
        assert helper is not None, "no file writer process"
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for number in range(8):
                client.sendmail("a@example.org", ["b@example.net"], f"Subject: n{number}\r\n\r\nbody\r\n")
        daemon.signal_group(signal.SIGTERM)
        assert daemon.process.wait(30) == 0, daemon.log()
    finally:
        daemon.stop()
    assert "file writer process is lost" not in daemon.log()
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)
    assert len(list((tmp_path / "spool" / "queue").glob("*/*/message"))) == 8
