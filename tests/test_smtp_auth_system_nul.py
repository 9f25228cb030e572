"""AUTH against the system's passwords (`auth` without a table) with a user name holding a NUL byte: a plain
authentication failure, not a broken session."""

from __future__ import annotations

import base64
import ssl

import pytest
from helpers_smtp import MAILNAME, LineClient, SmtpDaemon, make_certificate

CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
listen on 127.0.0.1 port {port} tls pki mx.test.example auth
action "local" mbox
match from any for local action "local"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("authnul")
    make_certificate(folder)
    server = SmtpDaemon(folder, CONFIG)
    server.start()
    server.wait_listening(server.port)
    yield server
    server.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("user", [b"ro\0ot", b"\0", b"root\0"], ids=["inside", "alone", "trailing"])
def test_auth_login_user_with_nul_is_refused_and_the_session_goes_on(daemon: SmtpDaemon, user: bytes) -> None:
    client = LineClient(daemon.port)
    try:
        assert client.reply()[0].startswith("220 ")
        client.send(b"EHLO c.test\r\nSTARTTLS\r\n")
        client.reply()
        assert client.reply() == ["220 2.0.0 Ready to start TLS"]
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client.sock = context.wrap_socket(client.sock, server_hostname=MAILNAME)
        client.send(b"EHLO c.test\r\n")
        assert "250-AUTH PLAIN LOGIN" in client.reply()
        client.send(f"AUTH LOGIN {b64(user)}\r\n".encode())
        assert client.reply() == ["334 UGFzc3dvcmQ6"]
        client.send(f"{b64(b'password')}\r\n".encode())
        assert client.reply() == ["535 Authentication failed"]
        client.send(b"NOOP\r\n")
        assert client.reply() == ["250 2.0.0 Ok"]
    finally:
        client.close()
    assert "smtp session failed" not in daemon.log()
