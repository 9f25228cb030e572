"""smtpctl against a daemon whose control socket's backlog is full (a burst of clients): connecting fails at once
with EAGAIN when the socket has a timeout, which smtpctl took for "smtpd doesn't seem to be running" (and
`show queue` then read the spool as if the daemon were down). It waits for room instead, up to its timeout."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from daemon import full_unix_backlog

from smtpctl.client import Client


def test_a_full_backlog_is_waited_for(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    accepted: list[socket.socket] = []
    with full_unix_backlog(path) as server:

        def drain() -> None:  # the busy daemon gets round to accepting, a little later
            server.settimeout(2)
            try:
                while True:
                    accepted.append(server.accept()[0])
            except OSError:
                return  # (nobody left to accept)

        timer = threading.Timer(0.3, drain)
        timer.start()
        try:
            with Client(path, timeout=10) as control:
                connection = control.connect()
                assert connection.getpeername() == path
        finally:
            timer.join(10)
            for item in accepted:
                item.close()
    assert accepted  # (the drain made the room the client waited for)
