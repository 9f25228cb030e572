"""`passwd:` tables against the real daemon: AUTH PLAIN under STARTTLS, userbase delivery into a virtual
user's Maildir with the table's uid and gid, `smtpctl update table` and reload after editing the file, and a
broken file at start and at reload."""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_delivery import open_temp_dir
from helpers_smtp import SmtpDaemon, make_certificate
from waiting import wait_until

from shared.passwords import hash_password

# Virtual users: ids that no system account has (as a Dovecot `vmail` setup uses).
VUID, VGID = 45901, 45902
THEIR_PW, OUR_PW = "their secret", "our secret"

CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
table users passwd:{dir}/passwd
listen on 127.0.0.1 port {port} tls pki mx.test.example auth-optional <users>
action "virtual" maildir userbase <users>
match from any for domain "virtual.test" action "virtual"
"""


def opensmtpd_hash(password: str) -> str:
    """A hash made by OpenSMTPD's own `smtpctl encrypt` (works offline, without its daemon)."""
    return subprocess.run(["/usr/sbin/smtpctl", "encrypt", password], capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def auth_plain(port: int, user: str, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.starttls(context=insecure_context())
        client.ehlo("client.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {token}")


@pytest.fixture()
def world() -> Iterator[Path]:
    """A folder others may traverse (the delivery runs as the virtual user), with certificates and homes."""
    with open_temp_dir("pysmtpd-passwd-") as top:
        folder = Path(top)
        make_certificate(folder, "mx.test.example")
        (folder / "vmail").mkdir(mode=0o755)
        yield folder


def passwd_lines(folder: Path, **extra: str) -> str:
    lines = [
        "# virtual users, shared with Dovecot (passwd-file)",
        f"alice:{opensmtpd_hash(THEIR_PW)}:{VUID}:{VGID}::{folder}/vmail/alice::userdb_quota_rule=*:storage=1G",
        f"bob:{hash_password(OUR_PW, rounds=4)}:{VUID}:{VGID}:Bob:{folder}/vmail/bob:/sbin/nologin",
        f"mailonly::{VUID}:{VGID}::{folder}/vmail/mailonly:",
        *extra.values(),
    ]
    return "\n".join(lines) + "\n"


def make_home(folder: Path, user: str) -> Path:
    home = folder / "vmail" / user
    home.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(home, VUID, VGID)
    return home


def test_auth_plain_with_opensmtpd_and_our_hashes(world: Path) -> None:
    (world / "passwd").write_text(passwd_lines(world))
    with SmtpDaemon(world, CONFIG) as daemon:
        assert auth_plain(daemon.port, "alice", THEIR_PW)[0] == 235
        assert auth_plain(daemon.port, "Bob", OUR_PW)[0] == 235  # user names are not case-sensitive
        assert auth_plain(daemon.port, "bob", THEIR_PW) == (535, b"Authentication failed")
        assert auth_plain(daemon.port, "mailonly", "")[0] == 535  # no password in the file: cannot log in
        assert auth_plain(daemon.port, "nobody-here", OUR_PW)[0] == 535
    log = daemon.log()
    assert "smtp authentication user=alice result=ok" in log
    assert "smtp authentication user=bob result=permfail" in log
    assert THEIR_PW not in log and OUR_PW not in log


def test_userbase_delivers_into_the_virtual_users_maildir_with_the_tables_ids(world: Path) -> None:
    (world / "passwd").write_text(passwd_lines(world))
    home = make_home(world, "bob")
    with SmtpDaemon(world, CONFIG, paused=()) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("sender@client.test", ["bob@virtual.test"],
                                   b"Subject: hello\r\n\r\nfor a virtual user\r\n") == {}
            assert client.docmd("MAIL", "FROM:<sender@client.test>")[0] == 250
            code, text = client.docmd("RCPT", "TO:<stranger@virtual.test>")  # not in the table
            assert code == 550, text
        new = home / "Maildir" / "new"
        delivered = wait_until(lambda: list(new.iterdir()) if new.is_dir() else [], 30,
                               explain=lambda: daemon.log())
    assert len(delivered) == 1
    text = delivered[0].read_text()
    assert "Delivered-To: bob@virtual.test\n" in text and text.endswith("for a virtual user\n")
    if os.geteuid() == 0:  # as root the delivery switches to the table's uid and gid
        info = delivered[0].stat()
        assert (info.st_uid, info.st_gid) == (VUID, VGID)
        assert ((home / "Maildir").stat().st_uid, (home / "Maildir").stat().st_gid) == (VUID, VGID)


def test_update_table_and_reload_read_the_edited_file_and_a_broken_one_keeps_the_old(world: Path) -> None:
    users = world / "passwd"
    users.write_text(passwd_lines(world))
    with SmtpDaemon(world, CONFIG) as daemon:
        assert auth_plain(daemon.port, "carol", "new pw")[0] == 535
        users.write_text(passwd_lines(world, carol=f"carol:{hash_password('new pw', rounds=4)}:1:1::/h:"))
        result = daemon.smtpctl("update", "table", "users")
        assert result.returncode == 0, result.stderr
        assert auth_plain(daemon.port, "carol", "new pw")[0] == 235

        # A broken line: the update fails naming FILE:LINE, and the table in use stays as it was.
        good = users.read_text()
        users.write_text(good + "dave:HASH:1:1\n")
        result = daemon.smtpctl("update", "table", "users")
        assert result.returncode != 0
        assert f"{users}:6: invalid passwd entry: 4 fields, at least 6 needed" in result.stderr, result.stderr
        assert auth_plain(daemon.port, "carol", "new pw")[0] == 235

        # A configuration reload reads tables again: refused while the file is broken, then taken.
        result = daemon.smtpctl("reload")
        assert result.returncode != 0
        assert f"{users}:6: invalid passwd entry" in result.stderr, result.stderr
        assert f"{daemon.config_path}:4: invalid configuration file {users} for table users" in result.stderr
        assert auth_plain(daemon.port, "carol", "new pw")[0] == 235
        users.write_text(good.replace("carol:", "carla:"))
        result = daemon.smtpctl("reload")
        assert result.returncode == 0, result.stderr
        assert auth_plain(daemon.port, "carol", "new pw")[0] == 535
        assert auth_plain(daemon.port, "carla", "new pw")[0] == 235


def test_a_broken_file_stops_the_start_with_file_and_line(world: Path) -> None:
    users = world / "passwd"
    users.write_text(passwd_lines(world) + ":nobody:1:1::/h:\n")
    daemon = SmtpDaemon(world, CONFIG)
    with pytest.raises(RuntimeError, match="smtpd exited at start"):
        daemon.start()
    log = daemon.log()
    assert f"{users}:5: invalid passwd entry: empty user name" in log, log
    assert f"{daemon.config_path}:4: invalid configuration file {users} for table users" in log, log
