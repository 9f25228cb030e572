"""Session events that OpenSMTPD 6.8 logs, logged alike: what log readers (logwatch, fail2ban-style filters,
`grep 'smtp bad-input'`) find in the maillog for the same dialog."""

from __future__ import annotations

import base64
import re
import smtplib

import pytest
from helpers_smtp import LineClient, SmtpDaemon, secured_client, start_auth_daemon
from waiting import wait_until


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    server = start_auth_daemon(tmp_path_factory.mktemp("loglines"), "secret")
    yield server
    server.stop()


def logged(daemon: SmtpDaemon, line: str) -> str:
    """The session id of the log line that reads `<session id> <line>` exactly (waited for)."""
    pattern = re.compile(rf"^([0-9a-f]{{16}}) {re.escape(line)}$", re.M)
    return wait_until(lambda: (found := pattern.search(daemon.log())) and found.group(1), explain=daemon.log)


@pytest.mark.parametrize(("line", "reply"), [
    (b"X" * 70000 + b"\r\n", "500 5.0.0 Line too long"),
    (b"HELO " + b"x" * 3000 + b"\r\n", "500 5.0.0 Command line too long"),
])
def test_a_line_too_long_is_logged_as_bad_input(daemon: SmtpDaemon, line: bytes, reply: str) -> None:
    """6.8 logs `smtp bad-input result="500 5.0.0 Line too long"` before closing; we logged the disconnection
    alone, so a count of bad-input lines (a scanner feeding junk) found none."""
    client = LineClient(daemon.port)
    try:
        assert client.reply()[0].startswith("220 ")
        client.send(line)
        assert client.reply() == [reply]
    finally:
        client.close()
    session = logged(daemon, f'smtp bad-input result="{reply}"')
    assert f"{session} smtp connected address=127.0.0.1" in daemon.log()


def test_a_secured_session_logs_its_tls_ciphers(daemon: SmtpDaemon) -> None:
    """6.8 logs `smtp tls ciphers=VERSION:CIPHER:BITS` once STARTTLS (or SMTPS) succeeds; we logged nothing, so
    the maillog could not tell which sessions were encrypted."""
    client = secured_client(daemon.port)
    version, cipher, bits = client.sock.version(), *client.sock.cipher()[0:3:2]
    client.send(b"QUIT\r\n")
    assert client.reply()[0].startswith("221 ")
    client.close()
    session = logged(daemon, f"smtp tls ciphers={version}:{cipher}:{bits}")
    assert f"{session} smtp connected address=127.0.0.1" in daemon.log()


def test_auth_failures_name_the_mechanism_and_step_never_the_credentials(daemon: SmtpDaemon) -> None:
    """6.8's failed-command lines say `AUTH LOGIN` (a scanner trying AUTH before STARTTLS), `AUTH LOGIN (password)`
    and so on; ours said `AUTH` alone for every refusal, and a grep for the mechanism found nothing. The
    credentials stay out of the log (6.8 logs the inline AUTH PLAIN token of a failed login: we do not)."""
    plain = LineClient(daemon.port)
    try:
        assert plain.reply()[0].startswith("220 ")
        plain.send(b"EHLO c.test\r\nAUTH LOGIN\r\nQUIT\r\n")
        plain.reply()
        refused = plain.reply()
    finally:
        plain.close()
    token = base64.b64encode(b"\0alice\0wrong").decode()
    client = secured_client(daemon.port)
    try:
        client.send(f"AUTH PLAIN {token}\r\n".encode())
        assert client.reply() == ["535 Authentication failed"]
        client.send(b"AUTH LOGIN\r\n")
        client.reply()
        client.send(base64.b64encode(b"alice") + b"\r\n")
        client.reply()
        client.send(base64.b64encode(b"wrong") + b"\r\n")
        assert client.reply() == ["535 Authentication failed"]
    finally:
        client.close()
    logged(daemon, f'smtp failed-command command="AUTH LOGIN" result="{refused[0]}"')
    session = logged(daemon, 'smtp failed-command command="AUTH PLAIN ********" result="535 Authentication failed"')
    assert logged(daemon, 'smtp failed-command command="AUTH LOGIN (password)" result="535 Authentication failed"'
                  ) == session
    assert token not in daemon.log()


def test_a_session_over_the_limit_is_logged_with_its_address(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A client refused because the session limit is reached (ours: 6.8 stops accepting instead) got only
    `smtp disconnected reason="too many sessions"`: no address for the flood's source, and a session whose
    connected line never came for the log readers that pair them."""
    config = 'listen on 127.0.0.1 port {port}\naction "local" mbox\nmatch from any for local action "local"\n'
    with SmtpDaemon(tmp_path_factory.mktemp("limit"), config, env={"SMTPD_SMTP_MAX_SESSIONS": "1"}) as server:
        wait_until(lambda: " smtp disconnected " in server.log(), explain=server.log)  # the start-up probe's
        first = LineClient(server.port)
        try:
            assert first.reply()[0].startswith("220 ")
            second = LineClient(server.port)
            assert second.reply()[0].startswith("421 ")
            second.close()
        finally:
            first.close()
        session = logged(server, 'smtp disconnected reason="too many sessions"')
        assert f"{session} smtp connected address=127.0.0.1 host=<unknown>" in server.log().splitlines()


def test_a_reply_repeating_client_bytes_cannot_break_the_log_line(daemon: SmtpDaemon) -> None:
    """The refusal of an unknown AUTH mechanism names it; its control bytes (a terminal escape, a bare CR that a
    log reader takes for a line end) went raw into the reply and into failed-command's result=."""
    client = secured_client(daemon.port)
    try:
        client.send(b"AUTH X\x1b[2J\rforged\r\n")
        (reply,) = client.reply()
    finally:
        client.close()
    assert reply == '504 5.7.4 Security features not supported: AUTH method "X\\033[2J\\015forged" not supported'
    logged(daemon, 'smtp failed-command command="AUTH X\\033[2J\\rforged" result="504 5.7.4 Security features not '
                   'supported: AUTH method "X\\\\033[2J\\\\015forged" not supported"')
    assert b"\x1b" not in daemon.log_path.read_bytes() and b"\r" not in daemon.log_path.read_bytes()


FILTERED = """filter "c" phase connect match rdns reject "550 go away"
filter "m" phase commit match mail-from regex "spam" reject "550 not this one"
listen on 127.0.0.1 port {port} filter "m"
listen on 127.0.0.1 port {port2} filter "c"
action "local" mbox
match from any for local action "local"
"""


def test_filter_refusals_are_failed_commands_as_in_6_8(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Checked against 6.8: a connect-phase refusal is `failed-command command="" result="550 ..."` (what greps for
    refused clients, no rDNS and the like, look for; we logged only our filter-response line), and a commit-phase
    one names DATA, as every other refusal of a message does (we said `command="."`)."""
    with SmtpDaemon(tmp_path_factory.mktemp("filtered"), FILTERED) as server:
        refused = LineClient(server.ports["port2"])
        try:
            assert refused.reply() == ["550 go away"]
        finally:
            refused.close()
        client = LineClient(server.port)
        try:
            client.reply()
            for line in (b"EHLO c.test", b"MAIL FROM:<spam@client.test>", b"RCPT TO:<root@localhost>", b"DATA"):
                client.send(line + b"\r\n")
                client.reply()
            client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            assert client.reply() == ["550 not this one"]
        finally:
            client.close()
        logged(server, 'smtp failed-command command="" result="550 go away"')
        logged(server, 'smtp failed-command command="DATA" result="550 not this one"')


def test_an_expanded_recipient_is_one_envelope_line_naming_the_address_given(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Checked against 6.8: `smtp envelope` is one line per accepted RCPT, `to=` the address the client gave. Ours
    had one line per envelope the expansion made, `to=` its target: an alias to an outside address read as if
    the client had asked to relay there, and the lines outnumbered `nrcpt=`."""
    config = ('table aliases { "list" = "root, someone@elsewhere.test" }\n'
              "listen on 127.0.0.1 port {port}\n"
              'action "local" mbox alias <aliases>\n'
              'action "out" relay\n'
              'match from any for local action "local"\n'
              'match from local for any action "out"\n')
    with SmtpDaemon(tmp_path_factory.mktemp("alias"), config, paused=("mda", "mta")) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail("sender@client.test", ["list@localhost"], b"Subject: x\r\n\r\nbody\r\n")
        wait_until(lambda: " smtp message " in server.log(), explain=server.log)
        assert re.search(r" smtp message msgid=\S+ size=\d+ nrcpt=1 proto=ESMTP$", server.log(), re.M)
        lines = [line for line in server.log().splitlines() if " smtp envelope " in line]
    assert len(lines) == 1, lines
    assert lines[0].endswith(" from=<sender@client.test> to=<list@localhost>"), lines
