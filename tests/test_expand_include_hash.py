"""A `#` inside a member of an `:include:` list is part of the address, not a comment (the real daemon).

`joe#1@partner.example` is a valid address (§6.1 allows `#` in the user part). Cut at the `#`, the member was
the local user `joe`, and mail for the partner went into a local mailbox. Checked against the real OpenSMTPD
6.8: it relays `user#x@remote.test` from an include file as it is. A `#` at the start of a line or after
whitespace still starts a comment.
"""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path

from daemon import free_port
from helpers_delivery import Daemon, maildir_count, make_mail_root, open_temp_dir, system_user
from helpers_mta import Remote


def test_hash_inside_an_include_member_is_data_and_the_member_is_relayed() -> None:
    with open_temp_dir("pysmtpd-inchash-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pih") as joe, system_user(homes, "pik") as kim, Remote() as remote:
            members = Path(top) / "members"
            members.write_text(f"# the list\n{joe.pw_name}#1@remote.test\n{kim.pw_name} # kim, local\n")
            aliases = Path(top) / "aliases"
            aliases.write_text(f"list: :include:{members}\n")
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      f"table aliases file:{aliases}\n"
                      'action "local" maildir alias <aliases>\n'
                      f'action "out" relay host smtp://127.0.0.1:{remote.port}\n'
                      'match from any for domain "local.test" action "local"\n'
                      'match from any for domain "remote.test" action "out"\n')
            daemon = Daemon(top, config, mail_root).start()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("client.test")
                    assert client.sendmail("s@client.test", ["list@local.test"], b"Subject: l\r\n\r\nbody\r\n") == {}
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (not remote.received or maildir_count(Path(kim.pw_dir) / "Maildir") < 1):
                    time.sleep(0.1)
                time.sleep(0.5)
                assert [r.rcpt_tos for r in remote.received] == [[f"{joe.pw_name}#1@remote.test"]]
                assert maildir_count(Path(joe.pw_dir) / "Maildir") == 0  # not the local user of the same name
                assert maildir_count(Path(kim.pw_dir) / "Maildir") == 1  # a comment after whitespace is still one
            finally:
                daemon.stop()
