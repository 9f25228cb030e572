"""Crash safety: a process running the real queue and scheduler, receiving and delivering under load, is killed
with SIGKILL at random moments, many times, and restarted on the same spool. Then:

* every acknowledged message is delivered (at least once),
* no message whose receiving had not reached its commit is ever delivered,
* no delivered message is partial,
* nothing is left in the spool once the last run drained it.

(A message whose commit was asked but not acknowledged when the kill came is in doubt: it may be delivered.)

A kill keeps the page cache, so the message folders written since the last checkpoint of the commit journal
survive it. The power-cut variant deletes those folders after every kill (what a power cut could do to files
never flushed): the journal must bring every acknowledged one back.
"""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_queue import crash_payload

from smtpd.queue.journal import Journal
from smtpd.queue.store import JOURNAL_FILES

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ROUNDS = 12


def worker(tmp_path: Path, code: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def read_until_killed(process: subprocess.Popen[bytes], kill_after: float) -> list[str]:
    """Read the worker's reports; SIGKILL it `kill_after` seconds after it is READY."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    received = b""
    deadline: float | None = None
    started = time.monotonic()
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            process.send_signal(signal.SIGKILL)
            break
        if time.monotonic() - started > 60:
            process.kill()
            raise AssertionError("the worker never became ready")
        ready, _, _ = select.select([fd], [], [], 0.01)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            received += chunk
            if deadline is None and b"READY\n" in received:
                deadline = time.monotonic() + kill_after
    while chunk := os.read(fd, 65536):  # what the worker wrote before it died
        received += chunk
    process.wait(timeout=30)
    errors = process.stderr.read().decode() if process.stderr else ""
    assert process.returncode == -signal.SIGKILL, errors
    return received.decode().splitlines()


def _requested_size(name: str, body_size: int) -> int:
    """The size crash_payload was asked for that gives this body size (it rounds down to whole lines)."""
    for requested in (100, 2000, 30000, 200000):
        line = len((name * 8)[:70]) + 1
        if max(1, requested // line) * line == body_size:
            return requested
    raise AssertionError(f"{name}: unexpected body size {body_size}")


def lose_unflushed_folders(spool: Path) -> int:
    """What a power cut could do after a kill: the folders of the commits the journal holds beyond its last
    checkpoint were never flushed; delete them. Returns how many were deleted."""
    records = []
    for name in JOURNAL_FILES:
        if not (spool / name).exists():
            continue
        journal = Journal(str(spool / name), 16 << 20)
        journal.open()
        try:
            checkpoint = journal.read_checkpoint()
            records += [record for record in journal.records() if record.seq > checkpoint]
        finally:
            journal.close()
    lost = 0
    for record in records:
        name = f"{record.msgid:08x}"
        for folder in (spool / "queue" / name[:2] / name, spool / "incoming" / name):
            if folder.exists():
                shutil.rmtree(folder)
                lost += 1
    return lost


@pytest.mark.parametrize(("power_cut", "clients"), [(False, 8), (True, 8), (True, 1)],
                         ids=["kill", "kill-and-power-cut", "kill-and-power-cut-one-client"])
def test_kill_9_at_random_moments_loses_no_acknowledged_mail(tmp_path: Path, power_cut: bool, clients: int) -> None:
    """(With one client, a commit is alone: its files are written after its acknowledgement.)"""
    randomizer = random.Random(int(os.environ.get("CRASH_SEED", "0")) or None)
    written: set[str] = set()
    committing: set[str] = set()
    acknowledged: set[str] = set()
    lost = 0
    # (with a power cut: checkpoints 0.3 s apart, so that a kill finds commits the journal alone holds; few folders
    # made ahead, so that delivered messages' folders are soon taken back for new ones)
    env = {"SMTPD_QUEUE_SPARE_FOLDERS": "4"} | ({"SMTPD_QUEUE_CHECKPOINT_DELAY": "0.3"} if power_cut else {})
    for round_number in range(ROUNDS if not power_cut else ROUNDS // 2):
        process = worker(tmp_path, f"import helpers_queue; helpers_queue.crash_worker({str(tmp_path)!r}, "
                                   f"{round_number}, {clients})", env)
        for line in read_until_killed(process, randomizer.uniform(0.05, 0.6)):
            kind, _, token = line.partition(" ")
            {"WRITE": written, "COMMIT": committing, "ACK": acknowledged}.get(kind, set()).add(token)
        if power_cut:
            lost += lose_unflushed_folders(tmp_path / "spool")
    assert len(acknowledged) > ROUNDS // 2  # the load was real
    assert lost or not power_cut  # the journal had something to bring back

    drain = worker(tmp_path, f"import helpers_queue; helpers_queue.drain_worker({str(tmp_path)!r})")
    output, errors = drain.communicate(timeout=180)
    assert drain.returncode == 0, errors.decode()
    assert b"DRAINED" in output

    delivered: dict[str, bytes] = {}
    for path in (tmp_path / "delivered").iterdir():
        assert not path.name.startswith("."), f"a partial delivery file: {path.name}"
        data = path.read_bytes()
        token = re.match(rb"Subject: (\S+)\n", data)
        assert token is not None, f"{path.name} has no Subject: {data[:60]!r}"
        name = token.group(1).decode()
        assert path.name.split("-", 1)[1] == f"{name}@y.test", f"{name} delivered to {path.name}"
        size = int(re.search(rb"X-Size: (\d+)", data).group(1))  # type: ignore[union-attr]
        body = data[data.index(b"\n\n") + 2:]
        assert len(body) == size + len(f"END {name}\n"), f"partial message {name}"
        assert data == crash_payload(name, _requested_size(name, size)), f"damaged message {name}"
        delivered[name] = data

    missing = acknowledged - delivered.keys()
    assert not missing, f"acknowledged but never delivered: {sorted(missing)[:5]}"
    ghosts = delivered.keys() - committing
    assert not ghosts, f"delivered although never committed: {sorted(ghosts)[:5]}"
    assert delivered.keys() <= written
    spool = tmp_path / "spool"
    leftovers = [path for sub in ("temporary", "incoming", "purge") for path in (spool / sub).iterdir()]
    assert leftovers == []
    assert list((spool / "queue").glob("*/*")) == []
