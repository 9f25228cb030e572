"""The SMTP tests' fixture: the real daemon as a subprocess, on a free loopback port, with its own paths.

``SmtpDaemon(tmp_path, config_text)`` writes the config (``{port}``, ``{port2}``..``{port9}``, ``{dir}`` are filled in), a
mailname file, and starts the real daemon (``python -m smtpd -d -f CONF -P .. -T ..``) with SMTPD_* variables
pointing into tmp_path. Local
delivery is paused (``-P mda`` equivalent) unless asked otherwise, so accepted messages stay in the spool where
the tests read them byte for byte. ``stop()`` ends the daemon by its pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAILNAME = "mx.test.example"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SmtpDaemon:
    def __init__(self, tmp_path: Path, config_text: str, *, paused: tuple[str, ...] = ("mda",),
                 env: dict[str, str] | None = None, traces: tuple[str, ...] = ()) -> None:
        self.dir = tmp_path
        # {port}, {port2} ... {port9}: each a free loopback port (self.ports["port2"], ...)
        self.ports = {name: free_port() for name in sorted(set(re.findall(r"\{(port\d?)\}", config_text)))}
        self.ports.setdefault("port", free_port())
        self.port = self.ports["port"]
        self.port2 = self.ports.get("port2", 0)
        for name, number in self.ports.items():
            config_text = config_text.replace("{" + name + "}", str(number))
        self.config_path = tmp_path / "smtpd.conf"
        self.config_path.write_text(config_text.replace("{dir}", str(tmp_path)))
        self.spool = tmp_path / "spool"
        self.socket_path = tmp_path / "smtpd.sock"
        self.log_path = tmp_path / "daemon.log"
        (tmp_path / "mailname").write_text(MAILNAME + "\n")
        self.env = dict(os.environ)
        self.env.update({
            "SMTPD_CONFIG": str(self.config_path), "SMTPD_SPOOL": str(self.spool),
            "SMTPD_SOCKET": str(self.socket_path), "SMTPD_MAILNAME": str(tmp_path / "mailname"),
            "SMTPD_PIDFILE": str(tmp_path / "smtpd.pid"), "PYTHONPATH": str(ROOT),
        })
        self.flags = [word for name in paused for word in ("-P", name)]
        self.flags += [word for name in traces for word in ("-T", name)]
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_port: int | None = None) -> SmtpDaemon:
        log = open(self.log_path, "wb")  # noqa: SIM115 — the child keeps writing to it
        self.process = subprocess.Popen([sys.executable, "-m", "smtpd", "-d", "-v", "-f", str(self.config_path),
                                         *self.flags], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        log.close()
        self.wait_listening(wait_port or self.port)
        return self

    def wait_listening(self, port: int, host: str = "127.0.0.1") -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not listen on {port}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> SmtpDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was accepted -------------------------------------------------------------------------------
    def message(self, msgid: str) -> bytes:
        from smtpd.queue.spool import Spool

        return _placed(Path(Spool(str(self.spool)).message_path(int(msgid, 16)))).read_bytes()

    def envelopes(self, msgid: str) -> list[str]:
        from smtpd.queue.spool import Spool

        folder = _placed(Path(Spool(str(self.spool)).message_dir(int(msgid, 16))))
        _placed(folder / "message")
        return [path.read_text() for path in sorted(folder.iterdir()) if path.name != "message"]


def _placed(path: Path) -> Path:
    """The path once the queue has put it in place. The 250 comes when the message is durable; the queue may
    move it under queue/ a moment later (its group commit), so a test reading queue/ right after a 250 waits."""
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path


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
