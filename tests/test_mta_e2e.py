"""End to end: mail submitted to our daemon is delivered locally or relayed to a second instance of our daemon
(the smarthost), with the "@foo.bar" sender rewrite, in the modern and in the legacy spelling (the seed guide's
hybrid setup). Real processes, real sockets, real smtplib and smtpctl."""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from helpers_mta import Daemon, DnsServer, free_port, maildir_messages, make_certificate, wait_until

MESSAGE = "From: bob@local.test\r\nTo: alice@remote.test\r\nSubject: hybrid setup\r\n\r\nrelay me\r\n"


@pytest.fixture()
def workdir() -> Iterator[Path]:
    # Outside pytest's private (0700) tmp tree: deliveries run as nobody and must reach their Maildir.
    path = Path(tempfile.mkdtemp(prefix="pysmtpd-relay-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def maildir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    shutil.chown(path, "nobody")
    return path


def smarthost_config(workdir: Path, plain_port: int, tls_port: int) -> str:
    cert = make_certificate(str(workdir), "smarthost.test")
    hashed = bcrypt.hashpw(b"s3cret-pass", bcrypt.gensalt()).decode()
    (workdir / "creds").write_text(f"relayuser {hashed}\n")
    box = maildir(workdir, "Maildir")
    return (f'pki smarthost.test cert "{cert.cert}"\n'
            f'pki smarthost.test key "{cert.key}"\n'
            f'table creds file:{workdir}/creds\n'
            'table users { "@" = "nobody" }\n'
            f"listen on 127.0.0.1 port {plain_port}\n"
            f"listen on 127.0.0.1 port {tls_port} tls pki smarthost.test auth <creds>\n"
            f'action "deliver" maildir "{box}" virtual <users>\n'
            'match from any for domain "remote.test" action "deliver"\n'
            'match from any auth for domain "remote.test" action "deliver"\n')


def start(workdir: Path, name: str, config_text: str, mailname: str, port: int,
          env: dict[str, str] | None = None) -> Daemon:
    return Daemon(str(workdir / name), config_text, mailname, port, env).__enter__()


def submit(port: int, recipients: list[str], sender: str = "bob@local.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, recipients, MESSAGE)


MODERN = """\
ca smarthost.test cert "{ca}"
table users {{ "@" = "nobody" }}
table secrets {{ lbl = "relayuser:s3cret-pass" }}
listen on 127.0.0.1 port {port}
action "local" maildir "{box}" virtual <users>
action "relay" relay host "smtp+tls://lbl@smarthost.test:{tls_port}" auth <secrets> mail-from "@foo.bar" \\
    ca smarthost.test
match from any for domain "local.test" action "local"
match from local for any action "relay"
"""

LEGACY = """\
table users {{ "@" = "nobody" }}
listen on 127.0.0.1 port {port}
accept from any for domain "local.test" virtual <users> deliver to maildir "{box}"
accept for any relay via "smtp://smarthost.test:{plain_port}" as "@foo.bar"
"""


@pytest.mark.parametrize("spelling", ["modern", "legacy"])
def test_hybrid_setup_delivers_locally_and_relays_the_rest(workdir: Path, spelling: str) -> None:
    plain_port, tls_port, port = free_port(), free_port(), free_port()
    zone = {"smarthost.test": [("A", "127.0.0.1")], "1.0.0.127.in-addr.arpa": [("PTR", "loopback.ptr.test.")]}
    with DnsServer(zone) as dns:
        smarthost = start(workdir, "smarthost", smarthost_config(workdir, plain_port, tls_port), "smarthost.test",
                          plain_port)
        try:
            box = maildir(workdir, "LocalMaildir")
            template = MODERN if spelling == "modern" else LEGACY
            text = template.format(ca=workdir / "smarthost.test.crt", port=port, box=box, tls_port=tls_port,
                                   plain_port=plain_port)
            ours = start(workdir, "ours", text, "mail.local.test", port, env={"SMTPD_RESOLVER": dns.setting})
            try:
                submit(port, ["carol@local.test", "alice@remote.test"])
                remote_box = str(workdir / "Maildir")
                assert wait_until(lambda: len(maildir_messages(remote_box)) == 1, 30), ours.log()
                assert wait_until(lambda: len(maildir_messages(str(box))) == 1, 30), ours.log()
                assert wait_until(lambda: ours.smtpctl("show", "queue").stdout == "", 30)
                routes = ours.smtpctl("show", "routes").stdout
                hoststats = ours.smtpctl("show", "hoststats").stdout
                # show hosts prints the reverse DNS name (looked up beside the delivery)
                assert wait_until(lambda: "loopback.ptr.test" in ours.smtpctl("show", "hosts").stdout, 30)
                hosts = ours.smtpctl("show", "hosts").stdout
                relays = ours.smtpctl("show", "relays").stdout
            finally:
                ours.stop()
        finally:
            smarthost.stop()
    relayed = maildir_messages(str(workdir / "Maildir"))[0]
    assert relayed["Return-Path"] == "<bob@foo.bar>"
    assert relayed["Subject"] == "hybrid setup"
    local = maildir_messages(str(box))[0]
    assert local["Return-Path"] == "<bob@local.test>"
    assert "127.0.0.1 (smarthost.test) " in routes
    assert hoststats.startswith("remote.test|")  # the recipient domain, as OpenSMTPD keys them
    assert hosts.startswith("127.0.0.1 loopback.ptr.test refcount=")
    port_text = f"port={tls_port if spelling == 'modern' else plain_port}"
    assert relays.startswith(f"[relay:smarthost.test,{port_text}")
    if spelling == "modern":
        assert ",smtp+tls,auth=secrets:lbl," in relays
    if spelling == "modern":
        assert "smtp authentication user=relayuser result=ok" in smarthost.log()


def test_remote_refusal_bounces_with_the_remote_reply(workdir: Path) -> None:
    plain_port, tls_port, port = free_port(), free_port(), free_port()
    with DnsServer({"smarthost.test": [("A", "127.0.0.1")]}) as dns:
        smarthost = start(workdir, "smarthost", smarthost_config(workdir, plain_port, tls_port), "smarthost.test",
                          plain_port)
        try:
            box = maildir(workdir, "LocalMaildir")
            text = LEGACY.format(port=port, box=box, plain_port=plain_port)
            ours = start(workdir, "ours", text, "mail.local.test", port, env={"SMTPD_RESOLVER": dns.setting})
            try:
                submit(port, ["nobody@unrouted.test"])
                assert wait_until(lambda: len(maildir_messages(str(box))) == 1, 30), ours.log()
                assert wait_until(lambda: ours.smtpctl("show", "queue").stdout == "", 30)
            finally:
                ours.stop()
        finally:
            smarthost.stop()
    bounce = maildir_messages(str(box))[0]
    assert bounce["Subject"] == "Delivery status notification: failed"
    text = bounce.as_string()
    assert "550 Invalid recipient: <nobody@unrouted.test>" in text, text  # the smarthost's own reply
    assert "Status: 5." in text
    assert os.path.exists(box)


def test_smtpctl_shows_a_disabled_route_and_resumes_it(workdir: Path) -> None:
    dead_port, port = free_port(), free_port()
    box = maildir(workdir, "LocalMaildir")
    text = LEGACY.format(port=port, box=box, plain_port=dead_port).replace("smarthost.test", "127.0.0.1")
    ours = start(workdir, "ours", text, "mail.local.test", port)  # (names from the tests' DNS server, conftest.py)
    try:
        submit(port, ["alice@remote.test"])

        def errors() -> int:
            line = ours.smtpctl("show", "routes").stdout
            return 4 if "-DQ-" in line else int(line.split("nerror=")[1].split()[0]) if "nerror=" in line else 0

        for attempt in range(4):  # the scheduler waits 400 s between tries: `schedule all` hurries it
            assert wait_until(lambda attempt=attempt: errors() > attempt, 30), ours.log()
            if attempt < 3:
                ours.smtpctl("schedule", "all")
        routes = ours.smtpctl("show", "routes").stdout
        queue = ours.smtpctl("show", "queue").stdout
        resumed = ours.smtpctl("resume", "route", "1")
        after = ours.smtpctl("show", "routes").stdout
    finally:
        ours.stop()
    assert routes.startswith("1. [] <-> 127.0.0.1 -DQ- nconn=0 nerror=0 penalty=1 timeout=")
    assert "|alice@remote.test|" in queue and queue.rstrip().endswith("|Connection failed: Connection refused")
    assert resumed.stdout.strip() == "command succeeded"
    assert " ---- " in after and "penalty=0 timeout=-" in after


def test_direct_mx_delivery_through_the_daemon(workdir: Path) -> None:
    plain_port, tls_port, port = free_port(), free_port(), free_port()
    zone = {"remote.test": [("MX", "10 mx.remote.test.")], "mx.remote.test": [("A", "127.0.0.1")]}
    text = (f"listen on 127.0.0.1 port {port}\n"
            'action "relay" relay\n'
            "match from local for any action \"relay\"\n")
    with DnsServer(zone) as dns:
        receiver = start(workdir, "receiver", smarthost_config(workdir, plain_port, tls_port), "mx.remote.test",
                         plain_port)
        try:
            ours = start(workdir, "ours", text, "mail.local.test", port,
                         env={"SMTPD_RESOLVER": dns.setting, "SMTPD_MX_PORT": str(plain_port)})
            try:
                submit(port, ["alice@remote.test"])
                assert wait_until(lambda: len(maildir_messages(str(workdir / "Maildir"))) == 1, 30), ours.log()
                routes = ours.smtpctl("show", "routes").stdout
            finally:
                ours.stop()
        finally:
            receiver.stop()
    delivered = maildir_messages(str(workdir / "Maildir"))[0]
    assert delivered["Return-Path"] == "<bob@local.test>"
    assert routes.startswith("1. [] <-> 127.0.0.1 (mx.remote.test) ")
    assert ("remote.test", "MX") in dns.queries


def test_relayed_notice_only_when_the_remote_does_not_offer_dsn(workdir: Path) -> None:
    from helpers_mta import RawRemote, standard_script
    port = free_port()
    dsn_script = standard_script({"EHLO": b"250-dsn.test\r\n250-DSN\r\n250 8BITMIME\r\n"})
    with RawRemote(dsn_script) as with_dsn, RawRemote(standard_script()) as without_dsn:
        box = maildir(workdir, "LocalMaildir")
        text = ('table users { "@" = "nobody" }\n'
                f"listen on 127.0.0.1 port {port}\n"
                f'action "local" maildir "{box}" virtual <users>\n'
                f'action "to_dsn" relay host "smtp://127.0.0.1:{with_dsn.port}"\n'
                f'action "to_plain" relay host "smtp://127.0.0.1:{without_dsn.port}"\n'
                'match from any for domain "local.test" action "local"\n'
                'match from local for domain "dsn.test" action "to_dsn"\n'
                'match from local for domain "plain.test" action "to_plain"\n')
        ours = start(workdir, "ours", text, "mail.local.test", port)
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("bob@local.test", ["carol@dsn.test", "dave@plain.test"], MESSAGE,
                                rcpt_options=["NOTIFY=SUCCESS"])
            # the notice is queued before the envelope is deleted: an empty queue means it was delivered too
            assert wait_until(lambda: with_dsn.commands.count("<EOM>") == 1
                              and without_dsn.commands.count("<EOM>") == 1
                              and ours.smtpctl("show", "queue").stdout == "", 30), ours.log()
        finally:
            ours.stop()
    # the DSN-capable remote got NOTIFY and reports success itself; the other one cannot: we say "relayed"
    assert any(line.startswith("RCPT TO:<carol@dsn.test> NOTIFY=SUCCESS") for line in with_dsn.commands)
    assert "RCPT TO:<dave@plain.test>" in without_dsn.commands
    notices = maildir_messages(str(box))
    assert len(notices) == 1
    assert notices[0]["Subject"] == "Delivery status notification: relayed"
    text = notices[0].as_string()
    assert "dave@plain.test" in text and "carol@dsn.test" not in text


def test_a_multi_line_refusal_stays_on_its_envelopes_line_in_show_queue(workdir: Path) -> None:
    # The errorline keeps every line of the remote's reply; `show queue` printed them as they were, and the
    # envelope's record broke over two lines (scripts reading one envelope per line read garbage).
    from helpers_mta import RawRemote, standard_script
    port = free_port()
    refusal = b"451-4.7.1 Greylisted, see\r\n451 4.7.1 https://example.test/why\r\n"
    with RawRemote(standard_script({"RCPT": refusal})) as remote:
        text = (f"listen on 127.0.0.1 port {port}\n"
                f'action "relay" relay host "smtp://127.0.0.1:{remote.port}"\n'
                'match from local for any action "relay"\n')
        ours = start(workdir, "ours", text, "mail.local.test", port)
        try:
            submit(port, ["alice@remote.test"])
            assert wait_until(lambda: "|pending|" in ours.smtpctl("show", "queue").stdout, 30), ours.log()
            queue = ours.smtpctl("show", "queue").stdout
        finally:
            ours.stop()
    assert len(queue.splitlines()) == 1, queue
    assert queue.rstrip("\n").endswith("|451-4.7.1 Greylisted, see\\n451 4.7.1 https://example.test/why")
