"""A burst of connections larger than the old listen backlog: every client gets its banner (or the 421 of the
session limit), none is left hanging on a connection the kernel dropped from a full accept queue."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

from helpers_smtp import SmtpDaemon

CONFIG = 'listen on 127.0.0.1 port {port}\naction "local" mbox\nmatch from any for domain "example.org" action "local"\n'
CLIENTS = 1200


def test_connection_burst_all_answered(tmp_path: Path) -> None:
    with SmtpDaemon(tmp_path, CONFIG) as server:
        clients: list[socket.socket] = []
        try:
            for _ in range(CLIENTS):  # all at once: connect() returns before the daemon accepts
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", server.port))
                clients.append(client)
            waiting = {client.fileno(): client for client in clients}
            answered: dict[bytes, int] = {}
            give_up = time.monotonic() + 30  # a liveness bound: the daemon answers them all within seconds
            poller = select.poll()
            for descriptor in waiting:
                poller.register(descriptor, select.POLLIN)
            while waiting and time.monotonic() < give_up:
                for descriptor, _ in poller.poll(200):
                    try:
                        data = waiting[descriptor].recv(100)
                    except OSError:
                        data = b"error"
                    answered[data[:4]] = answered.get(data[:4], 0) + 1
                    poller.unregister(descriptor)
                    del waiting[descriptor]
            assert not waiting, f"{len(waiting)} of {CLIENTS} clients never got a reply: {answered}"
            assert answered == {b"220 ": 1000, b"421 ": 200}
        finally:
            for client in clients:
                client.close()
