"""Dovecot reads what we deliver (mbox, maildir) and accepts our LMTP deliveries."""

from __future__ import annotations

import asyncio
import imaplib
import os

import pytest
from helpers_delivery import (
    DictTables,
    local_action,
    mail_world,
    make_config,
    mda_envelope,
    system_user,
    write_message,
)
from helpers_dovecot import Dovecot, DovecotUser
from waiting import wait_until

from smtpd.config.model import Method
from smtpd.delivery import Outcome
from smtpd.mda import MdaAgent

BODIES = [
    "Subject: plain\n\nhello\n",
    "Subject: from lines\n\nFrom the start\nFrom someone@example.org Wed Nov 25 10:00:00 2026\n\n"
    "From after a blank line\n>From quoted already\nend\n",
    "Subject: dots\n\n.\n..\n.leading dot\nno final newline",
    "Subject: big\n\n" + "".join(f"line {n} of a larger body\n" for n in range(5000)),
]


def expected_text(body: str, user: str, mbox: bool) -> str:
    text = f"Return-Path: <alice@sender.test>\nDelivered-To: {user}@example.org\n" + body
    if not text.endswith("\n"):
        text += "\n"
    if mbox:
        text = "\n".join(">" + line if line.startswith("From ") else line for line in text.split("\n"))
    return text


@pytest.fixture()
def world(monkeypatch):
    with mail_world(monkeypatch, "pysmtpd-dovecot-", "pdv") as made:
        yield made


def deliver_all(agent: MdaAgent, user: str, top: str, bodies: list[str]) -> None:
    async def run() -> list:
        results = []
        for number, body in enumerate(bodies):
            path = write_message(os.path.join(top, f"msg{number}"), body)
            results.append(await agent.deliver(mda_envelope("local", f"{user}@example.org", user), path))
        return results

    results = asyncio.run(run())
    assert [result.outcome for result in results] == [Outcome.OK] * len(bodies), results


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def test_dovecot_reads_our_mbox(world) -> None:
    top, root, bob = world
    agent = MdaAgent(make_config([local_action("local", Method.MBOX)], []), DictTables(), "mx.example.org")
    deliver_all(agent, bob.pw_name, top, BODIES)
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    with Dovecot(os.path.join(top, "dovecot"), [user], f"mbox:~/mail:INBOX={root}/%u") as dovecot:
        texts = [normalise(text) for text in dovecot.fetch(bob.pw_name)]
        assert texts == [expected_text(body, bob.pw_name, mbox=True) for body in BODIES]
        # After Dovecot has read (and indexed) the mailbox, we append again and it sees the new message.
        deliver_all(agent, bob.pw_name, top, ["Subject: later\n\nafter dovecot\n"])
        texts = [normalise(text) for text in dovecot.fetch(bob.pw_name)]
        assert len(texts) == len(BODIES) + 1
        assert texts[-1] == expected_text("Subject: later\n\nafter dovecot\n", bob.pw_name, mbox=True)
        # And an IMAP client sees the same messages.
        imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
        try:
            imap.login(bob.pw_name, user.password)
            status, data = imap.select("INBOX", readonly=True)
            assert status == "OK" and int(data[0]) == len(BODIES) + 1
            status, fetched = imap.fetch("2", "(BODY.PEEK[TEXT])")
            assert status == "OK"
            assert b">From someone@example.org Wed Nov 25" in fetched[0][1]
        finally:
            imap.logout()


def test_dovecot_reads_our_maildir(world) -> None:
    top, _, bob = world
    agent = MdaAgent(make_config([local_action("local", Method.MAILDIR)], []), DictTables(), "mx.example.org")
    deliver_all(agent, bob.pw_name, top, BODIES)
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    with Dovecot(os.path.join(top, "dovecot"), [user], "maildir:~/Maildir") as dovecot:
        texts = sorted(normalise(text) for text in dovecot.fetch(bob.pw_name))
        assert texts == sorted(expected_text(body, bob.pw_name, mbox=False) for body in BODIES)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_dovecot_lmtp_accepts_our_deliveries(world, transport) -> None:
    top, _, bob = world
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    with Dovecot(os.path.join(top, "dovecot"), [user], "maildir:~/Maildir") as dovecot:
        destination = f"127.0.0.1:{dovecot.lmtp_port}" if transport == "tcp" else dovecot.lmtp_socket
        config = make_config([local_action("local", Method.LMTP, lmtp_destination=destination),
                              local_action("byaddress", Method.LMTP, lmtp_destination=destination,
                                           lmtp_rcpt_to=True)], [])
        agent = MdaAgent(config, DictTables(), "mx.example.org")
        deliver_all(agent, bob.pw_name, top, BODIES)
        texts = [normalise(text) for text in dovecot.fetch(bob.pw_name)]
        assert len(texts) == len(BODIES)
        for body in BODIES:
            assert any(text.endswith(body if body.endswith("\n") else body + "\n") for text in texts), body[:30]

        async def more():
            path = write_message(os.path.join(top, "extra"), "Subject: unknown\n\nx\n")
            unknown = await agent.deliver(mda_envelope("local", "nobody-here@example.org", "nobody-here"), path)
            by_address = await agent.deliver(
                mda_envelope("byaddress", f"{bob.pw_name}@example.org", bob.pw_name), path)
            return unknown, by_address

        agent = MdaAgent(config, DictTables(maps={"u": {}}), "mx.example.org")
        unknown, by_address = asyncio.run(more())
        # The userbase does not know "nobody-here": a permanent failure before LMTP is even tried.
        assert unknown.outcome is Outcome.PERMFAIL
        assert by_address.outcome is Outcome.OK
        assert len(dovecot.fetch(bob.pw_name)) == len(BODIES) + 1


def test_lmtp_per_recipient_replies(world) -> None:
    """Dovecot refuses an unknown recipient with 5xx: a permanent failure for that envelope only."""
    from smtpd.mda.lmtp import deliver_lmtp

    top, _, bob = world
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    with Dovecot(os.path.join(top, "dovecot"), [user], "maildir:~/Maildir") as dovecot:
        path = write_message(os.path.join(top, "m"), "Subject: two\n\nfor two\n")

        async def run():
            with open(path, "rb") as message:
                return await deliver_lmtp(f"127.0.0.1:{dovecot.lmtp_port}", "mx.example.org", "a@b.test",
                                          ["nosuchuser", bob.pw_name], b"", message)

        unknown, known = asyncio.run(run())
        assert unknown.code == 550 and not unknown.temporary
        assert known.ok
        assert len(dovecot.fetch(bob.pw_name)) == 1


def test_lmtp_connection_refused_is_temporary(world) -> None:
    top, _, bob = world
    from helpers_dovecot import free_port

    config = make_config([local_action("local", Method.LMTP, lmtp_destination=f"127.0.0.1:{free_port()}")], [])
    agent = MdaAgent(config, DictTables(), "mx.example.org")
    path = write_message(os.path.join(top, "m"), "Subject: x\n\nx\n")
    result = asyncio.run(agent.deliver(mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name), path))
    assert result.outcome is Outcome.TEMPFAIL and result.text.startswith("Connection failed")


@pytest.mark.parametrize("port", ["99999", "0"])
def test_lmtp_port_out_of_range_is_said(world, port) -> None:
    """`lmtp "127.0.0.1:99999"` (a typo; the config check takes any destination, as OpenSMTPD's): the delivery
    waits with the destination named as invalid, not as an internal error (OverflowError from connect)."""
    top, _, bob = world
    config = make_config([local_action("local", Method.LMTP, lmtp_destination=f"127.0.0.1:{port}")], [])
    agent = MdaAgent(config, DictTables(), "mx.example.org")
    path = write_message(os.path.join(top, "m"), "Subject: x\n\nx\n")
    result = asyncio.run(agent.deliver(mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name), path))
    assert result.outcome is Outcome.TEMPFAIL
    assert result.text == f"invalid LMTP destination: 127.0.0.1:{port}", result


def test_deliveries_while_dovecot_rewrites_the_mbox(world) -> None:
    """Dovecot rewrites the mbox on EXPUNGE under its dotlock+fcntl locks; our appends must wait, never mix."""
    import threading

    top, root, bob = world
    agent = MdaAgent(make_config([local_action("local", Method.MBOX)], []), DictTables(), "mx.example.org")
    first = [f"Subject: old {n}\n\n" + f"old body {n}\n" * 200 for n in range(6)]
    deliver_all(agent, bob.pw_name, top, first)
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    later = [f"Subject: new {n}\n\nFrom line {n}\n" + f"new body {n}\n" * 300 for n in range(20)]
    with Dovecot(os.path.join(top, "dovecot"), [user], f"mbox:~/mail:INBOX={root}/%u") as dovecot:
        imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
        imap.login(bob.pw_name, user.password)
        imap.select("INBOX")
        delivering = threading.Thread(target=deliver_all, args=(agent, bob.pw_name, top + "/later", later))
        os.mkdir(top + "/later")
        delivering.start()
        try:
            for _ in range(3):  # expunge the oldest message three times while deliveries run
                assert imap.store("1", "+FLAGS", "\\Deleted")[0] == "OK"
                assert imap.expunge()[0] == "OK"
                imap.noop()
        finally:
            delivering.join(120)
            imap.logout()
        texts = [normalise(text) for text in dovecot.fetch(bob.pw_name)]
    subjects = sorted(text.split("Subject: ")[1].split("\n")[0] for text in texts)
    assert subjects == sorted([f"old {n}" for n in range(3, 6)] + [f"new {n}" for n in range(20)])
    for text in texts:
        subject = text.split("Subject: ")[1].split("\n")[0]
        kind, number = subject.split()
        lines = 200 if kind == "old" else 300
        assert text.count(f"{kind} body {number}\n") == lines, subject


def test_lmtp_envelopes_of_one_message_share_one_transaction(world) -> None:
    """Two envelopes of one message handed at once: one LMTP session, two RCPT TO, one DATA, a reply for each."""
    top, _, bob = world
    user = DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir)
    with Dovecot(os.path.join(top, "dovecot"), [user], "maildir:~/Maildir") as dovecot:
        config = make_config([local_action("byaddress", Method.LMTP, lmtp_destination=dovecot.lmtp_socket,
                                           lmtp_rcpt_to=True)], [])
        agent = MdaAgent(config, DictTables(), "mx.example.org")
        path = write_message(os.path.join(top, "shared"), "Subject: for two\n\nFrom a body line\nsent once\n")
        known = mda_envelope("byaddress", f"{bob.pw_name}@example.org", bob.pw_name, evpid=0x1111222200000001)
        unknown = mda_envelope("byaddress", "nosuchuser@example.org", bob.pw_name, evpid=0x1111222200000002)

        async def both():
            return await asyncio.gather(agent.deliver(known, path), agent.deliver(unknown, path))

        delivered, refused = asyncio.run(both())
        assert delivered.outcome is Outcome.OK, delivered
        assert refused.outcome is Outcome.PERMFAIL and refused.text.startswith("550 "), refused
        # One session on the Unix socket (Dovecot logs each connection, through its log process: the line may
        # come a moment after the reply) and one copy saved.
        wait_until(lambda: "Disconnect from local" in dovecot.log(), explain=dovecot.log)
        assert dovecot.log().count("Connect from local") == 1, dovecot.log()
        [text] = [normalise(text) for text in dovecot.fetch(bob.pw_name)]
        assert text.endswith("Return-Path: <alice@sender.test>\nSubject: for two\n\nFrom a body line\nsent once\n")
        # The shared copy carries no Delivered-To of ours (it would name the other recipient); Dovecot adds its
        # own because only one recipient was accepted in the transaction.
        assert [line for line in text.split("\n") if line.startswith("Delivered-To:")] == [
            f"Delivered-To: {bob.pw_name}@example.org"]
        assert "nosuchuser" not in text


def test_daemon_batches_one_smtp_message_for_two_users_into_one_lmtp_session(world) -> None:
    """SMTP in with two recipients, through the real daemon's queue and scheduler, one LMTP session out."""
    import smtplib

    from helpers_delivery import Daemon
    from helpers_dovecot import free_port

    top, root, bob = world
    homes = os.path.dirname(bob.pw_dir)
    with system_user(homes, "pdc") as carol:
        users = [DovecotUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir) for entry in (bob, carol)]
        with Dovecot(os.path.join(top, "dovecot"), users, "maildir:~/Maildir") as dovecot:
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      f'action "lm" lmtp "{dovecot.lmtp_socket}" rcpt-to\n'
                      'match from any for domain "lmtp.test" action "lm"\n')
            workdir = os.path.join(top, "daemon")
            os.mkdir(workdir)
            daemon = Daemon(workdir, config, root).start()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    refused = client.sendmail("sender@client.test",
                                              [f"{bob.pw_name}@lmtp.test", f"{carol.pw_name}@lmtp.test"],
                                              b"Subject: for both\r\n\r\nFrom a line\r\nbody\r\n")
                assert refused == {}
                wait_until(lambda: dovecot.log().count("saved mail to INBOX") >= 2, 30, 0.1,
                           explain=lambda: dovecot.log() + daemon.log())
            finally:
                daemon.stop()
            for entry in (bob, carol):
                [text] = [normalise(text) for text in dovecot.fetch(entry.pw_name)]
                assert "\nSubject: for both\n" in text and text.endswith("\n\nFrom a line\nbody\n")
                # One copy for both: no header may name a recipient (Dovecot too leaves out Delivered-To then).
                assert "Delivered-To:" not in text
                assert bob.pw_name not in text and carol.pw_name not in text
            assert dovecot.log().count("Connect from local") == 1, dovecot.log()


QUOTA_CONFIG = """
mail_plugins = $mail_plugins quota
plugin {
  quota = maildir:User quota
}
"""


def test_lmtp_refusals_keep_dovecots_status_codes_in_the_bounce(world) -> None:
    """One message for three users through `lmtp ... rcpt-to`: one saved, one over quota (552 5.2.2 after DATA),
    one Dovecot does not know (550 5.1.1 at RCPT). One bounce names the two failed recipients with Dovecot's
    enhanced codes as their Status (5.2.2 mailbox full, 5.1.1 no such user: what bounce processors act on),
    as a relayed recipient's report does; it said 5.3.0 for both."""
    import smtplib

    from helpers_delivery import Daemon
    from helpers_dovecot import free_port

    top, root, bob = world
    homes = os.path.dirname(bob.pw_dir)
    with system_user(homes, "pdq") as carol, system_user(homes, "pdu") as dave:
        users = [DovecotUser(bob.pw_name, bob.pw_uid, bob.pw_gid, bob.pw_dir),
                 DovecotUser(carol.pw_name, carol.pw_uid, carol.pw_gid, carol.pw_dir,
                             fields="userdb_quota_rule=*:storage=1K")]
        with Dovecot(os.path.join(top, "dovecot"), users, "maildir:~/Maildir", QUOTA_CONFIG) as dovecot:
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      f'action "lm" lmtp "{dovecot.lmtp_socket}" rcpt-to\n'
                      'action "mb" mbox\n'
                      'match from any for domain "lmtp.test" action "lm"\n'
                      'match from any for domain "local.test" action "mb"\n')
            workdir = os.path.join(top, "daemon")
            os.mkdir(workdir)
            daemon = Daemon(workdir, config, root).start()
            mbox = os.path.join(root, bob.pw_name)
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    refused = client.sendmail(f"{bob.pw_name}@local.test",
                                              [f"{entry.pw_name}@lmtp.test" for entry in (bob, carol, dave)],
                                              b"Subject: three\r\n\r\n" + b"x" * 3000 + b"\r\n")
                assert refused == {}
                wait_until(lambda: os.path.exists(mbox), 30, 0.1, explain=lambda: daemon.log() + dovecot.log())
                wait_until(lambda: daemon.smtpctl("show", "queue").stdout.strip() == "", 30, 0.1,
                           explain=daemon.log)
            finally:
                daemon.stop()
            assert len(dovecot.fetch(bob.pw_name)) == 1
            assert dovecot.fetch(carol.pw_name) == []
        with open(mbox) as handle:
            report = handle.read()
    assert report.count("\nFrom ") == 0 and report.startswith("From MAILER-DAEMON "), report  # one bounce
    blocks = {}
    for block in report.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "Final-Recipient" in fields:
            blocks[fields["Final-Recipient"]] = fields
    assert set(blocks) == {f"rfc822; {carol.pw_name}@lmtp.test", f"rfc822; {dave.pw_name}@lmtp.test"}, report
    carol_block = blocks[f"rfc822; {carol.pw_name}@lmtp.test"]
    dave_block = blocks[f"rfc822; {dave.pw_name}@lmtp.test"]
    assert carol_block["Status"] == "5.2.2" and "552 5.2.2" in carol_block["Diagnostic-Code"], carol_block
    assert dave_block["Status"] == "5.1.1" and "550 5.1.1" in dave_block["Diagnostic-Code"], dave_block
