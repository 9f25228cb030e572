"""Where expansion deliberately differs from OpenSMTPD 6.8 (docs/delivery.md), through the real daemon. Checked
against the real OpenSMTPD: there `dups` gives the user three copies, and the address loop refuses the whole
recipient with 524 once it reaches depth 10. Here: one copy, and the loop's other member gets the mail."""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path

from daemon import free_port
from helpers_delivery import Daemon, maildir_count, make_mail_root, open_temp_dir, system_user


def test_duplicates_through_addresses_and_case_make_one_copy_and_address_loops_end() -> None:
    with open_temp_dir("pysmtpd-dedup-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pdu") as bob, system_user(homes, "pdv") as carol:
            b, c = bob.pw_name, carol.pw_name
            aliases = Path(top) / "aliases"
            aliases.write_text(f"dups: {b}, {b}@local.test, {b.upper()}@LOCAL.TEST, {b.upper()}\n"
                               f"la: lb@local.test\nlb: la@local.test, {c}\n")
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      f"table aliases file:{aliases}\n"
                      'action "local" maildir alias <aliases>\n'
                      'match from any for domain "local.test" action "local"\n')
            daemon = Daemon(top, config, mail_root).start()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("client.test")
                    assert client.sendmail("s@client.test", ["dups@local.test"], b"Subject: d\r\n\r\nbody\r\n") == {}
                    assert client.sendmail("s@client.test", ["la@local.test"], b"Subject: l\r\n\r\nbody\r\n") == {}
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (maildir_count(Path(bob.pw_dir) / "Maildir") < 1
                                                       or maildir_count(Path(carol.pw_dir) / "Maildir") < 1):
                    time.sleep(0.1)
                time.sleep(1.0)  # no second copy arrives
                assert maildir_count(Path(bob.pw_dir) / "Maildir") == 1
                assert maildir_count(Path(carol.pw_dir) / "Maildir") == 1
            finally:
                daemon.stop()
