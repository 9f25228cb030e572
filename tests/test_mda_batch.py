"""Mailbox writes in batches (smtpd/mda: MAILBOX_BATCH; smtpd/mda/forkserver.py): messages for one mailbox
delivered at the same time share one child of the fork helper, and each still gets its own result."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
from pathlib import Path

import pytest
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

from smtpd.config.model import Method
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mda import MdaAgent, local
from smtpd.mda.privilege import ForkServer

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
