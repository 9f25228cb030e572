"""Stopping the daemon while an MDA command runs: nothing the command started outlives the daemon (the delivery
is tried again at the next start, so a survivor could deliver the message twice)."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess
from helpers_control import make_workdir
from waiting import wait_until


@pytest.fixture()
def workdir() -> Iterator[Path]:
    folder = make_workdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_sigterm_ends_the_whole_mda_command(workdir: Path) -> None:
    marks = workdir / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)
    command = f"/bin/sh -c 'sleep 120 & echo $! > {marks}/child; wait'"
    config = ("listen on 127.0.0.1 port {port}\n"
              'table users { "@" = "nobody" }\n'
              f'action "local" mda "{command}" virtual <users> user "nobody"\n'
              'match from any for any action "local"\n')
    daemon = SmtpdProcess(workdir, config).start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("a@client.test", ["u@localhost"], b"Subject: x\r\n\r\nbody\r\n")
        wait_until(lambda: (marks / "child").exists() and (marks / "child").read_text().strip(), 30)
        child = int((marks / "child").read_text())
        assert alive(child)
    finally:
        daemon.stop()
    try:
        wait_until(lambda: not alive(child), 10, explain=lambda: f"pid {child} outlived the daemon")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
