"""`smtpctl remove` of an envelope whose delivery is running, against the real daemon: as OpenSMTPD 6.8, the
envelope is marked, removed when its attempt ends, and counted (`1 envelope removed`); `--dry-run` lists it; a
second remove counts nothing. Before, the command printed `0 envelope removed` and the envelope went anyway."""

from __future__ import annotations

import asyncio
import smtplib
import threading
from pathlib import Path
from typing import Any

from daemon import SmtpdProcess
from helpers_mta import Remote, ScriptedHandler
from waiting import wait_until


class HeldHandler(ScriptedHandler):
    """Holds every end of DATA until released, then answers 451 (the attempt fails temporarily)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.waiting = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.waiting.set()
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        return "451 4.3.0 try again later"


def test_removing_an_envelope_in_flight_counts_it_and_it_is_gone_after_the_attempt(tmp_path: Path) -> None:
    handler = HeldHandler()
    with Remote(handler) as remote:
        config = ("listen on 127.0.0.1 port {port}\n"
                  f'action "relay" relay host "smtp://127.0.0.1:{remote.port}"\n'
                  'match from any for domain "relay.test" action "relay"\n')
        daemon = SmtpdProcess(tmp_path, config).start()
        try:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("alice@client.test", ["bob@relay.test"], b"Subject: held\r\n\r\nbody\r\n")
            assert handler.waiting.wait(30), daemon.log()
            [line] = daemon.smtpctl("show", "queue").stdout.splitlines()
            evpid = line.split("|")[0]
            assert line.split("|")[11] == "inflight"

            dry = daemon.smtpctl("remove", "--dry-run", evpid)
            assert dry.stdout.splitlines()[0].startswith(f"{evpid}|")
            assert dry.stdout.splitlines()[-1] == "1 envelope would be removed (dry run)"
            assert daemon.smtpctl("remove", evpid).stdout == "1 envelope removed\n"
            assert daemon.smtpctl("remove", "--dry-run", evpid).stdout == "0 envelope would be removed (dry run)\n"
            assert daemon.smtpctl("remove", evpid).stdout == "0 envelope removed\n"  # marked already

            handler.release.set()  # the attempt fails temporarily: the envelope is removed, not retried
            wait_until(lambda: daemon.smtpctl("show", "queue").stdout == "", 20, explain=daemon.log)
            assert daemon.smtpctl("show", "envelope", evpid).returncode == 1
        finally:
            handler.release.set()
            daemon.stop()
