"""The sendmail personality against the real daemon: `echo hi | sendmail root` ends in root's mailbox."""

from __future__ import annotations

import email.utils
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user
from waiting import wait_until

from smtpctl.commands.sendmail import complete_message, parse_arguments, parse_message, qualify

ROOT = Path(__file__).resolve().parent.parent
SENDMAIL = str(ROOT / ".venv" / "bin" / "sendmail")
CONFIG = (
    'table aliases { postmaster = "root", staff = "root, {user}" }\n'
    'action "local" mbox alias <aliases>\n'
    'match from local for local action "local"\n'
)


def run_sendmail(daemon_env: dict[str, str], args: list[str], text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SENDMAIL, *args], input=text, capture_output=True, text=True, timeout=60,
                          env=daemon_env, cwd="/")


def wait_for_mail(path: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            content = open(path).read()
        except FileNotFoundError:
            content = ""
        if content.count("\nDelivered-To: ") + content.startswith("Delivered-To: ") >= count:
            return content
        time.sleep(0.1)
    raise AssertionError(f"no mail in {path} after {timeout}s: {content!r}")


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-sendmail-") as top:
        workdir = Path(top)
        homes = workdir / "homes"
        homes.mkdir(mode=0o755)
        mail_root = make_mail_root(top)
        with system_user(str(homes), "psm") as user:
            yield workdir, mail_root, user


def make_daemon(workdir: Path, mail_root: str, user) -> Daemon:
    return Daemon(str(workdir), CONFIG.replace("{user}", user.pw_name), mail_root, mailname="mx.control.test")


def start_daemon(workdir: Path, mail_root: str, user) -> Daemon:
    return make_daemon(workdir, mail_root, user).start()


def test_echo_hi_sendmail_root_reaches_roots_mailbox(world) -> None:
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["root"], "hi\n")
        assert result.returncode == 0, (result.stderr, daemon.log())
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith("From root@mx.control.test ")
        assert "\nDelivered-To: root@mx.control.test\n" in content
        name = pwd.getpwuid(0).pw_gecos.split(",")[0]  # root's full name goes with the From: header added
        assert f"\nFrom: {name + ' ' if name else ''}<root@mx.control.test>\n" in content and "\nDate: " in content
        assert content.endswith("\nhi\n\n")
    finally:
        daemon.stop()


def test_sendmail_t_aliases_and_headers(world) -> None:
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        message = ("From somewhere Mon Jan  1 00:00:00 2024\nReturn-Path: <old@x>\nTo: staff\n"
                   "Bcc: postmaster@mx.control.test,\n  {user}@mx.control.test\nSubject: cron output\n\n"
                   ".leading dot\nbody\n").replace("{user}", user.pw_name)
        result = run_sendmail(daemon.env, ["-t", "-F", "Cron Daemon", "-f", "cron"], message)
        assert result.returncode == 0, (result.stderr, daemon.log())
        for mailbox in ("root", user.pw_name):
            content = wait_for_mail(os.path.join(mail_root, mailbox))
            assert "Subject: cron output" in content
            assert "From: Cron Daemon <cron@mx.control.test>" in content
            assert "Bcc" not in content and "old@x" not in content
            assert "\n.leading dot\nbody\n" in content
        assert os.stat(os.path.join(mail_root, user.pw_name)).st_uid == user.pw_uid
    finally:
        daemon.stop()


def test_t_sends_to_the_bcc_recipients_without_showing_them(world) -> None:
    """`sendmail -t` takes the recipients of To, Cc **and** Bcc (enqueue.c), and the Bcc: lines go. Before, the
    Bcc: lines were dropped before the recipients were read, so blind copies were never sent."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        message = (f"To: root\nBcc: Hidden One <{user.pw_name}@mx.control.test>,\n  postmaster\n"
                   "Subject: blind copies\n\nbody\n")
        result = run_sendmail(daemon.env, ["-t", "-f", "cron"], message)
        assert result.returncode == 0, (result.stderr, daemon.log())
        blind = wait_for_mail(os.path.join(mail_root, user.pw_name))
        assert f"\nDelivered-To: {user.pw_name}@mx.control.test\n" in blind
        mine = wait_for_mail(os.path.join(mail_root, "root"), count=2)  # root's own, and postmaster's
        assert "\nDelivered-To: postmaster@mx.control.test\n" in mine
        for content in (blind, mine):
            assert "Subject: blind copies" in content and "Bcc" not in content and "Hidden One" not in content
    finally:
        daemon.stop()


def test_verbose_prints_the_dialogue_on_standard_output(world) -> None:
    """`sendmail -v`: the SMTP dialogue goes to standard output, as OpenSMTPD's (and Sendmail's), so that `>log`
    keeps it. It went to standard error, with the message shown as `>>> [message]` where 6.8 shows its end."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["-v", "root"], "Subject: verbose\n\nbody\n")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        lines = result.stdout.splitlines()
        assert lines[0].startswith("<<< 220 ") and ">>> MAIL FROM:<root@mx.control.test>" in lines
        assert lines[lines.index(">>> DATA") + 2] == ">>> ." and lines[-1].startswith("<<< 221 ")
        assert "\nbody\n" in wait_for_mail(os.path.join(mail_root, "root"))
    finally:
        daemon.stop()


def test_a_recipient_named_twice_gets_one_copy_and_dsn_options_are_taken(world) -> None:
    """`sendmail -t root` of a message `To: root`: one copy (OpenSMTPD 6.8's sendmail says RCPT TO twice, and its
    daemon delivers two). `-N`, `-R`, `-V` go with MAIL FROM and RCPT TO, and our daemon takes them (6.8's
    offers no DSN on local submissions and refuses what its sendmail sends for them)."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["-t", "-N", "NEVER", "-R", "HDRS", "-V", "job-1", "root"],
                              "To: root\nSubject: twice\n\nbody\n")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        wait_until(lambda: " mda delivery " in daemon.log(), explain=daemon.log)
        time.sleep(1)  # (a second copy would be delivered by now)
        assert open(os.path.join(mail_root, "root")).read().count("\nSubject: twice\n") == 1
        assert daemon.log().count(" smtp envelope ") == 1
    finally:
        daemon.stop()


def test_root_in_another_users_login_session_sends_as_root(world) -> None:
    """A root shell opened from the user's login session (`sudo -i`): the sender is root, the account sendmail
    runs as. OpenSMTPD 6.8's asks getlogin(3), which reads the session's /proc/self/loginuid, and sends as the
    user (docs/delivery.md)."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = subprocess.run(["sh", "-c", 'echo "$0" >/proc/self/loginuid && exec "$@"', str(user.pw_uid),
                                 SENDMAIL, "root"], input="Subject: from sudo\n\nbody\n", capture_output=True,
                                text=True, timeout=60, env=daemon.env, cwd="/")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith("From root@mx.control.test ") and "\nSubject: from sudo\n" in content
    finally:
        daemon.stop()


def test_an_offline_message_keeps_its_bcc_recipients_for_the_replay(world) -> None:
    """`sendmail -t` with the daemon down: the file keeps the message as given, Bcc: lines included, so that the
    replay finds the blind copies' recipients (OpenSMTPD 6.8 keeps its copy without them: never sent)."""
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    text = f"To: root\r\nBcc: {user.pw_name}\r\nSubject: offline bcc\r\n\r\nbody\r\n"
    result = run_sendmail(daemon.env, ["-t", "-f", "cron"], text)
    assert result.returncode == 75, result.stderr
    [kept] = list((workdir / "spool" / "offline").iterdir())
    assert kept.read_bytes() == b"-t|-f|cron\n" + text.encode()
    daemon.start()
    try:
        for mailbox in ("root", user.pw_name):
            content = wait_for_mail(os.path.join(mail_root, mailbox))
            assert "\nSubject: offline bcc\n" in content and "Bcc" not in content
    finally:
        daemon.stop()


def test_text_without_a_header_is_all_body(world) -> None:
    """`echo "Warning: ..." | sendmail root`, `uptime | sendmail root`: the text is the body, not a header."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    texts = ["Warning: disk 90% full\n", " 10:00:01 up 3 days,  2 users,  load average: 0.00\nsecond line\n",
             "hello\nTo: someone\n",  # (OpenSMTPD 6.8 takes it for a header, and its daemon refuses it: 550)
             "From the logs: all fine\n", "Error: one\n\nError: two\n"]
    try:
        for text in texts:
            result = run_sendmail(daemon.env, ["root"], text)
            assert result.returncode == 0, (text, result.stderr, daemon.log())
        content = wait_for_mail(os.path.join(mail_root, "root"), count=len(texts))
        for text in texts:
            stored = ">" + text if text.startswith("From ") else text  # (mboxrd quoting)
            assert "\n\n" + stored + "\n" in content, (text, content)
    finally:
        daemon.stop()


def test_a_header_named_with_spaces_is_delivered(world) -> None:
    """A script's report whose header block holds `Started at: 10:00` (a name with a space) is a message with
    such a header, as OpenSMTPD 6.8 takes any line with a colon there: it used to be refused as not RFC 2822
    compliant (550, the message left in dead.letter)."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        text = "Subject: backup report\nStarted at: 10:00\nFinished at: 11:00\n"
        result = run_sendmail(daemon.env, ["root"], text)
        assert result.returncode == 0, (result.stderr, daemon.log())
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert "\nSubject: backup report\nStarted at: 10:00\nFinished at: 11:00\n" in content, content
    finally:
        daemon.stop()


def test_lone_carriage_returns_of_a_local_submission_are_kept(world) -> None:
    """A command's progress output (`10%\r20%`) arrives as written; only the CR of a CRLF goes (as OpenSMTPD).
    Before, every CR of a local submission was dropped."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["root"], "Subject: progress\r\n\r\n10%\r20%\r100%\r\ndone\r\n")
        assert result.returncode == 0, (result.stderr, daemon.log())
        wait_for_mail(os.path.join(mail_root, "root"))
        with open(os.path.join(mail_root, "root"), "rb") as mailbox:  # (bytes: text mode would turn CR into LF)
            content = mailbox.read()
        assert b"\nSubject: progress\n" in content and b"\n\n10%\r20%\r100%\ndone\n" in content, content
    finally:
        daemon.stop()


def test_sender_from_the_from_header_or_the_user_with_full_name(world) -> None:
    """OpenSMTPD's enqueue: without -f the envelope sender is the From: header's address; a From: header it
    adds carries the user's full name (GECOS)."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        text = "From: Alerts <alerts@example.org>\nSubject: web\n\nfrom a web application\n"
        result = run_sendmail(daemon.env, ["root"], text)
        assert result.returncode == 0, (result.stderr, daemon.log())
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith("From alerts@example.org ") and "Return-Path: <alerts@example.org>" in content
        result = run_sendmail(daemon.env, ["root"], "Subject: plain\n\nno From header\n")
        assert result.returncode == 0, (result.stderr, daemon.log())
        content = wait_for_mail(os.path.join(mail_root, "root"), count=2)
        name = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0]
        expected = f"From: {name} <root@mx.control.test>" if name else "From: <root@mx.control.test>"
        assert "\n" + expected + "\n" in content, content
    finally:
        daemon.stop()


def test_gecos_name() -> None:
    from smtpctl.commands.sendmail import gecos_name

    assert gecos_name("& Smith,Room 1,555", "john") == "John Smith"
    assert gecos_name("Jane Doe", "jane") == "Jane Doe" and gecos_name("", "x") == ""


def test_refused_recipient_fails_with_dead_letter(world) -> None:
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    home = workdir / "deadhome"
    home.mkdir()
    try:
        result = run_sendmail({**daemon.env, "HOME": str(home)}, ["nosuchuser-zz"], "lost\n")
        assert result.returncode == 70
        assert result.stderr.startswith("sendmail: command failed: 550 ")
        assert result.stderr.count("\n") == 1  # (OpenSMTPD 6.8 prints an empty line after the reply)
        assert "lost" in (home / "dead.letter").read_text()
        # A second refusal adds to dead.letter: OpenSMTPD 6.8 rewrites it, and the first lost message is gone.
        assert run_sendmail({**daemon.env, "HOME": str(home)}, ["nosuchuser-zz"], "lost again\n").returncode == 70
        assert (home / "dead.letter").read_text() == "lost\nlost again\n"
    finally:
        daemon.stop()


def test_offline_queue_is_replayed_at_start(world) -> None:
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    offline = workdir / "spool" / "offline"
    (workdir / "spool").mkdir()
    result = run_sendmail(daemon.env, ["-f", "batch", user.pw_name], "Subject: while down\n\nqueued offline\n")
    assert result.returncode == 75, result.stderr
    assert offline.stat().st_mode & 0o7777 == 0o1733  # created by sendmail: anyone may drop, nobody may list
    [kept] = list(offline.iterdir())
    assert kept.read_text().startswith(f"-f|batch|{user.pw_name}\nSubject: while down\n")
    assert os.stat(kept).st_mode & 0o777 == 0o600
    written = int(time.time()) - 3 * 3600  # written three hours before the daemon came back
    os.utime(kept, (written, written))
    bad = run_sendmail(daemon.env, ["a|b"], "x\n")
    # exit 70 as OpenSMTPD 6.8's (it was 1)
    assert (bad.returncode, bad.stderr.strip()) == (70, "sendmail: a|b contains illegal character")
    # Hidden files: one being written by a sendmail right now, and one a crash cut short two days ago.
    for name, age in ((".1796600000.0000000001", 0), (".1796400000.0000000002", 2 * 86400)):
        (offline / name).write_text(f"-f|batch|{user.pw_name}\nSubject: hidden\n\nnever sent\n")
        os.utime(offline / name, (time.time() - age, time.time() - age))
    daemon.start()
    try:
        content = wait_for_mail(os.path.join(mail_root, user.pw_name))
        assert "queued offline" in content and "From: <batch@mx.control.test>" in content
        # The Date added is when the message was written, not when it was replayed.
        assert f"Date: {email.utils.formatdate(written, localtime=True)}\n" in content
        deadline = time.monotonic() + 10
        while len(list(offline.iterdir())) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [path.name for path in offline.iterdir()] == [".1796600000.0000000001"]  # the one still written
        assert "never sent" not in open(os.path.join(mail_root, user.pw_name)).read()
    finally:
        daemon.stop()


def test_an_offline_file_of_sendmail_v_is_replayed_without_a_transcript(world) -> None:
    """`sendmail -v` with the daemon down: the replay submits it, and the dialogue -v prints (on standard
    output) goes nowhere: not into the daemon's own output, its log when run in the foreground."""
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    result = run_sendmail(daemon.env, ["-v", "root"], "Subject: verbose offline\n\nbody\n")
    assert result.returncode == 75, result.stderr
    daemon.start()
    try:
        assert "\nSubject: verbose offline\n" in wait_for_mail(os.path.join(mail_root, "root"))
        assert ">>> " not in daemon.log() and "<<< " not in daemon.log(), daemon.log()
    finally:
        daemon.stop()


def test_a_burst_of_sendmails_waits_for_a_control_connection(world) -> None:
    """More concurrent sendmails of one uid than the control socket serves at once: the next one waits for a
    connection to end instead of failing (exit 70, `[Errno 32] Broken pipe`)."""
    from smtpctl.commands.sendmail import open_enqueue
    from smtpd.control.server import MAX_CONNECTIONS_PER_UID

    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    held = [open_enqueue(daemon.socket) for _ in range(MAX_CONNECTIONS_PER_UID)]
    try:
        waiting = subprocess.Popen([SENDMAIL, "root"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=daemon.env, cwd="/")
        waiting.stdin.write(b"Subject: burst\n\nthe 33rd\n")
        waiting.stdin.close()
        time.sleep(1.5)
        assert waiting.poll() is None, waiting.stderr.read()  # still waiting, not failed
        for connection in held:
            connection.close()
        held = []
        assert waiting.wait(timeout=60) == 0, waiting.stderr.read()
        assert "the 33rd" in wait_for_mail(os.path.join(mail_root, "root"))
    finally:
        for connection in held:
            connection.close()
        daemon.stop()


def test_bs_speaks_smtp_on_standard_input_and_output(world) -> None:
    """`sendmail -bs` (Symfony Mailer's and Laravel's default): an SMTP session on stdin/stdout. It was taken
    as `-b s`, ignored: sendmail waited for the end of its input while the caller waited for a greeting, and
    then said `no recipients` (exit 70). A caller writing bare LF and closing its input without QUIT is served
    too; one whose input ends in the middle of a message sends nothing."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        dialogue = ("EHLO app.test\nMAIL FROM:<app@example.org>\nRCPT TO:<root>\nDATA\n"
                    "From: App <app@example.org>\nSubject: via -bs\n\nhello\n..dotted\n.\n")
        result = run_sendmail(daemon.env, ["-bs", "-i"], dialogue)
        assert result.returncode == 0, (result.stderr, daemon.log())
        replies = result.stdout.splitlines()
        assert replies[0].startswith("220 ") and replies[-1].startswith("221 "), replies
        assert "354 " in result.stdout and "Message accepted for delivery" in replies[-2]
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith("From app@example.org ") and "\nSubject: via -bs\n" in content
        assert content.endswith("\nhello\n.dotted\n\n")
        cut = run_sendmail(daemon.env, ["-bs"], "EHLO app.test\nMAIL FROM:<app@example.org>\nRCPT TO:<root>\n"
                                               "DATA\nSubject: cut short\n\nhalf")
        assert cut.returncode == 70
        offline = run_sendmail({**daemon.env, "SMTPD_SOCKET": str(workdir / "none.sock")}, ["-bs"], "EHLO a\n")
        assert (offline.returncode, offline.stdout) == (75, "421 4.3.0 mail system not running, try again later\n")
        time.sleep(1)
        assert "cut short" not in open(os.path.join(mail_root, "root")).read()
    finally:
        daemon.stop()


# -- pieces ------------------------------------------------------------------------------------------------

def test_options_and_usage() -> None:
    options = parse_arguments(["-oi", "-fbob", "-F", "Bob B", "-N", "SUCCESS", "-t", "-v", "a,b", "c@d.e"])
    assert (options.sender, options.full_name, options.notify) == ("bob", "Bob B", "SUCCESS")
    assert options.from_headers and options.verbose
    assert options.recipients == ["a", "b", "c@d.e"]
    assert qualify("root", "mx.test") == "root@mx.test" and qualify("<a@b>", "mx") == "a@b"
    result = subprocess.run([SENDMAIL, "-Z", "root"], input="", capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
        "usage: sendmail [-tv] [-f from] [-F name] to ...")
    result = subprocess.run([SENDMAIL], input="x\n", capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (70, "sendmail: no recipients\n")


def test_a_sender_with_an_unclosed_bracket_is_refused_at_once(tmp_path: Path) -> None:
    """`sendmail -f '<bounce@x'`: OpenSMTPD's sendmail refuses it (`leading < but no trailing >`, exit 1) before
    reading the message. Ours took `<bounce@x` as the sender: kept offline (exit 75) only to be refused at the
    replay, or refused by the daemon (501) with the message in dead.letter."""
    env = {**os.environ, "SMTPD_SOCKET": str(tmp_path / "no.sock"), "SMTPD_SPOOL": str(tmp_path / "spool")}
    result = subprocess.run([SENDMAIL, "-f", "<bounce@example.org", "root"], input="x\n", capture_output=True,
                            text=True, timeout=60, env=env)
    assert (result.returncode, result.stderr) == (1, "sendmail: leading < but no trailing >\n")
    assert not (tmp_path / "spool" / "offline").exists()
    result = subprocess.run([SENDMAIL, "-f", "<bounce@example.org>", "root"], input="x\n", capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 75, result.stderr  # (closed: fine, kept offline)


def test_standard_input_closed_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """A caller that runs sendmail with standard input closed (`sendmail root <&-`): Python then has no
    sys.stdin, and sendmail died with an AttributeError traceback (exit 1). It is a read error, reported as
    such with OpenSMTPD's exit status (69), and nothing is sent or kept offline."""
    env = {**os.environ, "SMTPD_SOCKET": str(tmp_path / "no.sock"), "SMTPD_SPOOL": str(tmp_path / "spool")}
    result = subprocess.run(["sh", "-c", 'exec "$0" root <&-', SENDMAIL], capture_output=True, text=True,
                            timeout=60, env=env)
    assert (result.returncode, result.stderr) == (69, "sendmail: cannot read the message: Bad file descriptor\n")
    assert not (tmp_path / "spool" / "offline").exists() or not list((tmp_path / "spool" / "offline").iterdir())


def test_options_may_follow_recipients(monkeypatch) -> None:
    """glibc getopt(3) permutes: OpenSMTPD's sendmail on Linux takes `sendmail root -f cron -t` as options."""
    monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    options = parse_arguments(["root", "-f", "cron", "a,b", "-oi", "-t", "--", "-x"])
    assert (options.sender, options.from_headers) == ("cron", True)
    assert options.recipients == ["root", "a", "b", "-x"]
    assert parse_arguments(["-q1h"]).queue_run and parse_arguments(["root", "-q"]).queue_run
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    assert parse_arguments(["root", "-f", "cron"]).recipients == ["root", "-f", "cron"]
    result = subprocess.run([SENDMAIL, "-q1h"], input="", capture_output=True, text=True)
    # (OpenSMTPD 6.8's exits 70 saying nothing)
    assert (result.returncode, result.stderr) == (
        70, "sendmail: periodic queue runs are not supported: the daemon schedules deliveries itself\n")


def test_a_sender_option_after_the_recipient_is_an_option(world) -> None:
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["root", "-f", "cron", "-F", "Cron Daemon"], "Subject: late\n\nlate -f\n")
        assert result.returncode == 0, (result.stderr, daemon.log())
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith("From cron@mx.control.test ") and "From: Cron Daemon <cron@mx.control.test>" in content
    finally:
        daemon.stop()


def test_long_lines_become_quoted_printable() -> None:
    message = parse_message(b"Subject: long\n\n" + b"x" * 2000 + b"\nshort\n")
    lines = complete_message(message, "a@b.c", None)
    assert "Content-Transfer-Encoding: quoted-printable" in lines
    assert all(len(line) < 990 for line in lines)
    assert "short" in lines


def test_a_line_is_long_at_989_bytes_of_text_and_the_charset_said_is_the_texts() -> None:
    """As OpenSMTPD 6.8's enqueue counts: 990 bytes with the line end (we waited for 990 without it); the body
    made quoted-printable goes with `Content-Disposition: inline` too. Its charset is UTF-8 when the text is
    (6.8 says unknown-8bit of every text, and readers then show UTF-8 as mojibake) and unknown-8bit otherwise,
    as 6.8 (we said UTF-8 of Latin-1 too)."""
    def added(text: bytes) -> list[str]:
        lines = complete_message(parse_message(b"Subject: s\n\n" + text + b"\n"), "a@b.c", None)
        return [line for line in lines[: lines.index("")] if line.startswith(("MIME-", "Content-"))]

    assert added(b"y" * 988) == []
    assert added(b"y" * 989) == ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                                 "Content-Disposition: inline", "Content-Transfer-Encoding: quoted-printable"]
    assert added(b"caf\xc3\xa9 " + b"y" * 1000)[1] == "Content-Type: text/plain; charset=utf-8"
    assert added(b"caf\xe9 " + b"y" * 1000)[1] == "Content-Type: text/plain; charset=unknown-8bit"


def test_long_text_without_a_header_is_encoded_and_a_long_header_line_leaves_the_body() -> None:
    """Where OpenSMTPD 6.8 does otherwise (docs/delivery.md): text without a header and with a long line is made
    quoted-printable, as its added header says (6.8 says so and sends the text as it is: `a=b` then reads as an
    escape); a long header line leaves a body of short lines as it is (6.8 encodes the body then)."""
    lines = complete_message(parse_message(b"x" * 1000 + b" a=b\n"), "a@b.c", None)
    assert "Content-Transfer-Encoding: quoted-printable" in lines and lines[-1].endswith(" a=3Db")
    lines = complete_message(parse_message(b"Subject: s\nX-List: " + b"z" * 1000 + b"\n\na=b\n"), "a@b.c", None)
    assert lines[-1] == "a=b" and not any(line.startswith(("MIME-", "Content-")) for line in lines)


def test_quoted_printable_keeps_the_messages_own_content_type() -> None:
    """A script's HTML report with a Content-Type but no MIME-Version: the long line makes the body
    quoted-printable, and the message's Content-Type stays the only one (as OpenSMTPD's enqueue adds it only
    when missing). Before, a second `Content-Type: text/plain; charset=utf-8` was added after it."""
    message = parse_message(b"Subject: report\nContent-Type: text/html; charset=iso-8859-1\n\n<p>caf\xe9 "
                            + b"x" * 1200 + b"</p>\n")
    lines = complete_message(message, "a@b.c", None)
    header = lines[: lines.index("")]
    assert [line for line in header if line.lower().startswith("content-type:")] == [
        "Content-Type: text/html; charset=iso-8859-1"]
    assert "MIME-Version: 1.0" in header and "Content-Transfer-Encoding: quoted-printable" in header
    assert all(len(line) < 990 for line in lines) and lines[len(header) + 1].startswith("<p>caf=E9 ")


def test_added_fields_come_before_the_messages_own() -> None:
    """OpenSMTPD's enqueue writes the From: and Date: it adds first, then the message's own fields; ours came
    last, after the Subject: and the rest."""
    lines = complete_message(parse_message(b"Subject: backup\nX-Job: nightly\n\nbody\n"), "a@b.c", "Cron")
    assert lines[0] == "From: Cron <a@b.c>" and lines[1].startswith("Date: ")
    assert lines[2:] == ["Subject: backup", "X-Job: nightly", "", "body"]


def test_a_return_path_further_down_the_header_goes() -> None:
    """A message resent from a mailbox file (`Delivered-To:` then `Return-Path:`): its old Return-Path went on,
    and the delivered message had two that disagreed. OpenSMTPD's enqueue drops them anywhere in the header."""
    message = parse_message(b"Delivered-To: a@x.test\nReturn-Path:\n <old@x.test>\nSubject: resent\n\nbody\n")
    assert message.headers == ["Delivered-To: a@x.test", "Subject: resent"]


def test_a_user_without_privileges_submits_as_themself(world) -> None:
    """What a user's cron job does: sendmail runs with the user's uid; the daemon learns who it is."""
    import io
    import sys
    import warnings

    from smtpctl.commands.sendmail import sendmail_main

    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        read_end, write_end = os.pipe()
        os.write(write_end, b"Subject: from cron\n\nnightly job done\n")
        os.close(write_end)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.environ.update({k: v for k, v in daemon.env.items() if k.startswith("SMTPD_")})
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
                sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(read_end)))
                status = sendmail_main(["root"])
            finally:
                os._exit(status)
        os.close(read_end)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0, daemon.log()
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith(f"From {user.pw_name}@mx.control.test ")
        assert "nightly job done" in content
    finally:
        daemon.stop()


def test_an_offline_file_written_while_the_daemon_runs_is_submitted_without_a_restart(world) -> None:
    """A sendmail that found no daemon to talk to (here: pointed at a socket that is not there, as during a
    start) leaves its file in offline/; the running daemon looks there again and submits it. Before, it waited
    for the next start. A file that fails for now (SMTP paused) is not tried again until then."""
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    daemon.env["SMTPD_OFFLINE_RESCAN_SECONDS"] = "0.5"
    daemon.start()
    try:
        unreachable = {**daemon.env, "SMTPD_SOCKET": str(workdir / "no-such.sock")}
        result = run_sendmail(unreachable, ["-f", "late", user.pw_name], "Subject: late\n\nwritten while up\n")
        assert result.returncode == 75, result.stderr
        content = wait_for_mail(os.path.join(mail_root, user.pw_name))
        assert "written while up" in content
        assert daemon.smtpctl("pause", "smtp").returncode == 0
        refused = run_sendmail(unreachable, [user.pw_name], "Subject: refused\n\nnobody\n")
        assert refused.returncode == 75, refused.stderr
        offline = workdir / "spool" / "offline"
        deadline = time.monotonic() + 10
        while "kept for a later try" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        [kept] = list(offline.iterdir())  # the refused one
        assert "nobody" in kept.read_text()
        time.sleep(1.5)  # three more looks at the folder
        assert daemon.log().count("kept for a later try") == 1
    finally:
        daemon.stop()


def test_with_smtp_paused_a_message_is_kept_offline_and_sent_on_resume(world) -> None:
    """`smtpctl pause smtp` for maintenance: cron's mail (Debian's cron runs `sendmail -FCronDaemon -i -B8BITMIME
    -oem root`) was refused with exit 70 and went to root's ~/dead.letter, never delivered. The daemon cannot
    take it now, as when it is down: the message is kept offline (exit 75) and delivered once SMTP is resumed."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    home = workdir / "crontab-home"
    home.mkdir()
    try:
        assert daemon.smtpctl("pause", "smtp").returncode == 0
        result = run_sendmail({**daemon.env, "HOME": str(home)}, ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
                              "Subject: Cron <root@host> backup\n\nbackup done\n")
        assert result.returncode == 75, result.stderr
        assert result.stderr == ("sendmail: server disallowed submission request: the message is kept offline "
                                 "for a later try\n")
        assert not (home / "dead.letter").exists()
        [kept] = list((workdir / "spool" / "offline").iterdir())
        assert "backup done" in kept.read_text()
        assert daemon.smtpctl("resume", "smtp").returncode == 0  # (the daemon's own rescan is a minute away)
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert "\nFrom: CronDaemon <root@mx.control.test>\n" in content and content.endswith("\nbackup done\n\n")
        wait_until(lambda: not list((workdir / "spool" / "offline").iterdir()), bound=10)
    finally:
        daemon.stop()


def test_an_aliases_file_from_postfix_with_continued_lines_reaches_everyone(world) -> None:
    """/etc/aliases as Postfix, Sendmail and Exim read it: an indented line continues the value before it. Read
    as an entry of its own (OpenSMTPD 6.8), `staff` lost the user without a word, and `USER,` became an alias."""
    workdir, mail_root, user = world
    aliases = workdir / "aliases"
    aliases.write_text(f"# See man 5 aliases for format\npostmaster: root\nstaff: root,\n"
                       f"  # the list goes on after a comment\n\t{user.pw_name}, postmaster\n")
    config = (f"table aliases file:{aliases}\n"
              'action "local" mbox alias <aliases>\nmatch from local for local action "local"\n')
    daemon = Daemon(str(workdir), config, mail_root, mailname="mx.control.test").start()
    try:
        result = run_sendmail(daemon.env, ["staff"], "Subject: meeting\n\nat noon\n")
        assert result.returncode == 0, result.stderr
        assert "at noon" in wait_for_mail(os.path.join(mail_root, "root"))
        assert "at noon" in wait_for_mail(os.path.join(mail_root, user.pw_name))
    finally:
        daemon.stop()


def test_a_message_refused_for_now_is_kept_offline_and_tried_again(world) -> None:
    """A 4xx at RCPT (here the aliases file has a broken value: the daemon cannot expand it) is a temporary
    refusal: the message was written to ~/dead.letter, exit 70, and never delivered. It is kept offline (exit
    75), and tried again after a while (SMTPD_OFFLINE_RETRY_SECONDS), not only at the next start: once the
    table is fixed, it arrives."""
    workdir, mail_root, user = world
    aliases = workdir / "aliases"
    aliases.write_text('staff: "|unclosed\n')
    config = f'table aliases file:{aliases}\naction "local" mbox alias <aliases>\nmatch from local for local action "local"\n'
    daemon = Daemon(str(workdir), config, mail_root, mailname="mx.control.test")
    daemon.env.update(SMTPD_OFFLINE_RESCAN_SECONDS="0.2", SMTPD_OFFLINE_RETRY_SECONDS="1")
    daemon.start()
    home = workdir / "script-home"
    home.mkdir()
    try:
        result = run_sendmail({**daemon.env, "HOME": str(home)}, ["staff"], "Subject: report\n\nnightly report\n")
        assert result.returncode == 75, result.stderr
        assert result.stderr.startswith("sendmail: 4") and result.stderr.endswith(
            ": the message is kept offline for a later try\n"), result.stderr
        assert not (home / "dead.letter").exists()
        wait_until(lambda: "could not be submitted" in daemon.log(), explain=daemon.log)
        aliases.write_text("staff: root\n")
        assert daemon.smtpctl("update", "table", "aliases").returncode == 0
        assert "nightly report" in wait_for_mail(os.path.join(mail_root, "root"))
    finally:
        daemon.stop()


def test_sendmail_q_runs_the_queue_now(world) -> None:
    """`sendmail -q` flushes the queue with Postfix, Exim and Sendmail (a network hook runs it when the link
    comes up): it exited 70 here, as OpenSMTPD 6.8's, and deferred mail waited for its next retry. It now
    schedules every envelope now, as `smtpctl schedule all`, quietly; without a daemon it says so, exit 69."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["-q"], "")
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert "control: uid=0 (root)" in daemon.log() and " ran schedule target=all" in daemon.log()
    finally:
        daemon.stop()
    down = run_sendmail(daemon.env, ["-q"], "")
    assert (down.returncode, down.stderr) == (
        69, "sendmail: smtpd doesn't seem to be running: the queue cannot be run\n")


def test_mail_of_bsd_mailx_and_s_nail_reaches_root(world) -> None:
    """What smartd, cron scripts and admins run: `mail -s SUBJECT root` of Debian's bsd-mailx (it runs
    `sendmail -i -t`, the recipients in the header) and of s-nail (`sendmail -i -f FROM -- root` with -r), each
    pointed at our sendmail as an administrator's mailrc or `-S mta=` does. (Packages bsd-mailx and s-nail.)"""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    mailrc = workdir / "mailrc"
    mailrc.write_text(f"set sendmail={SENDMAIL}\n")
    env = {**daemon.env, "HOME": str(workdir), "MAILRC": str(mailrc)}
    try:
        for command, text in (
                (["bsd-mailx", "-s", "SMART error detected on host", "root"], "Device: /dev/sda, 8 Currently unreadable sectors\n"),
                (["s-nail", "-:/", "-S", f"mta={SENDMAIL}", "-r", "smartd@example.org", "-s", "disk report", "root"],
                 "/dev/sda1 91%\n")):
            result = subprocess.run(command, input=text, capture_output=True, text=True, timeout=60, env=env, cwd="/")
            assert (result.returncode, result.stderr) == (0, ""), command
        content = wait_for_mail(os.path.join(mail_root, "root"), count=2)
        assert "\nSubject: SMART error detected on host\n" in content and "8 Currently unreadable sectors" in content
        assert "\nTo: root@mx.control.test\n" in content
        assert "Return-Path: <smartd@example.org>\n" in content and "\nSubject: disk report\n" in content
    finally:
        daemon.stop()


def test_a_full_control_backlog_is_waited_for_not_taken_for_a_daemon_that_is_down(tmp_path: Path) -> None:
    """Connecting to a Unix socket whose backlog of connections not yet accepted is full fails at once (EAGAIN)
    when the socket has a timeout: sendmail took that for no daemon and went offline (the message then waited
    for a restart). It is a busy daemon: sendmail waits, as for the `busy` answer."""
    from daemon import full_unix_backlog

    from smtpctl.commands.sendmail import Busy, open_enqueue

    path = str(tmp_path / "control.sock")
    with full_unix_backlog(path), pytest.raises(Busy):
        open_enqueue(path)


def test_an_offline_file_with_a_second_name_is_not_replayed(world) -> None:
    """offline/ is writable by everyone: a hard link there to a file of someone else's (made a while ago; a
    file of sendmail's has two names only for the moment between its link and the removal of its hidden name)
    is not submitted as that file's owner; it stays, and a warning says why."""
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    offline = workdir / "spool" / "offline"
    offline.mkdir(parents=True)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    original = elsewhere / "letter"
    original.write_text(f"{user.pw_name}\nSubject: linked\n\nnot to be sent\n")
    os.chown(original, user.pw_uid, user.pw_gid)
    os.link(original, offline / "1796600000.0000000003")
    os.utime(original, (time.time() - 3600, time.time() - 3600))
    daemon.start()
    try:
        wait_until(lambda: "has 2 links, skipped" in daemon.log(), explain=daemon.log)
        assert (offline / "1796600000.0000000003").exists()
        assert not os.path.exists(os.path.join(mail_root, user.pw_name))
    finally:
        daemon.stop()


def test_an_offline_file_the_daemon_refuses_for_good_goes_to_its_owners_dead_letter(world) -> None:
    """A message written offline whose recipient the daemon refuses (550: no rule for that domain) was kept and
    offered again at every start, for ever, and its dead.letter went to the daemon's home, which the owner's
    replay cannot write. Now it is saved in its owner's dead.letter, as at the terminal, and removed."""
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    offline = workdir / "spool" / "offline"
    offline.mkdir(parents=True)
    letter = offline / "1796600000.0000000004"
    letter.write_text("nobody@elsewhere.test\nSubject: nowhere\n\nfor no one\n")
    os.chown(letter, user.pw_uid, user.pw_gid)
    letter.chmod(0o600)
    daemon.start()
    try:
        wait_until(lambda: "saved in its owner's dead.letter and removed" in daemon.log(), explain=daemon.log)
        assert not letter.exists()
        dead = Path(user.pw_dir) / "dead.letter"
        assert "for no one" in dead.read_text() and dead.stat().st_uid == user.pw_uid
    finally:
        daemon.stop()


def test_a_full_name_with_a_comma_is_quoted_in_the_from_header() -> None:
    """`sendmail -F 'Doe, John'`: put in From: as it is, the header named two mailboxes (`Doe` and `John <...>`),
    and readers showed, or strict receivers refused, a From of two addresses."""
    import email.utils

    def from_header(name: str) -> str:
        [header] = [line for line in complete_message(parse_message(b"hi\n"), "j@x.test", name)
                    if line.startswith("From:")]
        return header

    assert from_header("Doe, John") == 'From: "Doe, John" <j@x.test>'
    assert email.utils.getaddresses([from_header('J. "Bob" Dobbs')[6:]]) == [('J. "Bob" Dobbs', "j@x.test")]
    assert from_header("John Doe") == "From: John Doe <j@x.test>"
    assert from_header('"Doe, John"') == 'From: "Doe, John" <j@x.test>'


@pytest.mark.parametrize("option", ["-bs", "-q"])
def test_an_offline_file_asking_for_bs_or_q_is_refused_not_run(world, option: str) -> None:
    """offline/ is writable by everyone, and the replay runs sendmail's code in a child of the daemon as the
    file's owner. A file planted there with `-bs` (which sendmail never writes offline) made that child speak
    SMTP on the daemon's own standard input and output: its greeting went into the daemon's log, and with a
    terminal or a pipe for input it waited there up to 300 s, at every start. It is refused for good now."""
    workdir, mail_root, user = world
    daemon = make_daemon(workdir, mail_root, user)
    offline = workdir / "spool" / "offline"
    offline.mkdir(parents=True)
    planted = offline / "1796600000.0000000005"
    planted.write_text(f"{option}\nSubject: planted\n\nnot a session\n")
    os.chown(planted, user.pw_uid, user.pw_gid)
    planted.chmod(0o600)
    daemon.start()
    try:
        wait_until(lambda: "saved in its owner's dead.letter and removed" in daemon.log(), explain=daemon.log)
        assert not planted.exists()
        assert "cannot be replayed from an offline file" in daemon.log()
        assert "ESMTP" not in daemon.log() and "address=local" not in daemon.log()  # no session was spoken
        assert "not a session" in (Path(user.pw_dir) / "dead.letter").read_text()
    finally:
        daemon.stop()


@pytest.mark.parametrize("args", [
    ["-f", "web@site.test>\r\nRCPT TO:<root@mx.control.test", "{user}"],
    ["-f", "web@site.test>\nRCPT TO:<root@mx.control.test", "{user}"],
    ["{user}@mx.control.test>\r\nRCPT TO:<root@mx.control.test"],
    ["-V", "id\r\nRCPT TO:<root@mx.control.test>", "{user}"],
    ["-F", "Web\r\nBcc: root", "-t"],
])
def test_a_line_break_in_an_address_or_option_adds_no_command(world, args: list[str]) -> None:
    """A script that passes what a web form gave it to `sendmail -f ADDRESS` (PHP's mail() does) must not let a
    CR LF in it end the MAIL FROM line and add a recipient: such a value is refused, nothing is sent."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        args = [arg.replace("{user}", user.pw_name) for arg in args]
        result = run_sendmail(daemon.env, args, f"To: {user.pw_name}\nSubject: form\n\nhello\n")
        assert result.returncode == 65, (result.stderr, daemon.log())
        assert result.stderr.strip().endswith("contains a line break"), result.stderr
        assert "\\r" in result.stderr or "\\n" in result.stderr  # shown escaped, on one line
        assert " smtp envelope " not in daemon.log()  # no transaction at all, so no RCPT TO:<root@...>
        assert not os.path.exists(os.path.join(mail_root, "root"))
    finally:
        daemon.stop()


def test_bp_lists_the_queue_as_mailq_does(world) -> None:
    """`sendmail -bp` is the queue listing in every sendmail-compatible program (Sendmail, Postfix, Exim), and
    scripts that watch the queue call it so. Ours took -bp for an ignored option: it read standard input for a
    message and ended with `no recipients`, exit 70 (as OpenSMTPD 6.8's does)."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        assert daemon.smtpctl("pause", "mda").returncode == 0
        assert run_sendmail(daemon.env, ["root"], "Subject: waiting\n\nin the queue\n").returncode == 0
        mailq = subprocess.run([str(ROOT / ".venv" / "bin" / "mailq")], capture_output=True, text=True, timeout=60,
                               env=daemon.env, cwd="/", stdin=subprocess.DEVNULL)
        assert mailq.returncode == 0 and "|root@mx.control.test|" in mailq.stdout, mailq
        listed = subprocess.run([SENDMAIL, "-bp"], capture_output=True, text=True, timeout=60, env=daemon.env,
                                cwd="/", stdin=subprocess.DEVNULL)
        assert (listed.returncode, listed.stderr) == (0, "")
        assert [line.split("|")[0] for line in listed.stdout.splitlines()] == [
            line.split("|")[0] for line in mailq.stdout.splitlines()]
    finally:
        daemon.stop()


def test_a_mode_that_sends_nothing_elsewhere_is_refused_not_sent(world) -> None:
    """`sendmail -bv root` asks to verify an address (Sendmail, Postfix, Exim), `-bt` to test addresses, `-bd` to
    run a daemon: none of them sends a message. Ours ignored every -b it did not know and sent standard input as
    mail to the address (an empty message from `sendmail -bv root </dev/null`). They are refused now, before
    anything is read; `-bm` (and the old `-ba`) still send."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        for mode in ("-bv", "-bt", "-bd"):
            result = run_sendmail(daemon.env, [mode, "root"], "Subject: not to be sent\n\nbody\n")
            assert result.returncode == 1 and result.stderr.startswith(f"sendmail: {mode} is not supported"), result
        assert run_sendmail(daemon.env, ["-bm", "root"], "Subject: sent\n\nbody\n").returncode == 0
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert "Subject: sent" in content and "not to be sent" not in content
        assert daemon.log().count(" smtp message ") == 1, daemon.log()
    finally:
        daemon.stop()


def test_an_address_in_utf8_is_submitted_with_smtputf8(world) -> None:
    """RFC 6531: an address with UTF-8 goes with `MAIL FROM:<...> SMTPUTF8`, which the daemon offers. sendmail
    never said it, so `sendmail jürgen` (or `-f jürgen@...`) was refused with `501 Recipient address syntax
    error`: exit 70, the message in dead.letter. It says it now when the sender or a recipient needs it."""
    workdir, mail_root, user = world
    config = ('table aliases { "j\u00fcrgen" = "root" }\n'
              'action "local" mbox alias <aliases>\nmatch from local for local action "local"\n')
    daemon = Daemon(str(workdir), config, mail_root, mailname="mx.control.test").start()
    try:
        result = run_sendmail(daemon.env, ["-v", "-f", "b\u00e4r", "j\u00fcrgen"], "Subject: utf-8\n\nGr\u00fc\u00dfe\n")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        assert ">>> MAIL FROM:<b\u00e4r@mx.control.test> SMTPUTF8\n" in result.stdout
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert "\nDelivered-To: j\u00fcrgen@mx.control.test\n" in content and "Subject: utf-8" in content
        plain = run_sendmail(daemon.env, ["-v", "root"], "Subject: ascii\n\nGr\u00fc\u00dfe\n")
        assert plain.returncode == 0 and ">>> MAIL FROM:<root@mx.control.test>\n" in plain.stdout
    finally:
        daemon.stop()


def test_bs_input_cut_in_a_message_says_so_and_shows_the_replies(world) -> None:
    """`sendmail -bs` whose caller's input ends in the middle of DATA (a PHP script that died) exits 70 and sends
    nothing, as before; but it said nothing at all, not even the greeting and the replies the commands before had
    got: a caller debugging it saw an empty output and a bare 70. It now passes those replies on and says why."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        cut = run_sendmail(daemon.env, ["-bs"], "EHLO app.test\nMAIL FROM:<app@example.org>\nRCPT TO:<root>\n"
                                               "DATA\nSubject: cut short\n\nhalf")
        assert cut.returncode == 70
        replies = cut.stdout.splitlines()
        assert replies[0].startswith("220 ") and replies[-1].startswith("354 "), replies
        assert cut.stderr == "sendmail: the input ended after DATA without the closing dot: no message is sent\n"
        assert run_sendmail(daemon.env, ["root"], "Subject: after\n\nbody\n").returncode == 0
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert "Subject: after" in content and "cut short" not in content
    finally:
        daemon.stop()


def test_more_recipients_than_one_transaction_takes_all_get_the_message(world) -> None:
    """`sendmail -t` of a message to more recipients than `smtp limit max-rcpt` allows in one transaction (1000 by
    default: a newsletter script's Bcc list): the daemon answers the one too many `451 4.5.3 Too many
    recipients`, and sendmail gave up on the whole message (exit 70, dead.letter). As RFC 5321 asks of a client,
    it now sends the message to those accepted and the rest in further transactions."""
    workdir, mail_root, user = world
    config = ("smtp limit max-rcpt 2\n"
              'table aliases { a = "root", b = "root", c = "root", d = "root", e = "{user}" }\n'
              'action "local" mbox alias <aliases>\nmatch from local for local action "local"\n')
    daemon = Daemon(str(workdir), config.replace("{user}", user.pw_name), mail_root,
                    mailname="mx.control.test").start()
    try:
        result = run_sendmail({**daemon.env, "HOME": str(workdir)}, ["-t", "e"],
                              "To: a, b\nCc: c\nBcc: d\nSubject: many\n\nbody\n")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        content = wait_for_mail(os.path.join(mail_root, "root"), count=4)
        assert sorted(line for line in content.splitlines() if line.startswith("Delivered-To: ")) == [
            f"Delivered-To: {name}@mx.control.test" for name in "abcd"]
        assert "Subject: many" in wait_for_mail(os.path.join(mail_root, user.pw_name))
        assert daemon.log().count(" smtp message ") == 3  # (2 + 2 + 1 recipients)
        assert not (workdir / "dead.letter").exists()
    finally:
        daemon.stop()


def test_a_recipient_named_twice_with_the_domain_in_capitals_gets_one_copy(world) -> None:
    """`sendmail -t root@MX.CONTROL.TEST` of a message `To: root`: a domain is the same whatever its case, but the
    copies were told apart by the exact text, so the same mailbox got the message twice."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        result = run_sendmail(daemon.env, ["-t", "root@MX.Control.Test"], "To: root\nSubject: twice\n\nbody\n")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        assert daemon.log().count(" smtp envelope ") == 1, daemon.log()
        wait_for_mail(os.path.join(mail_root, "root"))
    finally:
        daemon.stop()


def test_a_mailname_with_blanks_after_the_name_still_names_the_host(world) -> None:
    """`echo 'mx.example.org ' > /etc/mailname`: the blank went into every address sendmail qualified
    (`root@mx.control.test `), which the daemon refused (553, exit 70, dead.letter). A host name holds no blank:
    the line is trimmed."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        (workdir / "mailname-blank").write_text("mx.control.test \t\n")
        env = {**daemon.env, "SMTPD_MAILNAME": str(workdir / "mailname-blank"), "HOME": str(workdir)}
        result = run_sendmail(env, ["root"], "Subject: blank\n\nbody\n")
        assert (result.returncode, result.stderr) == (0, ""), daemon.log()
        content = wait_for_mail(os.path.join(mail_root, "root"))
        assert content.startswith("From root@mx.control.test ") and "Subject: blank" in content
    finally:
        daemon.stop()


def test_verbose_to_a_reader_that_left_still_sends_the_message(world) -> None:
    """`sendmail -v root | head -1`: once head has its line, writing the next line of the dialogue fails (EPIPE),
    and sendmail gave up the message for it (`[Errno 32] Broken pipe`, exit 70, dead.letter): the transcript is
    only a view of the submission. The submission goes on; the transcript stops."""
    workdir, mail_root, user = world
    daemon = start_daemon(workdir, mail_root, user)
    try:
        process = subprocess.Popen([SENDMAIL, "-v", "root"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env={**daemon.env, "HOME": str(workdir)}, cwd="/")
        assert process.stdout is not None
        process.stdout.close()  # the reader is gone before the first line
        _, errors = process.communicate(b"Subject: seen by head\n\nbody\n", timeout=60)
        assert (process.returncode, errors) == (0, b""), daemon.log()
        assert "Subject: seen by head" in wait_for_mail(os.path.join(mail_root, "root"))
        assert not (workdir / "dead.letter").exists()
    finally:
        daemon.stop()
