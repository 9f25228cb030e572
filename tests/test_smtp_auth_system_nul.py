"""AUTH against the system's passwords (`auth` without a table) with a user name holding a NUL byte: a plain
authentication failure, not a broken session."""

from __future__ import annotations

import base64

import pytest
from helpers_smtp import SmtpDaemon, secured_client, start_auth_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    server = start_auth_daemon(tmp_path_factory.mktemp("authnul"), None)
    yield server
    server.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("user", [b"ro\0ot", b"\0", b"root\0"], ids=["inside", "alone", "trailing"])
def test_auth_login_user_with_nul_is_refused_and_the_session_goes_on(daemon: SmtpDaemon, user: bytes) -> None:
    client = secured_client(daemon.port)
    try:
        client.send(f"AUTH LOGIN {b64(user)}\r\n".encode())
        assert client.reply() == ["334 UGFzc3dvcmQ6"]
        client.send(f"{b64(b'password')}\r\n".encode())
        assert client.reply() == ["535 Authentication failed"]
        client.send(b"NOOP\r\n")
        assert client.reply() == ["250 2.0.0 Ok"]
    finally:
        client.close()
    assert "smtp session failed" not in daemon.log()
