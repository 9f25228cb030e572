"""One user reached under two actions in one expansion gets one delivery per action (the real daemon): an alias
`both: user, user@archive.test` fills the user's Maildir (action "local") and ~/Archive (action "archive").
Duplicates under one action still make one delivery."""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path

from daemon import free_port
from helpers_delivery import Daemon, maildir_count, make_mail_root, open_temp_dir, system_user


def test_same_user_under_two_actions_gets_both_deliveries() -> None:
    with open_temp_dir("pysmtpd-twoact-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pta") as user:
            name = user.pw_name
            aliases = Path(top) / "aliases"
            aliases.write_text(f"both: {name}, {name}@archive.test, {name}\n")
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      f"table aliases file:{aliases}\n"
                      'action "local" maildir alias <aliases>\n'
                      'action "archive" maildir "~/Archive"\n'
                      'match from any for domain "local.test" action "local"\n'
                      'match from any for domain "archive.test" action "archive"\n')
            daemon = Daemon(top, config, mail_root, extra_args=("-T", "expand")).start()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("client.test")
                    assert client.sendmail("s@client.test", ["both@local.test"], b"Subject: two\r\n\r\nbody\r\n") == {}
                home = Path(user.pw_dir)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (maildir_count(home / "Maildir") < 1 or maildir_count(home / "Archive") < 1):
                    time.sleep(0.1)
                time.sleep(0.5)  # nothing more arrives: the repeated name under "local" stays one delivery
                assert (maildir_count(home / "Maildir"), maildir_count(home / "Archive")) == (1, 1)
            finally:
                daemon.stop()
