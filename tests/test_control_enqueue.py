"""`enqueue`: the control connection turns into a local SMTP session (what sendmail uses), for any user."""

from __future__ import annotations

import json
import os
import pwd
import socket
from collections.abc import Iterator

import pytest
from helpers_control import DaemonProcess, running_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as running:
        yield running


class Lines:
    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.buffer = b""

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.connection.recv(4096)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def reply(self) -> list[bytes]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines


def enqueue_dialogue(socket_path: str) -> tuple[dict, list[list[bytes]]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(20)
        connection.connect(socket_path)
        connection.sendall(b'{"v": 1, "id": 1, "cmd": "enqueue", "args": {}}\n')
        lines = Lines(connection)
        answer = json.loads(lines.line())
        if not answer["ok"]:
            return answer, []
        replies = [lines.reply()]
        for command in (b"EHLO localhost\r\n", b"MAIL FROM:<someone@example.org>\r\n", b"QUIT\r\n"):
            connection.sendall(command)
            replies.append(lines.reply())
        return answer, replies


def test_enqueue_hands_the_connection_to_smtp(daemon: DaemonProcess) -> None:
    answer, replies = enqueue_dialogue(daemon.socket)
    assert answer["ok"] is True and answer["id"] == 1
    assert replies[0] == [b"220 mx.control.test ESMTP PySMTPD\r\n"]
    assert replies[1][0].startswith(b"250-mx.control.test Hello localhost")
    assert replies[2][0].startswith(b"250 ")
    assert replies[3][0].startswith(b"221 ")
    assert "smtp connected address=local" in daemon.log()


def test_enqueue_is_open_to_every_user(daemon: DaemonProcess) -> None:
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            answer, replies = enqueue_dialogue(daemon.socket)
            os.write(write_end, json.dumps({"ok": answer["ok"], "banner": replies[0][0].decode() if replies else ""})
                     .encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert report == {"ok": True, "banner": "220 mx.control.test ESMTP PySMTPD\r\n"}


def test_enqueue_refused_while_smtp_is_paused(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("pause", "smtp").stdout == "command succeeded\n"
    try:
        answer, replies = enqueue_dialogue(daemon.socket)
    finally:
        daemon.smtpctl("resume", "smtp")
    assert answer["ok"] is False
    assert answer["error"]["message"] == "server disallowed submission request"
    assert replies == []


def test_client_detach_keeps_the_greeting(daemon: DaemonProcess) -> None:
    from smtpctl.client import Client

    client = Client(daemon.socket)
    assert client.call("enqueue")["uid"] == 0
    connection, pending = client.detach()
    with connection:
        lines = Lines(connection)
        lines.buffer = pending
        assert lines.reply() == [b"220 mx.control.test ESMTP PySMTPD\r\n"]
        connection.sendall(b"QUIT\r\n")
        assert lines.reply()[0].startswith(b"221 ")
