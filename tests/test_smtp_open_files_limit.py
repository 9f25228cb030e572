"""A flood of clients within the open-files limit: the daemon keeps descriptors back for itself, so root's
smtpctl and the queue still work, and the clients beyond the room get the session-limit reply."""

from __future__ import annotations

import socket
from pathlib import Path

from daemon import SmtpdProcess

CONFIG = 'listen on 127.0.0.1 port {port}\naction "local" mbox\nmatch from any for domain "example.org" action "local"\n'
LIMIT = 96  # open files for the daemon (soft and hard): room for (96 - 32) / 2 = 32 sessions


def test_a_flood_leaves_descriptors_for_the_daemon_itself(tmp_path: Path) -> None:
    """60 clients held open against a daemon allowed 96 open files: they took every descriptor, and root's
    smtpctl could not connect any more (nor the queue open a file)."""
    daemon = SmtpdProcess(tmp_path, CONFIG, wrapper=("prlimit", f"--nofile={LIMIT}:{LIMIT}", "--")).start()
    clients: list[socket.socket] = []
    try:
        assert f"smtp: at most 32 sessions at once, as the open-files limit ({LIMIT}) allows" in daemon.log()
        greetings = []
        for _ in range(60):
            client = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
            clients.append(client)
            greetings.append(client.makefile("rb").readline()[:4])
        assert greetings.count(b"220 ") == 32 and greetings.count(b"421 ") == 28, greetings
        status = daemon.smtpctl("show", "status")  # while the 32 sessions are still open
        assert (status.returncode, status.stdout) == (0, "MDA running\nMTA running\nSMTP running\n")
    finally:
        for client in clients:
            client.close()
        daemon.stop()
