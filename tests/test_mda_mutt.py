"""mutt and our mbox delivery share the mailbox: the same locks (mutt_dotlock's PATH.lock, fcntl), the same format.

mutt runs for real, as the mailbox's owner, in a detached tmux session (it needs a terminal): a muttrc `push`
pipes every message of the mailbox into a file, one separator after each, and quits.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid

import pytest
from helpers_delivery import (
    local_action,
    mail_world,
    make_config,
    mda_envelope,
    write_message,
)

from smtpd.config.model import Method
from smtpd.delivery import Outcome
from smtpd.mda import MdaAgent

SEPARATOR = "=====PYSMTPD-MUTT-SPLIT====="
BODIES = [
    "Subject: first\n\nhello\n",
    "Subject: from lines\n\nFrom the start\nFrom someone@example.org Wed Nov 25 10:00:00 2026\n\n"
    "From after a blank line\n>From quoted already\nend\n",
    "Subject: dots\n\n.\n..\n.leading dot\nno final newline",
]


@pytest.fixture()
def world(monkeypatch):
    with mail_world(monkeypatch, "pysmtpd-mutt-", "pmu") as made:
        yield made


def expected_text(body: str, user: str) -> str:
    """What mutt pipes out: our two header lines, the message, `From ` lines quoted as mbox stores them."""
    text = f"Return-Path: <alice@sender.test>\nDelivered-To: {user}@example.org\n" + body
    if not text.endswith("\n"):
        text += "\n"
    return "\n".join(">" + line if line.startswith("From ") else line for line in text.split("\n"))


def deliver(agent: MdaAgent, top: str, user: str, body: str, name: str):
    path = write_message(os.path.join(top, name), body)
    return agent.deliver(mda_envelope("local", f"{user}@example.org", user), path)


def run_mutt(top: str, user: str, mbox: str, keys: str, read_only: bool = True) -> str:
    """Run mutt as user on mbox in a detached tmux session, typing keys (which must end with <quit>)."""
    work = os.path.join(top, f"mutt-{uuid.uuid4().hex[:8]}")
    os.mkdir(work)
    os.chmod(work, 0o777)  # mutt runs as the user and writes its output here
    muttrc = os.path.join(work, "muttrc")
    with open(muttrc, "w") as handle:
        handle.write(
            # folder: without it mutt first asks whether to create ~/Mail, and that prompt eats the pushed keys.
            f"set folder={work}\nset mbox_type=mbox\nset sort=mailbox-order\nset pipe_split=yes\nset pipe_decode=no\n"
            f'set pipe_sep="{SEPARATOR}\\n"\nset wait_key=no\nset quit=yes\nset move=no\nset mark_old=no\n'
            f'set delete=yes\nset keep_flagged=no\npush "{keys}"\n')
    os.chmod(muttrc, 0o644)
    socket_name = f"pysmtpd-mutt-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket_name, "-f", "/dev/null"]
    flags = "-R " if read_only else ""
    subprocess.run([*tmux, "new-session", "-d", "-x", "160", "-y", "40",
                    f"runuser -u {user} -- env HOME={work} mutt -n {flags}-F {muttrc} -f {mbox}"], check=True)
    wait_for_mutt(tmux)
    return work


def wait_for_mutt(tmux: list[str]) -> None:
    """Wait for mutt to quit. When the mailbox changes under it, mutt shows a notice that can swallow one of the
    pushed keys and leave it idle in the index; after a while the test types sync and quit itself, as a user
    would (what the test checks is the mailbox's content, not mutt's keystroke handling)."""
    try:
        started = time.monotonic()
        nudged = started
        while subprocess.run([*tmux, "has-session"], capture_output=True).returncode == 0:
            now = time.monotonic()
            if now - started > 60:
                screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout
                raise AssertionError(f"mutt did not finish; its screen:\n{screen}")
            if now - started > 10 and now - nudged > 3:
                subprocess.run([*tmux, "send-keys", "$", "q"], capture_output=True)
                nudged = now
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def mutt_read_all(top: str, user: str, mbox: str) -> list[str]:
    """Every message of mbox as mutt sees it (raw, undecoded), read by mutt running as user."""
    outdir = os.path.join(top, f"mutt-out-{uuid.uuid4().hex[:8]}")
    os.mkdir(outdir)
    os.chmod(outdir, 0o777)
    out = os.path.join(outdir, "out")
    run_mutt(top, user, mbox, f"<tag-pattern>~A<enter><tag-prefix><pipe-message>cat >> {out}<enter><quit>")
    with open(out, encoding="utf-8") as handle:
        pieces = handle.read().split(SEPARATOR + "\n")
    # Undecoded, mutt pipes each message with its From_ line: check it, then keep the message itself.
    assert pieces[-1] == "", "mutt writes the separator after every message"
    messages = []
    for piece in pieces[:-1]:
        from_line, _, message = piece.partition("\n")
        assert from_line.startswith("From alice@sender.test "), piece
        messages.append(message)
    return messages


def test_mutt_reads_every_message_we_deliver_intact(world) -> None:
    top, root, bob = world
    agent = MdaAgent(make_config([local_action("local", Method.MBOX)], []), None, "mx.example.org")

    async def run() -> list:
        return [await deliver(agent, top, bob.pw_name, body, f"m{number}") for number, body in enumerate(BODIES)]

    assert [result.outcome for result in asyncio.run(run())] == [Outcome.OK] * len(BODIES)
    seen = mutt_read_all(top, bob.pw_name, os.path.join(root, bob.pw_name))
    assert seen == [expected_text(body, bob.pw_name) for body in BODIES]


def test_delivery_waits_for_mutts_dotlock_then_succeeds(world) -> None:
    top, root, bob = world
    mbox = os.path.join(root, bob.pw_name)
    agent = MdaAgent(make_config([local_action("local", Method.MBOX)], []), None, "mx.example.org")
    assert asyncio.run(deliver(agent, top, bob.pw_name, BODIES[0], "m0")).outcome is Outcome.OK
    size = os.path.getsize(mbox)
    # mutt's own setgid helper takes the lock as mutt does before it rewrites the mailbox (-p: with its mail group,
    # as mutt asks when the spool directory is not writable by the user).
    subprocess.run(["runuser", "-u", bob.pw_name, "--", "mutt_dotlock", "-p", mbox], check=True)
    assert os.path.exists(mbox + ".lock")
    try:
        async def deliver_while_locked():
            task = asyncio.ensure_future(deliver(agent, top, bob.pw_name, BODIES[1], "m1"))
            await asyncio.sleep(0.5)
            waited = not task.done() and os.path.getsize(mbox) == size
            await asyncio.to_thread(subprocess.run, ["runuser", "-u", bob.pw_name, "--", "mutt_dotlock", "-p", "-u", mbox],
                                    check=True)
            return waited, await task

        waited, result = asyncio.run(deliver_while_locked())
    finally:
        if os.path.exists(mbox + ".lock"):
            subprocess.run(["runuser", "-u", bob.pw_name, "--", "mutt_dotlock", "-p", "-u", mbox], check=False)
    assert waited
    assert result.outcome is Outcome.OK, result
    seen = mutt_read_all(top, bob.pw_name, mbox)
    assert seen == [expected_text(body, bob.pw_name) for body in BODIES[:2]]


def test_mutt_rewriting_the_mailbox_while_we_deliver_loses_nothing(world) -> None:
    """mutt deletes a message (rewriting the file under its locks) while ten deliveries append to it."""
    top, root, bob = world
    mbox = os.path.join(root, bob.pw_name)
    agent = MdaAgent(make_config([local_action("local", Method.MBOX)], []), None, "mx.example.org")
    victim = "Subject: victim\n\nto be deleted by mutt\n"
    assert asyncio.run(deliver(agent, top, bob.pw_name, victim, "victim")).outcome is Outcome.OK
    for number in range(20):  # a larger mailbox: mutt's rewrite takes a while
        assert asyncio.run(deliver(agent, top, bob.pw_name, f"Subject: old {number}\n\nFrom old\n" + "x" * 20000
                                   + "\n", f"old{number}")).outcome is Outcome.OK
    new_bodies = [f"Subject: new {number}\n\nFrom new {number}\nbody\n" for number in range(10)]

    async def mutt_and_deliveries() -> list:
        mutt = asyncio.to_thread(run_mutt, top, bob.pw_name, mbox,
                                 "<delete-pattern>~s victim<enter>" + "<sync-mailbox>" * 4 + "<quit>", False)
        deliveries = [deliver(agent, top, bob.pw_name, body, f"new{number}") for number, body in enumerate(new_bodies)]
        *results, _ = await asyncio.gather(*deliveries, mutt)
        return results

    results = asyncio.run(mutt_and_deliveries())
    assert [result.outcome for result in results] == [Outcome.OK] * len(new_bodies)
    # mutt refuses to write a mailbox that changed since it read it (it re-reads and keeps the deletion for
    # later), so under load its syncs may all meet a delivery and it quits without deleting. Then it deletes
    # now, with the mailbox quiet: the deletion is mutt's rewrite of a mailbox we wrote, and nothing must be lost.
    for _attempt in range(3):
        if not any("Subject: victim" in text for text in mutt_read_all(top, bob.pw_name, mbox)):
            break
        run_mutt(top, bob.pw_name, mbox, "<delete-pattern>~s victim<enter><sync-mailbox><quit>", False)
    seen = mutt_read_all(top, bob.pw_name, mbox)
    subjects = [line for text in seen for line in text.split("\n") if line.startswith("Subject: ")]
    assert "Subject: victim" not in subjects
    assert sorted(subjects) == sorted([f"Subject: old {number}" for number in range(20)]
                                      + [f"Subject: new {number}" for number in range(10)])
    for text in seen:
        if "Subject: new " in text:
            number = text.split("Subject: new ", 1)[1].split("\n", 1)[0]
            assert text.endswith(f"\n\n>From new {number}\nbody\n"), text
