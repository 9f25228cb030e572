"""smtpctl when the daemon does not answer as it should: it goes away in the middle of a command or a stream, or
answers something that is not our protocol. Each gets one line on stderr and exit 1, never a traceback, and a
stream the daemon cut is not taken for one that ended well."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_control import ROOT, running_daemon, smtpctl

INCOMPATIBLE = "smtpctl: incompatible smtpd and smtpctl\n"
CLOSED = "smtpctl: connection closed by smtpd\n"


@contextlib.contextmanager
def serving(serve, done: threading.Event, *sockets: list[socket.socket]) -> Iterator[None]:  # noqa: ANN001
    """``serve`` run in a thread until the block ends (``done`` set, the thread joined), then the sockets in the
    lists closed (lists, since a server fills its list of connections as it runs), even if the block fails."""
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        for listed in sockets:
            for each in listed:
                each.close()


@contextlib.contextmanager
def fake_daemon(path: Path, answer: bytes) -> Iterator[None]:
    """A control socket that reads each request line and answers `answer`, then closes the connection."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(10)
                received = b""
                with contextlib.suppress(OSError):
                    while b"\n" not in received:
                        chunk = connection.recv(4096)
                        if not chunk:
                            break
                        received += chunk
                    connection.sendall(answer)

    with serving(serve, done, [server]):
        yield


COMMANDS = [("show", "status"), ("show", "queue"), ("show", "hosts"), ("pause", "mda"), ("schedule", "all"),
            ("monitor", "-c", "1"), ("trace", "smtp", "--follow")]


@pytest.mark.parametrize(("answer", "said"), [
    (b"", CLOSED),  # took the request and went away
    (b'{"v": 1, "id": 1, "ok": tr', CLOSED),  # went away in the middle of its answer
    (b"hello there\n", INCOMPATIBLE),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", INCOMPATIBLE),  # deeper than the JSON parser goes
    (b'{"v": 2, "id": 1, "ok": true, "result": {}}\n', INCOMPATIBLE),
    (b'{"v": 1, "id": 1, "ok": false, "error": "no"}\n', INCOMPATIBLE),  # an error that is no object
], ids=["closed", "cut", "not-json", "deep", "version-2", "error-string"])
@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(words) for words in COMMANDS])
def test_a_daemon_that_does_not_answer_our_protocol(tmp_path: Path, answer: bytes, said: str,
                                                    words: tuple[str, ...]) -> None:
    path = tmp_path / "smtpd.sock"
    with fake_daemon(path, answer):
        result = smtpctl(str(path), *words, env={"SMTPD_SPOOL": str(tmp_path / "spool")}, timeout=60)
    assert (result.returncode, result.stderr, result.stdout) == (1, said, "")


@pytest.mark.parametrize("words", [("monitor", "--interval", "0.1"), ("trace", "stat", "--follow")])
def test_a_stream_the_daemon_cuts_fails(words: tuple[str, ...]) -> None:
    """`smtpctl monitor` and `trace --follow` end with 0 only when the user ends them (Ctrl-C, the reader of the
    pipe leaving): a daemon that stops under them is an error a supervising script must see."""
    with running_daemon() as daemon:
        follower = subprocess.Popen([sys.executable, "-m", "smtpctl", "--socket", daemon.socket, *words],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        try:
            assert follower.stdout is not None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # events: control connections count in `stat`
                daemon.request("hello")
                if select.select([follower.stdout], [], [], 0.1)[0]:
                    break
            assert follower.stdout.readline()
            daemon.signal(signal.SIGTERM)
            out, err = follower.communicate(timeout=30)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    assert (follower.returncode, err) == (1, CLOSED)


@pytest.mark.parametrize("answer", [b"garbage\n", b"[1]\n", b'{"v":1,"ok":false,"error":"x"}\n', b"\xff\xfe\n",
                                    b"[" * 100000 + b"\n"], ids=["text", "array", "error-text", "bad-utf8", "deep"])
def test_sendmail_keeps_the_message_offline_when_the_daemon_answers_garbage(tmp_path: Path, answer: bytes) -> None:
    """Nothing was handed over to a daemon whose answer to the enqueue request is not our protocol: the message
    is kept offline (exit 75) for a daemon that can take it. It died with a traceback (exit 1), the message lost."""
    sock = tmp_path / "garbage.sock"
    env = {"SMTPD_SOCKET": str(sock), "SMTPD_SPOOL": str(tmp_path / "spool"), "PATH": "/usr/bin:/bin"}
    with fake_daemon(sock, answer):
        result = subprocess.run([str(ROOT / ".venv" / "bin" / "sendmail"), "root"], input="Subject: kept\n\nhi\n",
                                capture_output=True, text=True, timeout=60, env=env)
    assert (result.returncode, result.stderr) == (
        75, "sendmail: incompatible smtpd and sendmail: the message is kept offline\n")
    [kept] = list((tmp_path / "spool" / "offline").iterdir())
    assert "Subject: kept" in kept.read_text()


@contextlib.contextmanager
def silent_daemon(path: Path) -> Iterator[None]:
    """A control socket that takes connections and requests and never answers (a daemon that hangs)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    with serving(serve, done, held, [server]):
        yield


@pytest.mark.parametrize("program", [("smtpctl", "show", "queue"), ("smtpctl", "show", "queue", "--json"),
                                     ("mailq",)])
def test_a_daemon_that_never_answers_is_given_up_on(tmp_path: Path, program: tuple[str, ...]) -> None:
    """Every request waits for its answer up to smtpctl's timeout (120 s; 1 s here), then `no answer from smtpd`,
    exit 1. `show queue` and mailq read their answer on their own path, which had no timeout at all: a monitoring
    script's `mailq | wc -l` against a hung daemon waited for ever."""
    path = tmp_path / "smtpd.sock"
    name, *words = program
    code = ("import sys; import smtpctl.client; smtpctl.client.DEFAULT_TIMEOUT = 1.0; from smtpctl.cli import main; "
            f"main(sys.argv[1:], prog={name!r})")
    with silent_daemon(path):
        result = subprocess.run([sys.executable, "-c", code, *words], capture_output=True, text=True, timeout=30,
                                env={"PYTHONPATH": str(ROOT), "SMTPD_SOCKET": str(path), "PATH": "/usr/bin:/bin"},
                                cwd=ROOT)
    assert (result.returncode, result.stderr, result.stdout) == (1, f"{name}: no answer from smtpd\n", "")
