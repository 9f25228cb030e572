"""A full disk, with the real daemon over SMTP: its spool on a 3 MiB tmpfs that the test mounts (as root, like the
rest of the suite). Mail is refused with the reference's reply once nothing fits; acknowledged mail is never lost;
removing mail gives the room back, and mail that waited for it is written and listed without a restart."""

from __future__ import annotations

import collections
import os
import pwd
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess, tmpfs_at
from helpers_delivery import open_temp_dir
from waiting import wait_until

CONFIG = 'listen on 127.0.0.1 port {port}\naction "relay" relay\nmatch from any for any action "relay"\n'
BODY = b"Subject: filling\r\n\r\n" + (b"x" * 76 + b"\r\n") * 1300  # about 100 KB


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "spool", "3m", "0700") as spool:
        yield spool


def send(port: int, index: int, body: bytes = BODY) -> tuple[int, str]:
    """The reply to the final dot: (code, msgid or text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("filler.test")
        client.mail("filler@example.org")
        client.rcpt(f"r{index}@relay.test")
        try:
            code, text = client.data(body)
        except smtplib.SMTPResponseException as refused:
            return refused.smtp_code, refused.smtp_error.decode()
        return (code, text.decode().split()[1]) if code == 250 else (code, text.decode())


def queued_msgids(daemon: SmtpdProcess) -> set[str]:
    return {line[:8] for line in daemon.smtpctl("show", "queue").stdout.splitlines()}


def shown_msgids(daemon: SmtpdProcess) -> tuple[set[str], set[str]]:
    """What one `show queue` shows: the messages listed, and those it says (on stderr) are acknowledged and wait
    for room on the disk."""
    result = daemon.smtpctl("show", "queue")
    return ({line[:8] for line in result.stdout.splitlines()},
            set(re.findall(r"^smtpctl: message ([0-9a-f]{8}) is acknowledged and waits for room on the disk",
                           result.stderr, re.MULTILINE)))


def wait_for_queue(daemon: SmtpdProcess, expected: set[str]) -> set[str]:
    deadline = time.monotonic() + 15  # (a liveness bound only)
    while (found := queued_msgids(daemon)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_a_full_spool_refuses_mail_loses_none_and_takes_mail_again_once_mail_is_removed(
        tmp_path: Path, small_spool: Path) -> None:
    with SmtpdProcess(tmp_path, CONFIG, paused=("mta", "mda")) as daemon:
        accepted: list[str] = []
        refusal = None
        for index in range(40):
            code, text = send(daemon.port, index)
            if code != 250:
                refusal = (code, text)
                break
            accepted.append(text)
        assert refusal == (421, "4.3.0 Temporary failure")
        assert len(accepted) >= 5
        # Every acknowledged message is kept and shown: listed, or (its files did not fit) kept by the journal
        # and named as waiting for room; listed as soon as its files are written, below.
        deadline = time.monotonic() + 15  # (the last one is listed once placed, a checkpoint after its 250)
        while (shown := shown_msgids(daemon))[0] | shown[1] != set(accepted) and time.monotonic() < deadline:
            time.sleep(0.1)
        listed, waiting = shown
        assert listed | waiting == set(accepted)
        assert not listed & waiting
        # The first message whose files did not fit had its journal record already (the journal's room is
        # written ahead): acknowledged, and waiting. So do those acknowledged through the journal just before it
        # (their records stay there until it is written: placed now, they could come back after a restart).
        # Removing mail must make room for it (a lock before).
        assert accepted[-1] in waiting

        removed = sorted(listed)[:3]
        assert len(removed) == 3
        for msgid in removed:
            assert daemon.smtpctl("remove", msgid).stdout == "1 envelope removed\n"
        kept = set(accepted) - set(removed)
        assert wait_for_queue(daemon, kept) == kept
        assert shown_msgids(daemon)[1] == set()
        code, msgid = send(daemon.port, 99)
        assert code == 250
        kept.add(msgid)
        assert wait_for_queue(daemon, kept) == kept

        daemon.restart()
        assert wait_for_queue(daemon, kept) == kept
        assert not list((small_spool / "corrupt").iterdir())


@pytest.mark.parametrize("first_start", ["with room", "still full"])
def test_mail_journaled_before_a_commit_that_waits_for_room_is_delivered_once_across_a_restart(
        tmp_path: Path, small_spool: Path, first_start: str) -> None:
    """While an acknowledged commit waits for room (only its journal record holds it), no checkpoint may empty the
    journal, so the records of the commits acknowledged just before it stay there too, and a start writes them
    back. Those commits must not be delivered meanwhile: they were, and after a stop and a start every one of
    them was delivered a second time (and a removed one came back). A start on the spool still full cannot
    write them back: it says so and what to do (it said `[Errno 28] No space left on device`), and loses
    nothing."""
    with open_temp_dir("pysmtpd-journal-held-") as top:
        mail = Path(top) / "mail"
        mail.mkdir()
        os.chown(mail, pwd.getpwnam("nobody").pw_uid, -1)
        config = ('listen on 127.0.0.1 port {port}\ntable users { "@" = "nobody" }\n'
                  f'action "local" maildir "{mail}/%{{rcpt.user}}" virtual <users> user "nobody"\n'
                  'match from any for any action "local"\n')
        # (a checkpoint a second after a commit, not 20 ms: the small messages' records are not voided yet when
        # the big one's files do not fit, whatever the machine's speed)
        daemon = SmtpdProcess(tmp_path, config, env={"SMTPD_QUEUE_CHECKPOINT_DELAY": "1"})
        with daemon:
            room = os.statvfs(small_spool)
            filler = small_spool / "filler"
            filler.write_bytes(b"f" * (room.f_bavail * room.f_frsize - 120 * 1024))
            tokens = [f"small{index}" for index in range(4)] + ["big"]
            sizes = [2000] * 4 + [200_000]
            accepted: list[str] = []
            for token, size in zip(tokens, sizes, strict=True):
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    client.sendmail("sender@example.org", [f"{token}@example.org"],
                                    f"Subject: {token}\r\n\r\n".encode() + (b"z" * 98 + b"\r\n") * (size // 100))
                accepted.append(token)

            def delivered() -> collections.Counter[str]:
                return collections.Counter({box.name: len(list((box / "new").iterdir()))
                                            for box in mail.iterdir() if (box / "new").is_dir()})

            def settled() -> bool:
                waiting = shown_msgids(daemon)[1]
                return len(waiting) + sum(delivered().values()) == len(accepted) and "big" not in delivered()

            deadline = time.monotonic() + 15  # (a liveness bound only)
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert settled(), (shown_msgids(daemon), delivered(), daemon.log())
            daemon.stop()
            if first_start == "still full":
                with pytest.raises(RuntimeError, match="smtpd exited at start"):
                    daemon.start()
                assert ("the commit journal holds acknowledged mail that cannot be written back" in daemon.log()
                        and "No space left on device); nothing is lost, the journal is kept: make room on the "
                            "spool's filesystem and start again" in daemon.log()), daemon.log()
            filler.unlink()
            daemon.start()
            # Delivered and gone from the queue: a copy written back a second time would still be queued or be
            # counted twice.
            deadline = time.monotonic() + 30
            while (sum(delivered().values()) < len(accepted) or queued_msgids(daemon)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert queued_msgids(daemon) == set()
            assert delivered() == collections.Counter(dict.fromkeys(accepted, 1))


def test_a_big_message_that_does_not_fit_while_it_arrives_gets_the_same_temporary_failure(
        tmp_path: Path, small_spool: Path) -> None:
    """Over 256 KiB a message goes to a file in temporary/ as it arrives; when that file cannot grow, the client
    gets the queue's temporary failure (not an internal error), and nothing of the message is left."""
    big = b"Subject: too big for the room left\r\n\r\n" + (b"y" * 76 + b"\r\n") * 20000  # 1.5 MB
    with SmtpdProcess(tmp_path, CONFIG, paused=("mta", "mda")) as daemon:
        assert send(daemon.port, 0, big) == (421, "4.3.0 Temporary failure")
        assert list((small_spool / "temporary").iterdir()) == []
        code, msgid = send(daemon.port, 1)  # a message that fits is taken as ever
        assert code == 250
        assert wait_for_queue(daemon, {msgid}) == {msgid}  # (listed once placed, a checkpoint after the 250)
        log = daemon.log()
    assert re.search(r"warn: \w+ smtp: (queue write failed|cannot write message file): No space left on device", log)
    assert "session failed" not in log


def test_sendmail_with_the_daemon_down_leaves_no_partial_file_when_the_spool_is_full(
        tmp_path: Path, small_spool: Path) -> None:
    """With the daemon down, sendmail keeps a message in offline/ for the next start to replay. If the file
    cannot be written whole, none is left (a replay would deliver a cut message): the message goes to
    ~/dead.letter and the exit status says it failed."""
    sendmail = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "sendmail")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "SMTPD_SPOOL": str(small_spool), "SMTPD_SOCKET": str(tmp_path / "no-daemon.sock"),
           "HOME": str(home)}
    offline = small_spool / "offline"
    too_big = "Subject: too big\n\n" + ("z" * 76 + "\n") * 50000  # 3.9 MB
    failed = subprocess.run([sendmail, "-f", "cron", "root"], input=too_big, capture_output=True, text=True,
                            env=env, timeout=60)
    assert (failed.returncode, failed.stderr) == (70, f"sendmail: cannot write the offline queue {offline}: No space "
                                                      "left on device\n")
    assert list(offline.iterdir()) == []
    assert (home / "dead.letter").read_text() == too_big
    kept = subprocess.run([sendmail, "-f", "cron", "root"], input="Subject: fits\n\nfits\n", capture_output=True,
                          text=True, env=env, timeout=60)
    assert kept.returncode == 75, kept.stderr
    [written] = list(offline.iterdir())
    assert not written.name.startswith(".")
    assert written.read_text() == "-f|cron|root\nSubject: fits\n\nfits\n"


@pytest.fixture
def small_mail_fs() -> Iterator[Path]:
    """A 300 KiB filesystem for the mailbox, owned by `nobody`, who the mail is delivered as (under a folder
    others may traverse, unlike pytest's tmp_path)."""
    with open_temp_dir("pysmtpd-full-mailbox-") as top:
        with tmpfs_at(Path(top) / "mail", "300k", "0755") as mount:
            os.chown(mount, pwd.getpwnam("nobody").pw_uid, -1)
            yield mount


def test_a_full_mailbox_filesystem_defers_delivery_and_delivers_once_there_is_room(
        tmp_path: Path, small_mail_fs: Path) -> None:
    """Delivery into a Maildir whose filesystem is full fails for now (the envelope waits, with the reason) and
    leaves nothing half written; once the owner makes room, the rest is delivered whole."""
    maildir = small_mail_fs / "Maildir"
    config = ('listen on 127.0.0.1 port {port}\ntable users { "@" = "nobody" }\n'
              f'action "local" maildir "{maildir}" virtual <users> user "nobody"\n'
              'match from any for domain "localhost" action "local"\n')
    with SmtpdProcess(tmp_path / "daemon", config) as daemon:
        for index in range(5):
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("sender@example.org", ["user@localhost"], BODY.replace(b"filling", b"mail %d" % index))
        def settled() -> list[str] | None:
            """The deferred envelopes' lines, once each of the 5 is delivered or deferred with its reason."""
            lines = daemon.smtpctl("show", "queue").stdout.splitlines()
            delivered = list((maildir / "new").glob("*")) if (maildir / "new").is_dir() else []
            if len(lines) + len(delivered) == 5 and all("No space left on device" in line for line in lines):
                return lines
            return None

        deadline = time.monotonic() + 15  # (a liveness bound only)
        while (deferred := settled()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert deferred is not None, daemon.smtpctl("show", "queue").stdout
        delivered_first = sorted((maildir / "new").iterdir())
        assert deferred and delivered_first  # some fit, some did not
        assert all(line.endswith(f"|{maildir}: No space left on device") for line in deferred)
        assert list((maildir / "tmp").iterdir()) == []  # nothing half written
        for path in delivered_first:  # the owner reads and deletes their mail
            path.unlink()
        assert daemon.smtpctl("schedule", "all").returncode == 0
        assert wait_for_queue(daemon, set()) == set()
        later = list((maildir / "new").iterdir())
        assert len(later) == len(deferred)
        assert all(path.read_bytes().endswith(b"x" * 76 + b"\n") for path in later)  # each one whole


def mbox_messages(mbox: Path) -> list[bytes]:
    """The messages of an mbox file, split at its `From ` separator lines."""
    data = mbox.read_bytes() if mbox.exists() else b""
    return [part for part in re.split(rb"(?:^|\n)From [^\n]*\n", data) if part]


def test_a_full_mbox_filesystem_defers_delivery_leaves_the_mbox_whole_and_delivers_once_there_is_room(
        tmp_path: Path, small_mail_fs: Path) -> None:
    """Appending to an mbox whose filesystem fills up fails for now: the part written is taken back (no message
    cut short in the mailbox, none marked delivered), and once the owner empties the mbox the rest arrive whole."""
    config = ('listen on 127.0.0.1 port {port}\ntable users { "user" = "nobody" }\n'
              'action "local" mbox alias <users>\nmatch from any for domain "localhost" action "local"\n')
    mbox = small_mail_fs / "nobody"
    with SmtpdProcess(tmp_path / "daemon", config, env={"SMTPD_MAILDIR_ROOT": str(small_mail_fs)}) as daemon:
        for index in range(5):
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("sender@example.org", ["user@localhost"], BODY.replace(b"filling", b"mail %d" % index))

        def settled() -> list[str] | None:
            lines = daemon.smtpctl("show", "queue").stdout.splitlines()
            if len(lines) + len(mbox_messages(mbox)) == 5 and all("No space left on device" in line for line in lines):
                return lines
            return None

        deferred = wait_until(settled, explain=lambda: daemon.smtpctl("show", "queue").stdout)
        first = mbox_messages(mbox)
        assert deferred and first  # some fit, some did not
        assert all(message.count(b"x" * 76 + b"\n") == 1300 for message in first)  # each one whole
        mbox.write_bytes(b"")  # the owner reads their mail
        assert daemon.smtpctl("schedule", "all").returncode == 0
        assert wait_for_queue(daemon, set()) == set()
        later = mbox_messages(mbox)
        assert len(later) == len(deferred)
        assert all(message.count(b"x" * 76 + b"\n") == 1300 for message in later)
        subjects = sorted(re.search(rb"Subject: mail (\d)", message)[1] for message in (*first, *later))
        assert subjects == [b"0", b"1", b"2", b"3", b"4"]  # each exactly once
