"""The real daemon under test: `python -m smtpd -d -f CONF` as a subprocess on private paths and loopback ports.

``SmtpdProcess(workdir, config_text)`` writes the config (``{port}``, ``{port2}``..``{port9}`` become free loopback
ports, ``{dir}`` the workdir), a mailname file, and points SMTPD_CONFIG/SPOOL/SOCKET/MAILNAME/PIDFILE into
workdir. ``start()`` runs the daemon and waits until it is ready (its SMTP port accepts and/or its control socket
answers); ``stop()`` ends it by its pid. ``smtpctl(...)`` runs the real smtpctl against its control socket.
The helpers_* modules wrap this class under the names their tests know.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MAILNAME = "mx.test.example"
READY_BOUND = 30.0  # seconds a starting daemon may take before the test gives up (a liveness bound only)
STOP_BOUND = 20.0


@contextlib.contextmanager
def full_unix_backlog(path: str) -> Iterator[socket.socket]:
    """A Unix socket at path that listens but never accepts, its backlog filled (a busy daemon's control socket):
    a client connecting with a timeout set gets EAGAIN at once. Yields the listening socket."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    waiting: list[socket.socket] = []
    try:
        for _ in range(64):  # (the backlog's size is the kernel's business): bounded
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:
                client.close()
                break
            waiting.append(client)
        else:
            raise AssertionError("the backlog never filled")
        yield server
    finally:
        for client in waiting:
            client.close()
        server.close()


@contextlib.contextmanager
def tmpfs_at(folder: Path, size: str, mode: str) -> Iterator[Path]:
    """A small filesystem of its own mounted on folder (made if missing), unmounted afterwards: a disk that
    fills up, or that can be made unusable, without touching the machine's."""
    folder.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick), on host (IPv4 or IPv6 loopback)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def smtpctl(socket_path: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Result:
    """`python -m smtpctl --socket SOCK ARGS` as a user runs it."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    completed = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", socket_path, *args],
                               capture_output=True, text=True, timeout=timeout, env=environment, cwd=str(ROOT))
    return Result(completed.returncode, completed.stdout, completed.stderr)


def read_line(connection: socket.socket) -> bytes:
    """One line, read a byte at a time so that nothing after it is consumed (streams send more lines)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = connection.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def fill_ports(config_text: str, ports: dict[str, int]) -> str:
    """Give each ``{port}``, ``{port2}``..``{port9}`` of config_text a free port (recorded in ports) and fill it in."""
    for name in sorted(set(re.findall(r"\{(port\d?)\}", config_text))):
        while name not in ports:
            candidate = free_port()
            if candidate not in ports.values():  # (the kernel may give a port it just gave: never twice here)
                ports[name] = candidate
    for name, number in ports.items():
        config_text = config_text.replace("{" + name + "}", str(number))
    return config_text


class SmtpdProcess:
    """One daemon process on workdir's config, spool, socket, mailname and log.

    paused: subsystems started paused (``-P mda``); traces: trace subsystems (``-T smtp``); args: more flags.
    listens: start() waits until ``port`` accepts; control: start() waits until the control socket answers.
    """

    def __init__(self, workdir: Path | str, config_text: str, *, mailname: str = MAILNAME,
                 env: dict[str, str] | None = None, paused: tuple[str, ...] = (), traces: tuple[str, ...] = (),
                 args: tuple[str, ...] = (), verbose: bool = False, port: int | None = None,
                 listens: bool = True, control: bool = True, log_name: str = "smtpd.log",
                 cwd: Path | None = None, wrapper: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.ports: dict[str, int] = {} if port is None else {"port": port}
        config_text = fill_ports(config_text, self.ports)
        self.ports.setdefault("port", free_port())
        self.port = self.ports["port"]  # the SMTP port start() waits for (a test may set another)
        self.port2 = self.ports.get("port2", 0)
        self.config_path = self.workdir / "smtpd.conf"
        self.config_path.write_text(config_text.replace("{dir}", str(self.workdir)))
        self.spool = self.workdir / "spool"
        self.socket_path = self.workdir / "smtpd.sock"
        self.socket = str(self.socket_path)
        self.log_path = self.workdir / log_name
        self.mailname_path = self.workdir / "mailname"
        self.mailname_path.write_text(mailname + "\n")
        self.env = {**os.environ, "SMTPD_CONFIG": str(self.config_path), "SMTPD_SPOOL": str(self.spool),
                    "SMTPD_SOCKET": self.socket, "SMTPD_MAILNAME": str(self.mailname_path),
                    "SMTPD_PIDFILE": str(self.workdir / "smtpd.pid"), "PYTHONPATH": str(ROOT), **(env or {})}
        self.flags = [*(["-v"] if verbose else []), *(word for name in paused for word in ("-P", name)),
                      *(word for name in traces for word in ("-T", name)), *args]
        self.wrapper = list(wrapper)  # a command the daemon runs under (`prlimit --nofile=96:96 --`)
        self.listens = listens
        self.control = control
        self.cwd = cwd or self.workdir
        self.own_group = False  # start() puts the daemon in a process group of its own (see signal_group)
        self.process: subprocess.Popen[bytes] | None = None
        self.stdin_data: bytes | None = None  # piped to the daemon's standard input at start (else inherited)

    # -- where things are -------------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.workdir

    # -- life ---------------------------------------------------------------------------------------------------
    def start(self, wait_port: int | None = None) -> Self:
        """Run the daemon (its log file starts afresh) and wait until it is ready; a failed start is stopped."""
        with open(self.log_path, "wb") as log:  # the child has its own copy of the descriptor
            command = [*self.wrapper, sys.executable, "-m", "smtpd", "-d", "-f", str(self.config_path), *self.flags]
            self.process = subprocess.Popen(command, env=self.env, cwd=str(self.cwd), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=self.own_group,
                                            stdin=None if self.stdin_data is None else subprocess.PIPE)
        if self.stdin_data is not None:
            assert self.process.stdin is not None
            with self.process.stdin:
                self.process.stdin.write(self.stdin_data)
        try:
            if self.control:
                self.wait_ready(self.answers, "open its control socket")
            port = wait_port or (self.port if self.listens else None)
            if port is not None:
                self.wait_listening(port)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, ready: Any, what: str) -> None:
        """Wait until ready() holds; a daemon that exits meanwhile fails the wait at once with its log."""
        def check() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"smtpd exited at start with {self.process.returncode}:\n{self.log()}")
            return bool(ready())

        wait_until(check, READY_BOUND, explain=lambda: f"smtpd did not {what}:\n{self.log()}")

    def wait_listening(self, port: int, host: str = "127.0.0.1") -> None:
        self.wait_ready(lambda: accepts(port, host), f"listen on {host}:{port}")

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL if it does not end within the bound."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_BOUND)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def restart(self, wait_port: int | None = None) -> Self:
        self.stop()
        return self.start(wait_port)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def signal_group(self, signum: int) -> None:
        """Signal the daemon and every process it started, as systemd's stop or timeout(1) do (own_group only)."""
        assert self.process is not None and self.own_group
        os.killpg(self.process.pid, signum)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control ----------------------------------------------------------------------------------------------
    def answers(self) -> bool:
        """Whether the control socket answers a hello."""
        try:
            return self.request("hello").get("ok") is True
        except (OSError, ValueError):
            return False

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        """One raw control request on a fresh connection; returns the reply object."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(self.socket)
            connection.sendall(json.dumps({"v": 1, "id": 1, "cmd": command, "args": args}).encode() + b"\n")
            return json.loads(read_line(connection))

    def smtpctl(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Result:
        return smtpctl(self.socket, *args, timeout=timeout, env={**self.env, **(env or {})})

    # -- what was accepted --------------------------------------------------------------------------------------
    def message(self, msgid: str) -> bytes:
        from smtpd.queue.spool import Spool

        return placed(Path(Spool(str(self.spool)).message_path(int(msgid, 16)))).read_bytes()

    def envelopes(self, msgid: str) -> list[str]:
        from smtpd.queue.spool import Spool

        folder = placed(Path(Spool(str(self.spool)).message_dir(int(msgid, 16))))
        placed(folder / "message")
        return [path.read_text() for path in sorted(folder.iterdir()) if path.name != "message"]


def placed(path: Path) -> Path:
    """The path once the queue has put it in place. The 250 comes when the message is durable; the queue may
    move it under queue/ a moment later (its group commit), so a test reading queue/ right after a 250 waits."""
    with contextlib.suppress(AssertionError):  # still absent: the caller's read reports the missing file
        wait_until(path.exists, READY_BOUND, interval=0.02)
    return path
