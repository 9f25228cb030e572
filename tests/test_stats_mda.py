"""`show stats`' mda counters, as OpenSMTPD 6.8 keeps them (checked against its daemon with three envelopes of two
users held by a slow mda command: `mda.envelope=3 mda.pending=0 mda.running=3 mda.user=2`, all four 0 once
delivered). We had none of them: a monitoring check of the local deliveries in progress found no key."""

from __future__ import annotations

import json
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir
from waiting import wait_until

MDA_KEYS = ("mda.envelope", "mda.pending", "mda.running", "mda.user")


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = make_workdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def stats(daemon: DaemonProcess) -> dict[str, int]:
    result = daemon.smtpctl("show", "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mda_counters(daemon: DaemonProcess) -> dict[str, int | None]:
    values = stats(daemon)
    return {key: values.get(key) for key in MDA_KEYS}


def test_mda_counters_follow_the_deliveries_in_progress(workdir: Path) -> None:
    gate = workdir / "go"
    # Each delivery waits until the test opens the gate (the recipients' users can read the workdir).
    command = f"while [ ! -e {gate} ]; do sleep 0.05; done; cat >/dev/null"
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              f'action "slow" mda "{command}"\n'
              'match from any for domain "ok.test" action "slow"\n')
    with DaemonProcess(workdir, config) as daemon:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("s@ok.test", ["nobody@ok.test", "daemon@ok.test"], b"Subject: 1\r\n\r\nx\r\n")
            client.sendmail("s@ok.test", ["nobody@ok.test"], b"Subject: 2\r\n\r\nx\r\n")
        wait_until(lambda: stats(daemon).get("scheduler.envelope.inflight") == 3, explain=daemon.log)
        wait_until(lambda: mda_counters(daemon)["mda.running"] == 3, explain=lambda: str(mda_counters(daemon)))
        assert mda_counters(daemon) == {"mda.envelope": 3, "mda.pending": 0, "mda.running": 3, "mda.user": 2}
        gate.touch()
        wait_until(lambda: stats(daemon).get("scheduler.envelope") == 0, explain=daemon.log)
        assert mda_counters(daemon) == dict.fromkeys(MDA_KEYS, 0)
