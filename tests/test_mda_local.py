"""Local delivery (reference §8.6): mbox, maildir, commands, files, privilege drop, loops, failures."""

from __future__ import annotations

import asyncio
import io
import os
import pwd
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

from smtpd.config.model import Config, Method
from smtpd.delivery import Outcome
from smtpd.mda import MdaAgent, local
from smtpd.mda.variables import VariableContext, VariableError, expand

MESSAGE = (
    "Received: from client.test by mx.example.org (PySMTPD)\n"
    "From: Alice <alice@sender.test>\n"
    "Subject: hello\n"
    "\n"
    "first line\n"
    "From the start of a line\n"
    "\n"
    "From alice@sender.test Wed Nov 25 10:00:00 2026\n"
    ">From already quoted\n"
    ".a dot line\n"
    "last line without newline"
)


@pytest.fixture()
def spool(monkeypatch):
    # Not pytest's tmp_path: its parents are private to root, and deliveries run as other users.
    with open_temp_dir() as top:
        tmp_path = Path(top)
        root = make_mail_root(top)
        monkeypatch.setenv("SMTPD_MAILDIR_ROOT", root)
        homes = tmp_path / "homes"
        homes.mkdir(mode=0o755)
        yield tmp_path, root, str(homes)


@pytest.fixture()
def bob(spool):
    with system_user(spool[2], "pmb") as entry:
        yield entry


def agent_for(config: Config, tables: DictTables | None = None) -> MdaAgent:
    return MdaAgent(config, tables or DictTables(), "mx.example.org")


def deliver(agent: MdaAgent, envelope, path: str):
    return asyncio.run(agent.deliver(envelope, path))


def mbox_config(**options) -> Config:
    method = options.pop("method", Method.MBOX)
    return make_config([local_action("local", method, **options)], [])


# -- mbox -------------------------------------------------------------------------------------------------

def test_mbox_delivery_format_owner_and_mode(spool, bob) -> None:
    tmp_path, root, _ = spool
    path = write_message(str(tmp_path / "msg"), MESSAGE)
    agent = agent_for(mbox_config())
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    mbox = os.path.join(root, bob.pw_name)
    info = os.stat(mbox)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (bob.pw_uid, 0o600)
    content = open(mbox, "rb").read().decode()
    messages = content.split("\n\nFrom alice@sender.test ")
    assert len(messages) == 2
    first = content.split("\n")
    assert first[0].startswith("From alice@sender.test ") and first[0].endswith(time.strftime("%Y"))
    assert first[1] == "Return-Path: <alice@sender.test>"
    assert first[2] == f"Delivered-To: {bob.pw_name}@example.org"
    assert "\n>From the start of a line\n" in content
    assert "\n>From alice@sender.test Wed Nov 25 10:00:00 2026\n" in content
    assert "\n>From already quoted\n" in content  # mboxo: only "From " lines get a ">"
    assert content.endswith("last line without newline\n\n")
    assert not os.path.exists(mbox + ".lock")


def test_mbox_for_root_is_written_without_root_privileges(spool) -> None:
    tmp_path, root, _ = spool
    path = write_message(str(tmp_path / "msg"), MESSAGE)
    agent = agent_for(mbox_config())
    result = deliver(agent, mda_envelope("local", "root@example.org", "root", sender=""), path)
    assert result.outcome is Outcome.OK, result
    mbox = os.path.join(root, "root")
    assert os.stat(mbox).st_uid == 0
    content = open(mbox).read()
    assert content.startswith("From MAILER-DAEMON ")
    assert "Return-Path" not in content


def test_mbox_refuses_symlink_and_foreign_owner(spool, bob) -> None:
    tmp_path, root, _ = spool
    path = write_message(str(tmp_path / "msg"), MESSAGE)
    agent = agent_for(mbox_config())
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, os.path.join(root, bob.pw_name))
    result = deliver(agent, envelope, path)
    assert result.outcome is Outcome.TEMPFAIL and "symbolic link" in result.text  # mail.local: EX_OSERR
    assert target.read_text() == ""
    os.unlink(os.path.join(root, bob.pw_name))
    with open(os.path.join(root, bob.pw_name), "w"):
        pass  # owned by root, not bob
    assert deliver(agent, envelope, path).outcome is Outcome.TEMPFAIL


class _FailingMessage(io.BytesIO):
    """A message whose reading fails after some lines, like a disk error in the middle of a write."""

    def __iter__(self):
        for number, line in enumerate(io.BytesIO(self.getvalue())):
            if number == 3:
                raise OSError(5, "Input/output error")
            yield line


def test_failed_mbox_write_is_truncated_back(tmp_path) -> None:
    mbox = str(tmp_path / "box")
    good = io.BytesIO(MESSAGE.encode())
    local.deliver_mbox(mbox, "a@b.c", b"", good)
    before = open(mbox, "rb").read()
    with pytest.raises(local.LocalDeliveryError):
        local.deliver_mbox(mbox, "a@b.c", b"", _FailingMessage(("x" * 100000 + "\n").encode() * 5))
    assert open(mbox, "rb").read() == before


def test_concurrent_deliveries_keep_every_message_whole(spool, bob) -> None:
    tmp_path, root, _ = spool
    agent = agent_for(mbox_config())
    paths = [write_message(str(tmp_path / f"m{n}"), f"Subject: {n}\n\n" + f"line {n}\n" * 2000)
             for n in range(12)]

    async def all_of_them():
        envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
        return await asyncio.gather(*(agent.deliver(envelope, path) for path in paths))

    results = asyncio.run(all_of_them())
    assert all(result.outcome is Outcome.OK for result in results)
    content = open(os.path.join(root, bob.pw_name)).read()
    chunks = content.split("\n\nFrom alice@sender.test ")
    assert len(chunks) == 12
    for chunk in chunks:
        subject = chunk.split("Subject: ")[1].split("\n")[0]
        assert chunk.count(f"line {subject}") == 2000


def test_mbox_waits_for_a_dotlock_and_an_fcntl_lock(spool, bob) -> None:
    tmp_path, root, _ = spool
    mbox = os.path.join(root, bob.pw_name)
    agent = agent_for(mbox_config())
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    path = write_message(str(tmp_path / "msg"), MESSAGE)
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    size = os.path.getsize(mbox)
    # Another program (a mail reader) holds both locks while it rewrites the mailbox.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"open({mbox + '.lock'!r}, 'x').close()\n"
        f"f = open({mbox!r}, 'r+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
        f"os.unlink({mbox + '.lock'!r})\n"
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"

        async def deliver_while_locked():
            task = asyncio.ensure_future(agent.deliver(envelope, path))
            await asyncio.sleep(0.5)
            unchanged = os.path.getsize(mbox) == size and not task.done()
            holder.stdin.write("\n")
            holder.stdin.flush()
            return unchanged, await task

        unchanged, result = asyncio.run(deliver_while_locked())
    finally:
        holder.wait(timeout=30)
    assert unchanged
    assert result.outcome is Outcome.OK
    assert open(mbox).read().count("\n\nFrom alice@sender.test ") == 1


@pytest.mark.parametrize("reader_order", ["fcntl-then-dotlock", "dotlock-then-fcntl"])
def test_mbox_delivery_never_deadlocks_with_a_reader_taking_the_locks_in_either_order(
        tmp_path, reader_order: str) -> None:
    """mutt takes the fcntl lock and then the dotlock, Dovecot by default the other way round. A reader holds its
    first lock while we try, then takes its second within a few seconds: it must get it (we hold nothing while
    we wait), write, and let us deliver after it."""
    mbox = str(tmp_path / "box")
    local.deliver_mbox(mbox, "a@b.c", b"", io.BytesIO(MESSAGE.encode()))
    lock = mbox + ".lock"
    take_dotlock = (
        "deadline = time.monotonic() + 10\n"
        "while True:\n"
        "    try:\n"
        f"        os.close(os.open({lock!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)); break\n"
        "    except FileExistsError:\n"
        "        if time.monotonic() > deadline: sys.exit(3)\n"
        "        time.sleep(0.05)\n")
    take_fcntl = "fcntl.lockf(f, fcntl.LOCK_EX)\n"  # blocking: it waits for us if we hold it
    first, second = (take_fcntl, take_dotlock) if reader_order == "fcntl-then-dotlock" else (take_dotlock, take_fcntl)
    reader = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({mbox!r}, 'a')\n" + first + "print('first', flush=True); sys.stdin.readline()\n" + second +
        "f.write('From reader@x Thu Jan  1 00:00:00 1970\\nSubject: reader\\n\\n\\n'); f.flush()\n"
        f"os.unlink({lock!r}); fcntl.lockf(f, fcntl.LOCK_UN)\n"
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "first\n"

        async def both() -> None:
            delivery = asyncio.to_thread(local.deliver_mbox, mbox, "a@b.c", b"",
                                         io.BytesIO(b"Subject: ours\n\nbody\n"))
            task = asyncio.ensure_future(delivery)
            await asyncio.sleep(0.5)  # we are trying for our locks now
            reader.stdin.write("\n")
            reader.stdin.flush()
            await task

        asyncio.run(both())
    finally:
        assert reader.wait(timeout=60) == 0, "the reader could not get its second lock: a deadlock"
    content = open(mbox).read()
    assert content.index("Subject: reader") < content.index("Subject: ours")
    assert not os.path.exists(lock)


# -- maildir ------------------------------------------------------------------------------------------------

def test_maildir_default_path_owner_and_unique_names(spool, bob) -> None:
    tmp_path, _, _ = spool
    agent = agent_for(mbox_config(method=Method.MAILDIR))
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    path = write_message(str(tmp_path / "msg"), MESSAGE)
    for _ in range(3):
        assert deliver(agent, envelope, path).outcome is Outcome.OK
    maildir = os.path.join(bob.pw_dir, "Maildir")
    names = os.listdir(os.path.join(maildir, "new"))
    assert len(set(names)) == 3
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    for sub in ("", "cur", "new", "tmp"):
        info = os.stat(os.path.join(maildir, sub))
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (bob.pw_uid, 0o700)
    delivered = open(os.path.join(maildir, "new", names[0])).read()
    assert delivered.startswith(f"Return-Path: <alice@sender.test>\nDelivered-To: {bob.pw_name}@example.org\n")
    # A Maildir message is stored as it is: no From_ quoting.
    assert "\nFrom the start of a line\n" in delivered
    assert delivered.endswith("last line without newline\n")


def test_maildir_path_variables_junk_and_extension(spool, bob) -> None:
    tmp_path, _, _ = spool
    config = mbox_config(method=Method.MAILDIR, maildir_path="~/mail/%{dest.domain}/%{dest.user:lowercase}",
                         junk=True)
    agent = agent_for(config)
    dest = f"{bob.pw_name.upper()}+Lists@Example.ORG"
    envelope = mda_envelope("local", dest, bob.pw_name, mda_subaddress="lists")
    plain = write_message(str(tmp_path / "plain"), MESSAGE)
    spam = write_message(str(tmp_path / "spam"), "X-Spam-Flag: YES\nSubject: buy\n\nnow\n")
    assert deliver(agent, envelope, plain).outcome is Outcome.OK
    base = os.path.join(bob.pw_dir, "mail", "Example.ORG", f"{bob.pw_name}+lists")
    assert len(os.listdir(os.path.join(base, "new"))) == 1
    os.makedirs(os.path.join(base, ".lists"))
    os.chown(os.path.join(base, ".lists"), bob.pw_uid, bob.pw_gid)
    assert deliver(agent, envelope, plain).outcome is Outcome.OK
    assert len(os.listdir(os.path.join(base, ".lists", "new"))) == 1
    assert deliver(agent, envelope, spam).outcome is Outcome.OK
    assert len(os.listdir(os.path.join(base, ".Junk", "new"))) == 1


def test_maildir_unwritable_is_temporary(spool, bob) -> None:
    tmp_path, _, _ = spool
    agent = agent_for(mbox_config(method=Method.MAILDIR, maildir_path="/proc/forbidden/%{user.username}"))
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    result = deliver(agent, envelope, write_message(str(tmp_path / "m"), MESSAGE))
    assert result.outcome is Outcome.TEMPFAIL


# -- root, loops, unknown users -------------------------------------------------------------------------------

def test_no_delivery_as_root_except_mbox(spool) -> None:
    tmp_path, _, _ = spool
    path = write_message(str(tmp_path / "m"), MESSAGE)
    for config in (mbox_config(method=Method.MAILDIR), mbox_config(method=Method.MDA, mda_command="/bin/true")):
        result = deliver(agent_for(config), mda_envelope("local", "root@example.org", "root"), path)
        assert (result.outcome, result.text) == (Outcome.PERMFAIL, "not allowed to deliver to: root")


def test_loop_detected_by_delivered_to(spool, bob) -> None:
    tmp_path, _, _ = spool
    dest = f"{bob.pw_name}@example.org"
    path = write_message(str(tmp_path / "m"), f"Delivered-To: {dest.upper()}\nSubject: x\n\nbody\n")
    result = deliver(agent_for(mbox_config()), mda_envelope("local", dest, bob.pw_name), path)
    assert (result.outcome, result.text) == (Outcome.LOOP, "Loop detected")


def test_loop_detected_by_the_delivered_to_line_we_write_for_an_alias(spool, bob) -> None:
    """Mail to an alias (`team` -> bob) gets `Delivered-To: team@...`, the address the client gave, but the check
    looked for the final address only: a message coming back to the alias (a script that re-sends it, two
    aliases pointing at each other through a delivery program) was delivered again at every turn."""
    tmp_path, _, _ = spool
    dest = f"{bob.pw_name}@example.org"
    path = write_message(str(tmp_path / "m"), "Delivered-To: team@example.org\nSubject: x\n\nbody\n")
    envelope = mda_envelope("local", dest, bob.pw_name, rcpt="team@example.org")
    result = deliver(agent_for(mbox_config()), envelope, path)
    assert (result.outcome, result.text) == (Outcome.LOOP, "Loop detected")


@pytest.mark.parametrize("text", [
    "Subject: x\n\nDelivered-To: {dest}\n",  # in the body: no loop
    "X-Note: delivered-to {dest} once\nSubject: x\n\nbody\n",  # in another header's value: no loop
    "Delivered-To: someone.else@example.org\n\nbody\n",  # another address: no loop
])
def test_no_loop_without_a_delivered_to_header_for_this_address(spool, bob, text: str) -> None:
    tmp_path, _, _ = spool
    dest = f"{bob.pw_name}@example.org"
    path = write_message(str(tmp_path / "m"), text.format(dest=dest))
    result = deliver(agent_for(mbox_config()), mda_envelope("local", dest, bob.pw_name), path)
    assert result.outcome is Outcome.OK, result.text


def test_missing_delivery_user_and_dispatcher(spool) -> None:
    tmp_path, _, _ = spool
    path = write_message(str(tmp_path / "m"), MESSAGE)
    config = mbox_config(method=Method.MAILDIR, user="no-such-user-xyz")
    result = deliver(agent_for(config), mda_envelope("local", "a@example.org", "a"), path)
    assert (result.outcome, result.text) == (Outcome.PERMFAIL, "delivery user 'no-such-user-xyz' does not exist")
    result = deliver(agent_for(config), mda_envelope("gone", "a@example.org", "a"), path)
    assert result.outcome is Outcome.TEMPFAIL


# -- commands ---------------------------------------------------------------------------------------------------

def test_mda_command_argv_environment_and_no_shell(spool, bob) -> None:
    tmp_path, _, _ = spool
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    script = tmp_path / "record.py"
    script.write_text(
        "import json, os, sys\n"
        "data = sys.stdin.read()\n"
        "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ), 'uid': os.getuid(), 'stdin': data},\n"
        f"          open({str(out / 'record.json')!r}, 'w'))\n")
    os.chmod(script, 0o755)
    config = mbox_config(method=Method.MDA,
                         mda_command=f"/usr/bin/python3 {script} -s '%{{sender}}' --to %{{rcpt:raw}}")
    evil = "x;touch${IFS}pwned`id`$(id)@sender.test"
    envelope = mda_envelope("local", f"{bob.pw_name}+tag@example.org", bob.pw_name, sender=evil,
                            mda_subaddress="tag")
    result = deliver(agent_for(config), envelope, write_message(str(tmp_path / "m"), MESSAGE))
    assert result.outcome is Outcome.OK, result
    import json

    record = json.load(open(out / "record.json"))
    # %{sender} is escaped (`!#$%&'*?`{|}~/` -> :), %{rcpt:raw} is not; both are single arguments.
    assert record["argv"] == ["-s", "x;touch::IFS:pwned:id::(id)@sender.test", "--to", f"{bob.pw_name}+tag@example.org"]
    assert not (tmp_path / "pwned").exists()
    assert record["uid"] == bob.pw_uid
    env = record["env"]
    assert env["SENDER"] == evil and env["RECIPIENT"] == f"{bob.pw_name}+tag@example.org"
    assert env["USER"] == env["LOGNAME"] == bob.pw_name and env["HOME"] == bob.pw_dir
    assert env["EXTENSION"] == "tag" and env["DOMAIN"] == "example.org" and env["SHELL"] == "/bin/sh"
    assert env["LOCAL"] == f"{bob.pw_name}+tag"
    assert set(env) - {"LC_CTYPE"} == {"PATH", "DOMAIN", "HOME", "RECIPIENT", "SHELL", "LOCAL", "LOGNAME", "USER",
                                       "SENDER", "EXTENSION"}
    assert record["stdin"].startswith(f"Return-Path: <{evil}>\nDelivered-To: ")


@pytest.mark.parametrize(("script", "outcome", "text"), [
    ("exit 0", Outcome.OK, "Delivered"),
    ("echo 'mailbox full' >&2; exit 75", Outcome.TEMPFAIL, '"mailbox full"'),
    ("echo over quota; exit 71", Outcome.TEMPFAIL, '"over quota"'),
    ("echo 'no such folder'; exit 67", Outcome.PERMFAIL, '"no such folder"'),
    ("exit 1", Outcome.PERMFAIL, "exited with status 1"),
    ("kill -TERM $$", Outcome.TEMPFAIL, "terminated; signal 15"),
])
def test_mda_exit_status_mapping(spool, bob, script, outcome, text) -> None:
    tmp_path, _, _ = spool
    program = tmp_path / "prog.sh"
    program.write_text(f"#!/bin/sh\ncat >/dev/null\n{script}\n")
    os.chmod(program, 0o755)
    config = mbox_config(method=Method.MDA, mda_command=str(program))
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    result = deliver(agent_for(config), envelope, write_message(str(tmp_path / "m"), MESSAGE))
    assert (result.outcome, result.text) == (outcome, text)


@pytest.mark.parametrize(("command", "outcome"), [
    ("exit 75", Outcome.TEMPFAIL),  # a builtin: no program of that name (it bounced, `exit: No such file`)
    ("umask 077", Outcome.OK),
    ("LC_ALL=C /bin/true", Outcome.OK),  # an assignment before the program
    ("if /bin/false; then exit 0; else exit 75; fi", Outcome.TEMPFAIL),  # (a keyword; `;` made it one already)
])
def test_an_mda_command_that_is_shell_text_without_operators_runs_in_a_shell(spool, bob, command,
                                                                             outcome) -> None:
    """OpenSMTPD runs every mda command with /bin/sh -c; ours runs one without the shell's syntax directly,
    and a command line starting with a builtin, a keyword or a variable assignment is the shell's syntax too."""
    tmp_path, _, _ = spool
    config = mbox_config(method=Method.MDA, mda_command=command)
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    result = deliver(agent_for(config), envelope, write_message(str(tmp_path / "m"), MESSAGE))
    assert result.outcome is outcome, result


def test_wrapper_wraps_the_mda_command(spool, bob) -> None:
    tmp_path, _, _ = spool
    out = tmp_path / "wrapped"
    out.mkdir()
    os.chmod(out, 0o777)
    config = make_config([local_action("local", Method.MDA, mda_command="/bin/cat", wrapper="log")], [])
    config = Config(path=config.path, actions=config.actions,
                    mda_wrappers={"log": f"/bin/sh -c 'echo \"$0 $*\" > {out}/args; exec \"$0\" \"$@\" > {out}/body'"
                                         " %{mda}"})
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    result = deliver(agent_for(config), envelope, write_message(str(tmp_path / "m"), MESSAGE))
    assert result.outcome is Outcome.OK, result
    assert (out / "args").read_text() == "/bin/cat \n"
    assert "first line" in (out / "body").read_text()


def test_pipe_and_file_items(spool, bob) -> None:
    tmp_path, _, _ = spool
    drop = tmp_path / "drop"
    drop.mkdir()
    os.chmod(drop, 0o777)
    agent = agent_for(mbox_config())
    path = write_message(str(tmp_path / "m"), MESSAGE)
    alias_user = "opensmtpd"
    # |command from an alias: runs as the unprivileged user.
    envelope = mda_envelope("local", "list@example.org", alias_user, mda_exec=f"|id -un > {drop}/who; cat > {drop}/in")
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    assert (drop / "who").read_text().strip() == alias_user
    assert "From the start of a line" in (drop / "in").read_text()
    # |command from bob's .forward: runs as bob.
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name, mda_exec=f"|id -un > {drop}/who2")
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    assert (drop / "who2").read_text().strip() == bob.pw_name
    # /file: appended in mbox format, every From_ line quoted, as the unprivileged user.
    envelope = mda_envelope("local", "list@example.org", alias_user, mda_exec=f"{drop}/archive")
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    archive = drop / "archive"
    assert os.stat(archive).st_uid == pwd.getpwnam(alias_user).pw_uid
    assert archive.read_text().startswith("From alice@sender.test ")
    assert "\n>From the start of a line\n" in archive.read_text()
    # A file the user may not write: a failure, nothing written.
    envelope = mda_envelope("local", "list@example.org", alias_user, mda_exec="/root/forbidden-archive")
    assert deliver(agent, envelope, path).outcome is Outcome.TEMPFAIL
    assert not os.path.exists("/root/forbidden-archive")


# -- variables ----------------------------------------------------------------------------------------------------

def test_format_specifiers() -> None:
    context = VariableContext("Alice+x@Sender.test", "Bob+Tag@Example.org", "bob+tag@example.org", "bob",
                              "/home/bob")
    cases = {
        "%{sender}": "Alice+x@Sender.test",
        "%{sender.user}/%{sender.domain}": "Alice+x/Sender.test",
        "%{rcpt.user:lowercase|strip}": "bob",
        "%{rcpt:strip}": "Bob@Example.org",
        "%{dest.user[0]}/%{dest.user[1:2]}/%{dest.user[-3:]}/%{dest.user[:1]}": "b/ob/tag/bo",
        "%{user.username:uppercase}": "BOB",
        "~/Maildir/%{dest.domain}": "/home/bob/Maildir/example.org",
        "%{user.directory}/x": "/home/bob/x",
        "100%% %{mbox.from}": "100% Alice+x@Sender.test",
    }
    for template, expected in cases.items():
        assert expand(template, context) == expected, template
    assert expand("%{mbox.from}", VariableContext("", "a@b", "a@b", "a", "/")) == "MAILER-DAEMON"
    assert expand("%{sender}", VariableContext("", "a@b", "a@b", "a", "/")) == ""
    hostile = VariableContext("x", "a/../b|c@d", "a@b", "a", "/")
    assert expand("%{rcpt.user}", hostile) == "a:..:b:c"
    assert expand("%{rcpt.user:raw}", hostile) == "a/../b|c"
    for bad in ("%{nope}", "%{rcpt:shout}", "%{rcpt[x]}", "%{mda}", "%{rcpt"):
        with pytest.raises(VariableError):
            expand(bad, context)


def test_mbox_written_by_another_program_gets_its_separator(spool, bob) -> None:
    tmp_path, root, _ = spool
    mbox = os.path.join(root, bob.pw_name)
    with open(mbox, "w") as handle:
        handle.write("From someone@else Mon Jan  1 00:00:00 2024\nSubject: old\n\nold body")
    os.chown(mbox, bob.pw_uid, bob.pw_gid)
    os.chmod(mbox, 0o600)
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    assert deliver(agent_for(mbox_config()), envelope, write_message(str(tmp_path / "m"), MESSAGE)).outcome \
        is Outcome.OK
    content = open(mbox).read()
    assert "\nold body\n\nFrom alice@sender.test " in content


def test_unprivileged_daemon_delivers_as_itself(spool, bob) -> None:
    """A daemon that is not root (the trial run) delivers as its own user into the configured folders."""
    tmp_path, _, _ = spool
    own_root = os.path.join(bob.pw_dir, "spool")
    os.mkdir(own_root, 0o700)
    os.chown(own_root, bob.pw_uid, bob.pw_gid)
    path = write_message(str(tmp_path / "m"), MESSAGE)
    os.chmod(path, 0o644)
    maildir_agent = agent_for(mbox_config(method=Method.MAILDIR, maildir_path=f"{bob.pw_dir}/box"))
    asyncio.run(asyncio.to_thread(lambda: None))  # load what the child needs while /root is readable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the child only runs the delivery, then exits
        pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups([])
            os.setgid(bob.pw_gid)
            os.setuid(bob.pw_uid)
            os.environ["SMTPD_MAILDIR_ROOT"] = own_root
            mbox_agent = agent_for(mbox_config())
            results = [asyncio.run(mbox_agent.deliver(mda_envelope("local", "root@example.org", "root"), path)),
                       asyncio.run(maildir_agent.deliver(mda_envelope("local", "x@example.org", "root"), path))]
            status = 0 if all(result.outcome is Outcome.OK for result in results) else 3
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    mbox = os.path.join(own_root, "root")
    assert os.stat(mbox).st_uid == bob.pw_uid
    assert "first line" in open(mbox).read()
    [name] = os.listdir(os.path.join(bob.pw_dir, "box", "new"))
    assert os.stat(os.path.join(bob.pw_dir, "box", "new", name)).st_uid == bob.pw_uid


def test_a_dead_delivery_helper_is_restarted(spool, bob) -> None:
    tmp_path, _, _ = spool
    agent = agent_for(mbox_config(method=Method.MAILDIR))
    envelope = mda_envelope("local", f"{bob.pw_name}@example.org", bob.pw_name)
    path = write_message(str(tmp_path / "m"), MESSAGE)
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    helper = agent.forkserver.process
    helper.kill()
    helper.wait()
    assert deliver(agent, envelope, path).outcome is Outcome.OK
    assert agent.forkserver.process is not helper
    assert len(os.listdir(os.path.join(bob.pw_dir, "Maildir", "new"))) == 2
    asyncio.run(agent.forkserver.stop())


def test_command_time_limit_kills_the_process_group(spool, bob) -> None:
    from smtpd.mda.command import run_command
    from smtpd.mda.privilege import Identity

    tmp_path, _, _ = spool
    identity = Identity.from_passwd(bob)
    with open(write_message(str(tmp_path / "m"), MESSAGE), "rb") as message:
        outcome = asyncio.run(run_command(["/bin/sh", "-c", "sleep 30 & sleep 30"], identity,
                                          {"PATH": "/usr/bin:/bin"}, b"", message, timeout=0.5))
    assert outcome.timed_out and outcome.temporary
    assert outcome.error_text() == "terminated; timeout"


def lmtp_peer(seen: list[bytes], final: Callable[[list[bytes]], bytes],
              rcpt: Callable[[bytes], bytes] = lambda line: b"250 ok\r\n",
              lhlo: bytes = b"250-lmtp\r\n250 PIPELINING\r\n") -> Callable[..., Any]:
    """A scripted LMTP server: every line it reads goes to ``seen`` (the message's too); RCPT is answered by
    ``rcpt``, the end of the message by ``final`` of the accepted RCPT lines."""
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lmtp ready\r\n")
        accepted: list[bytes] = []
        while line := await reader.readline():
            seen.append(line)
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(lhlo)
            elif verb == b"RCPT":
                answer = rcpt(line)
                if answer.startswith(b"250"):
                    accepted.append(line)
                writer.write(answer)
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                while (body := await reader.readline()) != b".\r\n":
                    seen.append(body)
                writer.write(final(accepted))
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    return peer


def deliver_to_peer(folder: str, peer: Callable[..., Any], sender: str, recipients: list[str], prefix: bytes = b"",
                    text: str = "Subject: x\n\nbody\n") -> list[Any]:
    """deliver_lmtp of a message of ``text`` to the scripted peer, on a Unix socket in ``folder``."""
    from smtpd.mda.lmtp import deliver_lmtp

    async def run() -> list[Any]:
        socket_path = os.path.join(folder, "lmtp.sock")
        server = await asyncio.start_unix_server(peer, socket_path)
        try:
            with open(write_message(os.path.join(folder, "m"), text), "rb") as message:
                return await deliver_lmtp(socket_path, "mx.test", sender, recipients, prefix, message)
        finally:
            server.close()
            await server.wait_closed()
            os.unlink(socket_path)

    return asyncio.run(run())


def test_lmtp_reply_codes_map_per_recipient(spool) -> None:
    """A scripted LMTP peer: 2xx, 4xx and 5xx after DATA, one per accepted recipient, and a 4xx at RCPT."""
    tmp_path, _, _ = spool
    received: list[bytes] = []

    def final(rcpts: list[bytes]) -> bytes:
        return b"".join(b"250 2.0.0 saved\r\n" if b"good" in rcpt else
                        b"452 4.2.2 over quota\r\n" if b"full" in rcpt else b"550 5.1.1 no such user\r\n"
                        for rcpt in rcpts)

    peer = lmtp_peer(received, final, rcpt=lambda line: b"452 4.2.2 mailbox busy\r\n" if b"busy" in line
                     else b"250 ok\r\n")
    replies = deliver_to_peer(str(tmp_path), peer, "s@x.test", ["good", "busy", "full", "gone"],
                              b"Delivered-To: x\n", "Subject: x\n\n.dot\nbody\n")
    assert [(reply.code, reply.ok, reply.temporary) for reply in replies] == [
        (250, True, False), (452, False, True), (452, False, True), (550, False, False)]
    assert b"..dot\r\n" in received and b"Delivered-To: x\r\n" in received


def test_lmtp_replies_received_are_final_even_if_the_server_says_more(spool) -> None:
    """A server that adds a line after its per-recipient replies is out of step from there on, but the replies
    it gave stand: taken as a failure, each recipient's copy (delivered) would be delivered again on retry."""
    tmp_path, _, _ = spool
    peer = lmtp_peer([], lambda rcpts: b"250 2.0.0 saved a\r\n250 2.0.0 saved b\r\n250 2.0.0 and one more\r\n")
    replies = deliver_to_peer(str(tmp_path), peer, "s@x.test", ["a", "b"])
    assert [(reply.code, reply.text) for reply in replies] == [(250, "250 2.0.0 saved a"), (250, "250 2.0.0 saved b")]


@pytest.mark.parametrize(("offers_smtputf8", "sender", "mail_line", "codes"), [
    (False, "u@ex\u00e4mple.org", "MAIL FROM:<u@xn--exmple-cua.org>", [250]),  # only the domain: A-labels
    (False, "j\u00fcrgen@ex\u00e4mple.org", None, [553]),  # a UTF-8 local part cannot go: refused for good
    (True, "j\u00fcrgen@ex\u00e4mple.org", "MAIL FROM:<j\u00fcrgen@ex\u00e4mple.org> SMTPUTF8", [250]),
])
def test_lmtp_utf8_senders_go_as_the_server_can_take_them(spool, offers_smtputf8: bool, sender: str,
                                                          mail_line: str | None, codes: list[int]) -> None:
    """A UTF-8 sender went to Dovecot (no SMTPUTF8 offered) without the parameter; it answered 250 and stored
    Return-Path: <>, the sender lost. Now as the relay does it."""
    tmp_path, _, _ = spool
    seen: list[bytes] = []
    lhlo = b"250-lmtp\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n" if offers_smtputf8 else b"250-lmtp\r\n250 PIPELINING\r\n"
    peer = lmtp_peer(seen, lambda rcpts: b"250 2.0.0 saved\r\n" * len(rcpts), lhlo=lhlo)
    assert [reply.code for reply in deliver_to_peer(str(tmp_path), peer, sender, ["bob"])] == codes
    mail = [line.decode().rstrip("\r\n") for line in seen if line.startswith(b"MAIL FROM")]
    assert mail == ([mail_line] if mail_line else [])


@pytest.mark.parametrize(("template", "expected"), [
    # no shell syntax: split into words, run directly
    ("/usr/bin/procmail -a %{rcpt.user}", ["/usr/bin/procmail", "-a", "bob+tag"]),
    ("deliver 'a | b' \"c > d\" e\\;f", ["deliver", "a | b", "c > d", "e;f"]),
    # shell syntax: the admin's line runs in sh; each value is a positional parameter, whatever its quoting
    ("spamc | procmail -a %{rcpt.user}", ["/bin/sh", "-c", 'spamc | procmail -a "${1}"', "sh", "bob+tag"]),
    ("echo \"to %{rcpt}\" '%{sender}' 100%% > out",
     ["/bin/sh", "-c", "echo \"to ${1}\" ''\"${2}\"'' 100% > out", "sh", "bob+tag@example.org", "a`b`$c@x.test"]),
    ("cat >> \"$HOME/log\"", ["/bin/sh", "-c", "cat >> \"$HOME/log\"", "sh"]),
    # a written-out `sh -c 'SCRIPT'`: the script is shell text too, its values positional parameters after its own
    ("sh -c 'procmail -a %{sender}'", ["sh", "-c", 'procmail -a "${1}"', "sh", "a`b`$c@x.test"]),
    ("/bin/bash -o pipefail -c 'spamc | procmail %{rcpt}' name one",
     ["/bin/bash", "-o", "pipefail", "-c", 'spamc | procmail "${2}"', "name", "one", "bob+tag@example.org"]),
    ("sh script.sh %{rcpt}", ["sh", "script.sh", "bob+tag@example.org"]),
    ("bash --norc -c 'echo %{rcpt}'", ["bash", "--norc", "-c", 'echo "${1}"', "sh", "bob+tag@example.org"]),
])
def test_mda_command_lines_with_and_without_shell_syntax(template: str, expected: list[str]) -> None:
    from smtpd.mda.command import command_argv

    context = VariableContext("a`b`$c@x.test", "bob+tag@example.org", "bob@example.org", "bob", "/home/bob")
    assert command_argv(template.replace("%{sender}", "%{sender:raw}"), context) == expected
