"""`queue compression` and `queue encryption` against what an administrator does with a running queue: turning
them off with mail queued, starting without the key after a crash, LMTP deliveries of an encrypted message."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest
from helpers_delivery import Daemon, mail_world
from helpers_dovecot import free_port
from waiting import wait_until

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture()
def world(monkeypatch):
    with mail_world(monkeypatch, "pysmtpd-crypt-hunt-", "pqh") as made:
        yield made


def config_text(port: int, queue: str) -> str:
    return (f"{queue}\n"
            f"listen on 127.0.0.1 port {port}\n"
            'action "md" maildir\n'
            'action "out" relay host smtp://127.0.0.1:9\n'
            'match from any for domain "local.test" action "md"\n'
            'match from any for domain "far.test" action "out"\n')


def send(port: int, recipients: list[str], message: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.sendmail("alice@client.test", recipients, message.encode()) == {}


def queued(daemon: Daemon) -> list[str]:
    return daemon.smtpctl("show", "queue").stdout.splitlines()


def maildir_texts(home: str) -> list[bytes]:
    new = Path(home, "Maildir", "new")
    return [path.read_bytes() for path in new.iterdir()] if new.is_dir() else []


def test_mail_queued_compressed_is_delivered_in_clear_once_compression_is_off(world) -> None:
    """Reading goes by the bytes (docs/queue.md): a local delivery after `queue compression` is taken out of
    smtpd.conf must write the message, not its gzip stream, into the mailbox."""
    top, root, bob = world
    port = free_port()
    workdir = os.path.join(top, "daemon")
    os.mkdir(workdir)
    daemon = Daemon(workdir, config_text(port, "queue compression"), root, extra_args=("-P", "mda")).start()
    try:
        send(port, [f"{bob.pw_name}@local.test"], "Subject: squeezed\r\n\r\nsqueezed body\r\n")
        wait_until(lambda: len(queued(daemon)) == 1, 20, explain=daemon.log)
    finally:
        daemon.stop()
    Path(daemon.config_path).write_text(config_text(port, ""))
    daemon.flags = []
    daemon.start()
    try:
        wait_until(lambda: maildir_texts(bob.pw_dir) and not queued(daemon), 20, explain=daemon.log)
    finally:
        daemon.stop()
    [text] = maildir_texts(bob.pw_dir)
    assert b"\nSubject: squeezed\n" in text and text.endswith(b"\n\nsqueezed body\n"), text[:300]
