"""`smtpctl show hoststats`: `domain|unixtime|text`, the last reply per recipient domain (reference §2.4). OpenSMTPD
6.8, relaying remote.test's mail to a smarthost that answers 451 for one recipient, prints
`remote.test|<time>|451 try later`; we printed the smarthost's name (`127.0.0.1|...`), so an administrator asking
about the domain whose mail is stuck found no line for it."""

from __future__ import annotations

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


def test_hoststats_are_kept_per_recipient_domain(workdir: Path) -> None:
    handler = ScriptedHandler(rcpt_replies={"later@remote.test": "451 4.7.1 try later"})
    port = free_port()
    with Remote(handler) as smarthost:
        config = (f"listen on 127.0.0.1 port {port}\n"
                  f'action "relay" relay host smtp://127.0.0.1:{smarthost.port}\n'
                  'match from any for domain "remote.test" action "relay"\n')
        with DaemonProcess(workdir, config) as daemon:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("alice@client.test", ["later@remote.test"], b"Subject: 1\r\n\r\nx\r\n")
            # the envelope is back in the queue, retried later, with the smarthost's reply
            wait_until(lambda: "|pending|" in (queue := daemon.smtpctl("show", "queue").stdout)
                       and queue.rstrip("\n").endswith("|451 4.7.1 try later"), explain=daemon.log)
            lines = daemon.smtpctl("show", "hoststats").stdout.splitlines()
    assert len(lines) == 1, lines
    domain, when, text = lines[0].split("|")
    assert (domain, text) == ("remote.test", "451 4.7.1 try later")
    assert when.isdigit()
