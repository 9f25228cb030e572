"""The SMTP tests' fixture: the real daemon as a subprocess, on a free loopback port, with its own paths.

``SmtpDaemon(tmp_path, config_text)`` is tests/daemon.py's SmtpdProcess with the SMTP tests' defaults: the config's
``{port}``, ``{port2}``..``{port9}``, ``{dir}`` are filled in, the daemon runs verbose (``-v``) and is ready when
``{port}`` accepts. Local delivery is paused (``-P mda``) unless asked otherwise, so accepted messages stay in the
spool where the tests read them byte for byte (``message()``, ``envelopes()``). ``stop()`` ends it by its pid.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from daemon import MAILNAME, ROOT, SmtpdProcess, free_port

__all__ = ["MAILNAME", "ROOT", "LineClient", "SmtpDaemon", "free_port", "make_certificate", "smtp_connection"]


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

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """The lines of one reply (a multi-line reply ends at its `CODE ` line); [] when the peer closed."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.pending:
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
