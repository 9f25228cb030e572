"""`:include:` files are read by the daemon as root at RCPT time: what a local user who can write on an include
file's path (a list kept in a home) may and may not make the daemon do. The real daemon over a real socket."""

from __future__ import annotations

import os
import smtplib
import socket
from pathlib import Path

import pytest
from daemon import free_port
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-include-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pia") as alice, system_user(homes, "pib") as bob:
            yield Path(top), mail_root, alice, bob


def _start(top: Path, mail_root: str, include: Path) -> tuple[Daemon, int]:
    port = free_port()
    aliases = top / "aliases"
    aliases.write_text(f"mlist: :include:{include}\n")
    config = (f"listen on 127.0.0.1 port {port}\n"
              f"table aliases file:{aliases}\n"
              'action "local" mbox alias <aliases>\n'
              'match from any for domain "mbox.test" action "local"\n')
    return Daemon(str(top), config, mail_root).start(), port


def _greeted(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
        return probe.recv(100)


def test_an_include_file_made_a_fifo_does_not_hang_the_daemon(world) -> None:
    top, mail_root, alice, bob = world
    include = Path(alice.pw_dir) / "list.txt"
    include.write_text(f"{bob.pw_name}\n")
    daemon, port = _start(top, mail_root, include)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            assert client.rcpt("mlist@mbox.test")[0] == 250  # a regular file is read as before
        include.unlink()
        os.mkfifo(include)
        os.chown(include, alice.pw_uid, alice.pw_gid)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:  # (a hung daemon: the timeout fails the test)
            client.ehlo("client.test")
            client.mail("sender@client.test")
            code, _ = client.rcpt("mlist@mbox.test")
            # The FIFO is not read: the alias expands to no one (524), and the answer comes at once.
            assert code == 524
            assert _greeted(port).startswith(b"220 ")
        assert "list.txt: not a regular file" in daemon.log()
    finally:
        daemon.stop()


def test_an_include_file_reached_through_a_users_symlink_to_a_file_of_someone_else_is_not_read(world) -> None:
    """alice keeps the list; she makes it a symbolic link to a file of bob's she cannot read herself. The
    daemon reads includes as root: it must not route mail by the lines of bob's file. A symbolic link of her
    own to a file of her own, or root's to anything, is followed as before."""
    top, mail_root, alice, bob = world
    secret = Path(bob.pw_dir) / "private"
    secret.write_text(f"{alice.pw_name}\n")
    os.chown(secret, bob.pw_uid, bob.pw_gid)
    secret.chmod(0o600)
    include = Path(alice.pw_dir) / "list.txt"
    include.symlink_to(secret)
    os.lchown(include, alice.pw_uid, alice.pw_gid)
    daemon, port = _start(top, mail_root, include)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            assert client.rcpt("mlist@mbox.test")[0] == 524  # nothing read: the alias expands to no one
        assert "list.txt: a symbolic link on its path belongs to neither root nor the file's owner" in daemon.log()
        own = Path(alice.pw_dir) / "own.txt"
        own.write_text(f"{bob.pw_name}\n")
        os.chown(own, alice.pw_uid, alice.pw_gid)
        include.unlink()
        include.symlink_to(own)
        os.lchown(include, alice.pw_uid, alice.pw_gid)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            assert client.rcpt("mlist@mbox.test")[0] == 250
    finally:
        daemon.stop()


def test_an_include_with_a_relative_path_is_an_invalid_alias_not_a_file_beside_the_daemon(world) -> None:
    """`:include:lists.txt` is an invalid item in OpenSMTPD (its makemap: `invalid entry`), so the alias fails
    for now (424). It was read, as root, relative to the folder the daemon was started from."""
    top, mail_root, alice, bob = world
    (top / "lists.txt").write_text(f"{bob.pw_name}\n")  # the daemon under test runs in top
    daemon, port = _start(top, mail_root, Path("lists.txt"))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            assert client.rcpt("mlist@mbox.test") == (424, b"4.2.4 Mailing list expansion problem: <mlist@mbox.test>")
    finally:
        daemon.stop()


def _rcpt(port: int, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        return client.rcpt(rcpt)


def test_a_large_include_file_is_read_whole_and_one_too_large_is_refused_never_cut(world) -> None:
    """A list of more than 1 MiB (some 30,000 members) was cut at 1 MiB: its last members got nothing, and the
    line across the cut became another recipient ("bob-archive@lists.remote.test" read as the local user bob).
    Now a list is read whole up to MAX_INCLUDE_SIZE, and a larger one fails for now (424), logged, never cut."""
    from smtpd.lookup.expand import MAX_INCLUDE_SIZE

    top, mail_root, alice, bob = world
    include = top / "list.txt"
    # A comment, so that the old 1 MiB cut fell just after "<bob>" in the next line.
    padding = "#" + "x" * ((1 << 20) - len(bob.pw_name) - 2) + "\n"
    include.write_text(padding + f"{bob.pw_name}-archive@lists.remote.test\n{alice.pw_name}\n")
    daemon, port = _start(top, mail_root, include)
    try:
        # Read whole: bob-archive@lists.remote.test is a remote address that no rule accepts (550 for the
        # whole alias); cut at 1 MiB, it was the local user bob, and alice, the last member, was dropped.
        assert _rcpt(port, "mlist@mbox.test")[0] == 550
        include.write_text(padding + f"{alice.pw_name}\n{bob.pw_name}\n")
        assert _rcpt(port, "mlist@mbox.test")[0] == 250
        with include.open("a") as grown:
            grown.write("#" + "y" * MAX_INCLUDE_SIZE + "\n")
        code, text = _rcpt(port, "mlist@mbox.test")
        assert (code, text) == (424, b"4.2.4 Mailing list expansion problem: <mlist@mbox.test>")
        assert f"include file {include}: larger than {MAX_INCLUDE_SIZE} bytes, not read" in daemon.log()
    finally:
        daemon.stop()
