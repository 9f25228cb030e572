"""A spool the daemon cannot write at start: one `smtpd: queue: ...` line naming the file and the reason, exit 1.
On a read-only filesystem the start said `the commit journal holds acknowledged mail that cannot be written back
(...: Read-only file system); ... make room on the spool's filesystem`, when the journal held nothing and room was
not the trouble; a file where a folder of the spool belongs gave Python's `[Errno 17] File exists: '...'`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess, tmpfs_at

CONFIG = 'listen on 127.0.0.1 port {port}\naction "relay" relay\nmatch from any for any action "relay"\n'


@pytest.fixture
def tmpfs_spool(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "spool", "8m", "0711") as spool:
        yield spool


def failed_start(daemon: SmtpdProcess) -> str:
    with pytest.raises(RuntimeError, match="exited at start with 1"):
        daemon.start()
    return daemon.log()


def remount(spool: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(spool)], check=True)


def test_a_read_only_spool_is_named_as_such(tmp_path: Path, tmpfs_spool: Path) -> None:
    daemon = SmtpdProcess(tmp_path, CONFIG)
    daemon.start()
    daemon.stop()  # a clean stop: the journal holds nothing
    remount(tmpfs_spool, "ro")
    log = failed_start(daemon)
    assert (f"smtpd: queue: the commit journal cannot be opened ({tmpfs_spool}/journal.a: Read-only file system)"
            in log), log
    assert "make room" not in log and "holds acknowledged mail" not in log

    remount(tmpfs_spool, "rw")
    (tmpfs_spool / "queue" / "7f").rmdir()  # a folder the start has to make
    remount(tmpfs_spool, "ro")
    log = failed_start(daemon)
    assert f"smtpd: queue: the spool cannot be used ({tmpfs_spool}/queue/7f: Read-only file system)" in log, log


def test_a_file_where_a_spool_folder_belongs(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "queue").write_text("")
    log = failed_start(SmtpdProcess(tmp_path, CONFIG))
    assert f"smtpd: queue: the spool cannot be used ({spool}/queue: not a folder)" in log, log
    assert "Errno" not in log


@pytest.mark.parametrize(("folder", "change", "reason"), [
    ("queue", "mode", "writable by others than its owner (mode 0777)"),
    ("queue/7f", "mode", "writable by others than its owner (mode 0770)"),
    (".", "mode", "writable by others than its owner (mode 0777)"),
    ("incoming", "owner", "owned by uid 65534, not by the daemon's (uid 0)"),
])
def test_a_spool_folder_others_could_write_into_stops_the_start(tmp_path: Path, folder: str, change: str,
                                                                 reason: str) -> None:
    """Anyone who can write under queue/ can put an envelope there that the daemon delivers (a command run as
    any user): a spool folder writable by others, or owned by another user, stops the start with one line, as
    OpenSMTPD refuses a spool of the wrong mode or owner."""
    daemon = SmtpdProcess(tmp_path, CONFIG)
    with daemon:  # (it makes the spool)
        pass
    path = (daemon.spool / folder).resolve()
    if change == "mode":
        path.chmod(0o777 if "0777" in reason else 0o770)
    else:
        os.chown(path, 65534, -1)
    try:
        log = failed_start(daemon)
    finally:
        daemon.stop()  # (when it started after all)
    assert f"smtpd: queue: the spool cannot be used ({path}: {reason})" in log, log
    path.chmod(0o700 if folder != "." else 0o711)
    os.chown(path, 0, -1)
    with daemon:  # put right, it starts
        assert daemon.alive()
