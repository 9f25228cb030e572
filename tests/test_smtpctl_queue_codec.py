"""smtpctl on a spool stored compressed and/or encrypted (`queue compression`, `queue encryption`), the daemon
down: `show envelope` / `show message` print the clear text, with the key of smtpd.conf or one typed at the
`key> ` prompt (pexpect drives a real pty), and the offline `show queue` lists encrypted envelopes with
smtpd.conf's key, or counts them in one stderr line without it. The spool's files are written by the queue's
codec itself, so these are the bytes the daemon stores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pexpect
from helpers_control import ROOT

from smtpd.queue.codec import QueueCodec
from smtpd.queue.envelope import Envelope, EnvelopeType
from smtpd.queue.format import dump_envelope

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210fedcba9876543210"
MESSAGE = b"Received: from client.test (localhost [127.0.0.1])\n\tby mx.test.example;\nSubject: secret\n\nbody\n"
CTIME = int(time.time()) - 60  # one time for every envelope: the tests compare files with what they wrote
RULES = 'action "local" mbox\nmatch from local for local action "local"\n'

CLEAR = QueueCodec()
GZIP = QueueCodec(compress=True)
ENCRYPTED = QueueCodec(key=KEY.encode())
BOTH = QueueCodec(compress=True, key=KEY.encode())


def store(spool: Path, msgid: int, codec: QueueCodec, recipients: tuple[str, ...] = ("bob@example.org",)) -> list[int]:
    """A committed message as the daemon stores it under ``codec``: its message file and one envelope file per
    recipient. Returns the evpids."""
    folder = spool / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
    folder.mkdir(parents=True)
    (folder / "message").write_bytes(codec.encode(MESSAGE))
    evpids = []
    for number, rcpt in enumerate(recipients, 1):
        evpid = (msgid << 32) | number
        (folder / f"{evpid:016x}").write_bytes(codec.encode(dump_envelope(envelope(evpid, rcpt))))
        evpids.append(evpid)
    return evpids


def envelope(evpid: int, rcpt: str) -> Envelope:
    return Envelope(evpid=evpid, dispatcher="local", type=EnvelopeType.MDA, smtpname="mx.test.example",
                    helo="client.test", hostname="localhost", sockaddr="127.0.0.1", sender="alice@example.com",
                    rcpt=rcpt, dest=rcpt, ctime=CTIME, ttl=345600)


def config(tmp_path: Path, queue_lines: str) -> Path:
    path = tmp_path / "smtpd.conf"
    path.write_text(queue_lines + RULES)
    return path


def environment(tmp_path: Path, config_path: Path) -> dict[str, str]:
    return dict(os.environ, SMTPD_SPOOL=str(tmp_path / "spool"), SMTPD_SOCKET=str(tmp_path / "smtpd.sock"),
                SMTPD_CONFIG=str(config_path), PYTHONPATH=str(ROOT))


def smtpctl(tmp_path: Path, config_path: Path, *args: str, prog: str = "smtpctl") -> subprocess.CompletedProcess[str]:
    """The smtpctl program (or its mailq personality), stdin not a terminal, on tmp_path's spool."""
    code = f"from smtpctl.cli import main; main(prog={prog!r})"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environment(tmp_path, config_path),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def on_terminal(tmp_path: Path, config_path: Path, *args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "smtpctl", *args], env=environment(tmp_path, config_path),
                         cwd=str(ROOT), encoding="utf-8", timeout=30)


def file_of(tmp_path: Path, evpid: int, name: str | None = None) -> str:
    msgid = evpid >> 32
    return str(tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}" / (name or f"{evpid:016x}"))


def test_show_message_and_envelope_print_the_clear_text_of_every_kind_of_file(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    conf = config(tmp_path, f"queue compression\nqueue encryption {KEY}\n")
    for msgid, codec in ((0x1A000001, GZIP), (0x2B000002, ENCRYPTED), (0x3C000003, BOTH)):
        evpid = store(spool, msgid, codec)[0]
        assert Path(file_of(tmp_path, evpid, "message")).read_bytes() != MESSAGE  # stored encoded
        for target in (f"{msgid:08x}", f"{evpid:016x}") if codec is BOTH else (f"{msgid:08x}",):
            shown = smtpctl(tmp_path, conf, "show", "message", target)
            assert (shown.returncode, shown.stdout, shown.stderr) == (0, MESSAGE.decode(), "")
        shown = smtpctl(tmp_path, conf, "show", "envelope", f"{evpid:016x}")
        assert (shown.returncode, shown.stderr) == (0, "")
        assert shown.stdout == dump_envelope(envelope(evpid, "bob@example.org")).decode()
        assert shown.stdout.startswith(f"format: pysmtpd-envelope\nversion: 1\nevpid: {evpid:016x}\n")


def test_without_a_terminal_or_a_key_an_encrypted_file_is_one_error_line(tmp_path: Path) -> None:
    evpid = store(tmp_path / "spool", 0x2B000002, BOTH)[0]
    for queue_lines in ("queue encryption\n", "queue encryption stdin\n", ""):
        conf = config(tmp_path, queue_lines)
        shown = smtpctl(tmp_path, conf, "show", "envelope", f"{evpid:016x}")
        assert (shown.returncode, shown.stdout) == (1, "")
        assert shown.stderr == (f"smtpctl: {file_of(tmp_path, evpid)}: encrypted, and {conf} names no queue "
                                f"encryption key; give the key with `queue encryption KEY` in {conf}, or run smtpctl "
                                "on a terminal to type it\n")
    missing = tmp_path / "absent.conf"
    shown = smtpctl(tmp_path, missing, "show", "message", f"{evpid:016x}")
    assert shown.returncode == 1
    assert shown.stderr.startswith(f"smtpctl: {file_of(tmp_path, evpid, 'message')}: encrypted, and {missing} "
                                   f"cannot be used (pushfile: {missing}: No such file or directory); ")
    # Compression alone needs no key, and no configuration.
    gzip_evpid = store(tmp_path / "spool", 0x1A000001, GZIP)[0]
    shown = smtpctl(tmp_path, missing, "show", "message", f"{gzip_evpid:016x}")
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, MESSAGE.decode(), "")


def test_a_wrong_key_in_the_configuration_or_damaged_data_is_an_error_naming_the_file(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    evpid = store(spool, 0x2B000002, ENCRYPTED)[0]
    other = config(tmp_path, f"queue encryption {OTHER_KEY}\n")
    shown = smtpctl(tmp_path, other, "show", "message", f"{evpid >> 32:08x}")
    assert (shown.returncode, shown.stdout) == (1, "")
    assert shown.stderr == (f"smtpctl: {file_of(tmp_path, evpid, 'message')}: cannot be decrypted with the queue "
                            f"encryption key in {other} (another key, or a damaged file)\n")

    # The right key, and a file whose compressed content is damaged behind a valid encryption.
    right = config(tmp_path, f"queue encryption {KEY}\n")
    damaged = store(spool, 0x3C000003, CLEAR)[0]
    Path(file_of(tmp_path, damaged, "message")).write_bytes(ENCRYPTED.encode(b"\x1f\x8b\x08\x00 not deflate"))
    shown = smtpctl(tmp_path, right, "show", "message", f"{damaged:016x}")
    assert (shown.returncode, shown.stdout) == (1, "")
    assert shown.stderr.startswith(f"smtpctl: {file_of(tmp_path, damaged, 'message')}: damaged compressed data (")
    # A gzip file cut short.
    Path(file_of(tmp_path, damaged)).write_bytes(GZIP.encode(dump_envelope(envelope(damaged, "x@example.org")))[:-6])
    shown = smtpctl(tmp_path, right, "show", "envelope", f"{damaged:016x}")
    assert (shown.returncode, shown.stdout, shown.stderr) == (
        1, "", f"smtpctl: {file_of(tmp_path, damaged)}: compressed data cut short\n")


NOT_THIS_KEY = "smtpctl: this key does not decrypt the file\r\n"


def answer(terminal: pexpect.spawn, key: str, note: str | None = None) -> None:
    """Type ``key`` at the `key> ` prompt; then ``note`` must be what smtpctl says of it."""
    terminal.expect_exact("key> ")
    terminal.sendline(key)
    if note is not None:
        terminal.expect_exact(note)


def test_on_a_terminal_the_key_is_asked_for_and_a_wrong_one_asked_again(tmp_path: Path) -> None:
    evpid = store(tmp_path / "spool", 0x3C000003, BOTH)[0]
    conf = config(tmp_path, "queue encryption stdin\n")
    terminal = on_terminal(tmp_path, conf, "show", "message", f"{evpid:016x}")
    try:
        answer(terminal, OTHER_KEY, NOT_THIS_KEY)
        answer(terminal, KEY)
        terminal.expect(pexpect.EOF)
        printed = terminal.before
    finally:
        terminal.close(force=True)
    assert terminal.exitstatus == 0
    assert printed.replace("\r\n", "\n").lstrip("\n") == MESSAGE.decode()
    assert KEY not in printed and OTHER_KEY not in printed  # not echoed


def test_on_a_terminal_three_wrong_keys_end_in_an_error(tmp_path: Path) -> None:
    evpid = store(tmp_path / "spool", 0x2B000002, ENCRYPTED)[0]
    conf = config(tmp_path, "")
    terminal = on_terminal(tmp_path, conf, "show", "envelope", f"{evpid:016x}")
    try:
        answer(terminal, "too short", "smtpctl: a queue encryption key is 32 characters long\r\n")
        for _ in range(2):
            answer(terminal, OTHER_KEY, NOT_THIS_KEY)
        terminal.expect_exact(f"smtpctl: {file_of(tmp_path, evpid)}: cannot be decrypted with the keys typed (3 "
                              "tries: another key, or a damaged file)\r\n")
        terminal.expect(pexpect.EOF)
        assert "key> " not in terminal.before
    finally:
        terminal.close(force=True)
    assert terminal.exitstatus == 1


def test_offline_show_queue_lists_encrypted_envelopes_with_the_configured_key(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    evpids = (store(spool, 0x1A000001, CLEAR) + store(spool, 0x2B000002, BOTH, ("carol@example.org", "dan@ex.test"))
              + store(spool, 0x3C000003, GZIP))
    conf = config(tmp_path, f"queue compression\nqueue encryption {KEY}\n")
    listed = smtpctl(tmp_path, conf, prog="mailq")
    assert (listed.returncode, listed.stderr) == (0, "")
    lines = listed.stdout.splitlines()
    assert [int(line.split("|")[0], 16) for line in lines] == evpids
    assert [line.split("|")[5] for line in lines] == ["bob@example.org", "carol@example.org", "dan@ex.test",
                                                       "bob@example.org"]
    assert all(line.split("|")[11] == "offline" for line in lines)


def test_offline_show_queue_without_the_key_says_once_what_it_leaves_out(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    clear = store(spool, 0x1A000001, CLEAR)
    store(spool, 0x2B000002, BOTH, ("carol@example.org", "dan@ex.test"))
    store(spool, 0x3C000003, ENCRYPTED)
    packed = store(spool, 0x4D000004, GZIP)
    for conf in (config(tmp_path, "queue encryption\n"), config(tmp_path, "queue encryption \"-\"\n")):
        listed = smtpctl(tmp_path, conf, "show", "queue")
        assert listed.returncode == 0
        assert [int(line.split("|")[0], 16) for line in listed.stdout.splitlines()] == clear + packed
        assert listed.stderr == f"smtpctl: 3 envelopes not shown: encrypted, and {conf} names no queue encryption key\n"

    # With another key than the spool's: also one line, and the spool is left as it is.
    before = sorted(str(path.relative_to(spool)) for path in spool.rglob("*"))
    other = config(tmp_path, f"queue encryption {OTHER_KEY}\n")
    listed = smtpctl(tmp_path, other, "--json", prog="mailq")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 2
    assert listed.stderr == (f"mailq: 3 envelopes not shown: they cannot be decrypted with the queue encryption "
                             f"key in {other} (another key, or damaged)\n")
    assert sorted(str(path.relative_to(spool)) for path in spool.rglob("*")) == before


def test_offline_show_queue_still_reports_a_damaged_file_beside_encrypted_ones(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    evpids = store(spool, 0x2B000002, ENCRYPTED, ("carol@example.org", "dan@ex.test"))
    Path(file_of(tmp_path, evpids[1])).write_bytes(b"format: pysmtpd-envelope\nversion: 9\n")
    listed = smtpctl(tmp_path, config(tmp_path, ""), "show", "queue")
    assert (listed.returncode, listed.stdout) == (0, "")
    problems = listed.stderr.splitlines()
    assert len(problems) == 2
    assert problems[0].startswith(f"smtpctl: corrupt queue file queue/2b/2b000002.{evpids[1]:016x}: ")
    assert problems[1] == f"smtpctl: 1 envelope not shown: encrypted, and {tmp_path}/smtpd.conf names no queue " \
                          "encryption key"
