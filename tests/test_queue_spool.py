"""The spool: envelope file format, durable commit layout, group commit, abort, crash leftovers, corrupt files,
loading a queue at start."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from helpers_queue import Harness, run, spool_files, wait_for

from smtpd.delivery import DeliveryResult
from smtpd.queue import store
from smtpd.queue.envelope import DsnNotify, Envelope, EnvelopeType
from smtpd.queue.format import EnvelopeFormatError, dump_envelope, load_envelope
from smtpd.queue.spool import Spool
from smtpd.queue.store import MEMORY_LIMIT


def sample_envelope() -> Envelope:
    return Envelope(evpid=0x0123456789ABCDEF, dispatcher="local", type=EnvelopeType.MDA, smtpname="mx.test",
                    helo="client.test", hostname="localhost", sockaddr="[::1]", sender="a@example.com",
                    rcpt="b+tag@example.org", dest="b@example.org", ctime=1795594471, ttl=345600, retry=2,
                    errorline="450 mailbox busy\\ try\nlater", flags={"authenticated", "internal"},
                    dsn_notify=DsnNotify.FAILURE | DsnNotify.DELAY, dsn_ret="HDRS", dsn_envid="ENV1",
                    dsn_orcpt="rfc822;b@example.org", esc_class=4, esc_code=30, mda_subaddress="tag")


def test_envelope_file_round_trips_and_is_readable_text() -> None:
    envelope = sample_envelope()
    data = dump_envelope(envelope)
    text = data.decode()
    assert text.startswith("format: pysmtpd-envelope\nversion: 1\n")
    assert "sender: a@example.com\n" in text
    assert "flags: authenticated internal\n" in text
    assert "dsn-notify: 6\n" in text
    assert "errorline: 450 mailbox busy\\\\ try\\nlater\n" in text  # one line, escaped
    assert "mda-exec" not in text  # empty fields are left out
    assert load_envelope(data) == envelope


def test_envelopes_with_the_same_flags_share_one_frozen_set() -> None:
    """A queue of 50,000 envelopes holds their flags once per combination (an empty set() each was 11 MB)."""
    first, second = sample_envelope(), sample_envelope()
    second.evpid += 1
    loaded = [load_envelope(dump_envelope(envelope)) for envelope in (first, second)]
    assert loaded[0].flags == {"authenticated", "internal"}
    assert loaded[0].flags is loaded[1].flags
    assert Envelope().flags is Envelope().flags
    assert load_envelope(dump_envelope(Envelope(evpid=5, ctime=1))).flags is Envelope().flags


def test_null_sender_is_written_as_at_sign() -> None:
    envelope = Envelope(sender="", rcpt="x@y", dest="x@y", ctime=5)
    data = dump_envelope(envelope)
    assert b"sender: @\n" in data
    assert load_envelope(data).sender == ""


@pytest.mark.parametrize(("mutation", "reason"), [
    (lambda text: text.replace("version: 1", "version: 3"), "version"),
    (lambda text: text + "colour: blue\n", "unknown key"),
    (lambda text: text.replace("ctime: 1795594471", "ctime: soon"), "ctime"),
    (lambda text: text.rstrip("\n"), "truncated"),
    (lambda text: text.replace("format: pysmtpd-envelope\n", ""), "not a pysmtpd-envelope"),
    (lambda text: text + "retry: 3\n", "duplicate"),
    # numbers are plain ASCII digits (int() takes all of these); NOTIFY and RET only what a client can give
    (lambda text: text.replace("ctime: 1795594471", "ctime: -1795594471"), "ctime: not a number"),
    (lambda text: text.replace("ttl: ", "ttl:  "), "ttl: not a number"),
    (lambda text: text.replace("retry: 2", "retry: 1_0"), "retry: not a number"),
    (lambda text: text.replace("ctime: 1795594471", "ctime: \u0665"), "ctime: not a number"),
    (lambda text: text.replace("dsn-notify: ", "dsn-notify: 99"), "not a NOTIFY value"),
    (lambda text: text.replace("dsn-ret: HDRS", "dsn-ret: BOGUS"), "dsn-ret: not one of"),
])
def test_malformed_envelope_files_are_refused_with_the_reason(mutation, reason: str) -> None:
    text = dump_envelope(sample_envelope()).decode()
    with pytest.raises(EnvelopeFormatError, match=reason):
        load_envelope(mutation(text).encode())


def test_commit_leaves_message_and_envelopes_under_queue_and_nothing_elsewhere(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            return await harness.submit(b"Subject: hi\n\nbody\n", recipients=("a@x.test", "b@x.test"))

    msgid, evpids = run(scenario())
    folder = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
    assert (folder / "message").read_bytes() == b"Subject: hi\n\nbody\n"
    assert sorted(path.name for path in folder.iterdir()) == sorted(["message", *(f"{e:016x}" for e in evpids)])
    for evpid in evpids:
        stored = load_envelope((folder / f"{evpid:016x}").read_bytes())
        assert stored.sender == "alice@example.com"
        assert stored.ttl == 4 * 86400  # expire = ctime + ttl: the real ttl is stored
        assert evpid >> 32 == msgid
    assert spool_files(tmp_path / "spool", "temporary") == []
    assert spool_files(tmp_path / "spool", "incoming") == []
    assert oct((folder / "message").stat().st_mode & 0o777) == "0o600"


def test_concurrent_commits_share_sync_rounds(tmp_path: Path) -> None:
    """200 sessions whose messages all end at once (each opened at its DATA, as a session does)."""
    async def scenario() -> tuple[int, int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            messages = []
            for index in range(200):
                message = harness.queue.new_message()
                await message.write(b"Subject: test\n\nhello\n")
                message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                              rcpt=f"u{index}@x.test", dest=f"u{index}@x.test"))
                messages.append(message)
            await asyncio.gather(*(message.commit() for message in messages))
            await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
            return harness.queue.io.batches, harness.queue.io.committed

    batches, committed = run(scenario())
    assert committed == 200
    assert batches < 200  # several sessions' messages were made durable by one round of syncs
    assert len(list((tmp_path / "spool" / "queue").glob("*/*/message"))) == 200


@pytest.mark.parametrize(("turns", "rounds"), [(store.GATHER_TURNS, 1), (0, 2)])
def test_a_round_waits_a_few_loop_turns_for_a_message_still_arriving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     turns: int, rounds: int) -> None:
    """A message is committed while another is still arriving, and that one is committed two turns of the loop
    later: the first round waits (up to GATHER_TURNS turns) and both share it, one fdatasync for the two. Without
    the wait, each has its own round."""
    monkeypatch.setattr(store, "GATHER_TURNS", turns)

    async def scenario() -> tuple[int, int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            assert harness.queue.io.journal is not None  # (inline journal rounds are the ones that wait)
            first, second = harness.queue.new_message(), harness.queue.new_message()
            for number, message in enumerate((first, second)):
                await message.write(b"Subject: x\n\nbody\n")
                message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                              rcpt=f"u{number}@x.test", dest=f"u{number}@x.test"))
            batches_before = harness.queue.io.batches

            async def commit_later() -> None:
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                await second.commit()

            await asyncio.gather(first.commit(), commit_later())
            await harness.queue.io.drain()
            return harness.queue.io.batches - batches_before, harness.queue.arriving

    assert run(scenario()) == (rounds, 0)


@pytest.mark.parametrize("sync_mode", ["journal", "syncfs", "fsync"])
def test_both_flush_modes_commit_lone_and_grouped_messages_whole(tmp_path: Path, sync_mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal (small messages through it, the big one through a syncfs round), syncfs (a whole batch
    flushed by one call, renames riding on the next batch) and per-file flushes all leave every message
    complete under queue/, big (spilled to temporary/) and small (held in memory) alike."""
    monkeypatch.setattr(store, "SYNC_MODE", sync_mode)
    big = b"Subject: big\n\n" + b"y" * (MEMORY_LIMIT + 10) + b"\n"

    async def scenario() -> tuple[list[int], int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            assert (harness.queue.io.filesystem is not None) == (sync_mode != "fsync")
            assert (harness.queue.io.journal is not None) == (sync_mode == "journal")
            lone, _ = await harness.submit(big)
            grouped = await asyncio.gather(*(harness.submit(b"Subject: small\n\nx\n",
                                                            recipients=(f"u{i}@x.test", f"v{i}@x.test"))
                                             for i in range(40)))
            await wait_for(lambda: len(harness.scheduler.entries) == 81, what="all envelopes scheduled")
            return [lone, *(msgid for msgid, _ in grouped)], len(harness.scheduler.entries)

    msgids, scheduled = run(scenario())
    assert scheduled == 81
    queue_root = tmp_path / "spool" / "queue"
    assert (queue_root / f"{msgids[0] >> 24:02x}" / f"{msgids[0]:08x}" / "message").read_bytes() == big
    for msgid in msgids[1:]:
        folder = queue_root / f"{msgid >> 24:02x}" / f"{msgid:08x}"
        assert (folder / "message").read_bytes() == b"Subject: small\n\nx\n"
        assert len(list(folder.iterdir())) == 3
    for sub in ("temporary", "incoming"):
        assert spool_files(tmp_path / "spool", sub) == []


def test_message_folders_made_ahead_are_used_and_never_taken_for_messages(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the file writer process, commits rename empty folders the writer thread made ahead in temporary/;
    a stop removes the spares, and a start after a crash removes leftovers without counting them as dropped
    messages."""
    monkeypatch.setattr(store, "FILE_WRITER", False)

    async def scenario() -> tuple[list[str], int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            await harness.submit()
            await wait_for(lambda: len(harness.queue.io.folders) >= store.SPARE_FOLDERS // 2, what="spare folders")
            spares = sorted(os.listdir(harness.spool / "temporary"))
            msgids = [msgid for msgid, _ in await asyncio.gather(*(harness.submit() for _ in range(5)))]
            left = set(os.listdir(harness.spool / "temporary"))
            assert all(f"{msgid:08x}" not in left for msgid in msgids)
            return spares, len(list((tmp_path / "spool" / "queue").glob("*/*/message")))

    spares, messages = run(scenario())
    assert spares and all(name.startswith(store.FOLDER_PREFIX) for name in spares)
    assert messages == 6
    assert os.listdir(tmp_path / "spool" / "temporary") == []  # the spares went with the stop
    leftover = tmp_path / "spool" / "temporary" / f"{store.FOLDER_PREFIX}1-1"
    leftover.mkdir()
    assert Spool(str(tmp_path / "spool")).recover() == (0, 0, 0, [])
    assert not leftover.exists()
    # A big message cut while being encoded for the queue codec: one message dropped, with both its files.
    for name in ("0badf00d", "0badf00d.stored"):
        (tmp_path / "spool" / "temporary" / name).write_bytes(b"cut")
    assert Spool(str(tmp_path / "spool")).recover() == (1, 0, 0, [])
    assert os.listdir(tmp_path / "spool" / "temporary") == []


def test_with_the_file_writer_no_empty_folder_is_made_ahead(tmp_path: Path) -> None:
    """The file writer process makes the folders of the commits it writes: the writer thread makes no empty ones
    (only delivered messages' folders taken back are made ready, see test_queue_recycle.py)."""
    async def scenario() -> tuple[list[str], int, bool]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            usable = harness.queue.io.file_writer is not None and harness.queue.io.file_writer.usable
            for _ in range(3):
                await asyncio.gather(*(harness.submit() for _ in range(4)))
            await harness.queue.io.drain()
            return os.listdir(harness.spool / "temporary"), len(harness.queue.io.folders), usable

    left, ready, usable = run(scenario())
    assert usable
    assert left == [] and ready == 0
    assert len(list((tmp_path / "spool" / "queue").glob("*/*/message"))) == 12


def test_a_new_message_never_takes_the_id_of_a_folder_on_disk_or_of_another_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids are random; the draws are scripted here so that they hit a folder already in the queue (placed by hand,
    as for `smtpctl discover`) and ids already taken. The disk check of a later message's id is made ahead, in a
    turn of the loop after new_message(), not when that message begins."""
    on_disk, a, b, c, d = 0x7E000001, 0x11000001, 0x22000002, 0x33000003, 0x44000004
    draws = iter([on_disk, a,  # first message: no id checked ahead yet; the one on disk is passed over
                  b,  # the check ahead after it: kept for the second message
                  on_disk,  # the check ahead after the second: refused, nothing kept
                  c,  # third message: none kept, so drawn at once
                  c, d])  # fourth message, in the same turn: c is the third's
    drawn: list[int] = []

    def scripted() -> int:
        drawn.append(next(draws))
        return drawn[-1]

    monkeypatch.setattr(store, "new_msgid", scripted)

    async def scenario() -> list[int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            folder = harness.spool / "queue" / f"{on_disk >> 24:02x}" / f"{on_disk:08x}"
            folder.mkdir(parents=True)
            first = harness.queue.new_message()
            assert drawn == [on_disk, a]
            await asyncio.sleep(0)
            assert drawn == [on_disk, a, b]  # checked in a turn of the loop, before the second message began
            second = harness.queue.new_message()
            await asyncio.sleep(0)
            third = harness.queue.new_message()
            fourth = harness.queue.new_message()
            assert drawn == [on_disk, a, b, on_disk, c, c, d]
            messages = [first, second, third, fourth]
            for index, message in enumerate(messages):
                await message.write(b"Subject: test\n\nhello\n")
                message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                              rcpt=f"u{index}@x.test", dest=f"u{index}@x.test"))
            await asyncio.gather(*(message.commit() for message in messages))
            await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
            return [message.msgid for message in messages]

    assert run(scenario()) == [a, b, c, d]
    queued = sorted(path.parent.name for path in (tmp_path / "spool" / "queue").glob("*/*/message"))
    assert queued == [f"{msgid:08x}" for msgid in (a, b, c, d)]
    assert not list((tmp_path / "spool" / "queue").glob(f"*/{on_disk:08x}/*"))  # the hand-made folder untouched


def test_abort_removes_the_partial_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Harness(tmp_path) as harness:
            message = harness.queue.new_message()
            await message.write(b"Subject: never finished\n")
            assert spool_files(harness.spool, "temporary") == []  # a small message is held in memory
            await message.write(b"x" * MEMORY_LIMIT)  # a big one goes on to a file
            assert spool_files(harness.spool, "temporary") == [f"{message.msgid:08x}"]
            await message.abort()

    run(scenario())
    assert spool_files(tmp_path / "spool", "temporary") == []
    assert list((tmp_path / "spool" / "queue").glob("*/*")) == []


def test_leftovers_of_a_crash_are_dropped_and_committed_mail_is_delivered(tmp_path: Path) -> None:
    async def first_life() -> int:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            msgid, _ = await harness.submit(b"Subject: acknowledged\n\nsafe\n")
            partial = harness.queue.new_message()  # the "crash" comes while this one is being received
            await partial.write(b"Subject: half" + b"x" * MEMORY_LIMIT)  # big enough to be on disk
            assert spool_files(harness.spool, "temporary") == [f"{partial.msgid:08x}"]
            (harness.spool / "incoming" / "0badc0de").mkdir()
            (harness.spool / "incoming" / "0badc0de" / "message").write_bytes(b"half committed")
            partial._fd = None  # noqa: SLF001 — keep the file, as a killed process would
            return msgid

    msgid = run(first_life())

    async def second_life() -> list[bytes]:
        async with Harness(tmp_path) as harness:
            await wait_for(lambda: len(harness.mda.delivered) >= 1, what="delivery after restart")
            await asyncio.sleep(0.1)
            return [item.data for item in harness.mda.delivered]

    assert run(second_life()) == [b"Subject: acknowledged\n\nsafe\n"]
    assert spool_files(tmp_path / "spool", "temporary") == []
    assert spool_files(tmp_path / "spool", "incoming") == []
    assert not (tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}").exists()


def test_corrupt_envelope_is_moved_aside_logged_and_the_rest_still_delivered(tmp_path: Path, caplog) -> None:
    async def first_life() -> tuple[int, list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            return await harness.submit(recipients=("good@x.test", "bad@x.test"))

    msgid, (good, bad) = run(first_life())
    folder = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
    (folder / f"{bad:016x}").write_bytes(b"format: pysmtpd-envelope\nversion: 1\ngarbage line\n")
    (folder / "0123").write_bytes(b"not an envelope name")

    async def second_life() -> list[str]:
        async with Harness(tmp_path) as harness:
            await wait_for(lambda: len(harness.mda.delivered) == 1, what="the good envelope")
            await harness.queue.loading_done.wait()
            return [entry.name for entry in harness.queue.corrupt_entries()]

    with caplog.at_level(logging.WARNING, logger="smtpd"):
        corrupt = run(second_life())
    assert f"{msgid:08x}.{bad:016x}" in corrupt
    assert f"{msgid:08x}.0123" in corrupt
    assert any("corrupt queue file moved aside" in record.getMessage() for record in caplog.records)
    why = (tmp_path / "spool" / "corrupt" / f"{msgid:08x}.{bad:016x}.why").read_text()
    assert "not `key: value`" in why


def test_message_without_message_file_is_moved_aside(tmp_path: Path) -> None:
    bogus = tmp_path / "spool" / "queue" / "7f" / "7f000001"
    bogus.mkdir(parents=True)
    (bogus / "7f00000100000001").write_bytes(dump_envelope(Envelope(rcpt="x@y", dest="x@y", ctime=1)))

    async def life() -> list[str]:
        async with Harness(tmp_path) as harness:
            await harness.queue.loading_done.wait()
            return [entry.reason for entry in harness.queue.corrupt_entries()]

    assert run(life()) == ["message file missing"]
    assert not bogus.exists()


def test_big_queue_is_loaded_in_the_background_and_delivered(tmp_path: Path) -> None:
    async def first_life() -> None:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            await asyncio.gather(*(harness.submit(recipients=(f"u{i}@x.test", f"v{i}@x.test")) for i in range(600)))

    run(first_life())

    async def second_life() -> tuple[int, int]:
        harness = Harness(tmp_path)
        harness.mda.policy = lambda envelope: DeliveryResult.tempfail("not now")
        async with harness:
            await harness.queue.loading_done.wait()
            await wait_for(lambda: len(harness.mda.attempts) == 1200, what="first attempts")
            return harness.queue.loaded_envelopes, len(harness.scheduler.entries)

    assert run(second_life()) == (1200, 1200)


def test_a_commit_whose_waiter_is_cancelled_is_still_scheduled(tmp_path: Path) -> None:
    async def scenario() -> int:
        async with Harness(tmp_path) as harness:
            message = harness.queue.new_message()
            await message.write(b"Subject: orphan\n\nx\n")
            message.add_envelope(Envelope(dispatcher="local", sender="a@x.test", rcpt="b@x.test", dest="b@x.test"))
            waiter = asyncio.ensure_future(message.commit())
            await asyncio.sleep(0)
            waiter.cancel()  # the client disconnected during the commit
            await wait_for(lambda: len(harness.mda.delivered) == 1, what="the committed message's delivery")
            return len(harness.mda.delivered)

    assert run(scenario()) == 1


def _committed_folder_back_in_incoming(tmp_path: Path, recipients: tuple[str, ...]) -> Path:
    """Commit a message, then put its folder back into incoming/: the state a crash leaves between the flush
    that acknowledges a commit and the move under queue/."""

    async def first_life() -> int:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            msgid, _ = await harness.submit(b"Subject: between\n\nrounds\n", recipients=recipients)
            return msgid

    msgid = run(first_life())
    folder = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
    moved = tmp_path / "spool" / "incoming" / f"{msgid:08x}"
    folder.rename(moved)
    return moved


def _second_life_deliveries(tmp_path: Path) -> list[str]:
    async def second_life() -> list[str]:
        async with Harness(tmp_path) as harness:
            await harness.queue.loading_done.wait()
            await asyncio.sleep(0.3)
            return sorted(item.envelope.rcpt for item in harness.mda.delivered)

    return run(second_life())


def test_a_complete_commit_left_in_incoming_is_placed_and_delivered(tmp_path: Path) -> None:
    moved = _committed_folder_back_in_incoming(tmp_path, ("a@x.test", "b@x.test"))
    assert _second_life_deliveries(tmp_path) == ["a@x.test", "b@x.test"]
    assert not moved.exists()


def test_a_complete_commit_whose_id_a_queue_folder_has_is_moved_aside_not_dropped(tmp_path: Path,
                                                                                   caplog) -> None:
    moved = _committed_folder_back_in_incoming(tmp_path, ("a@x.test",))
    msgid = int(moved.name, 16)
    by_hand = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / moved.name
    by_hand.mkdir()  # a folder put there by hand, under the same id, before the crashed daemon could move its own
    with caplog.at_level(logging.WARNING, logger="smtpd"):
        assert _second_life_deliveries(tmp_path) == []
    aside = tmp_path / "spool" / "corrupt" / moved.name
    assert (aside / "message").read_bytes() == b"Subject: between\n\nrounds\n"  # the mail is kept
    assert "acknowledged message" in (tmp_path / "spool" / "corrupt" / f"{moved.name}.why").read_text()
    assert not moved.exists()
    assert f"moved aside to corrupt/{moved.name}: an acknowledged message" in caplog.text


def test_an_incomplete_commit_in_incoming_is_dropped(tmp_path: Path) -> None:
    moved = _committed_folder_back_in_incoming(tmp_path, ("a@x.test", "b@x.test"))
    envelope_file = next(path for path in moved.iterdir() if path.name != "message")
    envelope_file.unlink()  # one envelope never reached the disk
    assert _second_life_deliveries(tmp_path) == []
    assert not moved.exists()


def test_a_commit_with_a_short_message_in_incoming_is_dropped(tmp_path: Path) -> None:
    moved = _committed_folder_back_in_incoming(tmp_path, ("a@x.test",))
    (moved / "message").write_bytes(b"Subject: between\n\nro")  # the data did not all reach the disk
    assert _second_life_deliveries(tmp_path) == []
    assert not moved.exists()
