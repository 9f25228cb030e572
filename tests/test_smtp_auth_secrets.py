"""AUTH credentials never reach the log or the traces, even on a line refused for ending with a bare LF."""

from __future__ import annotations

import base64

import pytest
from helpers_smtp import SmtpDaemon, secured_client, start_auth_daemon

PASSWORD = "secret"
BARE_LF_REPLY = ["500 5.5.2 Syntax error: command line must end with CRLF"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    server = start_auth_daemon(tmp_path_factory.mktemp("authsecrets"), PASSWORD, traces=("smtp",))
    yield server
    server.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auth_plain_line_ending_with_bare_lf_is_not_logged(daemon: SmtpDaemon) -> None:
    token = b64("\0alice\0Plain-Secret-1")
    client = secured_client(daemon.port)
    try:
        client.send(f"AUTH PLAIN {token}\n".encode())
        assert client.reply() == BARE_LF_REPLY
        client.send(f"AUTH PLAIN {token}\r\n".encode())  # the same, properly ended: wrong password
        assert client.reply() == ["535 Authentication failed"]
    finally:
        client.close()
    log = daemon.log()
    assert token not in log
    assert 'failed-command command="AUTH PLAIN ********" result="500 5.5.2 ' in log


def test_auth_login_password_ending_with_bare_lf_is_not_logged(daemon: SmtpDaemon) -> None:
    secret = b64("Login-Secret-2")
    client = secured_client(daemon.port)
    try:
        client.send(b"AUTH LOGIN\r\n")
        assert client.reply() == ["334 VXNlcm5hbWU6"]
        client.send(f"{b64('alice')}\r\n".encode())
        assert client.reply() == ["334 UGFzc3dvcmQ6"]
        client.send(f"{secret}\n".encode())
        assert client.reply() == BARE_LF_REPLY
        client.send(f"{b64(PASSWORD)}\r\n".encode())  # still the password step
        assert client.reply() == ["235 2.0.0 Authentication succeeded"]
    finally:
        client.close()
    log = daemon.log()
    assert secret not in log and b64(PASSWORD) not in log
    assert 'failed-command command="AUTH LOGIN (password)" result="500 5.5.2 ' in log
