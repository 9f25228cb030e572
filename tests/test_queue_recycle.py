"""Delivered messages' folders taken back for new messages (smtpd/queue/store.py, SpoolWriter.retire).

On ext4 without a journal every inode freed slows each inode allocation of the next minutes in its block group,
so a delivered message's folder, message file and envelope file are kept and rewritten for a new message. What
must hold: a new message's files hold its own data only (the old message's longer data is gone), the envelope is
its own, and a folder is reused only after a syncfs that began after its removal. And what a power cut in the
middle of a reuse may leave in incoming/ (an old envelope under a new name, new data under an old envelope) is
never taken for a commit at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from helpers_queue import Harness, run, wait_for

from smtpd.delivery import DeliveryResult
from smtpd.queue.envelope import Envelope


async def submit_pair(harness: Harness, bodies: list[bytes], rcpts: list[str]) -> list[int]:
    """Two messages that end together, as two sessions' would: their files go to the file writer process."""
    from smtpd.queue.envelope import EnvelopeType

    messages = []
    for body, rcpt in zip(bodies, rcpts, strict=True):
        message = harness.queue.new_message()
        await message.write(body)
        message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="alice@example.com",
                                      rcpt=rcpt, dest=rcpt))
        messages.append(message)
    await asyncio.gather(*(message.commit() for message in messages))
    await asyncio.gather(*(message.placed for message in messages if message.placed is not None))
    return [message.msgid for message in messages]


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "in-pairs-by-the-file-writer"])
def test_a_delivered_message_folder_carries_a_new_message_whole(tmp_path: Path, together: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smtpd.queue")
    folder_inodes: dict[int, int] = {}  # msgid -> inode of its queue folder, taken at delivery

    async def scenario() -> dict[int, bytes]:
        harness = Harness(tmp_path)

        def note_folder(envelope: Envelope) -> DeliveryResult:
            folder = os.path.dirname(harness.queue.message_path(envelope.msgid))
            folder_inodes[envelope.msgid] = os.stat(folder).st_ino
            return DeliveryResult.ok()

        harness.mda.policy = note_folder
        async with harness:
            writer = harness.queue.io
            writer.folders_wanted = 2  # refills often, so that taken-back folders are used soon
            old = [await harness.submit(b"Subject: old\n\n" + b"o" * 20000 + b"\n",
                                        recipients=(f"old{number}@example.org",)) for number in range(3)]
            await wait_for(lambda: len(harness.mda.delivered) == 3 and not list(harness.spool.glob("queue/*/*")),
                           what="the old messages delivered and removed")
            kept = set(os.listdir(harness.spool / "purge")) | {spare.path for spare in writer.folders if spare.envelope}
            assert kept, "no delivered message's folder was kept"
            sent: dict[int, bytes] = {}
            bodies = [f"Subject: new {number}\n\nshort {number}\n".encode() for number in range(12)]
            rcpts = [f"new{number}@example.org" for number in range(12)]
            if together:
                assert writer.file_writer is not None
                for first in range(0, 12, 2):
                    msgids = await submit_pair(harness, bodies[first:first + 2], rcpts[first:first + 2])
                    sent.update(zip(msgids, bodies[first:first + 2], strict=True))
            else:
                for body, rcpt in zip(bodies, rcpts, strict=True):
                    msgid, _ = await harness.submit(body, recipients=(rcpt,))
                    sent[msgid] = body
            await wait_for(lambda: len(harness.mda.delivered) == 15, what="the new messages delivered")
            delivered = {item.envelope.msgid: item.data for item in harness.mda.delivered}
            for item in harness.mda.delivered[3:]:
                number = item.data.split(b"\n")[0].split()[-1].decode()
                assert item.envelope.rcpt == f"new{number}@example.org"  # its own envelope
            old_inodes = {folder_inodes[msgid] for msgid, _ in old}
            reused = [msgid for msgid in sent if folder_inodes[msgid] in old_inodes]
            assert reused, "no new message was written into a delivered message's folder"
            return {msgid: delivered[msgid] for msgid in sent}

    delivered = run(scenario())
    assert "could not be written" not in caplog.text  # (a failed write would be retried from memory: not this)
    assert len(delivered) == 12
    for data in delivered.values():
        assert data.startswith(b"Subject: new ") and b"ooo" not in data  # no old tail
        assert len(data) < 40

    async def restart() -> None:
        async with Harness(tmp_path) as harness:
            assert harness.queue.loaded_envelopes == 0

    run(restart())
    spool = tmp_path / "spool"
    assert [path for sub in ("temporary", "incoming", "purge") for path in (spool / sub).iterdir()] == []
    assert list((spool / "queue").glob("*/*")) == []


def test_a_kept_folder_waits_for_a_syncfs_begun_after_its_removal(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Harness(tmp_path) as harness:
            writer = harness.queue.io
            assert writer.filesystem is not None
            kept = harness.spool / "purge" / "0badcafe"
            kept.mkdir()
            (kept / "message").write_bytes(b"old\n")
            (kept / "0badcafe00000001").write_bytes(b"old envelope\n")
            writer.retire([(str(kept), "0badcafe00000001")], writer.filesystem.started)
            assert writer.take_reusable(8) == []  # its removal may not be on disk yet
            writer.filesystem.sync()
            assert writer.take_reusable(8) == [(str(kept), "0badcafe00000001")]
            assert writer.take_reusable(8) == []

    run(scenario())


def _old_folder_under_a_new_name(tmp_path: Path) -> tuple[Path, bytes]:
    """A power cut in the middle of a taken-back folder's reuse, as the disk may show it: the old message's folder
    in incoming/ under a new message id, its envelope file renamed to a new envelope id but still the old one's."""

    async def first_life() -> tuple[int, bytes]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            body = b"Subject: old\n\nfor the old recipient\n"
            msgid, _ = await harness.submit(body, recipients=("old@example.org",))
            return msgid, body

    msgid, body = run(first_life())
    new_msgid = msgid ^ 0x00FFFFFF
    folder = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
    moved = tmp_path / "spool" / "incoming" / f"{new_msgid:08x}"
    folder.rename(moved)
    envelope_file = next(path for path in moved.iterdir() if path.name != "message")
    envelope_file.rename(moved / f"{new_msgid:08x}{envelope_file.name[8:]}")
    return moved, body


def _deliveries_after_restart(tmp_path: Path) -> list[str]:
    async def second_life() -> list[str]:
        async with Harness(tmp_path) as harness:
            await harness.queue.loading_done.wait()
            await asyncio.sleep(0.3)
            return [item.envelope.rcpt for item in harness.mda.delivered]

    return run(second_life())


def test_an_old_envelope_under_a_new_name_is_never_taken_for_a_commit(tmp_path: Path) -> None:
    moved, _ = _old_folder_under_a_new_name(tmp_path)
    assert _deliveries_after_restart(tmp_path) == []
    assert not moved.exists()


def test_new_data_under_an_old_envelope_is_never_delivered(tmp_path: Path) -> None:
    moved, _ = _old_folder_under_a_new_name(tmp_path)
    (moved / "message").write_bytes(b"Subject: new\n\nfor the new recipient only\n")
    assert _deliveries_after_restart(tmp_path) == []
    assert not moved.exists()


def test_a_big_delivered_message_gives_its_space_back_at_once(tmp_path: Path) -> None:
    """A kept folder holds its old files until a new message takes it: only small messages' folders are kept
    (RETIRE_MAX_BYTES), so that a delivered big message's space is not held in purge/."""
    from smtpd.queue.spool import RETIRE_MAX_BYTES

    async def scenario() -> tuple[list[str], list[int]]:
        async with Harness(tmp_path) as harness:
            small, _ = await harness.submit(b"Subject: small\n\nsmall\n", recipients=("small@example.org",))
            big, _ = await harness.submit(b"Subject: big\n\n" + b"b" * RETIRE_MAX_BYTES + b"\n",
                                          recipients=("big@example.org",))
            await wait_for(lambda: len(harness.mda.delivered) == 2 and not list(harness.spool.glob("queue/*/*")),
                           what="both delivered and removed")
            purge = harness.spool / "purge"
            held = [path.stat().st_size for sub in ("purge", "temporary") for path in (harness.spool / sub).rglob("*")
                    if path.is_file()]
            return sorted(os.listdir(purge)), held

    kept, held = run(scenario())
    assert kept  # the small one's folder is kept for reuse, as before
    assert all(size < RETIRE_MAX_BYTES for size in held)
