"""`:include:` files are read by the daemon as root at RCPT time: what a local user who can write on an include
file's path (a list kept in a home) may and may not make the daemon do. The real daemon over a real socket."""

from __future__ import annotations

import os
import smtplib
import socket
import time
from pathlib import Path

import pytest
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user
from test_mda_e2e import free_port


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-include-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pia") as alice, system_user(homes, "pib") as bob:
            yield Path(top), mail_root, alice, bob


def _start(top: Path, mail_root: str, include: Path) -> tuple[Daemon, int]:
    port = free_port()
    aliases = top / "aliases"
    aliases.write_text(f"mlist: :include:{include}\n")
    config = (f"listen on 127.0.0.1 port {port}\n"
              f"table aliases file:{aliases}\n"
              'action "local" mbox alias <aliases>\n'
              'match from any for domain "mbox.test" action "local"\n')
    return Daemon(str(top), config, mail_root).start(), port


def _greeted(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
        return probe.recv(100)


def test_an_include_file_made_a_fifo_does_not_hang_the_daemon(world) -> None:
    top, mail_root, alice, bob = world
    include = Path(alice.pw_dir) / "list.txt"
    include.write_text(f"{bob.pw_name}\n")
    daemon, port = _start(top, mail_root, include)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            assert client.rcpt("mlist@mbox.test")[0] == 250  # a regular file is read as before
        include.unlink()
        os.mkfifo(include)
        os.chown(include, alice.pw_uid, alice.pw_gid)
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            code, _ = client.rcpt("mlist@mbox.test")
            # The FIFO is not read: the alias gives nothing (no such user mlist), and the answer comes at once.
            assert code == 550
            assert _greeted(port).startswith(b"220 ")
        assert time.monotonic() - started < 5
        assert "list.txt: not a regular file" in daemon.log()
    finally:
        daemon.stop()
