"""An LMTP session cut short after DATA: the recipients the server already accepted are delivered, the others wait.

The daemon puts the envelopes of one message for one LMTP destination into one transaction (several RCPT TO,
one DATA, one reply per recipient). When the server says 250 for the first recipient and then closes the
connection, that recipient has its copy: marking it as a temporary failure would deliver it a second time."""

from __future__ import annotations

import os
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import free_port
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user
from waiting import wait_until


class CuttingLmtpServer:
    """Accepts every recipient, answers 250 for the first one after DATA, then closes the connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions = 0
        self.recipients: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection, connection.makefile("rwb") as stream:
                self.sessions += 1
                self._session(stream)

    def _session(self, stream) -> None:  # noqa: ANN001
        def say(line: str) -> None:
            stream.write(line.encode() + b"\r\n")
            stream.flush()

        say("220 cutting LMTP")
        while line := stream.readline():
            command = line.decode().strip()
            verb = command.upper()
            if verb.startswith("LHLO"):
                say("250-cutting")
                say("250 PIPELINING")
            elif verb.startswith(("MAIL", "RCPT")):
                if verb.startswith("RCPT"):
                    self.recipients.append(command[len("RCPT TO:"):].strip("<>"))
                say("250 2.1.0 Ok")
            elif verb == "DATA":
                say("354 go ahead")
                while stream.readline() not in (b".\r\n", b""):
                    pass
                say("250 2.0.0 saved for the first recipient")
                return  # and the connection closes before the other replies
            else:
                say("221 2.0.0 Bye")
                return

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(): the thread would outlive the test, and a
        # later test's forkpty() (pexpect) warns that the process is multi-threaded. shutdown() wakes it.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)


@pytest.fixture()
def world() -> Iterator[tuple[Path, str, object, CuttingLmtpServer]]:
    with open_temp_dir("pysmtpd-lmtpcut-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        server = CuttingLmtpServer()
        try:
            with system_user(homes, "plc") as user:
                yield Path(top), mail_root, user, server
        finally:
            server.close()


def test_recipients_accepted_before_the_session_broke_are_not_delivered_again(world) -> None:
    top, mail_root, user, server = world
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              f'action "lm" lmtp "127.0.0.1:{server.port}" rcpt-to\n'
              'match from any for domain "lmtp.test" action "lm"\n')
    daemon = Daemon(str(top), config, mail_root).start()
    try:
        daemon.wait_listening(port)
        recipients = [f"{user.pw_name}@lmtp.test", f"{user.pw_name}+a@lmtp.test", f"{user.pw_name}+b@lmtp.test"]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            assert client.sendmail("sender@client.test", recipients, b"Subject: cut\r\n\r\nbody\r\n") == {}
        wait_until(lambda: daemon.log().count(" mda delivery ") >= 3, explain=daemon.log)
        first = server.recipients[0]
        lines = [line for line in daemon.log().splitlines() if " mda delivery " in line]
        ok = [line for line in lines if "result=Ok" in line]
        assert len(ok) == 1 and f"rcpt=<{first}>" in ok[0], lines
        waiting = daemon.smtpctl("show", "queue").stdout.splitlines()
        assert len(waiting) == 2, waiting
        assert not any(f"|{first}|" in line for line in waiting), waiting
        assert all("Connection closed unexpectedly" in line for line in waiting), waiting
    finally:
        daemon.stop()


def test_the_same_through_a_relay_to_an_lmtp_host(world) -> None:
    """`relay host lmtp://...` (the relay's client, not the local LMTP delivery): the same cut, the same rule."""
    top, mail_root, _, server = world
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              f'action "lm" relay host "lmtp://127.0.0.1:{server.port}"\n'
              'match from any for domain "lmtp.test" action "lm"\n')
    daemon = Daemon(str(top), config, mail_root).start()
    try:
        daemon.wait_listening(port)
        recipients = ["one@lmtp.test", "two@lmtp.test", "three@lmtp.test"]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            assert client.sendmail("sender@client.test", recipients, b"Subject: cut\r\n\r\nbody\r\n") == {}
        wait_until(lambda: daemon.log().count(" mta delivery ") >= 3, explain=daemon.log)
        first = server.recipients[0]
        lines = [line for line in daemon.log().splitlines() if " mta delivery " in line]
        ok = [line for line in lines if 'result="Ok"' in line]
        assert len(ok) == 1 and f"to=<{first}>" in ok[0], lines
        waiting = daemon.smtpctl("show", "queue").stdout.splitlines()
        assert len(waiting) == 2 and not any(f"|{first}|" in line for line in waiting), waiting
    finally:
        daemon.stop()
