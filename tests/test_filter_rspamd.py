"""Debian's opensmtpd-filter-rspamd (Go, its own reading of the protocol, strict about every report's fields) run
by our daemon. What it is told shows in what it sends rspamd: the msgid (Queue-Id), client address, HELO name,
reverse name, sender and recipient, and the message as accepted. rspamd itself is not what is tested: the server
below answers its HTTP API (`POST /checkv2`, a JSON verdict) from the message's words, so each verdict is known,
and it records each request."""

from __future__ import annotations

import json
import smtplib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers_smtp import SmtpDaemon

FILTER = "/usr/libexec/opensmtpd/filter-rspamd"


class Verdicts(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 — http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        action = "reject" if b"SPAMSPAM" in body else "add header" if b"SPAMMY" in body else "no action"
        answer = {"action": action, "score": 0.5 if action == "no action" else 9.5, "required_score": 15,
                  "symbols": {}, "messages": {"smtp_message": "5.7.1 spam refused"} if action == "reject" else {}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def rspamd() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    server = HTTPServer(("127.0.0.1", 0), Verdicts)
    Verdicts.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], Verdicts.requests
    finally:
        server.shutdown()
        server.server_close()


def send(port: int, body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@example.com")
        client.rcpt("bob@remote.test")
        return client.data(body)


def test_filter_rspamd_is_told_the_session_and_its_verdicts_apply(tmp_path: Path,
                                                                  rspamd: tuple[int, list[dict[str, Any]]]) -> None:
    port, requests = rspamd
    config = (f'filter "rspamd" proc-exec "{FILTER} -url http://127.0.0.1:{port}"\n'
              'listen on 127.0.0.1 port {port} filter "rspamd"\n'
              'action "relay" relay\nmatch from any for any action "relay"\n')
    with SmtpDaemon(tmp_path / "daemon", config) as daemon:
        code, text = send(daemon.port, b"Subject: ham\r\n\r\nhello\r\n")
        assert code == 250, text
        ham = text.split()[1].decode()
        code, text = send(daemon.port, b"Subject: spammy\r\n\r\nSPAMMY words\r\n")
        assert code == 250, text
        spammy = daemon.message(text.split()[1].decode())
        assert send(daemon.port, b"Subject: spam\r\n\r\nSPAMSPAM\r\n") == (550, b"5.7.1 spam refused")
        assert daemon.alive()
    assert len(requests) == 3
    headers = requests[0]["headers"]
    assert (headers["Queue-Id"], headers["Ip"], headers["Helo"], headers["Hostname"], headers["From"],
            headers["Rcpt"]) == (ham, "127.0.0.1", "client.test", "localhost", "alice@example.com",
                                 "bob@remote.test")
    assert requests[0]["body"].startswith(b"Received: from client.test (localhost [127.0.0.1])")
    assert spammy.startswith(b"X-Spam: yes\nX-Spam-Score: 9.5 / 15\nReceived: ")
