"""`smtpctl discover MSGID` of a message that is under queue/ but not handed to the scheduler yet (it waits for
the checkpoint, here made 4 s long; a full disk makes the wait as long as it lasts, and `show queue` then names
the message on stderr): it is not taken (`0 envelopes discovered`), and the queue hands it over once. Before,
discover gave its envelopes to the scheduler, and the queue gave them a second time: the relayed recipient
received the message twice."""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

from daemon import SmtpdProcess
from helpers_mta import Remote
from waiting import wait_until


def test_discover_leaves_a_message_that_waits_for_its_checkpoint_to_the_queue(tmp_path: Path) -> None:
    with Remote() as remote:
        config = ("listen on 127.0.0.1 port {port}\n"
                  f'action "relay" relay host "smtp://127.0.0.1:{remote.port}"\n'
                  'action "held" mbox\n'
                  'match from any for domain "relay.test" action "relay"\n'
                  'match from any for domain "held.test" action "held"\n')
        daemon = SmtpdProcess(tmp_path, config, paused=("mda",), env={"SMTPD_QUEUE_CHECKPOINT_DELAY": "4"}).start()
        try:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("alice@client.test", ["bob@relay.test", "root@held.test"],
                                b"Subject: once\r\n\r\nbody\r\n")
            msgid = re.findall(r"smtp message msgid=([0-9a-f]{8})", daemon.log())[-1]
            placed = daemon.spool / "queue" / msgid[:2] / msgid
            wait_until(placed.is_dir, 10, explain=daemon.log)
            assert daemon.smtpctl("show", "queue").stdout == ""  # not handed over yet (the checkpoint is 4 s off)

            result = daemon.smtpctl("discover", msgid)
            assert result.stdout == "0 envelopes discovered\n", result

            wait_until(lambda: len(daemon.smtpctl("show", "queue").stdout.splitlines()) == 1
                       and remote.handler.received, 20, explain=daemon.log)
            time.sleep(1)  # (a second delivery would come at once)
            assert len(remote.handler.received) == 1
            [line] = daemon.smtpctl("show", "queue").stdout.splitlines()
            assert line.split("|")[5] == "root@held.test"
        finally:
            daemon.stop()
