"""Helpers for the control-plane tests: the real daemon (`python -m smtpd -d -f CONF`) in its own process on a
private spool and socket, and smtpctl run as a user runs it.

smtpctl runs as `python -m smtpctl --socket SOCK ...`. To run it as another user (nobody) the test forks, drops
its uid and calls smtpctl's main in the child: the interpreter lives under /root, which nobody cannot exec.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STARTUP_WAIT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def minimal_config(port: int | None = None, extra: str = "") -> str:
    listen = f"listen on 127.0.0.1 port {port}\n" if port else ""
    return (f"{listen}{extra}"
            'action "local" mbox\n'
            'match from local for local action "local"\n')


def make_workdir() -> Path:
    """A folder every user can traverse (nobody must reach the socket), removed by the caller."""
    workdir = Path(tempfile.mkdtemp(prefix="ctltest-", dir="/tmp"))
    workdir.chmod(0o755)
    return workdir


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class DaemonProcess:
    """A running daemon on a private spool and socket."""

    def __init__(self, workdir: Path, config_text: str | None = None, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "smtpd.sock")
        self.spool = workdir / "spool"
        self.config_path = workdir / "smtpd.conf"
        self.log_path = workdir / "smtpd.log"
        self.mailname = workdir / "mailname"
        self.mailname.write_text("mx.control.test\n")
        self.config_path.write_text(config_text if config_text is not None else minimal_config())
        self.env = {**os.environ, "SMTPD_SOCKET": self.socket, "SMTPD_SPOOL": str(self.spool),
                    "SMTPD_MAILNAME": str(self.mailname), "SMTPD_PIDFILE": str(workdir / "smtpd.pid"),
                    "SMTPD_CONFIG": str(self.config_path), "PYTHONPATH": str(ROOT), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.args = args  # extra smtpd flags, e.g. ("-P", "mda")
        self.real = True  # always the real `python -m smtpd` now (helpers_queue reads this)

    def start(self) -> DaemonProcess:
        command = [sys.executable, "-m", "smtpd", "-d", "-f", str(self.config_path), *self.args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 — closed in stop()
        self.process = subprocess.Popen(command, env=self.env, cwd=str(self.workdir), stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtpd exited at start:\n{self.log()}")
            if self.answers():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"smtpd did not open its control socket:\n{self.log()}")

    def answers(self) -> bool:
        try:
            return self.request("hello").get("ok") is True
        except OSError:
            return False

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        """One raw request on a fresh connection; returns the reply object."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(self.socket)
            connection.sendall(json.dumps({"v": 1, "id": 1, "cmd": command, "args": args}).encode() + b"\n")
            return json.loads(read_line(connection))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        with contextlib.suppress(AttributeError):
            self._log.close()

    def smtpctl(self, *args: str, timeout: float = 30, env: dict[str, str] | None = None) -> Result:
        return smtpctl(self.socket, *args, timeout=timeout, env={**self.env, **(env or {})})


def read_line(connection: socket.socket) -> bytes:
    """One line, read a byte at a time so that nothing after it is consumed (streams send more lines)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = connection.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def smtpctl(socket_path: str, *args: str, timeout: float = 30, env: dict[str, str] | None = None) -> Result:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    completed = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", socket_path, *args],
                               capture_output=True, text=True, timeout=timeout, env=environment, cwd=str(ROOT))
    return Result(completed.returncode, completed.stdout, completed.stderr)


def smtpctl_as(user: str, socket_path: str, *args: str, extra_groups: tuple[int, ...] = ()) -> Result:
    """Run smtpctl's main as ``user`` in a forked child (so it runs with that uid, as a user would)."""
    # Import everything the child needs while we can still read /root's interpreter files.
    for module in ("smtpctl.cli", "smtpctl.words", "smtpctl.fast", "smtpctl.showtext", "smtpctl.commands.show",
                   "smtpctl.commands.control", "smtpctl.commands.trace", "smtpctl.commands.monitor",
                   "smtpctl.commands.explain", "smtpctl.commands.queue", "json", "encodings.idna"):
        importlib.import_module(module)
    account = pwd.getpwnam(user)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, run smtpctl, exit with its status
        status = 1
        try:
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            os.setgroups(list(extra_groups))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            from smtpctl.cli import main

            main(["--socket", socket_path, *args], prog="smtpctl")
            status = 0
        except SystemExit as leaving:
            status = leaving.code if isinstance(leaving.code, int) else 1
        except BaseException as error:  # noqa: BLE001 — report anything to the parent, never return into pytest
            with contextlib.suppress(Exception):
                sys.stderr.write(f"child error: {error!r}\n")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(out_write)
    os.close(err_write)
    with os.fdopen(out_read, "rb") as out_file, os.fdopen(err_read, "rb") as err_file:
        stdout = out_file.read().decode()
        stderr = err_file.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    return Result(os.waitstatus_to_exitcode(wait_status), stdout, stderr)
