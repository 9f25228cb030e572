"""The relay against servers that misbehave as some on the Internet do, judged through the daemon: what the queue
keeps (`smtpctl show queue`), across a restart, and what the sender is told."""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_mta import Daemon, RawRemote, free_port, standard_script, wait_until

MESSAGE = "From: bob@local.test\r\nTo: alice@remote.test\r\nSubject: misbehaving\r\n\r\nrelay me\r\n"


@pytest.fixture()
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pysmtpd-misbehaving-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def relaying_daemon(workdir: Path, remote: RawRemote) -> Daemon:
    port = free_port()
    text = (f"listen on 127.0.0.1 port {port}\n"
            f'action "relay" relay host "smtp://127.0.0.1:{remote.port}"\n'
            'match from local for any action "relay"\n')
    return Daemon(str(workdir / "ours"), text, "mail.local.test", port)


def submit(daemon: Daemon, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
        client.sendmail("bob@local.test", recipients, MESSAGE)


def test_a_huge_temporary_refusal_does_not_make_the_envelope_unloadable(workdir: Path) -> None:
    # 30 lines of 4000 bytes: within what the client reads (64 lines of 4 KiB), but kept whole as the errorline the
    # envelope file grew past the queue's 64 KiB, and after a restart the message went to corrupt/ (never retried,
    # never bounced).
    refusal = b"".join(b"450-4.2.0 " + b"x" * 3990 + b"\r\n" for _ in range(29)) + b"450 4.2.0 mailbox busy\r\n"
    with RawRemote(standard_script({"RCPT": refusal})) as remote:
        ours = relaying_daemon(workdir, remote).__enter__()
        try:
            submit(ours, ["alice@remote.test"])
            assert wait_until(lambda: "450 4.2.0 mailbox busy" in ours.smtpctl("show", "queue").stdout, 30), ours.log()
            before = ours.smtpctl("show", "queue").stdout
            ours.restart()
            after = ours.smtpctl("show", "queue").stdout
            log = ours.log()
        finally:
            ours.stop()
    assert "|alice@remote.test|" in after, log
    assert "corrupt" not in log
    errorline = before.rstrip("\n").split("|", 13)[13].replace("\\n", "\n")  # (its line breaks shown as \n)
    assert len(errorline) <= 4096
    assert errorline.startswith("450-4.2.0 xxx") and errorline.endswith("...\n...\n450 4.2.0 mailbox busy")
