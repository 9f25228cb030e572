"""Corrupt and unreadable queue files with the real daemon: a garbage envelope, a message file that cannot be
read as one, and a FIFO named like an envelope, placed in the spool before the start and while it runs (then
`smtpctl discover`). Each is moved aside under corrupt/ with a `.why`, logged, listed by `show queue` on stderr
and by `show queue --corrupt` (online and offline), and the daemon goes on serving the rest."""

from __future__ import annotations

import collections
import json
import os
import pwd
import shutil
import smtplib
from pathlib import Path

import pytest
from daemon import ROOT, SmtpdProcess, placed
from helpers_control import DaemonProcess
from helpers_delivery import open_temp_dir
from helpers_queue import Harness, paused_daemon, run, wait_for
from waiting import wait_until

from smtpd.queue.format import dump_envelope, load_envelope

NOBODY = pwd.getpwnam("nobody").pw_uid


def message_dir(spool: Path, msgid: int) -> Path:
    return spool / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"


def fill(tmp_path: Path) -> list[list[int]]:
    async def scenario() -> list[list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            messages = []
            for number in range(4):
                _, evpids = await harness.submit(f"Subject: m{number}\n\nbody {number}\n".encode(),
                                                 recipients=(f"a{number}@one.test", f"b{number}@two.test"))
                messages.append(evpids)
            return messages

    return run(scenario())


def queued_evpids(process) -> set[int]:
    result = process.smtpctl("show", "queue")
    assert result.returncode == 0, result.stderr
    return {int(line.split("|")[0], 16) for line in result.stdout.splitlines()}


def corrupt_listing(process, *extra: str) -> list[list[str]]:
    result = process.smtpctl("show", "queue", "--corrupt", *extra)
    assert result.returncode == 0, result.stderr
    return [line.split("|", 2) for line in result.stdout.splitlines()]


def test_corrupt_files_before_start_and_while_running_are_moved_aside_and_listed(tmp_path: Path) -> None:
    messages = fill(tmp_path)
    spool = tmp_path / "spool"
    garbage_evpid = messages[0][1]
    garbage = message_dir(spool, garbage_evpid >> 32) / f"{garbage_evpid:016x}"
    garbage.write_bytes(b"\x00\x01\x02 garbage \xff\n")
    unreadable_msgid = messages[1][0] >> 32
    (message_dir(spool, unreadable_msgid) / "message").unlink()
    (message_dir(spool, unreadable_msgid) / "message").mkdir()  # there, but no message can be read from it
    fifo_evpid = (messages[2][0] >> 32 << 32) | 0x00ABCDEF
    os.mkfifo(message_dir(spool, fifo_evpid >> 32) / f"{fifo_evpid:016x}")  # opening it must not block

    process = paused_daemon(tmp_path)
    process.start()
    try:
        healthy = {messages[0][0], *messages[2], *messages[3]}
        wait_until(lambda: queued_evpids(process) == healthy, explain=process.log)
        corrupt = spool / "corrupt"
        assert sorted(name for name in os.listdir(corrupt) if not name.endswith(".why")) == sorted(
            [f"{garbage_evpid >> 32:08x}.{garbage_evpid:016x}", f"{unreadable_msgid:08x}",
             f"{fifo_evpid >> 32:08x}.{fifo_evpid:016x}",
             # copies of the messages whose other envelopes stay queued (for repairing these)
             f"{garbage_evpid >> 32:08x}.message", f"{fifo_evpid >> 32:08x}.message"])
        assert not garbage.exists() and not message_dir(spool, unreadable_msgid).exists()
        assert (corrupt / f"{unreadable_msgid:08x}.why").read_text() == "message file is not a regular file\n"
        assert (corrupt / f"{fifo_evpid >> 32:08x}.{fifo_evpid:016x}.why").read_text() == \
            f"not a regular file; the message is kept as corrupt/{fifo_evpid >> 32:08x}.message\n"
        # The unreadable message's envelopes are kept with it, for whoever repairs it.
        assert sorted(os.listdir(corrupt / f"{unreadable_msgid:08x}")) == sorted(
            ["message", *(f"{evpid:016x}" for evpid in messages[1])])

        log = process.log()
        assert log.count("corrupt queue file moved aside to corrupt/") == 3
        assert f"corrupt/{garbage_evpid >> 32:08x}.{garbage_evpid:016x}: not a pysmtpd-envelope file" in log

        shown = process.smtpctl("show", "queue")
        assert f"corrupt/{unreadable_msgid:08x}: message file is not a regular file" in shown.stderr
        listing = corrupt_listing(process)
        assert [path for path, _, _ in listing] == sorted(
            [f"corrupt/{garbage_evpid >> 32:08x}.{garbage_evpid:016x}", f"corrupt/{unreadable_msgid:08x}",
             f"corrupt/{fifo_evpid >> 32:08x}.{fifo_evpid:016x}"])
        assert all(int(moved) > 0 for _, moved, _ in listing)
        records = [json.loads(line) for line in process.smtpctl("show", "queue", "--corrupt", "--json")
                   .stdout.splitlines()]
        assert {record["path"]: record["reason"] for record in records}[f"corrupt/{unreadable_msgid:08x}"] == \
            "message file is not a regular file"

        # While running: garbage next to a good envelope, in a folder the daemon knows and in a new one.
        known = message_dir(spool, messages[3][0] >> 32)
        late_evpid = (messages[3][0] >> 32 << 32) | 0x00000BAD
        (known / f"{late_evpid:016x}").write_text("format: pysmtpd-envelope\nversion: 9\n")
        new_msgid = 0x7E00C0DE if (messages[3][0] >> 56) != 0x7E else 0x7D00C0DE
        target = message_dir(spool, new_msgid)
        target.mkdir()
        shutil.copyfile(known / "message", target / "message")
        good = load_envelope((known / f"{messages[3][0]:016x}").read_bytes())
        good.evpid = (new_msgid << 32) | 1
        (target / f"{good.evpid:016x}").write_bytes(dump_envelope(good))
        (target / f"{(new_msgid << 32) | 2:016x}").write_bytes(b"evpid: nonsense\n")

        assert process.smtpctl("discover", f"{messages[3][0] >> 32:08x}").stdout == "0 envelopes discovered\n"
        assert process.smtpctl("discover", f"{new_msgid:08x}").stdout == "1 envelope discovered\n"
        assert queued_evpids(process) == healthy | {good.evpid}
        assert not (known / f"{late_evpid:016x}").exists()
        assert "unsupported envelope version '9' (expected 1)" in (
            corrupt / f"{late_evpid >> 32:08x}.{late_evpid:016x}.why").read_text()
        assert len(corrupt_listing(process)) == 5
        assert process.alive()
    finally:
        process.stop()

    # Offline (daemon down): smtpctl reads corrupt/ and finds what is still unreadable under queue/, moving nothing.
    still_bad = message_dir(spool, messages[3][0] >> 32) / f"{messages[3][1]:016x}"
    still_bad.write_bytes(b"truncated")
    offline = corrupt_listing(process)
    assert len(offline) == 6
    assert offline[-1] == [f"queue/{messages[3][0] >> 56:02x}/{messages[3][0] >> 32:08x}/{messages[3][1]:016x}",
                           "0", "truncated envelope (no final newline)"]
    assert still_bad.exists()

    # A restart moves that one aside too, and goes on.
    process.start()
    try:
        wait_until(lambda: not still_bad.exists(), explain=process.log)
        assert len(corrupt_listing(process)) == 6
        assert queued_evpids(process) == (healthy | {good.evpid}) - {messages[3][1]}
    finally:
        process.stop()


def test_odd_names_in_incoming_do_not_stop_the_start(tmp_path: Path) -> None:
    """incoming/ holds commits in progress; a symbolic link there named like one (looping, or leading to a
    folder elsewhere) is no commit of ours: dropped, not followed. Before, a looping one made the daemon exit at
    start (`Too many levels of symbolic links`). A real commit left there beside it is still placed."""
    messages = fill(tmp_path)
    spool = tmp_path / "spool"
    left = message_dir(spool, messages[0][0] >> 32)
    left.rename(spool / "incoming" / left.name)  # a complete commit a crash left before its move under queue/
    (spool / "incoming" / "0badf00d").symlink_to("0badf00d")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(message_dir(spool, messages[1][0] >> 32), elsewhere)
    (spool / "incoming" / "0badf00e").symlink_to(elsewhere)

    process = paused_daemon(tmp_path)
    process.start()
    try:
        everything = {evpid for evpids in messages for evpid in evpids}
        wait_until(lambda: queued_evpids(process) == everything, explain=process.log)
        assert os.listdir(spool / "incoming") == []
        assert sorted(os.listdir(elsewhere)) == sorted(["message", *(f"{evpid:016x}" for evpid in messages[1])])
        assert "placed 1 acknowledged message(s)" in process.log()
    finally:
        process.stop()


def test_a_message_none_of_whose_envelopes_loads_goes_aside_whole_and_can_be_repaired(tmp_path: Path) -> None:
    """Envelopes of a newer format (a downgrade): the message goes to corrupt/ with them. Before, only the
    envelopes went, the folder was left with its message alone, and the next start deleted it as delivered."""
    messages = fill(tmp_path)
    spool = tmp_path / "spool"
    msgid = messages[0][0] >> 32
    folder = message_dir(spool, msgid)
    original = (folder / "message").read_bytes()
    for evpid in messages[0]:
        path = folder / f"{evpid:016x}"
        path.write_text(path.read_text().replace("version: 1\n", "version: 2\n"))

    offline = corrupt_listing(DaemonProcess(tmp_path))
    assert [(path, reason.startswith("no envelope of the message can be loaded")) for path, _, reason in offline] \
        == [(f"queue/{msgid >> 24:02x}/{msgid:08x}", True)]

    process = paused_daemon(tmp_path)
    process.start()
    try:
        healthy = {evpid for evpids in messages[1:] for evpid in evpids}
        wait_until(lambda: queued_evpids(process) == healthy, explain=process.log)
        ((path, _, reason),) = corrupt_listing(process)
        assert path == f"corrupt/{msgid:08x}"
        assert f"{messages[0][0]:016x}: unsupported envelope version '2' (expected 1)" in reason
        process.restart()  # the message is not deleted by a later start
        wait_until(lambda: queued_evpids(process) == healthy, explain=process.log)
        aside = spool / "corrupt" / f"{msgid:08x}"
        assert (aside / "message").read_bytes() == original
        # Repaired by hand and put back, `smtpctl discover` queues it again.
        for evpid in messages[0]:
            path = aside / f"{evpid:016x}"
            path.write_text(path.read_text().replace("version: 2\n", "version: 1\n"))
        aside.rename(folder)
        assert process.smtpctl("discover", f"{msgid:08x}").stdout == "2 envelopes discovered\n"
        assert queued_evpids(process) == healthy | set(messages[0])
    finally:
        process.stop()


def test_a_message_folder_that_cannot_be_listed_is_moved_aside_and_the_rest_still_loads(tmp_path: Path) -> None:
    """A name under queue/XX/ that is no readable folder (a symbolic link to itself, one to nothing, a plain
    file) goes aside; before, the loop's error ended the loading (the queue stayed "still being loaded" and the
    messages after it were never delivered) and made `mailq` with the daemon down die with a traceback."""
    messages = fill(tmp_path)
    spool = tmp_path / "spool"
    looping, dangling, plain = (message_dir(spool, messages[index][0] >> 32) for index in range(3))
    for folder in (looping, dangling, plain):
        shutil.rmtree(folder)
    looping.symlink_to(looping.name)
    dangling.symlink_to("/nonexistent/folder")
    plain.write_text("not a folder\n")
    odd = message_dir(spool, messages[3][0] >> 32)
    (odd / ".left-by-a-crash.tmp").write_text("")  # a good message that is loaded the careful way

    offline = DaemonProcess(tmp_path).smtpctl("show", "queue")  # (no daemon yet: smtpctl reads the spool)
    assert offline.returncode == 0, offline.stderr
    assert {int(line.split("|")[0], 16) for line in offline.stdout.splitlines()} == set(messages[3])
    assert f"queue/{looping.parent.name}/{looping.name}: message folder unreadable: Too many levels of symbolic " \
           "links" in offline.stderr

    process = paused_daemon(tmp_path)
    process.start()
    try:
        wait_until(lambda: "envelope(s) of 4 message(s) loaded" in process.log(), explain=process.log)
        assert queued_evpids(process) == set(messages[3])
        reasons = {path: reason for path, _, reason in corrupt_listing(process)}
        assert reasons == {f"corrupt/{looping.name}": "message folder unreadable: Too many levels of symbolic links",
                           f"corrupt/{dangling.name}": "message folder is a symbolic link to nothing",
                           f"corrupt/{plain.name}": "message folder is not a folder"}
        assert not any(os.path.lexists(path) for path in (looping, dangling, plain))
        assert process.alive()
    finally:
        process.stop()


def test_a_message_with_some_envelopes_corrupt_is_kept_beside_them_once_the_others_are_delivered(
        tmp_path: Path) -> None:
    """One envelope of two does not load: the other is delivered and the message folder purged, but a copy of
    the message stays in corrupt/ beside the envelope moved aside, so that the recipient can still be repaired.
    Before, the envelope was kept with no message left to deliver it with."""
    messages = fill(tmp_path)
    spool = tmp_path / "spool"
    good, bad = messages[0]
    msgid = good >> 32
    folder = message_dir(spool, msgid)
    original = (folder / "message").read_bytes()
    bad_file = folder / f"{bad:016x}"
    bad_file.write_text(bad_file.read_text().replace("version: 1\n", "version: 2\n"))

    async def scenario() -> None:
        async with Harness(tmp_path) as harness:
            await harness.queue.loading_done.wait()
            await wait_for(lambda: good in {item.envelope.evpid for item in harness.mda.delivered}
                           and not folder.exists())

    run(scenario())
    corrupt = spool / "corrupt"
    assert (corrupt / f"{msgid:08x}.message").read_bytes() == original
    assert (corrupt / f"{msgid:08x}.{bad:016x}").exists()
    why = (corrupt / f"{msgid:08x}.{bad:016x}.why").read_text()
    assert f"the message is kept as corrupt/{msgid:08x}.message" in why
    listed = [path for path, _, _ in corrupt_listing(DaemonProcess(tmp_path))]
    assert listed == [f"corrupt/{msgid:08x}.{bad:016x}"]  # (the copy is no corrupt file of its own)


def test_bytes_that_are_not_utf8_in_a_queue_file_are_shown_as_they_are_online_and_offline(tmp_path: Path) -> None:
    """An envelope edited by hand with a byte that is not UTF-8 loads (the format keeps bytes); `show queue`
    prints it as the byte it is, with the daemon down and up. Up, the control answer could not be encoded, and
    every `show queue` failed with an internal error."""
    import subprocess
    import sys

    messages = fill(tmp_path)
    evpid = messages[0][0]
    path = message_dir(tmp_path / "spool", evpid >> 32) / f"{evpid:016x}"
    path.write_bytes(path.read_bytes().replace(b"\nrcpt: a0@", b"\nrcpt: a0\xff@"))

    def show(process: DaemonProcess, *extra: str) -> bytes:
        completed = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", process.socket, "show", "queue",
                                    *extra], capture_output=True, timeout=60, cwd=str(ROOT),
                                   env={**os.environ, **process.env, "PYTHONPATH": str(ROOT)})
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    assert b"|a0\xff@one.test|" in show(DaemonProcess(tmp_path))
    process = paused_daemon(tmp_path)
    process.start()
    try:
        wait_until(lambda: "envelope(s) of 4 message(s) loaded" in process.log(), explain=process.log)
        listing = show(process)
        assert b"|a0\xff@one.test|" in listing and len(listing.splitlines()) == 8
        records = [json.loads(line) for line in show(process, "--json").splitlines()]
        assert {record["rcpt"] for record in records} >= {"a0\udcff@one.test", "b0@two.test"}
    finally:
        process.stop()


@pytest.mark.parametrize("damage", ["cut short", "grown"])
def test_a_message_file_damaged_after_its_commit_is_moved_aside_not_delivered(tmp_path: Path, damage: str) -> None:
    """A message file whose size is no longer what its commit wrote (a damaged disk, a hand edit) is not
    delivered as if whole: the message goes aside with its envelopes, is logged and listed, and the rest of the
    queue is delivered."""
    with open_temp_dir() as top:  # (nobody cannot enter tmp_path)
        check_damaged_message_is_set_aside(tmp_path, Path(top) / "Maildir", damage)


def check_damaged_message_is_set_aside(tmp_path: Path, maildir: Path, damage: str) -> None:
    maildir.mkdir()
    os.chown(maildir, NOBODY, NOBODY)
    config = ('listen on 127.0.0.1 port {port}\ntable users { "@" = "nobody" }\n'
              f'action "local" maildir "{maildir}" virtual <users> user "nobody"\n'
              'match from any for domain "localhost" action "local"\n')
    body = b"Subject: whole\r\n\r\n" + b"a line of the body\r\n" * 500
    with SmtpdProcess(tmp_path / "daemon", config, paused=("mda",)) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("sender@example.org", ["one@localhost", "two@localhost"], body)
            client.sendmail("sender@example.org", ["three@localhost"], body.replace(b"whole", b"other"))
        lines = wait_until(lambda: len(found := daemon.smtpctl("show", "queue").stdout.splitlines()) == 3 and found)
        damaged = collections.Counter(line[:8] for line in lines).most_common(1)[0][0]  # the one of two recipients
        message = placed(daemon.spool / "queue" / damaged[:2] / damaged / "message")
        written = message.stat().st_size
        if damage == "cut short":
            os.truncate(message, written // 2)
        else:
            with message.open("ab") as handle:
                handle.write(b"garbage\n")
        size = message.stat().st_size
        assert daemon.smtpctl("resume", "mda").returncode == 0
        wait_until(lambda: daemon.smtpctl("show", "queue").stdout == "", explain=daemon.log)
        delivered = [path.read_bytes() for path in (maildir / "new").iterdir()]
        assert len(delivered) == 1 and b"Subject: other" in delivered[0]  # the other message only
        assert [(path, reason) for path, _, reason in corrupt_listing(daemon)] == [
            (f"corrupt/{damaged}", f"message file has {size} bytes where its commit wrote {written}")]
        aside = daemon.spool / "corrupt" / damaged
        assert sorted(name for name in os.listdir(aside) if name != "message") == sorted(
            line[:16] for line in lines if line.startswith(damaged))  # its envelopes kept with it, for repair
        assert f"corrupt queue file moved aside to corrupt/{damaged}" in daemon.log()
