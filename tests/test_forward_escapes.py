"""Backslashes in expansion values, through the real daemon: `\\user` in a .forward keeps a copy in the user's own
mailbox (the sendmail idiom), and an escaped quote inside a quoted `|command` reaches the shell as a quote."""

from __future__ import annotations

import contextlib
import os
import smtplib
from collections.abc import Iterator
from pathlib import Path

from daemon import free_port
from helpers_delivery import Daemon, maildir_count, make_mail_root, open_temp_dir, system_user
from waiting import wait_until


@contextlib.contextmanager
def forwarding_world(prefix: str, *user_prefixes: str) -> Iterator[tuple[str, str, list]]:
    """A temp folder with a mail root and real system users homed in it: (folder, mail root, users)."""
    with open_temp_dir(f"pysmtpd-{prefix}-") as top, contextlib.ExitStack() as users:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        yield top, mail_root, [users.enter_context(system_user(homes, name)) for name in user_prefixes]


def write_forward(user, text: str) -> None:  # noqa: ANN001
    forward = Path(user.pw_dir) / ".forward"
    forward.write_text(text)
    os.chown(forward, user.pw_uid, user.pw_gid)


def maildir_daemon(top: str, mail_root: str, *args: str) -> tuple[Daemon, int]:
    """A daemon (not started) delivering fwd.test to Maildirs, and its port."""
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              'action "md" maildir\n'
              'match from any for domain "fwd.test" action "md"\n')
    return Daemon(top, config, mail_root, extra_args=args), port


def send(port: int, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.sendmail("s@client.test", [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n".encode()) == {}


def test_backslash_user_and_escaped_quotes_in_forward() -> None:
    with forwarding_world("fwdesc", "pfa", "pfb") as (top, mail_root, (alice, bob)):
        marker = Path(alice.pw_dir) / "piped"
        # A copy for alice herself (\alice), one for bob, and a command whose argument is quoted with \".
        write_forward(alice, f"\\{alice.pw_name}, {bob.pw_name}\n"
                             f'"|/bin/sh -c \\"cat > {marker}\\""\n')
        daemon, port = maildir_daemon(top, mail_root, "-T", "expand")
        daemon.start()
        try:
            send(port, f"{alice.pw_name}@fwd.test", "escapes")
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
    with forwarding_world("fwdhash", "pfh") as (top, mail_root, (alice,)):
        marker = Path(alice.pw_dir) / "piped"
        write_forward(alice, f"# procmail, as its FAQ says\n"
                             f"\"|IFS=' ' && exec /bin/sh -c 'cat > {marker}' || exit 75 #{alice.pw_name}\"\n")
        daemon, port = maildir_daemon(top, mail_root)
        daemon.start()
        try:
            send(port, f"{alice.pw_name}@fwd.test", "hashed")
            wait_until(lambda: marker.exists() and "Subject: hashed" in marker.read_text())
            assert marker.stat().st_uid == alice.pw_uid
            assert maildir_count(Path(alice.pw_dir) / "Maildir") == 0
        finally:
            daemon.stop()
