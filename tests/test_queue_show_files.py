"""`smtpctl show envelope EVPID` / `show message MSGID|EVPID` as reference §2.4: the file printed as it is,
no daemon needed (tested with it down and running), `smtpctl: fopen: No such file or directory` and exit 1 for
a missing file, `possibilities are:` and exit 255 for a word that is not an id (checked against the real
OpenSMTPD 6.8 smtpctl, whose grammar errors do not depend on the spool)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

from helpers_queue import Harness, paused_daemon, run

ROOT = Path(__file__).resolve().parent.parent
OPENSMTPD_SMTPCTL = "/usr/sbin/smtpctl"


def smtpctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Our smtpctl on tmp_path's spool and socket (the daemon there may be down)."""
    env = dict(os.environ, SMTPD_SPOOL=str(tmp_path / "spool"), SMTPD_SOCKET=str(tmp_path / "smtpd.sock"),
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "smtpctl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def fill(tmp_path: Path) -> tuple[int, list[int]]:
    async def scenario() -> tuple[int, list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            return await harness.submit(b"Subject: shown\n\nline one\nline two\n",
                                        recipients=("a@one.test", "b@two.test"))

    return run(scenario())


def message_dir(tmp_path: Path, msgid: int) -> Path:
    return tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"


def check_files_are_printed(tmp_path: Path, msgid: int, evpids: list[int]) -> None:
    folder = message_dir(tmp_path, msgid)
    for evpid in evpids:
        shown = smtpctl(tmp_path, "show", "envelope", f"{evpid:016x}")
        assert (shown.returncode, shown.stderr) == (0, "")
        assert shown.stdout == (folder / f"{evpid:016x}").read_text()
        assert shown.stdout.startswith("format: pysmtpd-envelope\nversion: 1\n")
        by_evpid = smtpctl(tmp_path, "show", "message", f"{evpid:016x}")
        assert (by_evpid.returncode, by_evpid.stdout) == (0, "Subject: shown\n\nline one\nline two\n")
    by_msgid = smtpctl(tmp_path, "show", "message", f"{msgid:08x}")
    assert (by_msgid.returncode, by_msgid.stdout) == (0, "Subject: shown\n\nline one\nline two\n")
    upper = smtpctl(tmp_path, "show", "envelope", f"{evpids[0]:016X}")
    assert upper.stdout == (folder / f"{evpids[0]:016x}").read_text()

    other_msgid = msgid ^ 0x00FF0000
    for args in (("show", "envelope", f"{(msgid << 32) | 0xDEAD:016x}"), ("show", "message", f"{other_msgid:08x}"),
                 ("show", "message", f"{(other_msgid << 32) | 1:016x}")):
        missing = smtpctl(tmp_path, *args)
        assert (missing.returncode, missing.stdout, missing.stderr) == (
            1, "", "smtpctl: fopen: No such file or directory\n"), args


def test_show_envelope_and_message_with_the_daemon_down_and_running(tmp_path: Path) -> None:
    msgid, evpids = fill(tmp_path)
    check_files_are_printed(tmp_path, msgid, evpids)  # no daemon
    process = paused_daemon(tmp_path)
    process.start()
    try:
        check_files_are_printed(tmp_path, msgid, evpids)
        assert process.alive()
    finally:
        process.stop()


def test_a_gzip_message_file_is_printed_uncompressed(tmp_path: Path) -> None:
    msgid, _ = fill(tmp_path)
    path = message_dir(tmp_path, msgid) / "message"
    path.write_bytes(gzip.compress(b"Subject: packed\n\nzipped body\n"))
    shown = smtpctl(tmp_path, "show", "message", f"{msgid:08x}")
    assert (shown.returncode, shown.stdout) == (0, "Subject: packed\n\nzipped body\n")


def test_bad_words_list_what_was_expected_as_opensmtpd_does(tmp_path: Path) -> None:
    cases = [("show", "message", "0123"), ("show", "message", "00000000"), ("show", "message", "0123456789abcdeg"),
             ("show", "envelope", "0123"), ("show", "envelope", "0000000000000000"), ("show", "envelope", "01234567"),
             ("show", "envelope"), ("show", "message"), ("show", "envelope", "0123456789abcdef", "extra")]
    for case in cases:
        ours = smtpctl(tmp_path, *case)
        reference = subprocess.run([OPENSMTPD_SMTPCTL, *case], capture_output=True, text=True, timeout=30)
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            reference.returncode, reference.stdout, reference.stderr), case
        assert ours.returncode == 255
    expected = smtpctl(tmp_path, "show", "message", "0123")
    assert expected.stderr == "possibilities are:\nshow message <msgid>\nshow message <evpid>\n"
