"""`smtpctl pause mta from ADDR for DOMAIN` names an address, not a text: `0:0::1`, `::1` and a relay
`src "0:0::1"` are the same source. The pause was kept under the text typed, so a route paused as `::1` still
relayed from a source written `0:0::1`, and pausing `::1` then `0::1` made two entries (and `resume` with the
other spelling failed). Real daemon, real smtpctl, a loopback DNS server and an aiosmtpd exchanger on ::1."""

from __future__ import annotations

import smtplib
from pathlib import Path

from helpers_mta import Daemon, DnsServer, Remote, free_port, wait_until

ZONE = {"six.test": [("MX", "10 mx.six.test.")], "mx.six.test": [("AAAA", "::1")]}


def test_a_pause_matches_the_source_however_its_address_is_written(tmp_path: Path) -> None:
    port, mx_port = free_port(), free_port("::1")
    config = (f"listen on 127.0.0.1 port {port}\n"
              'action "relay" relay src "0:0::1"\n'
              'match from any for domain "six.test" action "relay"\n')
    with DnsServer(ZONE) as dns, Remote(host="::1", port=mx_port) as remote:
        daemon = Daemon(str(tmp_path / "ours"), config, "mail.local.test", port,
                        env={"SMTPD_RESOLVER": dns.setting, "SMTPD_MX_PORT": str(mx_port)}).__enter__()
        try:
            assert daemon.smtpctl("pause", "mta", "from", "::1", "for", "six.test").returncode == 0
            again = daemon.smtpctl("pause", "mta", "from", "0::1", "for", "six.test")
            assert (again.returncode, again.stdout) == (1, "command failed\n")
            assert daemon.smtpctl("show", "mta", "paused").stdout == "[::1] -> six.test\n"  # as OpenSMTPD 6.8
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("bob@local.test", ["alice@six.test"], "Subject: paused\r\n\r\nbody\r\n")
            assert wait_until(lambda: "is paused" in daemon.smtpctl("show", "queue").stdout, 30), daemon.log()
            assert remote.received == []
            resumed = daemon.smtpctl("resume", "mta", "from", "0:0:0::1", "for", "six.test")
            assert (resumed.returncode, resumed.stdout) == (0, "command succeeded\n")
            assert daemon.smtpctl("show", "mta", "paused").stdout == ""
            assert daemon.smtpctl("schedule", "all").returncode == 0
            assert wait_until(lambda: len(remote.received) == 1, 30), daemon.log()
            routes = daemon.smtpctl("show", "routes").stdout
            assert "0:0::1" not in routes
            # OpenSMTPD 6.8 prints IPv6 addresses of routes and paused sources in brackets (checked against it:
            # `1. [] <-> [::1] (::1) ...`, `[::1] -> relay.test`); we printed them bare.
            assert routes.startswith("1. [::1] <-> [::1] (mx.six.test) "), routes
        finally:
            daemon.stop()


def test_show_mta_paused_without_the_daemons_line_brackets_ipv6() -> None:
    from smtpctl.showtext import mta_paused_lines

    rows = [{"source": "::1", "domain": "six.test"}, {"source": "192.0.2.1", "domain": None}]
    assert mta_paused_lines(rows) == ["[::1] -> six.test", "192.0.2.1 -> *"]
