"""Builtin filters (reference §3.8) run by a real daemon, with real clients from several loopback source
addresses and a DNS server of the test's own for the `rdns` and `fcrdns` conditions. Each phase's filter fires at
its command, with its reply; reject keeps the session, disconnect closes it; junk adds `X-Spam: Yes`; chains run
in order; a listener without a filter is not affected.
"""

from __future__ import annotations

import smtplib
import socket

import pytest
from helpers_mta import DnsServer
from helpers_smtp import LineClient, SmtpDaemon
from test_smtp_tempfail import makemap, restore, spoil

RECORDS = {
    "1.0.0.127.in-addr.arpa": [("PTR", "good.client.test.")],
    "good.client.test": [("A", "127.0.0.1")],
    "2.0.0.127.in-addr.arpa": [("PTR", "liar.client.test.")],  # fcrdns fails
    "liar.client.test": [("A", "127.0.0.9")],
    "3.0.0.127.in-addr.arpa": [("PTR", "dyn-3.pool.test.")],
    "dyn-3.pool.test": [("A", "127.0.0.3")],
    # 127.0.0.4: no reverse name
}

CONFIG = """
table blocked { 127.0.0.6 }
table trusted { 127.0.0.1 }
table dynamic { "^dyn-" }
table badhelo { "^evil" }
table spammer { "^spam@" }
table nobody { "^nobody@" }
table rewritten { "^old@" }
table short { "^short@" }
table odd { "^odd@" }
table down db:{dir}/down.db
filter "blocked" phase connect match src <blocked> disconnect "554 5.7.1 go away"
filter "no-rdns" phase connect match ! rdns reject "550 5.7.1 no reverse name"
filter "dynamic" phase helo match rdns regex <dynamic> reject "550 5.7.1 dynamic address"
filter "evil-helo" phase ehlo match helo regex <badhelo> reject "550 5.7.1 bad helo"
filter "trusted" phase mail-from match src <trusted> bypass
filter "spammer" phase mail-from match mail-from regex <spammer> reject "553 5.7.1 sender refused"
filter "rewrite" phase mail-from match mail-from regex <rewritten> rewrite "<new@sender.test>"
filter "nobody" phase rcpt-to match rcpt-to regex <nobody> reject "550 5.1.1 no such user"
filter "bad-text" phase rcpt-to match rcpt-to regex <badhelo> reject "oops"
filter "short-text" phase rcpt-to match rcpt-to regex <short> reject "550"
filter "odd-code" phase rcpt-to match rcpt-to regex <odd> reject "570 5.7.1 odd but valid"
filter "junk" phase data match ! fcrdns junk
filter "commit" phase commit match mail-from regex <nobody> reject "554 5.7.1 content refused"
filter "down" phase mail-from match src <down> reject "550 never"
filter "main" chain { "blocked", "no-rdns", "dynamic", "evil-helo", "trusted", "spammer", "rewrite", "nobody", \
"bad-text", "short-text", "odd-code", "junk", "commit" }
listen on 127.0.0.1 port {port} filter "main"
listen on 127.0.0.1 port {port2}
listen on 127.0.0.1 port {port3} filter "down"
action "local" mbox
match from any for domain "example.org" action "local"
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("filters")
    makemap(folder / "down", "127.0.0.8 x\n")
    with DnsServer(RECORDS) as dns:
        daemon = SmtpDaemon(folder, CONFIG, env={"SMTPD_RESOLVER": dns.setting}, traces=("filters",))
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()


class SourcedClient(LineClient):
    """A LineClient connecting from a given loopback source address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        self.pending = b""


def dialog(port: int, source: str, *commands: str) -> list[str]:
    """The greeting and each command's reply (its last line), then "<closed>" if the server closed."""
    client = SourcedClient(port, source)
    try:
        out = [" | ".join(client.reply()) or "<closed>"]
        for command in commands:
            try:
                client.send(command.encode() + b"\r\n")
                reply = client.reply()
            except ConnectionResetError:  # (written after the server closed)
                reply = []
            out.append(reply[-1] if reply else "<closed>")
            if not reply:
                break
        return out
    finally:
        client.close()


def send(daemon: SmtpDaemon, port: int, source: str, sender: str, rcpt: str = "root@example.org") -> bytes:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        assert code == 250, text
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(b"Subject: filters\r\n\r\nbody\r\n")
        assert code == 250, text
    return daemon.message(text.split()[1].decode())


def test_connect_disconnect_closes_after_its_reply(served: SmtpDaemon) -> None:
    assert dialog(served.port, "127.0.0.6", "EHLO client.test") == ["554 5.7.1 go away", "<closed>"]


def test_connect_reject_replaces_the_banner_and_keeps_the_session(served: SmtpDaemon) -> None:
    # No reverse name for 127.0.0.4: the rejection is the greeting; without a banner HELO is out of sequence.
    assert dialog(served.port, "127.0.0.4", "EHLO client.test", "NOOP", "QUIT") == [
        "550 5.7.1 no reverse name", "503 5.5.1 Invalid command: Command not allowed at this point.",
        "250 2.0.0 Ok", "221 2.0.0 Bye"]


def test_helo_and_ehlo_are_phases_of_their_own(served: SmtpDaemon) -> None:
    # dyn-3.pool.test: the helo filter refuses HELO only; the session goes on and EHLO is taken.
    assert dialog(served.port, "127.0.0.3", "HELO client.test", "EHLO client.test")[1:] == [
        "550 5.7.1 dynamic address", "250 HELP"]
    assert dialog(served.port, "127.0.0.1", "EHLO evil.test", "EHLO good.test")[1:] == [
        "550 5.7.1 bad helo", "250 HELP"]


def test_mail_from_and_rcpt_to_rejections_keep_the_session(served: SmtpDaemon) -> None:
    assert dialog(served.port, "127.0.0.2", "EHLO client.test", "MAIL FROM:<spam@x.test>", "MAIL FROM:<a@x.test>",
                  "RCPT TO:<nobody@example.org>", "RCPT TO:<root@example.org>")[2:] == [
        "553 5.7.1 sender refused", "250 2.0.0 Ok", "550 5.1.1 no such user",
        "250 2.1.5 Destination address valid: Recipient ok"]


def test_an_invalid_reject_message_is_421_and_disconnects(served: SmtpDaemon) -> None:
    assert dialog(served.port, "127.0.0.2", "EHLO client.test", "MAIL FROM:<a@x.test>",
                  "RCPT TO:<evil@example.org>", "NOOP")[3:] == ["421 Internal server error", "<closed>"]


def test_a_code_without_text_is_invalid_and_any_second_digit_is_valid(served: SmtpDaemon) -> None:
    # As 6.8: a message must be at least "NNN x"; the code's second digit may be anything.
    assert dialog(served.port, "127.0.0.2", "EHLO client.test", "MAIL FROM:<a@x.test>",
                  "RCPT TO:<odd@example.org>", "RCPT TO:<short@example.org>", "NOOP")[3:] == [
        "570 5.7.1 odd but valid", "421 Internal server error", "<closed>"]


def test_bypass_skips_the_rest_of_the_chain(served: SmtpDaemon) -> None:
    # 127.0.0.1 is trusted: the spammer and rewrite filters after the bypass do not run for it.
    assert dialog(served.port, "127.0.0.1", "EHLO client.test", "MAIL FROM:<spam@x.test>")[2] == "250 2.0.0 Ok"


def test_rewrite_changes_the_sender(served: SmtpDaemon) -> None:
    send(served, served.port, "127.0.0.2", "old@x.test")
    assert "from=<new@sender.test> to=<root@example.org>" in served.log()


def test_junk_adds_x_spam_before_received(served: SmtpDaemon) -> None:
    junked = send(served, served.port, "127.0.0.2", "a@x.test").decode()
    assert junked.startswith("X-Spam: Yes\nReceived: from client.test (liar.client.test [127.0.0.2])")
    clean = send(served, served.port, "127.0.0.1", "a@x.test").decode()
    assert clean.startswith("Received: ") and "X-Spam" not in clean


def test_commit_reject_drops_the_message_and_keeps_the_session(served: SmtpDaemon) -> None:
    assert dialog(served.port, "127.0.0.1", "EHLO client.test", "MAIL FROM:<nobody@x.test>",
                  "RCPT TO:<root@example.org>", "DATA", "Subject: x\r\n\r\nbody\r\n.", "MAIL FROM:<a@x.test>")[2:] == [
        "250 2.0.0 Ok", "250 2.1.5 Destination address valid: Recipient ok",
        '354 Enter mail, end with "." on a line by itself', "554 5.7.1 content refused", "250 2.0.0 Ok"]
    assert "from=<nobody@x.test>" not in served.log()


def test_a_listener_without_the_filter_is_not_affected(served: SmtpDaemon) -> None:
    assert dialog(served.port2, "127.0.0.6", "EHLO client.test", "MAIL FROM:<spam@x.test>")[0].startswith("220 ")
    assert dialog(served.port2, "127.0.0.6", "EHLO client.test", "MAIL FROM:<spam@x.test>")[2] == "250 2.0.0 Ok"


def test_a_failing_table_is_a_temporary_failure(served: SmtpDaemon) -> None:
    port = served.ports["port3"]
    assert dialog(port, "127.0.0.1", "EHLO client.test", "MAIL FROM:<a@x.test>")[2] == "250 2.0.0 Ok"
    kept = spoil(served.dir / "down.db")
    try:
        assert dialog(port, "127.0.0.1", "EHLO client.test", "MAIL FROM:<a@x.test>", "NOOP")[2:] == [
            "451 4.3.0 Temporary failure", "250 2.0.0 Ok"]
    finally:
        restore(served.dir / "down.db", kept)
