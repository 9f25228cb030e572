"""AUTH credentials never reach the log or the traces, even on a line refused for ending with a bare LF."""

from __future__ import annotations

import base64
import ssl

import pytest
from helpers_smtp import MAILNAME, LineClient, SmtpDaemon, make_certificate

PASSWORD = "secret"
BARE_LF_REPLY = ["500 5.5.2 Syntax error: command line must end with CRLF"]

CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
table creds { alice = "HASH" }
listen on 127.0.0.1 port {port} tls pki mx.test.example auth <creds>
action "local" mbox
match from any for local action "local"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    from shared.passwords import hash_password

    folder = tmp_path_factory.mktemp("authsecrets")
    make_certificate(folder)
    server = SmtpDaemon(folder, CONFIG.replace("HASH", hash_password(PASSWORD, "sha512")), traces=("smtp",))
    server.start()
    server.wait_listening(server.port)
    yield server
    server.stop()


def secured_client(port: int) -> LineClient:
    client = LineClient(port)
    assert client.reply()[0].startswith("220 ")
    client.send(b"EHLO c.test\r\nSTARTTLS\r\n")
    client.reply()
    assert client.reply() == ["220 2.0.0 Ready to start TLS"]
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    client.sock = context.wrap_socket(client.sock, server_hostname=MAILNAME)
    client.send(b"EHLO c.test\r\n")
    assert "250-AUTH PLAIN LOGIN" in client.reply()
    return client


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
    assert 'failed-command command="AUTH" result="500 5.5.2 ' in log
