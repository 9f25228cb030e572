"""What the relay's counters say after relaying to a smarthost, as OpenSMTPD 6.8 says it.

* `show stats`' mta.source: the relay's sources in use (checked against 6.8's daemon after one message relayed
  to a smarthost: `mta.source=1`, the default source, as `mta.route=1`). We counted only routes with a `src`
  address, so without one the key never appeared.
* `smtpctl show hoststats`: `domain|unixtime|text`, the last reply per recipient domain (reference §2.4). 6.8,
  relaying remote.test's mail to a smarthost that answers 451 for one recipient, prints
  `remote.test|<time>|451 try later`; we printed the smarthost's name (`127.0.0.1|...`), so an administrator
  asking about the domain whose mail is stuck found no line for it.
"""

from __future__ import annotations

import json
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir
from helpers_mta import Remote, ScriptedHandler
from waiting import wait_until


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = make_workdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def relay_to(smarthost: Remote, port: int) -> str:
    return (f"listen on 127.0.0.1 port {port}\n"
            f'action "relay" relay host smtp://127.0.0.1:{smarthost.port}\n'
            'match from any for domain "remote.test" action "relay"\n')


def send_one(port: int, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("alice@client.test", [recipient], b"Subject: 1\r\n\r\nx\r\n")


def test_the_default_source_counts_as_one_source(workdir: Path) -> None:
    port = free_port()
    with Remote() as smarthost, DaemonProcess(workdir, relay_to(smarthost, port)) as daemon:
        send_one(port, "bob@remote.test")
        wait_until(lambda: len(smarthost.received) == 1, explain=daemon.log)
        stats = json.loads(daemon.smtpctl("show", "stats", "--json").stdout)
    assert (stats.get("mta.route"), stats.get("mta.source")) == (1, 1)


def test_hoststats_are_kept_per_recipient_domain(workdir: Path) -> None:
    handler = ScriptedHandler(rcpt_replies={"later@remote.test": "451 4.7.1 try later"})
    port = free_port()
    with Remote(handler) as smarthost, DaemonProcess(workdir, relay_to(smarthost, port)) as daemon:
        send_one(port, "later@remote.test")
        # the envelope is back in the queue, retried later, with the smarthost's reply
        wait_until(lambda: "|pending|" in (queue := daemon.smtpctl("show", "queue").stdout)
                   and queue.rstrip("\n").endswith("|451 4.7.1 try later"), explain=daemon.log)
        lines = daemon.smtpctl("show", "hoststats").stdout.splitlines()
    assert len(lines) == 1, lines
    domain, when, text = lines[0].split("|")
    assert (domain, text) == ("remote.test", "451 4.7.1 try later")
    assert when.isdigit()
