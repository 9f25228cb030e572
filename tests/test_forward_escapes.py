"""Backslashes in expansion values, through the real daemon: `\\user` in a .forward keeps a copy in the user's own
mailbox (the sendmail idiom), and an escaped quote inside a quoted `|command` reaches the shell as a quote."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

from daemon import free_port
from helpers_delivery import Daemon, maildir_count, make_mail_root, open_temp_dir, system_user
from waiting import wait_until


def test_backslash_user_and_escaped_quotes_in_forward() -> None:
    with open_temp_dir("pysmtpd-fwdesc-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pfa") as alice, system_user(homes, "pfb") as bob:
            marker = Path(alice.pw_dir) / "piped"
            forward = Path(alice.pw_dir) / ".forward"
            # A copy for alice herself (\alice), one for bob, and a command whose argument is quoted with \".
            forward.write_text(f"\\{alice.pw_name}, {bob.pw_name}\n"
                               f'"|/bin/sh -c \\"cat > {marker}\\""\n')
            os.chown(forward, alice.pw_uid, alice.pw_gid)
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      'action "md" maildir\n'
                      'match from any for domain "fwd.test" action "md"\n')
            daemon = Daemon(top, config, mail_root, extra_args=("-T", "expand")).start()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("client.test")
                    refused = client.sendmail("s@client.test", [f"{alice.pw_name}@fwd.test"],
                                              b"Subject: escapes\r\n\r\nbody\r\n")
                    assert refused == {}
                wait_until(lambda: maildir_count(Path(alice.pw_dir) / "Maildir") == 1)
                wait_until(lambda: maildir_count(Path(bob.pw_dir) / "Maildir") == 1)
                wait_until(lambda: marker.exists() and "Subject: escapes" in marker.read_text())
                assert marker.stat().st_uid == alice.pw_uid
                assert "lka_expand: same user, submitting" in daemon.log()
            finally:
                daemon.stop()


def test_procmail_forward_line_with_a_hash_inside_its_quotes_is_delivered() -> None:
    # procmail's documented .forward line ends its quoted command with `#user`: a comment there would cut the line
    # inside its quotes, and every RCPT to the user was refused (424) for a .forward that could not be parsed.
    with open_temp_dir("pysmtpd-fwdhash-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pfh") as alice:
            marker = Path(alice.pw_dir) / "piped"
            forward = Path(alice.pw_dir) / ".forward"
            forward.write_text(f"# procmail, as its FAQ says\n"
                               f"\"|IFS=' ' && exec /bin/sh -c 'cat > {marker}' || exit 75 #{alice.pw_name}\"\n")
            os.chown(forward, alice.pw_uid, alice.pw_gid)
            port = free_port()
            config = (f"listen on 127.0.0.1 port {port}\n"
                      'action "md" maildir\n'
                      'match from any for domain "fwd.test" action "md"\n')
            daemon = Daemon(top, config, mail_root).start()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("client.test")
                    refused = client.sendmail("s@client.test", [f"{alice.pw_name}@fwd.test"],
                                              b"Subject: hashed\r\n\r\nbody\r\n")
                    assert refused == {}
                wait_until(lambda: marker.exists() and "Subject: hashed" in marker.read_text())
                assert marker.stat().st_uid == alice.pw_uid
                assert maildir_count(Path(alice.pw_dir) / "Maildir") == 0
            finally:
                daemon.stop()
