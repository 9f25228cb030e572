"""SMTP dialogs as data (tests/dialogs/*.dialog), each played against the real daemon over a real socket.

File format, one directive per line:
  `# text`           a comment (the first comment line says what the dialog shows)
  `port: NAME`       which listener to connect to: mx (default), submission, other, submission-optional
  `C: text`          the client sends text + CRLF (`C:` alone: an empty line)
  `C! python-bytes`  the client sends exact bytes, e.g. `C! b"DATA\\n"` (no CRLF added)
  `REPEAT n text`    the client sends text + CRLF n times
  `S: reply line`    the next reply line; a reply is the run of `S:` lines up to its `CODE ` line.
                     `*` in the expected text matches anything
  `TOGETHER`         the replies up to the next client line come in one read (one segment: a pipelined group's
                     replies are sent together)
  `STARTTLS`         the client starts TLS on the connection
  `CLOSED`           the server has closed the connection
Placeholders: {mailname}.
"""

from __future__ import annotations

import ast
import re
import ssl
from pathlib import Path

import pytest
from helpers_smtp import MAILNAME, LineClient, SmtpDaemon, make_certificate

DIALOGS = Path(__file__).parent / "dialogs"
ALICE_PASSWORD = "secret"

CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
smtp max-message-size 10K
smtp limit max-rcpt 3 max-mails 2
table creds { alice = "HASH" }
table sendermap { alice = "alice@example.org, @alice.test" }
listen on 127.0.0.1 port {port} tls pki mx.test.example
listen on 127.0.0.1 port {port2} tls-require pki mx.test.example auth <creds> senders <sendermap>
listen on 127.0.0.1 port {port3} hostname other.example no-dsn mask-src
listen on 127.0.0.1 port {port4} tls pki mx.test.example auth-optional <creds>
action "local" mbox
action "relay" relay
match from any for domain "example.org" action "local"
match from any for local action "local"
match auth from any for any action "relay"
"""


@pytest.fixture(scope="module")
def dialog_daemon(tmp_path_factory: pytest.TempPathFactory):

    from shared.passwords import hash_password

    folder = tmp_path_factory.mktemp("dialogs")
    make_certificate(folder)
    daemon = SmtpDaemon(folder, CONFIG.replace("HASH", hash_password(ALICE_PASSWORD, "sha512")))
    daemon.start()
    for port in daemon.ports.values():
        daemon.wait_listening(port)
    yield daemon
    daemon.stop()


def dialog_files() -> list[Path]:
    return sorted(DIALOGS.glob("*.dialog"))


def _matches(line: str, pattern: str) -> bool:
    """`*` matches any run of characters; everything else (brackets too) is literal."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), line, re.DOTALL) is not None


def _expect(client: LineClient, expected: list[str], where: str) -> None:
    got = client.reply()
    assert len(got) == len(expected) and all(
        _matches(line, pattern) for line, pattern in zip(got, expected, strict=False)), (
        f"{where}: expected {expected!r}, got {got!r}")


def play(path: Path, daemon: SmtpDaemon) -> None:
    lines = path.read_text().replace("{mailname}", MAILNAME).splitlines()
    ports = {"mx": daemon.port, "submission": daemon.port2, "other": daemon.ports["port3"],
             "submission-optional": daemon.ports["port4"]}
    port_name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("port:")), "mx")
    client = LineClient(ports[port_name])
    expected: list[str] = []
    try:
        for number, line in enumerate(lines, 1):
            where = f"{path.name}:{number}"
            if line.startswith("S: ") or line == "S:":
                expected.append(line[3:])
                if len(line) < 7 or line[6] != "-":
                    _expect(client, expected, where)
                    expected = []
                continue
            assert not expected, f"{where}: reply lines must end with a `CODE text` line"
            if line.startswith(("C: ", "C! ", "REPEAT ")) or line == "C:":
                client.one_read = False
            if line.startswith("C: ") or line == "C:":
                client.send(line[3:].encode("utf-8") + b"\r\n")
            elif line.startswith("C! "):
                client.send(ast.literal_eval(line[3:]))
            elif line.startswith("REPEAT "):
                _, count, text = line.split(" ", 2)
                client.send((text.encode() + b"\r\n") * int(count))
            elif line == "STARTTLS":
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                client.sock = context.wrap_socket(client.sock, server_hostname=MAILNAME)
            elif line == "TOGETHER":
                client.read_once()
            elif line == "CLOSED":
                assert client.closed(), f"{where}: the server did not close the connection"
            elif line.startswith(("#", "port:")) or not line.strip():
                continue
            else:
                raise AssertionError(f"{where}: unknown directive {line!r}")
    finally:
        client.close()


@pytest.mark.parametrize("path", dialog_files(), ids=lambda path: path.stem)
def test_dialog(path: Path, dialog_daemon: SmtpDaemon) -> None:
    play(path, dialog_daemon)
