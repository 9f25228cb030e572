"""The relay's `mta delivery` log line has OpenSMTPD 6.8's fields, which log watchers parse:

    SESSION mta delivery evpid=EVPID from=<MAIL FROM sent> to=<dest> rcpt=<original rcpt, or -> source="our address"
        relay="remote host" delay=AGE result="Ok|TempFail|PermFail" stat="reply or error"

from= is the sender as sent (after `mail-from`), rcpt= the address before an alias changed it (`-` when none did),
source= our end of the session (`-` when none was opened), delay= the envelope's age as `1h2m3s`."""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

from helpers_mta import Daemon, Remote, free_port, make_certificate, wait_until

LINE = re.compile(r"^[0-9a-f]{16} mta delivery evpid=[0-9a-f]{16} from=<(?P<sender>[^>]*)> to=<(?P<to>[^>]*)> "
                  r'rcpt=<(?P<rcpt>[^>]*)> source="(?P<source>[^"]*)" relay="(?P<relay>[^"]*)" '
                  r'delay=(?P<delay>(\d+[dhm])*\d+s|\d+[dhm](\d+[dhm])*) result="(?P<result>Ok|TempFail|PermFail)" '
                  r'stat="(?P<stat>[^"]*)"$')


def delivery_lines(daemon: Daemon) -> list[re.Match[str]]:
    lines = [line for line in daemon.log().splitlines() if " mta delivery " in line]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [match for match in matches if match is not None]


def test_delivery_line_has_opensmtpd_fields(tmp_path: Path) -> None:
    port, dead_port = free_port(), free_port()
    with Remote() as remote:
        config = ("table aliases { fwd = \"someone@remote.test\" }\n"
                  f"listen on 127.0.0.1 port {port}\n"
                  'action "local" mbox alias <aliases>\n'
                  f'action "out" relay host "smtp://127.0.0.1:{remote.port}" mail-from "@rewritten.test"\n'
                  f'action "dead" relay host "smtp://127.0.0.1:{dead_port}"\n'
                  'match from any for domain "local.test" action "local"\n'
                  'match from any for domain "dead.test" action "dead"\n'
                  'match from any for any action "out"\n')
        daemon = Daemon(str(tmp_path), config, "mx.local.test", port).start()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("bob@client.test", ["fwd@local.test", "direct@remote.test", "x@dead.test"],
                                b"Subject: log\r\n\r\nbody\r\n")
            assert wait_until(lambda: len(delivery_lines(daemon)) == 3, 30), daemon.log()
            time.sleep(2.1)  # the envelope left at x@dead.test is now 2 s old: its next line says so
            daemon.smtpctl("schedule", "all")
            assert wait_until(lambda: len(delivery_lines(daemon)) == 4, 30), daemon.log()
            lines = delivery_lines(daemon)
        finally:
            daemon.stop()
    by_rcpt = {match["to"]: match for match in lines[:3]}
    forwarded, direct, dead = by_rcpt["someone@remote.test"], by_rcpt["direct@remote.test"], by_rcpt["x@dead.test"]
    assert forwarded["sender"] == "bob@rewritten.test"  # the MAIL FROM that was sent
    assert forwarded["rcpt"] == "fwd@local.test" and direct["rcpt"] == "-"
    assert forwarded["source"] == direct["source"] == "127.0.0.1"
    assert forwarded["relay"] == "127.0.0.1" and forwarded["result"] == "Ok"
    assert forwarded["stat"] == "250 2.0.0 Ok: queued"
    assert dead["source"] == "-" and dead["relay"] == "127.0.0.1" and dead["result"] == "TempFail"
    assert dead["sender"] == "bob@client.test" and dead["stat"].startswith("Connection failed")
    later = lines[3]
    assert later["to"] == "x@dead.test"
    assert int(later["delay"].rstrip("s")) >= 2, later.string  # the envelope's age, not the attempt's length


def session_lines(daemon: Daemon, kind: str) -> list[str]:
    """The `mta` lines of the session whose `mta connecting` line is the first of the log, without their id."""
    found = re.search(r"^([0-9a-f]{16}) mta connecting ", daemon.log(), re.M)
    assert found is not None, daemon.log()
    prefix = f"{found.group(1)} mta "
    return [line[len(prefix):] for line in daemon.log().splitlines()
            if line.startswith(prefix) and line.split()[2] in kind.split()]


def relay_one(workdir: Path, relay_port: int) -> Daemon:
    """A daemon (stopped when this returns) that relayed one message to 127.0.0.1:``relay_port`` and logged its
    one `mta delivery` line."""
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              f'action "out" relay host "smtp://127.0.0.1:{relay_port}"\n'
              'match from any for any action "out"\n')
    daemon = Daemon(str(workdir), config, "mx.local.test", port).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("bob@client.test", ["x@remote.test"], b"Subject: log\r\n\r\nbody\r\n")
        assert wait_until(lambda: len(delivery_lines(daemon)) == 1, 30), daemon.log()
    finally:
        daemon.stop()
    return daemon


def test_a_session_that_cannot_open_logs_mta_error(tmp_path: Path) -> None:
    """6.8 logs `mta error reason=...` when a session fails to open (here: nothing listens); we logged only the
    `mta connecting` line, so `grep 'mta error'` (and docs/filters.md's pointer to it) found nothing."""
    daemon = relay_one(tmp_path, free_port())
    lines = session_lines(daemon, "connecting connected error")
    assert [line.split()[0] for line in lines] == ["connecting", "error"], lines
    assert lines[1].startswith("error reason=Connection failed"), lines
    assert delivery_lines(daemon)[0]["stat"].startswith("Connection failed")


def test_a_session_secured_by_starttls_logs_its_ciphers(tmp_path: Path) -> None:
    """6.8 logs `mta connected` once the connection is made, then `mta tls ciphers=VERSION:CIPHER:BITS`; we
    logged `mta connected tls=TLSv1.3` after the whole handshake, which a watcher of either line missed."""
    certificate = make_certificate(str(tmp_path), "remote.test")
    with Remote(tls=certificate, require_starttls=True) as remote:
        daemon = relay_one(tmp_path / "d", remote.port)
    lines = session_lines(daemon, "connecting connected tls delivery")
    assert [line.split()[0] for line in lines] == ["connecting", "connected", "tls", "delivery"], lines
    assert lines[1] == "connected"
    assert re.fullmatch(r"tls ciphers=TLSv1\.[23]:[A-Z0-9_-]+:\d+", lines[2]), lines
    assert delivery_lines(daemon)[0]["result"] == "Ok"
