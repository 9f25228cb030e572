"""What the tests of `queue compression` and `queue encryption` share: the key, a daemon with a local Maildir
action and a relay action, and the client side (send, the queue's rows)."""

from __future__ import annotations

import os
import smtplib

from helpers_delivery import Daemon
from waiting import wait_until

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210fedcba9876543210"
PAUSED = ("-P", "mda", "-P", "mta")


def config_text(port: int, queue: str, relay_port: int = 9) -> str:
    """``queue``'s statements, a listener, local.test delivered to Maildirs, far.test relayed to ``relay_port``
    (port 9: nothing answers, so a relay is deferred)."""
    return (f"{queue}\n"
            f"listen on 127.0.0.1 port {port}\n"
            'action "md" maildir\n'
            f'action "out" relay host smtp://127.0.0.1:{relay_port}\n'
            'match from any for domain "local.test" action "md"\n'
            'match from any for domain "far.test" action "out"\n')


def new_daemon(top: str, root: str, config: str, flags: tuple[str, ...] = PAUSED, name: str = "daemon") -> Daemon:
    """A daemon (not started) in ``top``/``name``, delivering under the mail root ``root``; by default both
    delivery agents paused, so that mail stays queued."""
    workdir = os.path.join(top, name)
    os.makedirs(workdir, exist_ok=True)
    return Daemon(workdir, config, root, extra_args=flags)


def send(port: int, recipients: list[str], message: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.sendmail("alice@client.test", recipients, message.encode()) == {}


def queue_rows(daemon: Daemon) -> list[list[str]]:
    result = daemon.smtpctl("show", "queue")
    assert result.returncode == 0, result.stderr
    return [line.split("|") for line in result.stdout.splitlines()]


def queue_one(daemon: Daemon, port: int, recipients: list[str], message: str) -> str:
    """Send one message to a daemon whose queue is empty, and wait until it is queued: its msgid."""
    send(port, recipients, message)
    wait_until(lambda: len(queue_rows(daemon)) == len(recipients), 20, explain=daemon.log)
    return queue_rows(daemon)[0][0][:8]
