"""What the queue logs of an envelope it drops without delivering it, as OpenSMTPD 6.8 logs it (checked against
its daemon: `smtpctl remove` of a waiting envelope)."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

from daemon import SmtpdProcess
from waiting import wait_until

CONFIG = """listen on 127.0.0.1 port {port}
action "local" mbox
match from any for local action "local"
"""


def test_smtpctl_remove_logs_each_envelope_removed(tmp_path: Path) -> None:
    """6.8 logs `delivery: Remove for EVPID: from=<...>, to=<...>, rcpt=<->, delay=3s, stat=Removed by
    administrator` for each envelope `smtpctl remove` drops; we logged only that smtpctl ran, so the maillog
    did not say what became of the mail."""
    with SmtpdProcess(tmp_path, CONFIG, paused=("mda",)) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("sender@client.test", ["root@localhost"], b"Subject: x\r\n\r\nbody\r\n")
        found = wait_until(lambda: re.search(r" smtp envelope evpid=([0-9a-f]{16}) ", daemon.log()),
                           explain=daemon.log)
        evpid = found.group(1)
        result = daemon.smtpctl("remove", evpid)
        assert result.returncode == 0, result.stderr
        line = wait_until(lambda: next((text for text in daemon.log().splitlines() if " Remove for " in text), None),
                          explain=daemon.log)
    assert re.fullmatch(rf"delivery: Remove for {evpid}: from=<sender@client\.test>, to=<root@localhost>, "
                        r"rcpt=<->, delay=\d+s, stat=Removed by administrator", line), line
