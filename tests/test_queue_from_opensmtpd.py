"""Switching from OpenSMTPD 6.8: the mail it left queued in its spool is delivered by ours (docs/queue.md,
"Coming from OpenSMTPD").

Real 6.8 accepts the mail with its deliveries paused; its spool is copied as it stands and ours is started on the
copy, with the same smtpd.conf, as an administrator would after stopping one daemon and starting the other."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess, free_port
from helpers_delivery import system_user
from helpers_mta import OpenSmtpd, Remote, maildir_messages
from waiting import wait_until

OPENSMTPD_SPOOL = "/var/spool/smtpd"
OPENSMTPCTL = "/usr/sbin/smtpctl"
SENDER = "alice@sender.test"


def shared_config(workdir: Path, port: int | str, remote_port: int) -> str:
    """One smtpd.conf for both daemons: local mail through an alias to a user and a command, the rest relayed
    (ours gets port `{port}`, which SmtpdProcess fills in)."""
    return (f"table aliases file:{workdir}/aliases\n"
            f"listen on 127.0.0.1 port {port}\n"
            f'action "local" maildir "{workdir}/mail/%{{user.username}}" alias <aliases>\n'
            f'action "out" relay host smtp://127.0.0.1:{remote_port}\n'
            'match from any for domain "test.example" action "local"\n'
            'match from any for any action "out"\n')


@pytest.fixture()
def workdir() -> Iterator[Path]:
    # Outside pytest's private (0700) tmp tree: deliveries run as the users of the aliases.
    folder = Path(tempfile.mkdtemp(prefix="pysmtpd-from68-"))
    os.chmod(folder, 0o755)
    for shared in ("mail", "piped"):
        (folder / shared).mkdir()
        os.chmod(folder / shared, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def send(client: smtplib.SMTP, recipient: str, message: bytes, mail_options: tuple[str, ...] = (),
         rcpt_options: tuple[str, ...] = ()) -> str:
    """One transaction; returns the msgid of the 250 (`250 2.0.0 <msgid> Message accepted for delivery`)."""
    assert client.mail(SENDER, list(mail_options))[0] == 250
    assert client.rcpt(recipient, list(rcpt_options))[0] == 250
    code, reply = client.data(message)
    assert code == 250, reply
    return reply.decode().split()[1]


def queue_with_opensmtpd(workdir: Path, config: str, port: int, copy_to: Path) -> None:
    """Real 6.8 takes two messages (deliveries paused); its spool is copied while it holds them, without the
    messages other tests may have left in it (it is the system's), then 6.8 removes ours from it."""
    msgids: list[str] = []
    with OpenSmtpd(str(workdir), config, port, args=("-P", "mta", "-P", "mda")) as opensmtpd:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.test")
                msgids.append(send(client, "team@test.example", b"Subject: one\n\nfor the team\n"))
                msgids.append(send(client, "bob@remote.test", b"Subject: two\n\nfor bob\n",
                                   ("RET=HDRS", "ENVID=abc123"),
                                   ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@remote.test")))
            # (as it stands: 6.8's folders belong to its queue user)
            subprocess.run(["cp", "-a", OPENSMTPD_SPOOL, str(copy_to)], check=True, timeout=60)
        finally:
            for msgid in msgids:
                subprocess.run([OPENSMTPCTL, "remove", msgid], capture_output=True, timeout=60)
        assert opensmtpd.process is not None and opensmtpd.process.poll() is None, opensmtpd.log()
    for folder in (copy_to / "queue").glob("*/*"):
        if folder.name not in msgids:
            shutil.rmtree(folder)
    assert sorted(folder.name for folder in (copy_to / "queue").glob("*/*")) == sorted(msgids)


def assert_listed_as_ours(ours: SmtpdProcess, runstate: str) -> None:
    """`show queue` lists 6.8's three envelopes (its alias gave two), none unreadable, each expiring when the
    queue's ttl (4 days, the config's default) says, not at its creation as 6.8's `ttl: 0` would have it."""
    listing = ours.smtpctl("show", "queue")
    assert (listing.returncode, listing.stderr) == (0, "")
    rows = [line.split("|") for line in listing.stdout.splitlines()]
    assert sorted((row[2], row[6], row[11]) for row in rows) == [
        ("mda", "team@test.example", runstate), ("mda", "team@test.example", runstate),
        ("mta", "bob@remote.test", runstate)]
    assert all(int(row[8]) - int(row[7]) == 4 * 86400 for row in rows), rows


def test_mail_opensmtpd_left_queued_is_delivered_by_ours(workdir: Path) -> None:
    with system_user(str(workdir), prefix="p68") as user, Remote() as remote:
        (workdir / "aliases").write_text(f"team: {user.pw_name}, |/usr/bin/tee {workdir}/piped/copy\n")
        ours = SmtpdProcess(workdir / "ours", shared_config(workdir, "{port}", remote.port),
                            paused=("mda", "mta"))
        port = free_port()
        queue_with_opensmtpd(workdir, shared_config(workdir, port, remote.port), port, ours.spool)
        assert_listed_as_ours(ours, "offline")  # (smtpctl reading the spool itself, before the first start)
        with ours:
            assert_listed_as_ours(ours, "pending")
            assert not (ours.spool / "corrupt").exists() or not os.listdir(ours.spool / "corrupt")
            # 6.8's queue account no longer owns anything in it (it could write envelopes into our queue)
            queue_account = pwd.getpwnam("opensmtpq").pw_uid
            assert not [path for path in ours.spool.rglob("*") if path.lstat().st_uid == queue_account]
            assert "OpenSMTPD's spool taken over" in ours.log()
            assert stat.S_IMODE((ours.spool / "offline").stat().st_mode) == 0o1733
            assert ours.smtpctl("resume", "mda").returncode == 0
            assert ours.smtpctl("resume", "mta").returncode == 0
            # bob's and, since the remote offers no DSN, the "relayed" notice his NOTIFY=SUCCESS asked for
            wait_until(lambda: len(remote.received) == 2 and (workdir / "piped/copy").exists()
                       and maildir_messages(str(workdir / "mail" / user.pw_name)), explain=ours.log)
            wait_until(lambda: ours.smtpctl("show", "queue").stdout == "", explain=ours.log)
        relayed, notice = sorted(remote.received, key=lambda received: received.mail_from == "<>")
        assert (relayed.mail_from, relayed.rcpt_tos) == (SENDER, ["bob@remote.test"])
        # (6.8 stores a blank line after what smtplib sent, and delivers it too, into a Maildir as well: ours
        # delivers its file as it is)
        assert relayed.message["Subject"] == "two" and relayed.message.get_payload().rstrip() == "for bob"
        # 6.8's NOTIFY, ENVID, ORCPT and RET came along
        assert (notice.mail_from, notice.rcpt_tos) == ("<>", [SENDER])
        status = notice.message.get_payload()[1].as_string()
        assert "Original-Envelope-Id: abc123" in status and "Original-Recipient: rfc822; bob@remote.test" in status
        assert "Action: relayed" in status
        assert len(notice.message.get_payload()) == 3 and "for bob" not in notice.data.decode()  # RET=HDRS
        [local] = maildir_messages(str(workdir / "mail" / user.pw_name))
        assert local["Subject"] == "one" and local.get_payload().rstrip() == "for the team"
        piped = (workdir / "piped/copy").read_text()
        assert "Subject: one" in piped and piped.rstrip().endswith("for the team")


OPENSMTPD_REPORT_ENVELOPE = """version: 3
dispatcher: out
type: bounce
smtpname: mx.test.example
helo: client.test
hostname: localhost
sockaddr: 127.0.0.1
sender: alice@sender.test
rcpt: bob@remote.test
dest: bob@remote.test
errorline: 550 5.1.1 <bob@remote.test>: no such user
ctime: {now}
last-try: 0
last-bounce: 0
ttl: 604800
retry: 0
dsn-notify: 0
esc-class: 5
esc-code: 11
bounce-ttl: 0
bounce-type: failed
"""


def test_a_report_opensmtpd_had_not_sent_yet_is_sent(tmp_path: Path) -> None:
    """6.8 keeps a pending report as a `type: bounce` envelope beside the message (reference §8.3); ours
    sends it as its own failure report and removes it."""
    with Remote() as remote:
        ours = SmtpdProcess(tmp_path, shared_config(tmp_path, "{port}", remote.port))
        (tmp_path / "aliases").write_text("")
        folder = ours.spool / "queue" / "5e" / "5e0a1b2c"
        folder.mkdir(parents=True)
        (folder / "message").write_text("Subject: lost\nMessage-ID: <lost@sender.test>\n\nnot delivered\n")
        (folder / "5e0a1b2c00000001").write_text(OPENSMTPD_REPORT_ENVELOPE.format(now=int(time.time())))
        with ours:
            wait_until(lambda: remote.received, explain=ours.log)
            wait_until(lambda: ours.smtpctl("show", "queue").stdout == "", explain=ours.log)
        report = remote.received[0]
        assert (report.mail_from, report.rcpt_tos) == ("<>", [SENDER])
        assert report.message.get_content_type() == "multipart/report"
        status = report.message.get_payload()[1].as_string()
        assert "Final-Recipient: rfc822; bob@remote.test" in status and "Status: 5.1.1" in status
        assert "no such user" in status
        assert not folder.exists()
