"""`queue compression` and `queue encryption` against what an administrator does with a running queue: turning
them off with mail queued, starting without the key after a crash, LMTP deliveries of an encrypted message."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from helpers_codec import KEY, config_text, new_daemon, queue_one, queue_rows, send
from helpers_delivery import DictTables, local_action, mail_world, make_config, mda_envelope
from helpers_dovecot import Dovecot, DovecotUser, free_port
from helpers_filters import filter_command, open_folder
from waiting import wait_until

from smtpd.config.model import Method
from smtpd.delivery import Outcome
from smtpd.mda import MdaAgent
from smtpd.queue import codec


@pytest.fixture()
def world(monkeypatch):
    with mail_world(monkeypatch, "pysmtpd-crypt-hunt-", "pqh") as made:
        yield made


def maildir_texts(home: str) -> list[bytes]:
    new = Path(home, "Maildir", "new")
    return [path.read_bytes() for path in new.iterdir()] if new.is_dir() else []


def test_mail_queued_compressed_is_delivered_in_clear_once_compression_is_off(world) -> None:
    """Reading goes by the bytes (docs/queue.md): a local delivery after `queue compression` is taken out of
    smtpd.conf must write the message, not its gzip stream, into the mailbox."""
    top, root, bob = world
    port = free_port()
    daemon = new_daemon(top, root, config_text(port, "queue compression"), ("-P", "mda")).start()
    try:
        queue_one(daemon, port, [f"{bob.pw_name}@local.test"], "Subject: squeezed\r\n\r\nsqueezed body\r\n")
    finally:
        daemon.stop()
    Path(daemon.config_path).write_text(config_text(port, ""))
    daemon.flags = []
    daemon.start()
    try:
        wait_until(lambda: maildir_texts(bob.pw_dir) and not queue_rows(daemon), 20, explain=daemon.log)
    finally:
        daemon.stop()
    [text] = maildir_texts(bob.pw_dir)
    assert b"\nSubject: squeezed\n" in text and text.endswith(b"\n\nsqueezed body\n"), text[:300]


def test_a_clear_message_a_filter_made_begin_like_encrypted_bytes_is_delivered_as_it_is(world) -> None:
    """Reading goes by the first bytes, and 0x01 means encrypted: a message with neither queue option on that a
    filter made begin with it was taken for an encrypted one, with no key to read it: every delivery failed."""
    top, root, bob = world
    port = free_port()
    with open_folder("codec-mark") as folder:
        marking = filter_command(folder, "filter.log", "reports=", "phases=data-line", r"dataline=prepend:\x01X-Mark: 1")
        config = (f'filter "mark" proc-exec {marking}\n'
                  + config_text(port, "").replace(f"port {port}\n", f'port {port} filter "mark"\n'))
        daemon = new_daemon(top, root, config, ()).start()
        try:
            send(port, [f"{bob.pw_name}@local.test"], "Subject: marked\r\n\r\nmarked body\r\n")
            wait_until(lambda: maildir_texts(bob.pw_dir), 20, explain=daemon.log)
        finally:
            daemon.stop()
    [text] = maildir_texts(bob.pw_dir)
    assert b"\x01X-Mark: 1\nReceived: " in text and text.endswith(b"\n\nmarked body\n"), text[:300]


def test_lmtp_envelopes_of_an_encrypted_message_share_one_transaction(world, monkeypatch) -> None:
    """The LMTP batch of a message gathered its envelopes by the inode of the file each read: a decrypted copy
    in memory is one per envelope, so every recipient of an encrypted message had a session of its own."""
    top, _, bob = world
    monkeypatch.setattr(codec, "_current", codec.QueueCodec(compress=True, key=KEY.encode()))
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    with Dovecot(os.path.join(top, "dovecot"), [user], "maildir:~/Maildir") as dovecot:
        config = make_config([local_action("lm", Method.LMTP, lmtp_destination=dovecot.lmtp_socket,
                                           lmtp_rcpt_to=True)], [])
        agent = MdaAgent(config, DictTables(), "mx.example.org")
        path = os.path.join(top, "message")
        Path(path).write_bytes(codec.stored(b"Subject: for two\n\nsent once\n"))
        first = mda_envelope("lm", f"{bob.pw_name}@example.org", bob.pw_name, evpid=0x1111222200000001)
        second = mda_envelope("lm", f"{bob.pw_name}+two@example.org", bob.pw_name, evpid=0x1111222200000002)

        async def both():
            return await asyncio.gather(agent.deliver(first, path), agent.deliver(second, path))

        results = asyncio.run(both())
        assert [result.outcome for result in results] == [Outcome.OK, Outcome.OK], results
        wait_until(lambda: "Disconnect from local" in dovecot.log(), explain=dovecot.log)
        assert dovecot.log().count("Connect from local") == 1, dovecot.log()


def test_an_acknowledged_commit_left_in_incoming_is_kept_by_a_start_without_the_key(world) -> None:
    """A crash left an acknowledged commit in incoming/ (not yet moved under queue/), and the next start has no
    key: its envelopes cannot be read to tell an acknowledged commit from an unfinished one, so it must be kept
    aside with the reason, never dropped as unacknowledged."""
    top, root, _ = world
    port = free_port()
    daemon = new_daemon(top, root, config_text(port, f"queue encryption {KEY}"), ("-P", "mta"))
    daemon.start()
    try:
        msgid = queue_one(daemon, port, ["carol@far.test"], "Subject: acknowledged\r\n\r\nkeep me\r\n")
    finally:
        daemon.stop()
    # As a crash between the commit's flush and its move under queue/ leaves it.
    os.rename(os.path.join(daemon.spool, "queue", msgid[:2], msgid), os.path.join(daemon.spool, "incoming", msgid))
    Path(daemon.config_path).write_text(config_text(port, ""))
    daemon.start()
    try:
        corrupt = daemon.smtpctl("show", "queue", "--corrupt").stdout
    finally:
        daemon.stop()
    assert "unacknowledged" not in daemon.log(), daemon.log()
    assert msgid in corrupt and codec.NO_KEY in corrupt, corrupt
    # What the reason says to do: back to incoming/, a start with the key checks it and places it.
    os.rename(os.path.join(daemon.spool, "corrupt", msgid), os.path.join(daemon.spool, "incoming", msgid))
    Path(daemon.config_path).write_text(config_text(port, f"queue encryption {KEY}"))
    daemon.start()
    try:
        wait_until(lambda: [row[0][:8] for row in queue_rows(daemon)] == [msgid], 20, explain=daemon.log)
    finally:
        daemon.stop()


def test_a_lost_or_damaged_key_check_file_is_judged_by_the_queue(world) -> None:
    """encryption-check gone (a spool copied without it, a cleanup): a start with another key wrote it for that
    key, moved every queued message aside as undecryptable, and from then on refused the right key. The queue
    itself now decides; and a damaged check file no longer locks out the key the queue decrypts with."""
    top, root, _ = world
    port = free_port()
    daemon = new_daemon(top, root, config_text(port, f"queue encryption {KEY}"), ("-P", "mta"))
    daemon.start()
    try:
        queue_one(daemon, port, ["carol@far.test"], "Subject: kept\r\n\r\nkept\r\n")
    finally:
        daemon.stop()
    check = Path(daemon.spool, "encryption-check")
    check.unlink()
    Path(daemon.config_path).write_text(config_text(port, f"queue encryption {'x' * 32}"))
    with pytest.raises(RuntimeError, match="exited at start"):
        daemon.start()
    assert "the queue encryption key is not the one this spool's queue was encrypted with" in daemon.log()
    assert not check.exists() and not any(Path(daemon.spool, "corrupt").iterdir())
    check.write_bytes(b"")  # damaged: the right key starts, and writes it again
    Path(daemon.config_path).write_text(config_text(port, f"queue encryption {KEY}"))
    daemon.start()
    try:
        wait_until(lambda: len(queue_rows(daemon)) == 1, 20, explain=daemon.log)
        assert "encryption-check was damaged: written again" in daemon.log(), daemon.log()
    finally:
        daemon.stop()
    assert check.read_bytes().startswith(codec.ENCRYPTED_MARK)


def open_copies() -> set[int]:
    """The inodes of the clear message copies (memfds) this process holds open."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:smtpd-message"):
                found.add(os.stat(f"/proc/self/fd/{name}").st_ino)
        except OSError:
            continue
    return found


def test_readers_of_one_message_share_one_clear_copy(tmp_path: Path, monkeypatch) -> None:
    """Every delivery decoded a copy of its own, kept while it ran or waited for its mailbox batch: a 20 MB
    message to 40 local users held 750 MB of copies. The readers at one time now share one, each with its own
    offset, and it goes with the last of them."""
    monkeypatch.setattr(codec, "_current", codec.QueueCodec(compress=True, key=KEY.encode()))
    clear = b"Subject: shared\n\n" + b"".join(b"line %d\n" % number for number in range(50_000))
    path = tmp_path / "message"
    path.write_bytes(codec.stored(clear))
    readers = [codec.open_message(str(path)) for _ in range(10)]
    try:
        assert len(open_copies()) == 1
        assert readers[0].read(100) == clear[:100]
        assert [reader.read() for reader in readers[1:]] == [clear] * 9  # (offsets of their own)
    finally:
        for reader in readers:
            reader.close()
    assert open_copies() == set()
    path.write_bytes(codec.stored(clear)[:-1])  # damaged: each reader is told, nothing stays behind
    for _ in range(2):
        with pytest.raises(codec.QueueCodecError):
            codec.open_message(str(path))
    assert open_copies() == set()


def test_a_tampered_compressed_and_encrypted_message_is_a_tag_failure(tmp_path: Path) -> None:
    """Decrypted blocks are decompressed before the tag at the end is checked: a changed byte was reported as
    damaged compressed data, which sends an administrator looking at gzip instead of at the file or the key."""
    queue_codec = codec.QueueCodec(compress=True, key=KEY.encode())
    stored = bytearray(queue_codec.encode(os.urandom(300_000)))  # (random: the gzip stream is as long)
    stored[len(stored) // 2] ^= 0xFF
    path = tmp_path / "message"
    path.write_bytes(bytes(stored))
    with pytest.raises(codec.QueueCodecError, match="cannot be decrypted"):
        queue_codec.open_message(str(path))
