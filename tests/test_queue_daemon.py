"""The queue commands against a running daemon (its own process, real control socket, deliveries paused):
show queue (lines, JSON, one message, filters), pause/resume envelope, remove (dry run and real), schedule,
discover, show envelope/message, and a corrupt file moved aside by the daemon and reported by smtpctl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_queue import Harness, paused_daemon, run
from waiting import wait_until

from smtpd.queue.format import dump_envelope, load_envelope


def fill(tmp_path: Path) -> dict[str, list[int]]:
    async def scenario() -> dict[str, list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            _, first = await harness.submit(b"Subject: first\n\none\n", recipients=("a@one.test", "b@two.test"))
            _, second = await harness.submit(b"Subject: second\n\ntwo\n", recipients=("c@two.test",),
                                             sender="carol@example.com")
            return {"first": first, "second": second}

    return run(scenario())


@pytest.fixture
def daemon(tmp_path: Path):
    ids = fill(tmp_path)
    process = paused_daemon(tmp_path)
    process.ids = ids  # type: ignore[attr-defined]
    process.start()
    wait_until(lambda: len(process.smtpctl("show", "queue").stdout.splitlines()) >= 3, 20, explain=process.log)
    yield process
    process.stop()


def lines(result) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [line.split("|") for line in result.stdout.splitlines()]


def test_show_queue_lines_json_and_one_message(daemon) -> None:
    first, second = daemon.ids["first"], daemon.ids["second"]
    rows = lines(daemon.smtpctl("show", "queue"))
    assert sorted(row[0] for row in rows) == sorted(f"{evpid:016x}" for evpid in first + second)
    for row in rows:
        assert len(row) == 14
        assert row[11] == "pending"  # mda paused: due, waiting
        assert int(row[12]) <= 0
        assert int(row[8]) - int(row[7]) == 4 * 86400
    one = lines(daemon.smtpctl("sh", "q", f"{first[0] >> 32:08x}"))
    assert sorted(row[5] for row in one) == ["a@one.test", "b@two.test"]
    records = [json.loads(line) for line in daemon.smtpctl("show", "queue", "--json", "--sender", "carol").stdout
               .splitlines()]
    assert [(record["rcpt"], record["runstate"]) for record in records] == [("c@two.test", "pending")]
    assert isinstance(records[0]["runvalue"], int)


def test_pause_resume_remove_schedule_with_reference_counts(daemon) -> None:
    first, second = daemon.ids["first"], daemon.ids["second"]
    msgid = f"{first[0] >> 32:08x}"
    assert daemon.smtpctl("pause", "envelope", msgid).stdout == "2 envelopes paused\n"
    suspended = lines(daemon.smtpctl("show", "queue", "--state", "suspended"))
    assert sorted(row[3] for row in suspended) == ["suspend", "suspend"]
    assert daemon.smtpctl("resume", "envelope", f"{first[0]:016x}").stdout == "1 envelope resumed\n"
    assert daemon.smtpctl("resume", "envelope", "all").stdout == "1 envelope resumed\n"
    assert daemon.smtpctl("schedule", "all").stdout == "3 envelopes scheduled\n"

    dry = daemon.smtpctl("remove", "--domain", "two.test", "--dry-run")
    assert dry.returncode == 0
    assert sorted(row.split("|")[5] for row in dry.stdout.splitlines()[:-1]) == ["b@two.test", "c@two.test"]
    assert dry.stdout.splitlines()[-1] == "2 envelopes would be removed (dry run)"
    assert len(lines(daemon.smtpctl("show", "queue"))) == 3  # nothing removed by the dry run

    assert daemon.smtpctl("remove", f"{second[0]:016x}").stdout == "1 envelope removed\n"
    assert daemon.smtpctl("remove", f"{second[0]:016x}").stdout == "0 envelope removed\n"
    assert sorted(row[5] for row in lines(daemon.smtpctl("show", "queue"))) == ["a@one.test", "b@two.test"]
    message_dir = daemon.spool / "queue" / f"{second[0] >> 56:02x}" / f"{second[0] >> 32:08x}"
    wait_until(lambda: not message_dir.exists(), 10)  # the last envelope gone: the message goes too


def test_discover_show_envelope_and_message(daemon) -> None:
    first = daemon.ids["first"]
    source = daemon.spool / "queue" / f"{first[0] >> 56:02x}" / f"{first[0] >> 32:08x}"
    new_msgid = 0x7E000001 if (first[0] >> 56) != 0x7E else 0x7D000001
    target = daemon.spool / "queue" / f"{new_msgid >> 24:02x}" / f"{new_msgid:08x}"
    target.mkdir()
    (target / "message").write_bytes((source / "message").read_bytes())
    envelope = load_envelope((source / f"{first[0]:016x}").read_bytes())
    envelope.evpid = (new_msgid << 32) | 5
    (target / f"{envelope.evpid:016x}").write_bytes(dump_envelope(envelope))

    assert daemon.smtpctl("discover", f"{new_msgid:08x}").stdout == "1 envelope discovered\n"
    assert daemon.smtpctl("discover", f"{new_msgid:08x}").stdout == "0 envelopes discovered\n"
    assert len(lines(daemon.smtpctl("show", "queue"))) == 4
    shown = daemon.smtpctl("show", "envelope", f"{envelope.evpid:016x}")
    assert shown.returncode == 0 and "rcpt: a@one.test\n" in shown.stdout
    message = daemon.smtpctl("show", "message", f"{envelope.evpid:016x}")
    assert message.stdout == "Subject: first\n\none\n"
    missing = daemon.smtpctl("show", "envelope", "0123456789abcdef")
    assert (missing.returncode, missing.stderr) == (1, "smtpctl: fopen: No such file or directory\n")


def test_corrupt_file_is_moved_aside_by_the_daemon_and_reported(tmp_path: Path) -> None:
    ids = fill(tmp_path)
    evpid = ids["first"][1]
    path = tmp_path / "spool" / "queue" / f"{evpid >> 56:02x}" / f"{evpid >> 32:08x}" / f"{evpid:016x}"
    path.write_bytes(b"version: 9\nnonsense\n")  # (version 3 is OpenSMTPD 6.8's, read by its rules)
    process = paused_daemon(tmp_path)
    process.start()
    try:
        wait_until(lambda: not path.exists(), 20, explain=process.log)
        result = process.smtpctl("show", "queue")
        assert len(result.stdout.splitlines()) == 2
        assert f"corrupt/{evpid >> 32:08x}.{evpid:016x}: not a pysmtpd-envelope file" in result.stderr
        assert process.alive()
        assert "corrupt queue file moved aside" in process.log()
    finally:
        process.stop()


def test_sender_at_selects_only_the_null_sender(tmp_path: Path) -> None:
    """docs/queue.md: `--sender @` is the null sender. As a plain substring it matched every address, so
    `smtpctl remove --sender @` (meant for the reports) removed the whole queue."""

    async def scenario() -> tuple[list[int], list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            _, ordinary = await harness.submit(recipients=("a@one.test", "b@two.test"))
            _, report = await harness.submit(sender="", recipients=("c@one.test",))
            return ordinary, report

    ordinary, report = run(scenario())
    offline = lines(run_smtpctl_offline(tmp_path, "show", "queue", "--sender", "@"))
    assert [row[0] for row in offline] == [f"{report[0]:016x}"]
    process = paused_daemon(tmp_path)
    process.start()
    try:
        wait_until(lambda: len(process.smtpctl("show", "queue").stdout.splitlines()) == 3, 20,
                   explain=process.log)
        shown = lines(process.smtpctl("show", "queue", "--sender", "@"))
        assert [(row[0], row[4]) for row in shown] == [(f"{report[0]:016x}", "@")]
        dry = process.smtpctl("remove", "--sender", "@", "--dry-run")
        assert dry.stdout.splitlines()[-1] == "1 envelope would be removed (dry run)"
        assert process.smtpctl("remove", "--sender", "@").stdout == "1 envelope removed\n"
        left = lines(process.smtpctl("show", "queue"))
        assert sorted(row[0] for row in left) == sorted(f"{evpid:016x}" for evpid in ordinary)
        # a substring with an @ in it still matches addresses as before
        assert len(lines(process.smtpctl("show", "queue", "--sender", "ALICE@"))) == 2
    finally:
        process.stop()


def run_smtpctl_offline(tmp_path: Path, *args: str):
    """smtpctl with the daemon down, on tmp_path's spool (as tests/test_queue_commands.py runs it)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, SMTPD_SPOOL=str(tmp_path / "spool"), SMTPD_SOCKET=str(tmp_path / "smtpd.sock"),
               PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-m", "smtpctl", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)


def test_an_empty_filter_is_refused_not_read_as_all(daemon) -> None:
    """The daemon reads an empty filter as none, and a changing command with a filter but no target acts on
    `all`: `smtpctl remove --domain "$D"` with D empty removed every envelope. smtpctl refuses the empty value."""
    for command in (("remove",), ("schedule",), ("pause", "envelope"), ("resume", "envelope"), ("show", "queue")):
        for option in ("--domain", "--sender", "--rcpt"):
            result = daemon.smtpctl(*command, option, "")
            assert result.returncode == 255, (command, option, result.stdout)
            assert f"Invalid value for {option}: must not be empty" in result.stderr
    assert len(lines(daemon.smtpctl("show", "queue"))) == 3  # nothing removed
    dry = daemon.smtpctl("remove", "--domain", "two.test", "--dry-run")
    assert dry.stdout.splitlines()[-1] == "2 envelopes would be removed (dry run)"
