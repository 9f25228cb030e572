"""`queue compression` and `queue encryption` with the real daemon: what it stores holds no clear text (message
files, envelope files, the commit journal), and what it delivers is the message as sent, through a local
delivery read by Dovecot and through a relay; the key from smtpd.conf, standard input or the terminal; a wrong
key stops the start and changes nothing; a crash right after the 250s loses nothing; a daemon started without
the key keeps encrypted mail aside with the reason."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pexpect
import pytest
from helpers_codec import KEY, OTHER_KEY, config_text, new_daemon, queue_one, queue_rows, send
from helpers_delivery import mail_world
from helpers_dovecot import Dovecot, DovecotUser, free_port
from helpers_mta import Remote, ScriptedHandler, maildir_messages
from test_queue_file_writer import file_writer_of
from waiting import wait_until

from smtpd.queue.codec import ENCRYPTED_MARK

BIG_LINES = 9000  # about 400 KB: over the 256 KiB a message is held in memory, so it goes through its file


@pytest.fixture()
def world(monkeypatch):
    with mail_world(monkeypatch, "pysmtpd-crypt-", "pqe") as made:
        yield made








def big_message(token: str) -> str:
    return f"Subject: big {token}\r\n\r\n" + "".join(f"line {n} {token}\r\n" for n in range(BIG_LINES))


def spool_files(spool: str) -> dict[str, bytes]:
    return {str(path.relative_to(spool)): path.read_bytes() for path in Path(spool).rglob("*") if path.is_file()}




def test_smtpd_n_takes_both_without_a_warning(tmp_path: Path) -> None:
    conf = tmp_path / "smtpd.conf"
    conf.write_text(f"queue compression\nqueue encryption {KEY}\nlisten on 127.0.0.1\n"
                    'action "l" mbox\nmatch for local action "l"\n')
    result = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(conf)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SMTPD_MAILNAME": str(tmp_path / "none")})
    assert (result.returncode, result.stderr) == (0, "configuration OK\n")


def test_stored_encrypted_and_compressed_delivered_as_sent(world) -> None:
    top, root, bob = world
    token = f"clear{uuid.uuid4().hex}"
    small = f"Subject: small {token}\r\n\r\nthe secret is {token}\r\n"
    big = big_message(token)
    users = [DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)]
    with Remote() as remote, Dovecot(os.path.join(top, "dovecot"), users, "maildir:~/Maildir") as dovecot:
        port = free_port()
        daemon = new_daemon(top, root, config_text(port, f"queue compression\nqueue encryption {KEY}",
                                                   remote.port)).start()
        try:
            for message in (small, big):
                send(port, [f"{bob.pw_name}@local.test", "carol@far.test"], message)
            wait_until(lambda: len(queue_rows(daemon)) == 4, 20, explain=daemon.log)
            files = spool_files(daemon.spool)
            messages = [data for name, data in files.items() if name.endswith("/message")]
            envelopes = [data for name, data in files.items() if name.startswith("queue/") and
                         not name.endswith("/message")]
            assert len(messages) == 2 and len(envelopes) == 4, sorted(files)
            assert all(data.startswith(ENCRYPTED_MARK) for data in messages + envelopes)
            assert [name for name, data in files.items() if token.encode() in data or b"carol@far.test" in data] \
                == [], "clear text in the spool"
            # Compressed before it was encrypted: 400 KB of repetitive lines take a few KB.
            assert min(len(data) for data in messages) < 2000 < len(small) + 100_000
            assert max(len(data) for data in messages) < 60_000
            assert sorted(row[5] for row in queue_rows(daemon)) == sorted([f"{bob.pw_name}@local.test"] * 2
                                                                            + ["carol@far.test"] * 2)
            # smtpctl prints a queued message in clear with smtpd.conf's key, as the administrator reads it.
            msgid = queue_rows(daemon)[0][0][:8]
            shown = daemon.smtpctl("show", "message", msgid)
            assert shown.returncode == 0 and "Subject: " in shown.stdout and token in shown.stdout, shown
            daemon.flags = []  # a restart reads the encrypted envelopes back, and delivers
            daemon.restart()
            wait_until(lambda: len(remote.received) == 2 and not queue_rows(daemon), 30,
                       explain=lambda: daemon.log() + dovecot.log())
        finally:
            daemon.stop()
        relayed = sorted((item.data.decode().replace("\r\n", "\n") for item in remote.received), key=len)
        fetched = sorted((text.replace("\r\n", "\n") for text in dovecot.fetch(bob.pw_name)), key=len)
        for sent, got_relayed, got_local in zip((small, big), relayed, fetched, strict=True):
            body = sent.replace("\r\n", "\n").split("\n\n", 1)[1]
            assert got_relayed.endswith("\n\n" + body) and got_local.endswith("\n\n" + body)
            assert f"Subject: {sent.split(' ', 2)[1]} {token}\n" in got_local


def test_a_bounce_quotes_the_original_in_clear(world) -> None:
    """The relay refuses the recipient for good: the bounce, delivered to the local sender, returns the
    original message read from the encrypted queue, not its stored bytes."""
    top, root, bob = world
    token = f"bounced{uuid.uuid4().hex}"
    with Remote(ScriptedHandler(rcpt_replies={"ghost@far.test": "550 5.1.1 no such user"})) as remote:
        port = free_port()
        daemon = new_daemon(top, root, config_text(port, f"queue compression\nqueue encryption {KEY}",
                                                   remote.port), flags=()).start()
        try:
            send_from = f"{bob.pw_name}@local.test"
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail(send_from, ["ghost@far.test"], f"Subject: {token}\r\n\r\nsaid {token}\r\n")
            maildir = os.path.join(bob.pw_dir, "Maildir")
            wait_until(lambda: maildir_messages(maildir), 30, explain=daemon.log)
        finally:
            daemon.stop()
    [report] = maildir_messages(maildir)
    returned = [part for part in report.walk() if part.get_content_type() == "message/rfc822"]
    assert returned, report.as_string()
    original = returned[0].get_payload()[0]
    assert original["Subject"] == token and f"said {token}" in original.get_payload()


def test_wrong_key_stops_the_start_and_changes_nothing(world) -> None:
    top, root, bob = world
    port = free_port()
    daemon = new_daemon(top, root, config_text(port, f"queue encryption {KEY}")).start()
    try:
        queue_one(daemon, port, [f"{bob.pw_name}@local.test"], "Subject: kept\r\n\r\nkept\r\n")
        # A reload cannot switch the codec of a running queue: it says so.
        Path(daemon.config_path).write_text(config_text(port, f"queue encryption {OTHER_KEY}"))
        assert daemon.smtpctl("reload").returncode == 0
        wait_until(lambda: "queue compression or encryption changed: it takes effect at the next start"
                   in daemon.log(), 10, explain=daemon.log)
    finally:
        daemon.stop()
    before = spool_files(daemon.spool)
    assert daemon.process is not None
    with pytest.raises(RuntimeError, match="exited at start"):
        daemon.start()
    assert daemon.process.returncode == 1
    assert ("smtpd: queue: the queue encryption key is not the one this spool's queue was encrypted with"
            in daemon.log()), daemon.log()
    assert spool_files(daemon.spool) == before
    Path(daemon.config_path).write_text(config_text(port, f"queue encryption {KEY}"))
    daemon.start()
    try:
        assert [row[5] for row in queue_rows(daemon)] == [f"{bob.pw_name}@local.test"]
    finally:
        daemon.stop()


def test_key_from_standard_input_or_the_terminal(world) -> None:
    top, root, bob = world
    port = free_port()
    daemon = new_daemon(top, root, config_text(port, "queue encryption stdin"))
    daemon.stdin_data = f"{KEY}\n".encode()
    daemon.start()
    try:
        queue_one(daemon, port, [f"{bob.pw_name}@local.test"], "Subject: piped key\r\n\r\nbody\r\n")
    finally:
        daemon.stop()
    # No key in smtpd.conf and no terminal: a clear refusal.
    Path(daemon.config_path).write_text(config_text(port, "queue encryption"))
    daemon.stdin_data = b""
    with pytest.raises(RuntimeError, match="exited at start"):
        daemon.start()
    assert "smtpd: queue encryption: smtpd.conf gives no key and there is no terminal to ask for it" in daemon.log()
    # On a terminal it asks, as OpenSMTPD does; the same key reads the queue the piped key wrote.
    child = pexpect.spawn(sys.executable, ["-m", "smtpd", "-d", "-f", daemon.config_path, "-P", "mda"],
                          env=daemon.env, cwd=str(daemon.workdir), timeout=30)
    try:
        child.expect_exact("queue key: ")
        child.sendline(KEY)
        wait_until(daemon.answers, 20, explain=lambda: child.before.decode(errors="replace"))
        # (The queue loads in the background: right after the start, show queue may list nothing yet.)
        wait_until(lambda: [row[5] for row in queue_rows(daemon)] == [f"{bob.pw_name}@local.test"], 20,
                   explain=lambda: child.before.decode(errors="replace"))
    finally:
        child.terminate(force=True)


def test_crash_after_the_250s_loses_nothing(world) -> None:
    """kill -9 after the 250s, their files never written (the file writer process stopped): the commits live
    only in the journal, encrypted; the next start writes them back and every message is delivered, once."""
    top, root, _ = world
    with Remote() as remote:
        port = free_port()
        daemon = new_daemon(top, root, config_text(port, f"queue compression\nqueue encryption {KEY}",
                                                   remote.port))
        daemon.start()
        assert daemon.process is not None
        writer = file_writer_of(daemon.process.pid)
        assert writer is not None, "no file writer process"
        tokens = [f"crash{number}x{uuid.uuid4().hex}" for number in range(20)]
        try:
            os.kill(writer, signal.SIGSTOP)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                for token in tokens:
                    client.sendmail("alice@client.test", ["carol@far.test"], f"Subject: {token}\r\n\r\n{token}\r\n")
            daemon.signal(signal.SIGKILL)
            daemon.process.wait(10)
            os.kill(writer, signal.SIGKILL)
            assert [name for name, data in spool_files(daemon.spool).items() if b"crash" in data] == []
            daemon.flags = []
            daemon.start()
            wait_until(lambda: len(remote.received) >= len(tokens) and not queue_rows(daemon), 30,
                       explain=daemon.log)
        finally:
            daemon.stop()
        assert f"wrote back {len(tokens)} acknowledged message(s) from the commit journal" in daemon.log()
        bodies = sorted(item.data.decode().rsplit("\r\n\r\n", 1)[-1].strip() for item in remote.received)
        assert bodies == sorted(tokens)


def test_without_the_key_encrypted_mail_is_kept_aside_with_the_reason(world) -> None:
    top, root, bob = world
    port = free_port()
    daemon = new_daemon(top, root, config_text(port, f"queue encryption {KEY}"))
    daemon.flags = ["-P", "mda"]  # the relay is tried, and fails: its envelope is rewritten, encrypted
    daemon.start()
    try:
        send(port, ["carol@far.test"], "Subject: deferred\r\n\r\nbody\r\n")
        wait_until(lambda: any(row[13] for row in queue_rows(daemon)), 30, explain=daemon.log)
        [row] = queue_rows(daemon)
        assert int(row[10]) >= 1 and row[13], row  # tried, and why it failed
        envelope = Path(daemon.spool, "queue", row[0][:2], row[0][:8], row[0])
        assert envelope.read_bytes().startswith(ENCRYPTED_MARK)
    finally:
        daemon.stop()
    Path(daemon.config_path).write_text(config_text(port, ""))
    daemon.start()
    try:
        assert "messages stored encrypted cannot be read without its key" in daemon.log()
        wait_until(lambda: "encrypted, and no queue encryption key is configured"
                   in daemon.smtpctl("show", "queue", "--corrupt").stdout, 20, explain=daemon.log)
        assert queue_rows(daemon) == []
    finally:
        daemon.stop()
    assert any(path.is_dir() for path in Path(daemon.spool, "corrupt").iterdir())  # kept, not deleted
