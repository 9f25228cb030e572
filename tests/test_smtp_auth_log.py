"""Values a client chooses reach the log escaped: an AUTH user name or a refused command line cannot add lines
or fields to the maillog (as OpenSMTPD passes them through strnvis)."""

from __future__ import annotations

import base64

import pytest
from helpers_smtp import LineClient, SmtpDaemon, secured_client, start_auth_daemon
from waiting import wait_until

from smtpd.log import visible

PASSWORD = "secret"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    server = start_auth_daemon(tmp_path_factory.mktemp("authlog"), PASSWORD)
    yield server
    server.stop()


def test_visible_escapes_what_could_forge_a_line_or_a_field() -> None:
    assert visible("alice") == "alice"
    assert visible("a b\tc\r\nd") == "a b\\tc\\r\\nd"
    assert visible("a b\nc", white=True) == "a\\040b\\012c"
    assert visible("back\\slash") == "back\\\\slash"
    assert visible("\x1b[31m\udcff") == "\\033[31m\\377"


def test_auth_user_with_a_newline_cannot_forge_a_log_line(daemon: SmtpDaemon) -> None:
    forged = "0000000000000000 smtp authentication user=admin result=ok"
    user = f"x result=ok\n{forged}\ny"
    client = secured_client(daemon.port)
    try:
        token = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
        client.send(f"AUTH PLAIN {token}\r\n".encode())
        assert client.reply() == ["535 Authentication failed"]
    finally:
        client.close()
    wait_until(lambda: "y result=permfail" in daemon.log(), explain=daemon.log)
    lines = daemon.log().splitlines()
    assert forged not in lines
    assert not any(line.startswith("y result=") for line in lines)
    assert ("smtp authentication user=x\\040result=ok\\0120000000000000000\\040smtp\\040authentication"
            "\\040user=admin\\040result=ok\\012y result=permfail") in daemon.log()


def test_refused_command_with_control_characters_is_logged_escaped(daemon: SmtpDaemon) -> None:
    client = LineClient(daemon.port)
    try:
        assert client.reply()[0].startswith("220 ")
        client.send(b"XYZZY\rinfo: forged\x1b[2J\r\n")
        assert client.reply() == ["500 5.5.1 Invalid command: Command unrecognized"]
    finally:
        client.close()
    # (the log line is written at the end of the daemon's loop turn, maybe after the reply reached us)
    wait_until(lambda: "XYZZY" in daemon.log(), explain=daemon.log)
    assert 'failed-command command="XYZZY\\rinfo: forged\\033[2J" result="500 ' in daemon.log()


@pytest.mark.parametrize("steps", [
    [b"AUTH LOGIN", b"", base64.b64encode(b"whatever")],  # an empty user name line, then the password
    [b"AUTH PLAIN " + base64.b64encode(b"\0\0" + PASSWORD.encode())],  # PLAIN with an empty user name
])
def test_an_empty_user_name_is_a_failed_login_not_a_syntax_error(daemon: SmtpDaemon, steps: list[bytes]) -> None:
    """As OpenSMTPD: the empty name is checked like any other, and fails (535 after the delay), where we said 501."""
    client = secured_client(daemon.port)
    try:
        replies = []
        for step in steps:
            client.send(step + b"\r\n")
            replies.append(client.reply()[0])
        assert replies[-1] == "535 Authentication failed", replies
        assert all(reply.startswith("334 ") for reply in replies[:-1]), replies
    finally:
        client.close()
