"""`scheduler.envelope.incoming` is OpenSMTPD 6.8's gauge of the envelopes of messages being received (checked
against its daemon: 2 after two RCPTs, 0 after RSET, 0 once the message is committed), and `monitor`'s enq
column counts the envelopes the scheduler took in. It was a running total of committed envelopes, so `show
stats` said `scheduler.envelope.incoming=3` on an idle daemon where OpenSMTPD says 0."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir, minimal_config
from helpers_smtp import LineClient


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    workdir = make_workdir()
    port = free_port()
    try:
        with DaemonProcess(workdir, minimal_config(port), paused=("mda",)) as running:
            running.port = port  # type: ignore[attr-defined]
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def stats(daemon: DaemonProcess) -> dict[str, int]:
    result = daemon.smtpctl("show", "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def incoming(daemon: DaemonProcess) -> int:
    return stats(daemon).get("scheduler.envelope.incoming", 0)


def open_transaction(daemon: DaemonProcess, recipients: int) -> LineClient:
    client = LineClient(daemon.port)  # type: ignore[attr-defined]
    assert client.reply()[-1].startswith("220")
    for command in ["EHLO client.test", "MAIL FROM:<alice@client.test>",
                    *["RCPT TO:<root@mx.control.test>"] * recipients]:
        client.send(command.encode() + b"\r\n")
        assert client.reply()[-1][:1] == "2", command
    return client


def test_incoming_counts_the_envelopes_of_open_transactions_only(daemon: DaemonProcess) -> None:
    client = open_transaction(daemon, 2)
    try:
        assert incoming(daemon) == 2
        client.send(b"RSET\r\n")
        assert client.reply()[-1].startswith("250")
        assert incoming(daemon) == 0
        for command in ["MAIL FROM:<alice@client.test>", "RCPT TO:<root@mx.control.test>", "DATA"]:
            client.send(command.encode() + b"\r\n")
            assert client.reply()[-1][:1] in "23", command
        assert incoming(daemon) == 1
        client.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        assert client.reply()[-1].startswith("250")
        assert incoming(daemon) == 0
        # (the scheduler takes the envelope at the queue's next checkpoint, a moment after the 250)
        deadline = time.monotonic() + 10
        while stats(daemon).get("scheduler.envelope", 0) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats(daemon)["scheduler.envelope"] == 1
    finally:
        client.close()


def test_a_client_that_goes_away_leaves_nothing_incoming(daemon: DaemonProcess) -> None:
    client = open_transaction(daemon, 3)
    assert incoming(daemon) == 3
    client.close()
    deadline = time.monotonic() + 10
    while incoming(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert incoming(daemon) == 0


def test_monitor_enq_counts_the_envelopes_queued(daemon: DaemonProcess) -> None:
    queued = stats(daemon)["scheduler.envelope"]
    assert queued >= 1  # the message of the first test, kept by the paused mda
    result = daemon.smtpctl("monitor", "--json", "--count", "1", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    assert (row["envelope_curr"], row["envelope_enq"], row["envelope_deq"]) == (queued, queued, 0)
