"""The SMTP tests' fixture: the real daemon as a subprocess, on a free loopback port, with its own paths.

``SmtpDaemon(tmp_path, config_text)`` is tests/daemon.py's SmtpdProcess with the SMTP tests' defaults: the config's
``{port}``, ``{port2}``..``{port9}``, ``{dir}`` are filled in, the daemon runs verbose (``-v``) and is ready when
``{port}`` accepts. Local delivery is paused (``-P mda``) unless asked otherwise, so accepted messages stay in the
spool where the tests read them byte for byte (``message()``, ``envelopes()``). ``stop()`` ends it by its pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from daemon import MAILNAME, ROOT, SmtpdProcess, free_port

__all__ = ["MAILNAME", "ROOT", "LineClient", "SmtpDaemon", "free_port", "make_certificate", "server_end",
           "smtp_connection"]


class SmtpDaemon(SmtpdProcess):
    def __init__(self, tmp_path: Path, config_text: str, *, paused: tuple[str, ...] = ("mda",),
                 env: dict[str, str] | None = None, traces: tuple[str, ...] = ()) -> None:
        super().__init__(tmp_path, config_text, env=env, paused=paused, traces=traces, verbose=True,
                         control=False, log_name="daemon.log", cwd=ROOT)


@contextlib.contextmanager
def smtp_connection(port: int, host: str = "127.0.0.1", timeout: float = 30) -> Iterator[socket.socket]:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


class LineClient:
    """A raw SMTP client for dialog tests: send exact bytes, read complete replies."""

    one_read = False  # replies must come from what read_once() read, without reading more

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.pending = b""

    def read_once(self) -> None:
        """Read what the server sent next, in one recv; reply() then takes from it and reads no more."""
        assert not self.pending, f"unread replies before a group: {self.pending!r}"
        self.pending = self.sock.recv(65536)
        self.one_read = True

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """The lines of one reply (a multi-line reply ends at its `CODE ` line); [] when the peer closed."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.pending:
                assert not self.one_read, f"reply not in the same read as the ones before it: {lines!r}"
                chunk = self.sock.recv(65536)
                if not chunk:
                    return lines
                self.pending += chunk
            raw, self.pending = self.pending.split(b"\r\n", 1)
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def closed(self) -> bool:
        """Whether the server closed the connection (reads until EOF)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.pending += chunk
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()


def make_certificate(folder: Path, name: str = "mx.test.example") -> tuple[Path, Path]:
    """A self-signed certificate and key for `name`, made with the openssl command."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


AUTH_LISTENER_CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
CREDENTIALS
listen on 127.0.0.1 port {port} tls pki mx.test.example AUTH
action "local" mbox
match from any for local action "local"
"""


def start_auth_daemon(folder: Path, password: str | None, traces: tuple[str, ...] = ()) -> SmtpDaemon:
    """A daemon whose STARTTLS listener offers AUTH: against a creds table where alice has ``password`` (a
    `$6$` hash), or with None against the system's passwords."""
    from shared.passwords import hash_password

    make_certificate(folder)
    if password is None:
        config = AUTH_LISTENER_CONFIG.replace("CREDENTIALS", "").replace("AUTH", "auth")
    else:
        table = f'table creds {{ alice = "{hash_password(password, "sha512")}" }}'
        config = AUTH_LISTENER_CONFIG.replace("CREDENTIALS", table).replace("AUTH", "auth <creds>")
    server = SmtpDaemon(folder, config, traces=traces)
    server.start()
    server.wait_listening(server.port)
    return server


def secured_client(port: int) -> LineClient:
    """A client past EHLO, STARTTLS and EHLO again, with AUTH offered."""
    import ssl

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


def auth_plain_codes(port: int, user: bytes, password: bytes) -> tuple[int, int]:
    """(the reply code to AUTH PLAIN with these exact bytes, after STARTTLS; the code to a NOOP after it, 0 when
    the session was closed)."""
    import base64
    import smtplib
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        code = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password).decode())[0]
        try:
            return code, client.noop()[0]
        except smtplib.SMTPServerDisconnected:
            return code, 0


SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


def server_end(pid: int, client: socket.socket) -> socket.socket:
    """A duplicate of the daemon's own socket for this client's connection (pidfd_getfd(2)), to read its options.

    The daemon's end is the socket in /proc/PID/net/tcp{,6} whose remote port is the client's local port; its
    inode names one of /proc/PID/fd. Closing the duplicate leaves the daemon's socket open."""
    client_port = client.getsockname()[1]
    inode = ""
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == client_port and fields[9] != "0":
                inode = fields[9]
    assert inode, f"no socket of pid {pid} is connected to local port {client_port}"
    fds = [entry for entry in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(entry) == f"socket:[{inode}]"]
    assert fds, f"socket inode {inode} is not among pid {pid}'s descriptors"
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        duplicate = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fds[0].name), 0)
        if duplicate < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=duplicate)
