"""Loading the queue at start through the spool reader process (smtpd/queue/loading.py, spool_reader.py): the
plain folders it reads, the odd ones it leaves to the daemon's careful loading, a reader that cannot start; and
the envelope parser's fast path agreeing with the strict one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from helpers_queue import Harness, run

from smtpd.queue import format as envelope_format
from smtpd.queue import loading, spool_reader
from smtpd.queue.envelope import DsnNotify, Envelope, EnvelopeType
from smtpd.queue.format import EnvelopeFormatError, dump_envelope, load_envelope


def plain_envelope() -> Envelope:
    return Envelope(evpid=0x0123456789ABCDEF, dispatcher="relay", type=EnvelopeType.MTA, smtpname="mx.test",
                    helo="client.test", hostname="localhost", sockaddr="127.0.0.1", sender="a@example.com",
                    rcpt="b@example.org", dest="b@example.org", ctime=1795594471, ttl=345600, retry=2,
                    flags={"authenticated", "suspend"}, dsn_notify=DsnNotify.FAILURE | DsnNotify.DELAY,
                    dsn_ret="HDRS", esc_class=4, esc_code=30, commit_size=2163, commit_crc32=0xFB8F448E,
                    commit_envelopes=1)


@pytest.mark.parametrize("text", [
    "",  # the plain file: fast path
    "sender: @\n",  # the null sender
    "errorline: a\\\\b\\nc\n",  # escapes: strict path
    "Bounce-Type: failed\n",  # a key in capitals: strict path
    "tag:no-space\n",  # `key:value`
    "dsn-notify: 00\n",  # a value only the strict path converts
])
def test_fast_and_strict_parsers_agree(text: str) -> None:
    data = dump_envelope(plain_envelope()).decode()
    if text.startswith("dsn-notify"):
        data = data.replace("dsn-notify: 6\n", text)
    elif text.startswith("sender"):
        data = data.replace("sender: a@example.com\n", text)
    else:
        data += text
    loaded = load_envelope(data.encode())
    assert loaded == envelope_format._load_strict(data)
    if not text:
        assert loaded == plain_envelope()


@pytest.mark.parametrize(("extra", "reason"), [
    ("retry: 3\n", "duplicate"),
    ("colour: blue\n", "unknown key"),
    ("ttl: long\n", "ttl"),
    ("\n", "not `key: value`"),
    ("type: smtp\n", "type"),
])
def test_a_file_the_fast_path_refuses_gets_the_strict_paths_reason(extra: str, reason: str) -> None:
    data = dump_envelope(plain_envelope()).decode().replace("ttl: 345600\n", "").replace("type: mta\n", "")
    data += extra
    with pytest.raises(EnvelopeFormatError, match=reason):
        load_envelope(data.encode())


def test_the_reader_and_the_format_agree_on_the_largest_envelope() -> None:
    assert spool_reader.MAX_STORED_ENVELOPE_BYTES == envelope_format.MAX_STORED_ENVELOPE_BYTES
    assert spool_reader.MESSAGE_FILE == "message"


def _fill(tmp_path: Path, messages: int) -> list[tuple[int, list[int]]]:
    async def first_life() -> list[tuple[int, list[int]]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            return [await harness.submit(recipients=(f"u{index}@x.test", f"v{index}@x.test"))
                    for index in range(messages)]

    return run(first_life())


def _second_life(tmp_path: Path) -> tuple[set[int], list[str], int]:
    async def life() -> tuple[set[int], list[str], int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            await harness.queue.loading_done.wait()
            return (set(harness.scheduler.entries), sorted(entry.name for entry in harness.queue.corrupt_entries()),
                    harness.queue.loaded_envelopes)

    return run(life())


def test_plain_and_odd_folders_load_as_before(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Several readers (more than MESSAGES_PER_READER folders), and among the plain folders odd ones that the
    reader leaves to the daemon: each ends as load_message decides."""
    stored = _fill(tmp_path, 150)
    queue = tmp_path / "spool" / "queue"

    def folder(msgid: int) -> Path:
        return queue / f"{msgid >> 24:02x}" / f"{msgid:08x}"

    (tmp_msgid, (kept, _)), (fifo_msgid, (_, fifo)), (bad_msgid, (_, bad)), (done_msgid, done) = stored[:4]
    (folder(tmp_msgid) / f".{kept:016x}.tmp").write_bytes(b"half a rewrite")  # removed, the rest loads
    os.unlink(folder(fifo_msgid) / f"{fifo:016x}")
    os.mkfifo(folder(fifo_msgid) / f"{fifo:016x}")  # not a regular file: aside, never opened for a blocking read
    (folder(bad_msgid) / f"{bad:016x}").write_bytes(b"format: pysmtpd-envelope\nversion: 1\ngarbage\n")
    for evpid in done:  # every envelope delivered, the crash came before the folder went: purged
        os.unlink(folder(done_msgid) / f"{evpid:016x}")

    with caplog.at_level(logging.WARNING, logger="smtpd"):
        loaded, corrupt, count = _second_life(tmp_path)
    assert not [record for record in caplog.records if "spool reader" in record.getMessage()]  # it did the work
    expected = {evpid for _, evpids in stored[4:] for evpid in evpids} | set(stored[0][1])
    expected |= {stored[1][1][0], stored[2][1][0]}
    assert loaded == expected
    assert count == len(expected)
    assert corrupt == sorted([f"{fifo_msgid:08x}.{fifo:016x}", f"{bad_msgid:08x}.{bad:016x}"])
    assert not (folder(tmp_msgid) / f".{kept:016x}.tmp").exists()
    assert not folder(done_msgid).exists()


def test_without_the_reader_everything_is_loaded_in_the_daemon(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stored = _fill(tmp_path, 20)
    # A reader that exits at once having sent nothing (its script is not there): the daemon loads it all.
    monkeypatch.setattr(loading, "READER", str(tmp_path / "no-such-reader.py"))
    loaded, corrupt, count = _second_life(tmp_path)
    assert loaded == {evpid for _, evpids in stored for evpid in evpids}
    assert (corrupt, count) == ([], 40)


def test_show_queue_in_a_pipe_prints_what_the_click_path_prints(tmp_path: Path) -> None:
    """smtpctl's fast path for `show queue` (smtpctl/fast.py) against the Click command: same lines, same
    warnings (a corrupt file moved aside), same exit status."""
    from click.testing import CliRunner
    from helpers_queue import paused_daemon
    from waiting import wait_until

    from smtpctl.words import cli

    stored = _fill(tmp_path, 3)
    msgid, (evpid, _) = stored[0]
    path = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}" / f"{evpid:016x}"
    path.write_bytes(b"nonsense\n")
    process = paused_daemon(tmp_path)
    process.start()
    try:
        wait_until(lambda: len(process.smtpctl("show", "queue").stdout.splitlines()) == 5, 20, explain=process.log)
        fast = process.smtpctl("show", "queue")
        slow = CliRunner().invoke(cli, ["--socket", process.socket, "show", "queue"])
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.exit_code, slow.stdout, slow.stderr)
        assert f"corrupt/{msgid:08x}.{evpid:016x}: not a pysmtpd-envelope file" in fast.stderr
    finally:
        process.stop()
