"""Following traces while mail flows through the real daemon: SMTP sessions, rule matching, expansion."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers_control import ROOT, DaemonProcess, free_port, make_workdir

MESSAGE = b"Subject: traced\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    workdir = make_workdir()
    port = free_port()
    # Relaying to a port where nobody listens: the mail is accepted and queued, delivery is retried later.
    text = (f"listen on 127.0.0.1 port {port}\n"
            f'action "out" relay host smtp://127.0.0.1:{free_port()}\n'
            'match from any for any action "out"\n')
    running = DaemonProcess(workdir, text).start()
    running.port = port  # type: ignore[attr-defined]
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def follow(daemon: DaemonProcess, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "smtpctl", "--socket", daemon.socket, "trace", *args,
                             "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_until_following(daemon: DaemonProcess, count: int) -> None:
    """The follower is subscribed once the daemon counts its control connection (besides ours)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = daemon.request("show.stats")["result"]["stats"]
        if stats.get("control.session", 0) >= count + 1:
            return
        time.sleep(0.05)
    raise AssertionError("the follower did not connect")


class EventReader:
    """JSON lines from a process's stdout, read with os.read so that select() sees every unread byte."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.buffer = b""

    def collect(self, until: re.Pattern[str], timeout: float = 20) -> list[dict]:
        events: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                event = json.loads(line)
                events.append(event)
                if until.search(event.get("message", "")):
                    return events
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                self.buffer += chunk
        raise AssertionError(f"no event matching {until.pattern}; got {[e.get('message') for e in events]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(15)


def send(port: int, sender: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail(sender, [rcpt], MESSAGE)


def test_follower_sees_sessions_rules_and_expansion(daemon: DaemonProcess) -> None:
    follower = follow(daemon, "smtp", "rules", "expand")
    try:
        wait_until_following(daemon, 1)
        for number in range(3):
            send(daemon.port, f"sender{number}@example.org", f"rcpt{number}@example.net")  # type: ignore[attr-defined]
        reader = EventReader(follower)
        events = reader.collect(re.compile(r"rcpt2@example\.net"))
        events += reader.collect(re.compile(r">>> 221 "))
    finally:
        stop(follower)
    assert follower.returncode == 0
    messages = [event["message"] for event in events]
    subsystems = {event["subsystem"] for event in events}
    assert {"smtp", "rules", "expand"} <= subsystems
    assert any(re.search(r"^[0-9a-f]{16}: <<< MAIL FROM:<sender0@example.org>", text, re.I) for text in messages)
    assert any(text.startswith("rule #1 matched: match from any for any action") for text in messages)
    assert any("rcpt1@example.net" in text for text in messages if text.startswith("lka_expand"))
    assert any(re.search(r">>> 250 2\.0\.0 [0-9a-f]{8} Message accepted for delivery", text) for text in messages)
    assert all(event["type"] == "trace" for event in events)


def test_follow_one_session_while_another_runs(daemon: DaemonProcess) -> None:
    port = daemon.port  # type: ignore[attr-defined]
    watched = smtplib.SMTP("127.0.0.1", port, timeout=20)
    try:
        watched.ehlo()
        deadline = time.monotonic() + 10
        tokens: list[str] = []
        while not tokens and time.monotonic() < deadline:
            tokens = re.findall(r"([0-9a-f]{16}) smtp connected", daemon.log())
            time.sleep(0.05)
        token = tokens[-1]
        follower = follow(daemon, "smtp", "--session", token)
        try:
            wait_until_following(daemon, 1)
            send(port, "other@example.org", "other@example.net")  # a session we do not follow
            watched.sendmail("watched@example.org", ["watched@example.net"], MESSAGE)
            events = EventReader(follower).collect(re.compile(r">>> 250 2\.0\.0 .*Message accepted"))
        finally:
            stop(follower)
    finally:
        watched.quit()
    assert events and all(event.get("session") == token for event in events)
    assert not any("other@example" in event["message"] for event in events)
    assert any("watched@example.org" in event["message"] for event in events)


def test_monitor_counts_sessions_and_envelopes(daemon: DaemonProcess) -> None:
    monitor = subprocess.Popen([sys.executable, "-m", "smtpctl", "--socket", daemon.socket, "monitor", "--json",
                                "--interval", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert monitor.stdout is not None
    try:
        first = json.loads(monitor.stdout.readline())  # totals so far
        for number in range(2):
            send(daemon.port, f"m{number}@example.org", f"n{number}@example.net")  # type: ignore[attr-defined]
        connected = enqueued = 0
        deadline = time.monotonic() + 20
        while (connected < 2 or enqueued < 2) and time.monotonic() < deadline:
            row = json.loads(monitor.stdout.readline())
            connected += row["client_conn"]
            enqueued += row["envelope_enq"]
    finally:
        stop(monitor)
    assert first["client_conn"] >= 0
    assert (connected, enqueued) == (2, 2)


def test_trace_turned_on_at_runtime_goes_to_the_log(daemon: DaemonProcess) -> None:
    """`smtpctl trace smtp` on a daemon started without -T: the session's trace lines are in its log, as
    OpenSMTPD's (they went nowhere: only a daemon started with -T had somewhere to print them)."""
    assert daemon.smtpctl("trace", "smtp").stdout == "command succeeded\n"
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as client:  # type: ignore[attr-defined]
            client.ehlo("runtime-trace.test")
        deadline = time.monotonic() + 20
        while "runtime-trace.test" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(r"^smtp: \S+: <<< ehlo runtime-trace\.test$", daemon.log(), re.M), daemon.log()
    finally:
        assert daemon.smtpctl("untrace", "smtp").stdout == "command succeeded\n"
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as client:  # type: ignore[attr-defined]
        client.ehlo("after-untrace.test")
    time.sleep(0.5)
    assert "after-untrace.test" not in daemon.log()


def test_the_report_about_a_message_is_followed_by_its_msgid() -> None:
    """`trace --follow --msgid M` must show where the failure report about M went: the `queued as` event named
    only the report's own msgid, and the log's `dropped` warning named no message at all."""
    workdir = make_workdir()
    port = free_port()
    text = (f"listen on 127.0.0.1 port {port}\n"
            'action "fail" mda "/bin/false" user nobody\n'
            f'action "back" relay host smtp://127.0.0.1:{free_port()}\n'
            'match from any for domain "fail.test" action "fail"\n'
            'match from local for domain "back.test" action "back"\n')
    try:
        with DaemonProcess(workdir, text, paused=("mda", "mta")) as daemon:
            daemon.wait_listening(port)
            msgids = []
            for sender in ("someone@back.test", "someone@nowhere.test"):
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                    client.ehlo("client.test")
                    client.mail(sender)
                    assert client.rcpt("nobody@fail.test")[0] == 250, daemon.log()
                    code, reply = client.data(MESSAGE)
                    assert code == 250
                    msgids.append(reply.decode().split()[1])
            routed, dropped = msgids
            follower = follow(daemon, "bounce", "--msgid", routed)
            try:
                wait_until_following(daemon, 1)
                assert daemon.smtpctl("resume", "mda").returncode == 0
                events = EventReader(follower).collect(re.compile(r"queued as [0-9a-f]{8}"))
            finally:
                stop(follower)
            queued = events[-1]
            assert queued["message"].startswith(f"failed report for message {routed} to <someone@back.test> queued as ")
            assert queued["original"] == routed and queued["msgid"] != routed
            deadline = time.monotonic() + 20
            warning = (f"warn: bounce: failed report for message {dropped} to <someone@nowhere.test> dropped: "
                       "no rule accepts the sender's address")
            while warning not in daemon.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert warning in daemon.log()
            assert f"bounce: failed report for message {routed} to <someone@back.test> queued as " \
                   f"{queued['msgid']} (1 recipient(s))" in daemon.log()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_follow_by_the_address_the_client_gave_reaches_the_delivery_of_its_expansion() -> None:
    """`trace scheduler --follow --address team@local.test`: the delivery attempts go to bob@remote.test (a
    virtual table expanded the address); they name the address the client gave too, so following it does not stop
    at the expansion."""
    workdir = make_workdir()
    port = free_port()
    text = (f"listen on 127.0.0.1 port {port}\n"
            'table virtuals { "team@local.test" = "bob@remote.test" }\n'
            'action "local" mbox virtual <virtuals>\n'
            f'action "out" relay host smtp://127.0.0.1:{free_port()}\n'
            'match from any for domain "local.test" action "local"\n'
            'match from any for any action "out"\n')
    daemon = DaemonProcess(workdir, text).start()
    try:
        follower = follow(daemon, "scheduler", "--address", "team@local.test")
        try:
            wait_until_following(daemon, 1)
            send(port, "alice@example.org", "team@local.test")
            events = EventReader(follower).collect(re.compile(r"tempfail"))
        finally:
            stop(follower)
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert any(re.search(r"mta delivery of [0-9a-f]{16} to <bob@remote\.test>", event["message"]) for event in events)
    assert all(event["rcpt"] == "team@local.test" for event in events)
