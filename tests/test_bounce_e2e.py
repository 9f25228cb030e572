"""End to end: mail accepted over SMTP by the real daemon, a local delivery that fails for good, and the
failure report (DSN) delivered by the real MDA into the sender's mailbox; the queue is empty afterwards."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from email import message_from_string
from pathlib import Path

import pytest
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-bounce-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pba") as alice, system_user(homes, "pbb") as bob:
            yield Path(top), mail_root, alice, bob


# Mail to mbox.test lands in mailboxes; every delivery to fail.test fails for good (its command exits 1).
FAILING_CONFIG = ("listen on 127.0.0.1 port {port}\n"
                  'action "local" mbox\n'
                  'action "fail" mda "/bin/false"\n'
                  'match from any for domain "mbox.test" action "local"\n'
                  'match from any for domain "fail.test" action "fail"\n')


def test_a_permanent_delivery_failure_comes_back_to_the_sender_as_a_dsn(world) -> None:
    top, mail_root, alice, bob = world
    port = free_port()
    daemon = Daemon(str(top), FAILING_CONFIG.format(port=port), mail_root).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(f"{alice.pw_name}@mbox.test", ["RET=HDRS", "ENVID=track+2B7"])
            assert client.rcpt(f"{bob.pw_name}@fail.test",
                               ["NOTIFY=FAILURE", f"ORCPT=rfc822;{bob.pw_name}+2Btag@fail.test"])[0] == 250
            assert client.data(b"Subject: doomed\r\n\r\nthe secret body\r\n")[0] == 250
        mailbox = Path(mail_root) / alice.pw_name
        wait_until(lambda: mailbox.exists() and "Delivery status notification" in mailbox.read_text(), 60, 0.1,
                   explain=daemon.log)
        text = mailbox.read_text()
        report = message_from_string(text[text.index("\n") + 1:])  # after the mbox "From " line
        assert report["Subject"] == "Delivery status notification: failed"
        assert report.get_content_type() == "multipart/report"
        status = next(part for part in report.walk() if part.get_content_type() == "message/delivery-status")
        per_message, per_recipient = status.get_payload()[:2]
        assert per_message["Original-Envelope-Id"] == "track+7"  # (decoded from xtext)
        assert per_recipient["Original-Recipient"] == f"rfc822; {bob.pw_name}+tag@fail.test"
        assert per_recipient["Final-Recipient"] == f"rfc822; {bob.pw_name}@fail.test"
        assert per_recipient["Action"] == "failed"
        assert per_recipient["Status"].startswith("5.")
        assert "Subject: doomed" in text
        assert "the secret body" not in text  # RET=HDRS
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        deadline = time.monotonic() + 30
        while True:
            listing = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", daemon.socket, "show", "queue"],
                                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
            if listing.stdout == "" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert listing.returncode == 0 and listing.stdout == ""  # the original and the report are both gone
    finally:
        daemon.stop()


def test_a_report_whose_routing_fails_for_now_is_kept_not_dropped(world) -> None:
    """The sender's ~/.forward is too big: expanding the sender's address is a temporary failure (424). The
    failure report must wait (the failed envelope stays queued) and go once the .forward is fixed, not be
    dropped with the envelope."""
    top, mail_root, alice, bob = world
    port = free_port()
    daemon = Daemon(str(top), FAILING_CONFIG.format(port=port), mail_root).start()
    forward = Path(alice.pw_dir) / ".forward"
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(f"{alice.pw_name}@mbox.test")
            assert client.rcpt(f"{bob.pw_name}@fail.test")[0] == 250
            forward.write_text(f"{alice.pw_name}\n" * 1000)  # 4096 bytes or more: a temporary failure
            os.chown(forward, alice.pw_uid, alice.pw_gid)
            assert client.data(b"Subject: doomed\r\n\r\nbody\r\n")[0] == 250
        wait_until(lambda: "report not queued" in daemon.log(), 30, 0.1, explain=daemon.log)
        assert "dropped" not in daemon.log()
        listing = daemon.smtpctl("show", "queue")
        assert f"{bob.pw_name}@fail.test" in listing.stdout  # the failed envelope waits for its report
        forward.unlink()
        mailbox = Path(mail_root) / alice.pw_name
        # (it is tried again 10 s later; `schedule` makes that now)
        daemon.smtpctl("schedule", "all")
        wait_until(lambda: mailbox.exists() and "Delivery status notification: failed" in mailbox.read_text(),
                   60, 0.1, explain=daemon.log)
    finally:
        daemon.stop()


def test_success_asked_of_an_alias_of_several_is_one_expanded_report_naming_no_member(world) -> None:
    """RFC 3461 6.2.7.3: NOTIFY=SUCCESS to an address expanded to several targets is answered once, `expanded`,
    and not by each target. Before, the sender of a message to team@ got a report per member giving each
    member's address (and the outside address a member's mail went on to), which is not the sender's to know."""
    top, mail_root, alice, bob = world
    aliases = top / "aliases"
    aliases.write_text(f"team: {bob.pw_name}, {bob.pw_name}@fail.test\n")
    config = (f"table aliases file:{aliases}\n"
              + FAILING_CONFIG.replace('action "local" mbox\n', 'action "local" mbox alias <aliases>\n'))
    port = free_port()
    daemon = Daemon(str(top), config.format(port=port), mail_root).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(f"{alice.pw_name}@mbox.test")
            assert client.rcpt("team@mbox.test", ["NOTIFY=SUCCESS"])[0] == 250
            assert client.data(b"Subject: to the team\r\n\r\nhello team\r\n")[0] == 250
        reports = Path(mail_root) / alice.pw_name
        wait_until(lambda: reports.exists() and "Delivery status notification" in reports.read_text(), 60, 0.1,
                   explain=daemon.log)
        wait_until(lambda: "result=PermFail" in daemon.log() and daemon.smtpctl("show", "queue").stdout == "", 60,
                   0.1, explain=daemon.log)  # (the failed member: done, and no report of its own)
    finally:
        daemon.stop()
    assert "hello team" in (Path(mail_root) / bob.pw_name).read_text()
    text = reports.read_text()
    assert text.count("Subject: Delivery status notification") == 1, text  # (none for the failed member)
    report = message_from_string(text[text.index("\n") + 1:])
    status = next(part for part in report.walk() if part.get_content_type() == "message/delivery-status")
    [per_recipient] = status.get_payload()[1:]
    assert per_recipient["Action"] == "expanded"
    assert per_recipient["Final-Recipient"] == "rfc822; team@mbox.test"
    assert bob.pw_name not in text.replace(f"for <{alice.pw_name}@", "")
