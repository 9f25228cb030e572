"""`show stats`' mta.source: the relay's sources in use, as OpenSMTPD 6.8 counts them (checked against its daemon
after one message relayed to a smarthost: `mta.source=1`, the default source, as `mta.route=1`). We counted only
routes with a `src` address, so without one the key never appeared."""

from __future__ import annotations

import json
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir
from helpers_mta import Remote
from waiting import wait_until


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = make_workdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_default_source_counts_as_one_source(workdir: Path) -> None:
    port = free_port()
    with Remote() as smarthost:
        config = (f"listen on 127.0.0.1 port {port}\n"
                  f'action "relay" relay host smtp://127.0.0.1:{smarthost.port}\n'
                  'match from any for domain "remote.test" action "relay"\n')
        with DaemonProcess(workdir, config) as daemon:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("alice@client.test", ["bob@remote.test"], b"Subject: 1\r\n\r\nx\r\n")
            wait_until(lambda: len(smarthost.received) == 1, explain=daemon.log)
            stats = json.loads(daemon.smtpctl("show", "stats", "--json").stdout)
    assert (stats.get("mta.route"), stats.get("mta.source")) == (1, 1)
