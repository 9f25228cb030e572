"""SMTP in, local delivery out: the real daemon over a real socket, aliases, .forward, mbox and Maildir."""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path

import pytest
from daemon import free_port
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, running, system_user


def wait_for(predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for delivery")


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-e2e-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pea") as alice, system_user(homes, "peb") as bob:
            yield Path(top), mail_root, alice, bob


def test_smtp_to_mbox_maildir_aliases_and_forward(world) -> None:
    top, mail_root, alice, bob = world
    archive = top / "archive"
    archive.mkdir()
    os.chmod(archive, 0o777)
    forward = Path(bob.pw_dir) / ".forward"
    forward.write_text(f"{bob.pw_name}, {alice.pw_name}\n")
    os.chown(forward, bob.pw_uid, bob.pw_gid)
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              f'table aliases {{ staff = "{alice.pw_name}, {archive}/log", gone = "error:550 5.1.6 moved away" }}\n'
              'action "local" mbox alias <aliases>\n'
              'action "md" maildir "~/Maildir"\n'
              'match from any for domain "mbox.test" action "local"\n'
              'match from any for domain "maildir.test" action "md"\n')
    daemon = Daemon(str(top), config, mail_root, extra_args=("-T", "expand")).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            refused = client.sendmail("sender@client.test", ["staff@mbox.test", f"{bob.pw_name}@maildir.test",
                                                             f"{bob.pw_name}@mbox.test"],
                                      b"Subject: hello\r\n\r\nFrom me\r\nbody\r\n")
            assert refused == {}
            code, text = client.rcpt("gone@mbox.test") if client.mail("s@client.test")[0] == 250 else (0, b"")
            assert (code, text) == (550, b"5.1.6 moved away: <gone@mbox.test>")
            code, _ = client.rcpt("nosuchuser@mbox.test")
            assert code == 550
            client.rset()
        alice_box = os.path.join(mail_root, alice.pw_name)
        # staff -> alice (mbox) and the archive file; bob's .forward -> bob and alice: alice gets two copies.
        content = wait_for(lambda: open(alice_box).read().count("Subject: hello") == 2 and open(alice_box).read()
                           if os.path.exists(alice_box) else None)
        assert "\n>From me\n" in content
        assert os.stat(alice_box).st_uid == alice.pw_uid
        bob_box = os.path.join(mail_root, bob.pw_name)
        wait_for(lambda: os.path.exists(bob_box) and "Subject: hello" in open(bob_box).read())
        new = Path(bob.pw_dir) / "Maildir" / "new"
        [name] = wait_for(lambda: os.listdir(new) if new.exists() and os.listdir(new) else None)
        assert "\nFrom me\n" in (new / name).read_text()
        assert os.stat(new / name).st_uid == bob.pw_uid
        log_file = archive / "log"
        wait_for(lambda: log_file.exists() and "Subject: hello" in log_file.read_text())
        assert log_file.stat().st_uid == __import__("pwd").getpwnam("opensmtpd").pw_uid
        # (the delivery's log line is written once its result is back, a moment after the mailbox has the mail)
        log = wait_for(lambda: "result=Ok stat=Delivered" in daemon.log() and daemon.log())
        assert "expand: lka_expand: address: staff@mbox.test [depth=0]" in log
        assert f"expand: no .forward for user {alice.pw_name}, just deliver" in log
        assert "mda delivery evpid=" in log
    finally:
        daemon.stop()


def test_percent_brace_in_a_raw_value_or_after_double_percent_is_literal(world) -> None:
    """`%%{` is a literal `%{`, and a sender whose local part holds `%{` (both are atext) is passed as it is by
    `%{sender:raw}`: neither is an unterminated specifier, and the message is delivered, not bounced."""
    top, mail_root, alice, _ = world
    out = top / "argv"
    script = top / "argv.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {out}\ncat > /dev/null\n')
    script.chmod(0o755)
    os.chmod(top, 0o777)  # the script writes its file as alice
    with running(top, mail_root, f'action "cmd" mda "{script} %{{sender:raw}} 100%%{{literal}}"\n'
                                 'match from any for domain "cmd.test" action "cmd"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.docmd("MAIL FROM:<a%{x@client.test>")[0] == 250
            assert client.docmd(f"RCPT TO:<{alice.pw_name}@cmd.test>")[0] == 250
            assert client.data(b"Subject: percent\r\n\r\nbody\r\n")[0] == 250
        argv = wait_for(lambda: out.exists() and out.read_text())
        assert argv.splitlines() == ["a%{x@client.test", "100%{literal}"]


def test_relative_maildir_path_is_under_the_home(world) -> None:
    """`maildir "Mail/%{rcpt.user}"`: OpenSMTPD's mail.maildir runs in the home, so the folder is ~/Mail/<user>;
    such a config is valid for both, and its mail must not bounce."""
    top, mail_root, alice, _ = world
    with running(top, mail_root, 'action "md" maildir "Mail/%{rcpt.user}"\n'
                                 'match from any for domain "maildir.test" action "md"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("sender@client.test", [f"{alice.pw_name}@maildir.test"],
                                   b"Subject: relative\r\n\r\nbody\r\n") == {}
        new = Path(alice.pw_dir) / "Mail" / alice.pw_name / "new"
        [name] = wait_for(lambda: os.listdir(new) if new.exists() and os.listdir(new) else None)
        assert "Subject: relative" in (new / name).read_text()
        assert os.stat(new / name).st_uid == alice.pw_uid


def deliver_with_a_hostile_sender(world, command: str, subject: str) -> tuple[Path, str]:  # noqa: ANN001
    """One message to alice through `mda COMMAND` from a raw sender full of shell syntax that is valid in an
    address; the command is to write the sender into sender.txt and the message into message.txt in alice's
    home. Returns (alice's home, message.txt), after checking that the sender arrived as data only."""
    top, mail_root, alice, _ = world
    with running(top, mail_root, f'action "cmd" mda "{command}"\n'
                                 'match from any for domain "cmd.test" action "cmd"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.docmd("MAIL FROM:<x`touch${IFS}pwned`@client.test>")[0] == 250
            assert client.docmd(f"RCPT TO:<{alice.pw_name}@cmd.test>")[0] == 250
            assert client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())[0] == 250
        home = Path(alice.pw_dir)
        text = wait_for(lambda: (home / "message.txt").exists() and (home / "message.txt").read_text())
        assert (home / "sender.txt").read_text() == "x`touch${IFS}pwned`@client.test\n"
        assert not (home / "pwned").exists() and not any(home.glob("*pwned*"))
        assert os.stat(home / "message.txt").st_uid == alice.pw_uid
        return home, text


def test_an_mda_command_line_with_shell_syntax_runs_in_a_shell_without_the_envelope_as_shell_text(world) -> None:
    """`mda "... | ... > file"` (a pipeline and a redirection, as migrated OpenSMTPD configs have: it runs every
    mda command through /bin/sh -c) works; the sender, given raw and full of shell syntax that is valid in an
    address, reaches the commands as an argument only: nothing of it is run. Before, `|` and `>` were passed to
    the first program as arguments and the mail bounced."""
    _, text = deliver_with_a_hostile_sender(
        world, "echo %{sender:raw} > sender.txt; tr a-z A-Z | cat > message.txt", "piped")
    assert "SUBJECT: PIPED" in text and "BODY" in text


def test_an_mda_command_written_as_sh_dash_c_gets_the_envelope_as_arguments_not_as_script_text(world) -> None:
    """`mda "/bin/sh -c '... %{sender:raw} ...'"`: the script is one quoted word, so the line has no shell syntax
    of its own, but the script is shell text all the same: its specifiers are positional parameters of that
    shell. Before, the raw sender was pasted into the script and its backquotes ran as the recipient."""
    _, text = deliver_with_a_hostile_sender(
        world, "/bin/sh -c 'echo %{sender:raw} > sender.txt; cat > message.txt'", "scripted")
    assert "Subject: scripted" in text


def test_a_forward_command_of_a_sub_address_gets_its_extension(world) -> None:
    """`"|procmail -a $EXTENSION"` in bob's .forward, mail to bob+lists@: the command sees EXTENSION=lists, as an
    mda action's command does (and as Postfix gives it to .forward commands). It used to be missing."""
    top, mail_root, alice, _ = world
    home = Path(alice.pw_dir)
    forward = home / ".forward"
    forward.write_text(f'"|echo ext=$EXTENSION local=$LOCAL > {home}/env.txt"\n')
    os.chown(forward, alice.pw_uid, alice.pw_gid)
    with running(top, mail_root, 'action "md" maildir\n'
                                 'match from any for domain "fwd.test" action "md"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("s@client.test", [f"{alice.pw_name}+lists@fwd.test"], b"Subject: x\r\n\r\nb\r\n") == {}
        text = wait_for(lambda: (home / "env.txt").exists() and (home / "env.txt").read_text())
        assert text == f"ext=lists local={alice.pw_name}+lists\n"


def test_a_failing_mda_command_is_logged_with_one_error_wrapper(world) -> None:
    """`mda "/bin/false"`: the delivery line says `stat=Error (exited with status 1)`, the shape of OpenSMTPD
    6.8's `stat=Error (exited abnormally)` (checked against its daemon). It said `Error (Error (exited with
    status 1))`, and log parsers took the inner `Error (` for part of the reason."""
    top, mail_root, alice, _ = world
    with running(top, mail_root, 'action "fail" mda "/bin/false"\n'
                                 'match from any for domain "fail.test" action "fail"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("sender@client.test", [f"{alice.pw_name}@fail.test"], b"Subject: x\r\n\r\nx\r\n")
        line = wait_for(lambda: next((text for text in daemon.log().splitlines() if "mda delivery" in text), None))
        assert line.endswith("result=PermFail stat=Error (exited with status 1)"), line


def _opened_by_some_process(path: str) -> bool:
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(link) == path for link in fd_dir.iterdir()):
                return True
        except OSError:
            continue
    return False


def test_a_spool_mbox_that_is_a_symbolic_link_keeps_the_mail_queued(world) -> None:
    """`/var/mail/<user>` made a symbolic link (to a file in the home, say): never followed, and the mail waits in
    the queue for the administrator to fix the spool, as with OpenSMTPD, whose mail.local refuses a `linked or
    special file` with EX_OSERR (temporary). It used to be a permanent failure: the mail bounced."""
    top, mail_root, alice, _ = world
    target = Path(alice.pw_dir) / "mbox"
    target.touch()
    os.chown(target, alice.pw_uid, alice.pw_gid)
    os.symlink(target, os.path.join(mail_root, alice.pw_name))
    with running(top, mail_root, 'action "local" mbox\n'
                                 'match from any for domain "mbox.test" action "local"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("sender@client.test", [f"{alice.pw_name}@mbox.test"],
                                   b"Subject: link\r\n\r\nbody\r\n") == {}
        [line] = wait_for(lambda: [line for line in daemon.log().splitlines() if "mda delivery" in line])
        assert "result=TempFail" in line and "is a symbolic link" in line
        assert target.read_text() == ""
        assert "symbolic link" in daemon.smtpctl("show", "queue").stdout
        assert "Delivery status notification" not in daemon.log()


def test_file_targets_are_opened_as_their_writer_like_mail_mboxfile(world) -> None:
    """`/file` items run with the writer's own rights (the unprivileged user for aliases), as OpenSMTPD's
    mail.mboxfile: `/dev/null` (the usual discard alias) takes the message, and a symbolic link or a file with
    two links is written through. They used to be refused (`not a regular file`: the mail waited in the queue
    until it bounced; a symlink bounced at once). A FIFO is still refused, for now, without hanging."""
    top, mail_root, _, _ = world
    files = top / "files"
    files.mkdir()
    os.chmod(files, 0o777)
    (files / "2026.mbox").touch()
    os.chmod(files / "2026.mbox", 0o666)
    os.symlink(files / "2026.mbox", files / "current")
    (files / "audit").touch()
    os.chmod(files / "audit", 0o666)
    os.link(files / "audit", files / "audit.hardlink")
    os.mkfifo(files / "pipe")
    os.chmod(files / "pipe", 0o666)
    with running(top, mail_root, f'table aliases {{ devnull = "/dev/null", archive = "{files}/current", '
                                 f'audit = "{files}/audit.hardlink", fifo = "{files}/pipe" }}\n'
                                 'action "local" mbox alias <aliases>\n'
                                 'match from any for domain "mbox.test" action "local"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("sender@client.test", ["devnull@mbox.test", "archive@mbox.test",
                                                         "audit@mbox.test", "fifo@mbox.test"],
                                   b"Subject: files\r\n\r\nbody\r\n") == {}
        lines = wait_for(lambda: len(found := [line for line in daemon.log().splitlines()
                                               if "mda delivery" in line]) == 4 and found)
        results = {line.split(" to=<")[1].split("@")[0]: line.split(" result=")[1] for line in lines}
        assert results["devnull"] == "Ok stat=Delivered"
        assert results["archive"] == "Ok stat=Delivered"
        assert results["audit"] == "Ok stat=Delivered"
        assert results["fifo"].startswith("TempFail stat=Error (") and "not a regular file" in results["fifo"]
        assert "Subject: files" in (files / "2026.mbox").read_text()
        assert os.path.islink(files / "current")
        assert "Subject: files" in (files / "audit").read_text()


def test_a_mbox_removed_by_the_lock_holder_gets_the_mail_in_its_new_file(world) -> None:
    """A reader holding the dotlock removes the spool mbox it emptied (BSD mail(1) without `keep`), then
    unlocks, while our delivery waits for the lock with the old file open: the mail goes to the mailbox the path
    names now (created afresh), never into the removed file. It used to be written there: logged Delivered, and
    lost."""
    top, mail_root, alice, _ = world
    box = os.path.join(mail_root, alice.pw_name)
    with open(box, "w") as handle:
        handle.write("From old@client.test Mon Jan  1 00:00:00 2024\nSubject: old\n\nold\n\n")
    os.chown(box, alice.pw_uid, alice.pw_gid)
    os.chmod(box, 0o600)
    lock = box + ".lock"
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # the reader's dotlock
    with running(top, mail_root, 'action "local" mbox\n'
                                 'match from any for domain "mbox.test" action "local"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.sendmail("sender@client.test", [f"{alice.pw_name}@mbox.test"],
                                   b"Subject: new mail\r\n\r\nbody\r\n") == {}
        wait_for(lambda: _opened_by_some_process(box))  # the delivery has the mbox open, waiting for the lock
        os.unlink(box)
        os.unlink(lock)

        def delivered() -> bool:
            daemon.smtpctl("schedule", "all")  # a temporary failure is tried again at once
            return os.path.exists(box) and "Subject: new mail" in open(box).read()

        wait_for(delivered)
        assert os.stat(box).st_uid == alice.pw_uid
