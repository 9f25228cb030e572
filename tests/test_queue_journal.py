"""The commit journal (smtpd/queue/journal.py): what a start writes back, and what it must never write back.

A kill -9 does not lose the page cache, so the crash tests cannot show what the journal is for: a power cut
after the 250 and before the checkpoint, when the message's own files never reached the disk. The daemon test
here makes that cut by hand: it stops the daemon with SIGKILL before any checkpoint (the delay is set to an
hour), deletes the message folders the commits had written, and restarts it on the same spool.
"""

from __future__ import annotations

import os
import signal
import smtplib
import zlib
from pathlib import Path

import pytest
from daemon import SmtpdProcess
from waiting import wait_until

from smtpd.queue.journal import HEADER_BYTES, Journal, JournalPair, JournalRecord, record_parts

RELAY_CONFIG = """listen on 127.0.0.1 port {port}
action "relay" relay
match from any for any action "relay"
"""


def record(seq: int, msgid: int, body: bytes) -> list[bytes]:
    evpid = (msgid << 32) | 0x1234
    return record_parts(seq, msgid, body, zlib.crc32(body), [(evpid, f"rcpt: r{seq}@example.org\n".encode())])


def fresh_journal(path: Path) -> Journal:
    journal = Journal(str(path), 4 << 20)
    journal.open()
    assert journal.recover(lambda found: None) == 0
    return journal


def replayed(path: Path) -> list[JournalRecord]:
    """What a start would write back from the journal at path (then the journal is empty)."""
    journal = Journal(str(path), 4 << 20)
    journal.open()
    found: list[JournalRecord] = []
    journal.recover(found.append)
    journal.close()
    return found


def test_records_appended_and_not_checkpointed_are_written_back(tmp_path: Path) -> None:
    journal = fresh_journal(tmp_path / "journal")
    journal.append([record(1, 0x11111111, b"first\n"), record(2, 0x22222222, b"second\n")])
    journal.append([record(3, 0x33333333, b"third\n" * 1000)])
    journal.close()
    found = replayed(tmp_path / "journal")
    assert [(item.seq, item.msgid) for item in found] == [(1, 0x11111111), (2, 0x22222222), (3, 0x33333333)]
    assert found[2].message == b"third\n" * 1000
    assert found[0].envelopes == [((0x11111111 << 32) | 0x1234, b"rcpt: r1@example.org\n")]
    assert replayed(tmp_path / "journal") == []  # the start emptied it


def test_a_checkpoint_covers_the_records_before_it(tmp_path: Path) -> None:
    journal = fresh_journal(tmp_path / "journal")
    journal.append([record(1, 0x11111111, b"one\n"), record(2, 0x22222222, b"two\n")])
    journal.mark(2)
    journal.append([record(3, 0x33333333, b"three\n")])
    journal.close()
    assert [item.seq for item in replayed(tmp_path / "journal")] == [3]


def test_a_checkpoint_switches_journals_and_empties_the_one_left(tmp_path: Path) -> None:
    """Appends go on in the other journal while the checkpoint flushes the spool and empties the one left;
    a start writes back both."""
    pair = JournalPair((str(tmp_path / "a"), str(tmp_path / "b")), 4 << 20)
    pair.open()
    assert pair.recover(lambda found: None) == 0
    pair.active.append([record(1, 0x11111111, b"one\n")])
    left = pair.switch()
    pair.active.append([record(2, 0x22222222, b"two\n")])  # while the checkpoint runs
    left.mark(1)
    pair.active.append([record(3, 0x33333333, b"three\n")])
    pair.close()
    again = JournalPair((str(tmp_path / "a"), str(tmp_path / "b")), 4 << 20)
    again.open()
    found: list[JournalRecord] = []
    assert again.recover(found.append) == 2
    assert sorted(item.seq for item in found) == [2, 3]
    again.close()


def test_a_torn_last_record_is_not_written_back(tmp_path: Path) -> None:
    journal = fresh_journal(tmp_path / "journal")
    journal.append([record(1, 0x11111111, b"whole\n")])
    start = journal.position
    journal.append([record(2, 0x22222222, b"torn\n" * 200)])
    journal.close()
    with open(tmp_path / "journal", "r+b") as handle:  # the end of the last record never reached the disk
        handle.seek(start + 300)
        handle.write(bytes(200))
    assert [item.seq for item in replayed(tmp_path / "journal")] == [1]


def test_records_of_an_earlier_run_are_never_taken(tmp_path: Path) -> None:
    """After a restart, sequence numbers start again from 1 under a new salt: an old record that follows the
    new ones exactly, with a higher number, is still not part of the journal."""
    journal = fresh_journal(tmp_path / "journal")
    journal.append([record(1, 0x11111111, b"a" * 100), record(2, 0x22222222, b"b" * 100),
                    record(3, 0x33333333, b"c" * 100)])
    journal.close()
    assert len(replayed(tmp_path / "journal")) == 3  # a start: written back, journal emptied
    journal = Journal(str(tmp_path / "journal"), 4 << 20)
    journal.open()
    journal.recover(lambda found: None)
    journal.append([record(1, 0x44444444, b"d" * 100)])  # same length: the old record 2 follows it exactly
    journal.close()
    assert [(item.seq, item.msgid) for item in replayed(tmp_path / "journal")] == [(1, 0x44444444)]


def test_a_message_body_cannot_pass_for_a_record(tmp_path: Path) -> None:
    """A client cannot make a start deliver a message of its own making: a record forged inside a body, found
    where the journal ends, lacks the salt."""
    journal = fresh_journal(tmp_path / "journal")
    forged = b"".join(record(2, 0x66666666, b"forged\n")[:1]) + bytes(4)
    journal.append([record(1, 0x55555555, b"x" * 10)])
    end = journal.position
    journal.close()
    with open(tmp_path / "journal", "r+b") as handle:
        handle.seek(end)
        handle.write(forged + b"forged\n" + b"".join(record(2, 0x66666666, b"forged\n")[2:]))
    assert [item.msgid for item in replayed(tmp_path / "journal")] == [0x55555555]


def test_the_file_grows_with_written_zeros_up_to_its_bound(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal"), 2 << 20)
    journal.open()
    journal.recover(lambda found: None)
    assert os.path.getsize(tmp_path / "journal") == HEADER_BYTES + (1 << 20)
    big = record(1, 0x11111111, b"y" * (1 << 20))
    assert journal.has_room(sum(map(len, big)) + 4)
    journal.append([big])
    assert os.path.getsize(tmp_path / "journal") == 2 << 20
    assert not journal.has_room(1 << 20)
    journal.close()


def test_acknowledged_mail_survives_losing_its_files_before_the_checkpoint(tmp_path: Path) -> None:
    daemon = SmtpdProcess(tmp_path, RELAY_CONFIG, paused=("mta", "mda"),
                          env={"SMTPD_QUEUE_CHECKPOINT_DELAY": "3600"})
    with daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo()
            for index in range(5):
                assert client.mail("alice@example.org")[0] == 250
                assert client.rcpt(f"bob{index}@example.net")[0] == 250
                assert client.rcpt("carol@example.net")[0] == 250
                code, text = client.data(f"Subject: journal {index}\r\n\r\nbody {index}\r\n".encode())
                assert code == 250, text
        # Acknowledged, but no checkpoint yet: the scheduler has not taken them.
        assert daemon.smtpctl("show", "queue").stdout == ""
        daemon.signal(signal.SIGKILL)
        assert daemon.process is not None
        daemon.process.wait(10)
        # The power cut: none of the folders the commits wrote reached the disk.
        folders = [folder for bucket in (daemon.spool / "queue").iterdir() for folder in bucket.iterdir()]
        assert len(folders) == 5
        for folder in folders:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
        # Started in another flush mode, it still writes back what the journal holds.
        daemon.env["SMTPD_QUEUE_SYNC"] = "fsync"
        daemon.start()
        assert "wrote back 5 acknowledged message(s) from the commit journal" in daemon.log()
        # (all listed once the background loading has read them)
        wait_until(lambda: len(daemon.smtpctl("show", "queue").stdout.splitlines()) == 10, 10)
        lines = daemon.smtpctl("show", "queue").stdout.splitlines()
        assert len(lines) == 10
        recipients = sorted(line.split("|")[6] for line in lines)
        assert recipients == sorted([f"bob{index}@example.net" for index in range(5)] + ["carol@example.net"] * 5)
        bodies = sorted(daemon.message(folder.name).split(b"\n\n", 1)[1] for folder in folders)
        assert bodies == [f"body {index}\n".encode() for index in range(5)]
        daemon.stop()
        # A clean stop checkpoints: the next start writes nothing back.
        daemon.start()
        wait_until(lambda: len(daemon.smtpctl("show", "queue").stdout.splitlines()) == 10, 10)
        assert "from the commit journal" not in daemon.log()


def test_a_failed_checkpoint_stops_the_journal_and_loses_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint that cannot write the journal's header leaves header and records in doubt: the queue stops
    using the journal (every later commit is flushed with syncfs) and every message is still placed whole."""
    import asyncio

    from helpers_queue import Harness, run

    from smtpd.queue import journal as journal_module

    def failing_mark(self: Journal, checkpoint: int) -> None:
        if checkpoint:  # (the start's own mark(0) succeeds)
            raise OSError(5, "Input/output error")
        original_mark(self, checkpoint)

    original_mark = journal_module.Journal.mark
    monkeypatch.setattr(journal_module.Journal, "mark", failing_mark)

    async def scenario() -> tuple[bool, bool, list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            had_journal = harness.queue.io.journal is not None
            first = [await harness.submit(b"Subject: one\n\nbody\n")]
            later = await asyncio.gather(*(harness.submit(b"Subject: more\n\nbody\n") for _ in range(5)))
            return had_journal, harness.queue.io.journal is None, [msgid for msgid, _ in first + later]

    had_journal, given_up, msgids = run(scenario())
    assert had_journal and given_up
    for msgid in msgids:
        folder = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
        assert (folder / "message").read_bytes().endswith(b"\n\nbody\n")
        assert len(list(folder.iterdir())) == 2


def test_acknowledged_mail_whose_files_cannot_be_written_stays_in_the_journal_until_they_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A journal commit is acknowledged before its files are written. When they cannot be (a full disk), the
    journal's record is its only copy: no checkpoint may empty the journal until the files are written, which
    is tried again; then the message is placed like any other."""
    import asyncio
    import errno
    import logging
    import shutil

    from helpers_queue import Harness, run, wait_for

    from smtpd.queue import store

    failing = {"on": True}
    original_write_all = store.write_all

    def write_all(fd: int, data: bytes) -> None:
        if failing["on"] and b"stranded body" in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        original_write_all(fd, data)

    monkeypatch.setattr(store, "write_all", write_all)
    monkeypatch.setattr(store, "STRANDED_RETRY_DELAY", 0.05)
    monkeypatch.setattr(store, "FILE_WRITER", False)  # (the failure is injected into the daemon's own writes)
    caplog.set_level(logging.INFO, logger="smtpd.queue")

    async def scenario() -> tuple[list[JournalRecord], int, bytes]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            io = harness.queue.io
            message = harness.queue.new_message()
            await message.write(b"Subject: stranded\n\nstranded body\n")
            message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="alice@example.com",
                                          rcpt="bob@example.org", dest="bob@example.org"))
            await message.commit()  # acknowledged: the record is durable
            await wait_for(lambda: bool(io.stranded), what="the commit to be stranded")
            # Other mail goes on, and is placed: by sync rounds, which leave the journal as it is.
            others = await asyncio.gather(*(harness.submit(b"Subject: other\n\nother body\n") for _ in range(3)))
            await asyncio.sleep(0.3)  # several retries, several due checkpoints
            assert io.stranded and message.placed is not None and not message.placed.done()
            # What a power cut now would leave to the next start: the stranded message is written back.
            copy = tmp_path / "copy"
            copy.mkdir()
            for name in store.JOURNAL_FILES:
                shutil.copy(harness.spool / name, copy / name)
            found = [record for name in store.JOURNAL_FILES for record in replayed(copy / name)]
            failing["on"] = False
            await message.placed
            assert not io.stranded
            folder = harness.spool / "queue" / f"{message.msgid >> 24:02x}" / f"{message.msgid:08x}"
            return found, len(others), (folder / "message").read_bytes()

    from smtpd.queue.envelope import Envelope, EnvelopeType

    found, others, stored = run(scenario())
    assert others == 3
    assert [record.message for record in found if b"stranded body" in record.message] == \
        [b"Subject: stranded\n\nstranded body\n"]
    assert stored.endswith(b"\n\nstranded body\n")
    assert caplog.text.count("is acknowledged but its files could not be written") == 1  # (not at every retry)
    assert "written from memory after an earlier failure" in caplog.text


def test_big_commits_have_their_files_written_by_the_flusher_thread_after_their_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the settings of a smaller SMTPD_QUEUE_ROUND_FILES_BYTES and SMTPD_QUEUE_INLINE_JOURNAL_BYTES, commits
    over the first go through journal rounds on the flusher thread, which writes their files after the records,
    into folders made ahead (not the file writer process): every message is still placed whole."""
    import asyncio
    import threading

    from helpers_queue import Harness, run

    from smtpd.queue import store

    written_by: list[str] = []
    original_write_commits = store.SpoolWriter._write_commits

    def write_commits(self: store.SpoolWriter, commits: list, on_thread: bool) -> dict:  # type: ignore[type-arg]
        written_by.extend(threading.current_thread().name for commit in commits if not commit.written)
        return original_write_commits(self, commits, on_thread)

    monkeypatch.setattr(store.SpoolWriter, "_write_commits", write_commits)
    monkeypatch.setattr(store, "ROUND_FILES_BYTES", 32 * 1024)
    monkeypatch.setattr(store, "INLINE_JOURNAL_BYTES", 64 * 1024)

    bodies = [f"Subject: big {index}\n\n".encode() + bytes([65 + index]) * (100 * 1024) + b"\n" for index in range(6)]
    assert all(len(body) > store.ROUND_FILES_BYTES for body in bodies)

    async def scenario() -> tuple[list[int], int]:
        from smtpd.queue.envelope import Envelope, EnvelopeType

        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            io = harness.queue.io
            assert io.journal is not None
            messages = []  # all opened before any ends, as sessions in DATA at the same time
            for body in bodies:
                message = harness.queue.new_message()
                await message.write(body)
                message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                              rcpt="b@x.test", dest="b@x.test"))
                messages.append(message)
            await asyncio.gather(*(message.commit() for message in messages))
            await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
            return [message.msgid for message in messages], io.committed

    msgids, committed = run(scenario())
    assert committed == len(bodies)
    assert len(written_by) == len(bodies) and "queue-flush" in written_by, written_by
    for msgid, body in zip(msgids, bodies, strict=True):
        folder = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
        assert (folder / "message").read_bytes() == body
        assert len(list(folder.iterdir())) == 2


def test_a_folder_that_cannot_move_into_the_queue_is_moved_again_until_it_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An acknowledged message is written, but its move under queue/ fails (a full disk): it waits complete in
    incoming/, the move is tried again, and once it works the message is placed and delivered; no restart."""
    import asyncio
    import errno
    import logging
    import os

    from helpers_queue import Harness, run, wait_for

    from smtpd.queue import store

    failing = {"on": True}
    original_rename = os.rename

    def rename(source: str, target: str) -> None:
        if failing["on"] and "/incoming/" in str(source) and "/queue/" in str(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        original_rename(source, target)

    monkeypatch.setattr(store.os, "rename", rename)
    monkeypatch.setattr(store, "STRANDED_RETRY_DELAY", 0.05)
    monkeypatch.setattr(store, "FILE_WRITER", False)  # (the failure is injected into the daemon's own renames)
    caplog.set_level(logging.INFO, logger="smtpd.queue")

    async def scenario() -> tuple[list[str], list[str]]:
        async with Harness(tmp_path) as harness:
            submitted = asyncio.ensure_future(harness.submit(b"Subject: waiting\n\nwaiting body\n"))
            await wait_for(lambda: bool(harness.queue.io.unmoved), what="the move to fail")
            await wait_for(lambda: "could not be moved" in caplog.text, what="the warning")
            in_incoming = sorted(os.listdir(harness.spool / "incoming"))
            assert not submitted.done()  # (acknowledged, not placed: the scheduler does not have it yet)
            failing["on"] = False
            msgid, _ = await asyncio.wait_for(submitted, 10)  # (a liveness bound only)
            await wait_for(lambda: bool(harness.mda.delivered), what="the delivery")
            return in_incoming, [f"{msgid:08x}"]

    in_incoming, expected = run(scenario())
    assert in_incoming == expected  # complete, and waiting where the next start would place it
    assert caplog.text.count("could not be moved into the queue (No space left on device)") == 1
    assert "moved into the queue after an earlier failure" in caplog.text


@pytest.mark.parametrize("file_writer", [True, False])
def test_a_commit_whose_id_a_folder_put_by_hand_has_is_moved_aside_not_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_writer: bool) -> None:
    """Between the check of a new message's id and its move under queue/, a folder of that id is put there by
    hand: the message cannot go there, so it goes to corrupt/ (kept, shown) and the hand-made folder stays."""
    from helpers_queue import Harness, run, wait_for

    from smtpd.queue import store
    from smtpd.queue.envelope import Envelope, EnvelopeType

    monkeypatch.setattr(store, "FILE_WRITER", file_writer)

    async def scenario() -> tuple[int, BaseException | None]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            message = harness.queue.new_message()
            by_hand = harness.spool / "queue" / f"{message.msgid >> 24:02x}" / f"{message.msgid:08x}"
            by_hand.mkdir(parents=True)
            (by_hand / "message").write_bytes(b"Subject: put here by hand\n\n")
            await message.write(b"Subject: ours\n\nour body\n")
            message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                          rcpt="b@x.test", dest="b@x.test"))
            await message.commit()  # acknowledged
            assert message.placed is not None
            await wait_for(message.placed.done, what="the placement to end")
            return message.msgid, message.placed.exception()

    msgid, error = run(scenario())
    assert error is not None
    name = f"{msgid:08x}"
    assert (tmp_path / "spool" / "corrupt" / name / "message").read_bytes().endswith(b"\n\nour body\n")
    assert "acknowledged message" in (tmp_path / "spool" / "corrupt" / f"{name}.why").read_text()
    by_hand = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / name
    assert sorted(path.name for path in by_hand.iterdir()) == ["message"]
    assert not list((tmp_path / "spool" / "incoming").iterdir())
