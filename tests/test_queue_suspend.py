"""`smtpctl pause envelope` survives a restart: the real daemon, mail received over SMTP, a paused envelope
shown with the `suspend` flag before the restart, while the daemon is down (offline) and after; it is not
delivered until `resume envelope`, while the other message is. Also many envelopes paused at once (every file
written) and loaded paused by a new queue."""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path

import pytest
from helpers_control import free_port, smtpctl
from helpers_delivery import Daemon, make_mail_root, open_temp_dir, system_user
from helpers_queue import Harness, run, wait_for
from waiting import wait_until

from smtpd.queue.format import load_envelope


def queue_lines(daemon: Daemon) -> dict[str, list[str]]:
    """evpid -> the 14 fields of its `show queue` line."""
    result = smtpctl(daemon.socket, "show", "queue", env=daemon.env)
    assert result.returncode == 0, result.stderr
    return {line.split("|")[0]: line.split("|") for line in result.stdout.splitlines()}


def maildir_subjects(user_home: str) -> list[str]:
    new = Path(user_home) / "Maildir" / "new"
    if not new.is_dir():
        return []
    subjects = []
    for path in new.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Subject: "):
                subjects.append(line[len("Subject: "):])
                break
    return sorted(subjects)


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-suspend-") as top, system_user(os.path.join(top), "psu") as user:
        yield top, make_mail_root(top), user


def test_a_paused_envelope_stays_paused_across_a_restart_until_resumed(world) -> None:
    top, mail_root, user = world
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              'action "md" maildir "~/Maildir"\n'
              'match from any for domain "maildir.test" action "md"\n')
    first = Daemon(top, config, mail_root, extra_args=("-P", "mda")).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            for subject in ("kept back", "goes now"):
                client.sendmail("sender@client.test", [f"{user.pw_name}@maildir.test"],
                                f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        lines = wait_until(lambda: len(queue_lines(first)) == 2 and queue_lines(first))
        [held] = [evpid for evpid in lines
                  if "Subject: kept back" in smtpctl(first.socket, "show", "message", evpid, env=first.env).stdout]
        paused = smtpctl(first.socket, "pause", "envelope", held[:8], env=first.env)
        assert paused.stdout == "1 envelope paused\n"
        flags = {evpid: fields[3] for evpid, fields in queue_lines(first).items()}
        assert flags[held] == "suspend"
        assert [value for evpid, value in flags.items() if evpid != held] == [""]
        envelope_file = smtpctl(first.socket, "show", "envelope", held, env=first.env)
        assert "\nflags: suspend\n" in envelope_file.stdout

        # Killed (no clean stop): the flag must already be on disk.
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
        first.process = None

        offline = queue_lines(first)
        assert offline[held][3] == "suspend" and offline[held][11] == "offline"
        assert [fields[3] for evpid, fields in offline.items() if evpid != held] == [""]
        # Offline, --state suspended finds the paused one by its flag on disk (it found nothing), and --state
        # offline finds every envelope.
        selected = smtpctl(first.socket, "show", "queue", "--state", "suspended", env=first.env).stdout.splitlines()
        assert [line.split("|")[0] for line in selected] == [held]
        everything = smtpctl(first.socket, "show", "queue", "--state", "offline", env=first.env).stdout.splitlines()
        assert len(everything) == 2
    finally:
        first.stop()

    second = Daemon(top, config, mail_root).start()  # deliveries running now
    try:
        wait_until(lambda: maildir_subjects(user.pw_dir) == ["goes now"])
        wait_until(lambda: list(queue_lines(second)) == [held])
        fields = queue_lines(second)[held]
        assert fields[3] == "suspend" and fields[11] == "pending"
        assert smtpctl(second.socket, "schedule", held, env=second.env).stdout == "0 envelope scheduled\n"
        # A message sent now is delivered while the paused one, due since the start, still is not.
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("sender@client.test", [f"{user.pw_name}@maildir.test"], b"Subject: probe\r\n\r\nx\r\n")
        wait_until(lambda: maildir_subjects(user.pw_dir) == ["goes now", "probe"], explain=second.log)
        wait_until(lambda: list(queue_lines(second)) == [held], explain=second.log)
        assert maildir_subjects(user.pw_dir) == ["goes now", "probe"]

        resumed = smtpctl(second.socket, "resume", "envelope", held, env=second.env)
        assert resumed.stdout == "1 envelope resumed\n"
        wait_until(lambda: maildir_subjects(user.pw_dir) == ["goes now", "kept back", "probe"])
        wait_until(lambda: queue_lines(second) == {})
        assert second.process is not None and second.process.poll() is None
    finally:
        second.stop()


def test_resume_clears_the_flag_on_disk_and_it_stays_cleared_after_a_restart(world) -> None:
    top, mail_root, user = world
    port = free_port()
    config = (f"listen on 127.0.0.1 port {port}\n"
              'action "md" maildir "~/Maildir"\n'
              'match from any for domain "maildir.test" action "md"\n')
    daemon = Daemon(top, config, mail_root, extra_args=("-P", "mda")).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("sender@client.test", [f"{user.pw_name}@maildir.test"], b"Subject: one\r\n\r\nx\r\n")
        [evpid] = wait_until(lambda: list(queue_lines(daemon)))
        assert smtpctl(daemon.socket, "pause", "envelope", "all", env=daemon.env).stdout == "1 envelope paused\n"
        assert smtpctl(daemon.socket, "pause", "envelope", "all", env=daemon.env).stdout == "0 envelope paused\n"
        assert smtpctl(daemon.socket, "resume", "envelope", evpid, env=daemon.env).stdout == "1 envelope resumed\n"
        assert "flags:" not in smtpctl(daemon.socket, "show", "envelope", evpid, env=daemon.env).stdout
        daemon.stop()
        assert queue_lines(daemon)[evpid][3] == ""  # offline
        daemon = Daemon(top, config, mail_root, extra_args=("-P", "mda")).start()
        assert wait_until(lambda: queue_lines(daemon).get(evpid))[3] == ""
    finally:
        daemon.stop()


def test_pausing_many_envelopes_writes_every_file_and_a_new_queue_loads_them_paused(tmp_path: Path) -> None:
    async def pause_all() -> list[int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            evpids: list[int] = []
            for number in range(6):
                _, ids = await harness.submit(recipients=tuple(f"r{number}.{index}@example.org" for index in range(5)))
                evpids.extend(ids)
            assert await harness.scheduler.suspend(harness.scheduler.select("all")) == 30
            return evpids

    evpids = run(pause_all())
    spool = tmp_path / "spool" / "queue"
    files = {int(path.name, 16): path for path in spool.rglob("*") if path.is_file() and path.name != "message"}
    assert sorted(files) == sorted(evpids)
    assert all(load_envelope(path.read_bytes()).flags == {"suspend"} for path in files.values())
    assert not [path for path in spool.rglob(".*.tmp")]

    async def restart_then_resume() -> None:
        async with Harness(tmp_path) as harness:  # deliveries running
            await harness.queue.loading_done.wait()
            assert {harness.scheduler.state_of(entry) for entry in harness.scheduler.entries.values()} == {"suspended"}
            assert len(harness.scheduler.entries) == 30
            half = [entry for entry in harness.scheduler.select("all") if entry.envelope.evpid % 2]
            assert await harness.scheduler.resume(half) == len(half)
            await wait_for(lambda: len(harness.mda.delivered) == len(half), what="the resumed deliveries")
            assert {item.envelope.evpid for item in harness.mda.delivered} == {entry.envelope.evpid for entry in half}
            assert len(harness.scheduler.entries) == 30 - len(half)

    run(restart_then_resume())


def test_an_envelope_removed_while_its_pause_is_written_does_not_come_back(tmp_path: Path, monkeypatch) -> None:
    """`smtpctl remove` while `pause envelope` rewrites the same file: the rewrite had checked that the file was
    there, the removal deleted it, and the rewrite then put it back (with `suspend`): the removed mail returned
    at the next start. The removal now waits for the rewrite and deletes the file after it."""
    import asyncio
    import threading

    from smtpd.control.registry import HANDLERS
    from smtpd.queue import spool as spool_module

    async def scenario() -> tuple[dict, dict, list[str], list[str]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            msgid, evpids = await harness.submit(recipients=("a@x.test", "b@x.test"))
            entered, gate = threading.Event(), threading.Event()
            replace_file = spool_module.replace_file

            def held(path: str, data: bytes, **options: object) -> None:
                entered.set()  # past the check that the file is there
                gate.wait(10)
                replace_file(path, data, **options)

            monkeypatch.setattr(spool_module, "replace_file", held)
            target = {"target": f"{evpids[0]:016x}"}
            pause = asyncio.ensure_future(HANDLERS["pause.envelope"](harness.daemon, target))
            await wait_for(entered.is_set, what="the rewrite started")
            remove = asyncio.ensure_future(HANDLERS["remove"](harness.daemon, target))
            await asyncio.sleep(0.3)  # (before the fix, the removal had deleted the file by now)
            gate.set()
            paused, removed = await pause, await remove
            folder = harness.spool / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"
            expected = sorted(["message", f"{evpids[1]:016x}"])
            return paused, removed, sorted(os.listdir(folder)), expected

    paused, removed, files, expected = run(scenario())
    assert paused == {"count": 1} and removed == {"count": 1}
    assert files == expected
