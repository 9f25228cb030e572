"""The trace subsystems that name our one-process design's plumbing: io, imsg, mproc and filters.

The real daemon runs with a TLS listener that names a filter and a plain one that does not; `smtpctl trace io imsg
mproc filters --follow --json` follows it while mail arrives over STARTTLS and is delivered to an mbox (through
the fork helper) and to an mda command (a subprocess), both as the recipients' own uids.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user
from helpers_smtp import free_port, make_certificate
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
Event = dict[str, Any]


class Follower:
    """`smtpctl trace ... --follow --json` in its own process; its events collected by a thread."""

    def __init__(self, socket_path: str, *keywords: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpctl", "--socket", socket_path, "trace", *keywords, "--follow", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.events: list[Event] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.append(json.loads(line))

    def wait_for(self, predicate: Callable[[Event], bool], what: str) -> Event:
        def found() -> Event | None:
            return next((event for event in list(self.events) if predicate(event)), None)

        return wait_until(found, explain=lambda: f"no {what} event; got:\n"
                          + "\n".join(json.dumps(event) for event in self.events))

    def stop(self) -> str:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()  # (ours, by pid) then fail: a follower must end on Ctrl-C
                self.process.wait(15)
                raise AssertionError("smtpctl trace --follow did not end within 15 s of SIGINT") from None
        self.reader.join(5)
        assert self.process.stderr is not None
        return self.process.stderr.read()


def hello(socket_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(socket_path)
        connection.sendall(b'{"v": 1, "id": 1, "cmd": "hello", "args": {}}\n')
        connection.recv(65536)


def wait_subscribed(socket_path: str, follower: Follower) -> None:
    """Make control traffic until the follower (subscribed at some point after it starts) shows an event."""
    def shown() -> bool:
        hello(socket_path)
        return bool(follower.events)

    wait_until(shown, interval=0.1, explain=lambda: "the follower printed nothing")


@pytest.fixture()
def traced_world() -> Iterator[dict[str, Any]]:
    with open_temp_dir("pysmtpd-trace-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        cert, key = make_certificate(Path(top))
        filtered, plain = free_port(), free_port()
        config = (f'pki mx.test.example cert "{cert}"\n'
                  f'pki mx.test.example key "{key}"\n'
                  'filter "nordns" phase connect match !rdns disconnect "550 no rDNS"\n'
                  f'listen on 127.0.0.1 port {filtered} tls pki mx.test.example filter "nordns"\n'
                  f"listen on 127.0.0.1 port {plain}\n"
                  'action "local" mbox\n'
                  'action "cmd" mda "/bin/cat"\n'
                  'match from any for domain "mbox.test" action "local"\n'
                  'match from any for domain "cmd.test" action "cmd"\n')
        with system_user(homes, "pta") as alice, system_user(homes, "ptb") as bob:
            daemon = Daemon(top, config, mail_root).start()
            follower = Follower(daemon.socket, "io", "imsg", "mproc", "filters")
            try:
                wait_subscribed(daemon.socket, follower)
                yield {"daemon": daemon, "follower": follower, "alice": alice, "bob": bob, "mail_root": mail_root,
                       "filtered": filtered, "plain": plain}
            finally:
                try:
                    follower.stop()
                finally:
                    daemon.stop()


def of(subsystem: str, text: str, **fields: Any) -> Callable[[Event], bool]:
    def matches(event: Event) -> bool:
        return (event.get("subsystem") == subsystem and text in event.get("message", "")
                and all(event.get(key) == value for key, value in fields.items()))
    return matches


def send_over_starttls(port: int, recipients: list[str]) -> tuple[int, str]:
    """Send one message; returns the client's local port (the io trace's `port`) and the queue id."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client_port = client.sock.getsockname()[1]
        client.starttls(context=context)
        client.ehlo("client.test")
        client.mail("sender@client.test")
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, text = client.data(b"Subject: traced\r\n\r\nhello\r\n")
        assert code == 250
    [msgid] = re.findall(r"\b[0-9a-f]{8}\b", text.decode())
    return client_port, msgid


def session_of(follower: Follower, client_port: int) -> str:
    opened = follower.wait_for(of("io", "connection opened", port=client_port), "io connection opened")
    assert opened["address"] == "127.0.0.1"
    return str(opened["session"])


def test_io_imsg_mproc_filters_events_while_mail_is_delivered(traced_world: dict[str, Any]) -> None:
    follower: Follower = traced_world["follower"]
    alice, bob = traced_world["alice"], traced_world["bob"]
    client_port, msgid = send_over_starttls(traced_world["filtered"],
                                            [f"{alice.pw_name}@mbox.test", f"{bob.pw_name}@cmd.test"])
    session = session_of(follower, client_port)
    mailbox = Path(traced_world["mail_root"]) / alice.pw_name
    wait = follower.wait_for

    # io: the session's bytes (sizes, not content), its TLS handshake and its end; control connections too
    read = wait(of("io", "read", session=session), "io read")
    assert read["size"] > 0 and "EHLO" not in read["message"]
    assert wait(of("io", "write", session=session), "io write")["size"] > 0
    handshake = wait(of("io", "TLS handshake done", session=session), "io TLS handshake")
    assert handshake["tls_version"].startswith("TLS") and handshake["cipher"]
    assert wait(of("io", "connection closed", session=session), "io closed")["reason"] in ("quit", "disconnect")
    assert wait(of("io", "control connection opened", uid=0), "io control connection")["pid"] > 0

    # imsg: session -> queue -> scheduler -> mda and back, with the ids `trace --msgid/--session` look for
    committed = wait(of("imsg", "smtp -> queue", session=session, msgid=msgid), "imsg smtp -> queue")
    evpids = committed["evpids"]
    assert len(evpids) == 2 and all(evpid.startswith(msgid) for evpid in evpids)
    added = wait(of("imsg", "queue -> scheduler", msgid=msgid), "imsg queue -> scheduler")
    assert sorted(added["evpids"]) == sorted(evpids) and added["loaded"] is False
    for evpid in evpids:
        assert wait(of("imsg", "scheduler -> mda", evpid=evpid, msgid=msgid), "imsg handover")["agent"] == "mda"
        assert wait(of("imsg", "mda -> scheduler", evpid=evpid), "imsg result")["outcome"] == "ok"
    assert wait(of("imsg", "control -> daemon: hello", command="hello"), "imsg control")["uid"] == 0

    # mproc: the fork helper and its child (as alice) for the mbox; the mda command's process (as bob)
    assert wait(of("mproc", "delivery fork helper started"), "mproc helper start")["pid"] > 0
    forked = wait(of("mproc", "forked to run as uid", uid=alice.pw_uid), "mproc child forked")
    assert forked["method"] == "mbox" and forked["evpid"] in evpids and forked["msgid"] == msgid
    exited = wait(of("mproc", "exited with status 0", pid=forked["pid"]), "mproc child exit")
    assert exited["status"] == 0 and exited["evpid"] == forked["evpid"]
    command = wait(of("mproc", "mda command /bin/cat started", uid=bob.pw_uid), "mproc command start")
    assert command["evpid"] in evpids and command["evpid"] != forked["evpid"]
    assert wait(of("mproc", "exited with status 0", pid=command["pid"]), "mproc command exit")["status"] == 0
    assert "Subject: traced" in mailbox.read_text()

    # filters: the filtered listener's connect filter was consulted (the client has a PTR name: it proceeds);
    # the other phases have no filter, so say nothing
    event = wait(of("filters", "phase=connect", session=session), "filters connect")
    assert (event["filter"], event["decision"]) == ("nordns", "proceed")
    assert [e["phase"] for e in follower.events if e.get("subsystem") == "filters" and e.get("session") == session] \
        == ["connect"]


def test_no_filter_events_without_a_filter_and_session_follower(traced_world: dict[str, Any]) -> None:
    daemon, follower, bob = traced_world["daemon"], traced_world["follower"], traced_world["bob"]
    with smtplib.SMTP("127.0.0.1", traced_world["plain"], timeout=30) as client:
        client_port = client.sock.getsockname()[1]
        client.ehlo("client.test")
        client.mail("sender@client.test")
        assert client.rcpt(f"{bob.pw_name}@cmd.test")[0] == 250
        assert client.data(b"Subject: plain\r\n\r\nhello\r\n")[0] == 250
    session = session_of(follower, client_port)
    follower.wait_for(of("io", "connection closed", session=session), "io closed")
    assert [event for event in follower.events if event.get("subsystem") == "filters"] == []

    # `trace --follow --session ID` keeps that session's io events and drops the others'
    with smtplib.SMTP("127.0.0.1", traced_world["plain"], timeout=30) as tracked, \
            smtplib.SMTP("127.0.0.1", traced_world["plain"], timeout=30) as other:
        session = session_of(follower, tracked.sock.getsockname()[1])
        narrow = Follower(daemon.socket, "io", "--session", session)
        try:
            wait_until(lambda: tracked.noop() and narrow.events, interval=0.1,
                       explain=lambda: "the --session follower printed nothing")
            other.noop()
            other.ehlo("other.test")
            tracked.ehlo("tracked.test")
            narrow.wait_for(of("io", "read 19 bytes", session=session), "io read of EHLO tracked.test")
        finally:
            narrow.stop()
    assert narrow.events and {event["session"] for event in narrow.events} == {session}


def test_console_trace_lines_name_their_subsystem_once(tmp_path: Path) -> None:
    """`smtpd -T stat -T scheduler` printed `stat: stat: smtp.session += 1 -> 1` and `scheduler: scheduler: new
    envelope ...`: messages that name their subsystem got it again in front."""
    from helpers_smtp import SmtpDaemon

    daemon = SmtpDaemon(tmp_path, "listen on 127.0.0.1 port {port}\n"
                        'action "relay" relay\nmatch from any for any action "relay"\n',
                        paused=("mda", "mta"), traces=("stat", "scheduler"))
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("a@client.test", ["b@remote.test"], b"Subject: t\r\n\r\nx\r\n")
        wait_until(lambda: "scheduler: new envelope" in daemon.log(), explain=daemon.log)
        log = daemon.log()
        assert "stat: smtp.session += 1 -> 1" in log
        assert "stat: stat:" not in log and "scheduler: scheduler:" not in log
    finally:
        daemon.stop()
