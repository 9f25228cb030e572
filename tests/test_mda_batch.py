"""Mailbox writes in batches (smtpd/mda: MAILBOX_BATCH; smtpd/mda/forkserver.py): messages for one mailbox
delivered at the same time share one child of the fork helper, and each still gets its own result."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pwd
import re
import smtplib
import subprocess
from pathlib import Path

import pytest
from daemon import SmtpdProcess
from helpers_delivery import (
    DictTables,
    local_action,
    make_config,
    make_mail_root,
    mda_envelope,
    open_temp_dir,
    system_user,
    write_message,
)
from helpers_queue import Harness, run, wait_for
from waiting import wait_until

from smtpd.config.model import Method
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mda import MdaAgent, local
from smtpd.mda.privilege import ForkServer

NOBODY_UID = pwd.getpwnam("nobody").pw_uid
MESSAGE = "From: Alice <alice@sender.test>\nSubject: batch {n}\n\nFrom here on\nbody {n}\n"


@pytest.fixture()
def spool(monkeypatch):
    with open_temp_dir() as top:
        tmp_path = Path(top)
        monkeypatch.setenv("SMTPD_MAILDIR_ROOT", make_mail_root(top))
        homes = tmp_path / "homes"
        homes.mkdir(mode=0o755)
        yield tmp_path, str(homes)


@pytest.fixture()
def bob(spool):
    with system_user(spool[1], "pbt") as entry:
        yield entry


def agent_for(method: Method, **options: object) -> MdaAgent:
    return MdaAgent(make_config([local_action("local", method, **options)], []), DictTables(), "mx.example.org")


async def deliver_all(agent: MdaAgent, envelopes_and_paths: list[tuple[object, str]]) -> list[DeliveryResult]:
    try:
        return await asyncio.gather(*(agent.deliver(envelope, path) for envelope, path in envelopes_and_paths))
    finally:
        await agent.stop()


def writer_pids(folder: str) -> set[str]:
    """The pids in the Maildir file names (`...P<pid>Q...`): one per child that wrote there."""
    return {re.search(r"P(\d+)Q", name).group(1) for name in os.listdir(folder)}  # type: ignore[union-attr]


def test_concurrent_maildir_deliveries_share_a_child_and_each_is_reported(spool, bob) -> None:
    tmp_path, _ = spool
    agent = agent_for(Method.MAILDIR)
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    paths = [write_message(str(tmp_path / f"m{n}"), MESSAGE.format(n=n)) for n in range(12)]
    results = run(deliver_all(agent, [(envelope, path) for path in paths]))
    assert [result.outcome for result in results] == [Outcome.OK] * 12
    new = os.path.join(bob.pw_dir, "Maildir", "new")
    bodies = sorted(Path(new, name).read_text() for name in os.listdir(new))
    assert [body.count("Subject: batch") for body in bodies] == [1] * 12
    assert {re.search(r"body (\d+)", body).group(1) for body in bodies} == {str(n) for n in range(12)}  # type: ignore[union-attr]
    assert all(Path(new, name).stat().st_uid == bob.pw_uid for name in os.listdir(new))
    assert len(writer_pids(new)) < 12  # batched: fewer children than messages
    assert os.listdir(os.path.join(bob.pw_dir, "Maildir", "tmp")) == []


def test_a_failed_message_in_a_batch_fails_alone(spool, bob) -> None:
    tmp_path, _ = spool
    agent = agent_for(Method.MAILDIR, junk=True)
    maildir = Path(bob.pw_dir, "Maildir")
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / ".Junk").write_text("not a folder\n")  # the spam message's folder cannot be made
    for path in (maildir, *maildir.iterdir()):
        os.chown(path, bob.pw_uid, bob.pw_gid)
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    paths = [write_message(str(tmp_path / f"m{n}"), MESSAGE.format(n=n)) for n in range(6)]
    paths[3] = write_message(str(tmp_path / "spam"), "X-Spam: yes\n" + MESSAGE.format(n=3))
    results = run(deliver_all(agent, [(envelope, path) for path in paths]))
    assert [result.outcome for result in results] == [Outcome.OK] * 3 + [Outcome.TEMPFAIL] + [Outcome.OK] * 2
    assert ".Junk" in results[3].text
    assert len(os.listdir(maildir / "new")) == 5
    assert len(writer_pids(str(maildir / "new"))) < 5


def test_concurrent_mbox_deliveries_are_whole_and_separate(spool, bob) -> None:
    tmp_path, _ = spool
    agent = agent_for(Method.MBOX)
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    paths = [write_message(str(tmp_path / f"m{n}"), MESSAGE.format(n=n)) for n in range(10)]
    results = run(deliver_all(agent, [(envelope, path) for path in paths]))
    assert [result.outcome for result in results] == [Outcome.OK] * 10
    mbox = Path(os.environ["SMTPD_MAILDIR_ROOT"], bob.pw_name).read_text()
    assert len(re.findall(r"^From alice@sender\.test ", mbox, re.MULTILINE)) == 10
    assert mbox.count("\n>From here on\n") == 10
    assert sorted(re.findall(r"body (\d+)", mbox), key=int) == [str(n) for n in range(10)]


def test_a_child_past_its_time_limit_fails_every_unreported_message(spool, bob) -> None:
    tmp_path, _ = spool
    mbox = str(tmp_path / "locked-mbox")
    fd = os.open(mbox, os.O_RDWR | os.O_CREAT, 0o600)
    os.fchown(fd, bob.pw_uid, bob.pw_gid)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # held by us: the child waits for it until it is killed
    messages = [open(write_message(str(tmp_path / f"m{n}"), MESSAGE.format(n=n)), "rb") for n in range(3)]
    identity = {"uid": bob.pw_uid, "gid": bob.pw_gid, "groups": [bob.pw_gid], "home": bob.pw_dir}

    async def scenario() -> list[object]:
        helper = ForkServer()
        try:
            return await helper.run_batch(
                {"method": "mboxfile", "path": mbox, "identity": identity, "timeout": 0.5,
                 "items": [{"sender": "a@b.test", "prefix": ""}] * 3},
                [message.fileno() for message in messages], [{}, {}, {}])
        finally:
            await helper.stop()

    try:
        results = run(scenario())
    finally:
        os.close(fd)
        for message in messages:
            message.close()
    assert len(results) == 3
    assert all(result.timed_out and result.status != 0 for result in results)  # type: ignore[attr-defined]
    assert os.path.getsize(mbox) == 0


def test_a_helper_request_without_one_descriptor_per_item_fails_each_item(spool) -> None:
    tmp_path, _ = spool
    message = open(write_message(str(tmp_path / "m"), MESSAGE.format(n=0)), "rb")

    async def scenario() -> list[object]:
        helper = ForkServer()
        try:
            return await helper.run_batch(
                {"method": "maildir", "directory": str(tmp_path / "Maildir"),
                 "identity": {"uid": 65534, "gid": 65534, "groups": [65534], "home": "/"},
                 "items": [{"prefix": ""}, {"prefix": ""}]}, [message.fileno()], [{}, {}])
        finally:
            await helper.stop()

    try:
        results = run(scenario())
    finally:
        message.close()
    assert [result.status for result in results] == [local.EX_TEMPFAIL]  # type: ignore[attr-defined]


def test_removals_after_deliveries_are_batched_and_finished_by_stop(tmp_path: Path) -> None:
    async def scenario() -> Harness:
        async with Harness(tmp_path) as harness:
            for n in range(20):
                await harness.submit(f"Subject: {n}\n\nx\n".encode(), recipients=("a@x.test", "b@x.test"))
            await wait_for(lambda: len(harness.mda.delivered) == 40, what="forty deliveries")
            await wait_for(lambda: not harness.scheduler.entries, what="envelopes forgotten")
        return harness

    harness = run(scenario())
    assert list((tmp_path / "spool" / "queue").glob("*/*")) == []
    assert not harness.scheduler.removals


def test_queue_removal_results_per_envelope(tmp_path: Path) -> None:
    async def scenario() -> list[bool]:
        async with Harness(tmp_path) as harness:
            harness.daemon.paused.add("mda")  # nothing delivers: the envelopes stay queued
            _, evpids = await harness.submit(recipients=("a@x.test", "b@x.test", "c@x.test"))
            missing = evpids[0] ^ 1
            return list(await asyncio.gather(*(harness.queue.remove_envelope(evpid)
                                               for evpid in (*evpids, missing, evpids[0]))))

    assert run(scenario()) == [True, True, True, False, False]
    assert list((tmp_path / "spool" / "queue").glob("*/*")) == []


def child_pids(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # (gone meanwhile)
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def test_a_helper_that_cannot_fork_fails_that_batch_alone_and_delivers_the_running_one_once() -> None:
    """Out of descriptors (or processes), the fork helper could not start a child: it died, and the batch its
    child was still writing was reported failed, tried again, and delivered twice. Now the batch it cannot start
    fails for now, and the one under way is reported as it ends: each message is in its mbox once."""
    with open_temp_dir() as top:
        root = Path(top) / "mail"
        root.mkdir()
        os.chmod(root, 0o1777)
        mbox = root / "nobody"
        mbox.write_bytes(b"")
        os.chown(mbox, NOBODY_UID, NOBODY_UID)
        config = ('listen on 127.0.0.1 port {port}\ntable users { "a" = "nobody", "b" = "daemon" }\n'
                  'action "local" mbox alias <users>\nmatch from any for domain "localhost" action "local"\n')
        with SmtpdProcess(Path(top) / "daemon", config, env={"SMTPD_MAILDIR_ROOT": str(root)}) as daemon:
            holder = os.open(mbox, os.O_RDWR)
            fcntl.lockf(holder, fcntl.LOCK_EX)  # a mail reader holds the mbox: the child for `a` waits
            try:
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    client.sendmail("s@example.org", ["a@localhost"], b"Subject: to a\r\n\r\nhello a\r\n")
                helper = wait_until(lambda: next((pid for pid in child_pids(daemon.process.pid)
                                                  if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
                                                  and child_pids(pid)), None))
                limits = subprocess.run(["prlimit", f"--pid={helper}", "--nofile", "--raw", "--noheadings",
                                         "--output=SOFT,HARD"], check=True, capture_output=True, text=True)
                soft, hard = limits.stdout.split()
                open_now = len(os.listdir(f"/proc/{helper}/fd"))  # room for the next message's descriptor only
                subprocess.run(["prlimit", f"--pid={helper}", f"--nofile={open_now + 1}:{hard}"], check=True)
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    client.sendmail("s@example.org", ["b@localhost"], b"Subject: to b\r\n\r\nhello b\r\n")
                deferred = wait_until(lambda: [line for line in daemon.smtpctl("show", "queue").stdout.splitlines()
                                               if "|b@localhost|" in line and not line.endswith("|")],
                                      explain=daemon.log)
                subprocess.run(["prlimit", f"--pid={helper}", f"--nofile={soft}:{hard}"], check=False)  # (gone
                # by now, before the fix)
            finally:
                os.close(holder)  # the reader lets go

            def delivered() -> bool:
                daemon.smtpctl("schedule", "all")
                return daemon.smtpctl("show", "queue").stdout == ""

            wait_until(delivered, explain=daemon.log)
            assert mbox.read_bytes().count(b"hello a") == 1, daemon.log()
            assert (root / "daemon").read_bytes().count(b"hello b") == 1
            assert deferred[0].endswith("|delivery helper: pipe: Too many open files"), deferred
