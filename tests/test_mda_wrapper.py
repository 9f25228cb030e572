"""`mda wrapper` around mbox, maildir and lmtp actions, delivering as a real unprivileged user.

The recipient cannot read the daemon's Python (it lives under /root here): the wrapper runs as the recipient
around a filter, and the daemon's own writer delivers what the wrapper passes on.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
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

from smtpd.config.model import Config, Method
from smtpd.delivery import Outcome
from smtpd.lookup.userinfo import unprivileged_user
from smtpd.mda import MdaAgent

MESSAGE = "From: Alice <alice@sender.test>\nSubject: wrapped\n\nhello\nFrom the start of a line\nend\n"


@pytest.fixture()
def world(monkeypatch):
    with open_temp_dir("pysmtpd-wrapper-") as top:
        root = make_mail_root(top)
        monkeypatch.setenv("SMTPD_MAILDIR_ROOT", root)
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        out = os.path.join(top, "out")
        os.mkdir(out)
        os.chmod(out, 0o777)  # the wrapper, running as the recipient, leaves its notes here
        with system_user(homes, "pwr") as bob:
            yield Path(top), root, out, bob


def wrapped_config(method: Method, wrapper: str, **options: object) -> Config:
    config = make_config([local_action("local", method, wrapper="w", **options)], [])
    return Config(path=config.path, actions=config.actions, mda_wrappers={"w": wrapper})


def deliver(config: Config, top: Path, user: str):
    path = write_message(str(top / "msg"), MESSAGE)
    agent = MdaAgent(config, DictTables(), "mx.example.org")
    return asyncio.run(agent.deliver(mda_envelope("local", f"{user}@example.org", user), path))


def note_and_pass_on(out: str) -> str:
    """A wrapper that records who runs it and what it wraps, adds a header, and runs the wrapped command."""
    return (f"/bin/sh -c 'id -un > {out}/who; echo \"$0 $*\" > {out}/args; "
            "{ echo X-Wrapped: yes; exec \"$0\" \"$@\"; }' %{mda}")


def test_the_recipient_cannot_run_the_daemons_python(world) -> None:
    """The situation the wrapper design must survive (else the tests below would prove nothing)."""
    _, _, _, bob = world
    probe = subprocess.run(["runuser", "-u", bob.pw_name, "--", sys.executable, "-c", "pass"], capture_output=True)
    assert probe.returncode != 0


def test_mbox_under_a_wrapper_runs_it_as_the_recipient(world) -> None:
    top, root, out, bob = world
    result = deliver(wrapped_config(Method.MBOX, note_and_pass_on(out)), top, bob.pw_name)
    assert result.outcome is Outcome.OK, result
    assert Path(out, "who").read_text() == f"{bob.pw_name}\n"
    assert Path(out, "args").read_text() == "/bin/cat \n"
    mbox = os.path.join(root, bob.pw_name)
    info = os.stat(mbox)
    assert (info.st_uid, info.st_mode & 0o777) == (bob.pw_uid, 0o600)
    content = Path(mbox).read_text()
    assert content.startswith("From alice@sender.test ")
    assert content.split("\n", 1)[1] == (
        f"X-Wrapped: yes\nReturn-Path: <alice@sender.test>\nDelivered-To: {bob.pw_name}@example.org\n"
        "From: Alice <alice@sender.test>\nSubject: wrapped\n\nhello\n>From the start of a line\nend\n\n")


def test_maildir_under_a_wrapper_runs_it_as_the_recipient(world) -> None:
    top, _, out, bob = world
    result = deliver(wrapped_config(Method.MAILDIR, note_and_pass_on(out)), top, bob.pw_name)
    assert result.outcome is Outcome.OK, result
    assert Path(out, "who").read_text() == f"{bob.pw_name}\n"
    [delivered] = list(Path(bob.pw_dir, "Maildir", "new").iterdir())
    assert delivered.stat().st_uid == bob.pw_uid
    assert delivered.read_text() == (
        f"X-Wrapped: yes\nReturn-Path: <alice@sender.test>\nDelivered-To: {bob.pw_name}@example.org\n{MESSAGE}")


@pytest.mark.parametrize(("wrapper", "text"), [
    ("/bin/sh -c 'echo over quota >&2; exit 75' %{mda}", '"over quota"'),
    ("/bin/sh -c 'cat > /dev/null' %{mda}", "mda wrapper wrote no message on its standard output"),
])
def test_a_wrapper_that_fails_or_swallows_the_message_is_temporary(world, wrapper: str, text: str) -> None:
    top, root, _, bob = world
    result = deliver(wrapped_config(Method.MBOX, wrapper), top, bob.pw_name)
    assert (result.outcome, result.text) == (Outcome.TEMPFAIL, text)
    assert not os.path.exists(os.path.join(root, bob.pw_name))


def test_a_wrapper_that_fails_for_good_is_permanent(world) -> None:
    top, _, _, bob = world
    result = deliver(wrapped_config(Method.MAILDIR, "/bin/sh -c 'echo no such folder >&2; exit 67' %{mda}"),
                     top, bob.pw_name)
    assert (result.outcome, result.text) == (Outcome.PERMFAIL, '"no such folder"')
    assert not os.path.exists(os.path.join(bob.pw_dir, "Maildir"))


def test_root_mbox_wrapper_runs_unprivileged(world) -> None:
    top, root, out, _ = world
    result = deliver(wrapped_config(Method.MBOX, note_and_pass_on(out)), top, "root")
    assert result.outcome is Outcome.OK, result
    assert Path(out, "who").read_text() == f"{unprivileged_user()}\n"
    assert "X-Wrapped: yes\n" in Path(root, "root").read_text()


def test_a_wrapper_on_an_lmtp_action_filters_what_goes_over_lmtp() -> None:
    """`action "lmtp" lmtp "/run/dovecot/lmtp" wrapper W`: the config takes it, and every message bounced
    (`wrapper not supported for lmtp`). The wrapper now runs as the recipient around /bin/cat, as for mbox and
    maildir, and its output is what the LMTP server receives."""
    from test_mda_local import lmtp_peer

    with open_temp_dir("pysmtpd-lmtpwrap-") as top, system_user(top, "plw") as bob:
        socket_path = os.path.join(top, "lmtp.sock")
        config = make_config([local_action("lmtp", Method.LMTP, lmtp_destination=socket_path, wrapper="tag")], [])
        config.mda_wrappers["tag"] = "sed -e 's/^Subject: /Subject: [wrapped by '\"$USER\"'] /' | %{mda}"
        message = os.path.join(top, "message")
        with open(message, "w") as handle:
            handle.write("Subject: hello\n\nbody\n")
        seen: list[bytes] = []
        peer = lmtp_peer(seen, lambda rcpts: b"250 2.0.0 saved\r\n" * len(rcpts))

        async def run():
            server = await asyncio.start_unix_server(peer, socket_path)
            try:
                agent = MdaAgent(config, DictTables(), "mx.example.org")
                return await agent.deliver(mda_envelope("lmtp", f"{bob.pw_name}@example.org", bob.pw_name), message)
            finally:
                server.close()
                await server.wait_closed()

        result = asyncio.run(run())
        assert result.outcome is Outcome.OK, result
        assert f"RCPT TO:<{bob.pw_name}>\r\n".encode() in seen
        assert f"Subject: [wrapped by {bob.pw_name}] hello\r\n".encode() in seen
        assert f"Delivered-To: {bob.pw_name}@example.org\r\n".encode() in seen


def test_a_wrapper_running_the_command_inside_sh_dash_c_gets_all_of_its_words(world) -> None:
    """`mda wrapper w "/bin/sh -c '%{mda}'"`: the script is the wrapped command, all of it. Taken for an argv
    word, `%{mda}` was replaced by the command's words, and sh ran the program alone (`sh -c /usr/bin/tee
    wrapped.txt` runs tee without its file, the next word being only sh's $0)."""
    top, _, out, bob = world
    config = wrapped_config(Method.MDA, "/bin/sh -c '%{mda}'", mda_command=f"/usr/bin/tee {out}/wrapped.txt")
    result = deliver(config, top, bob.pw_name)
    assert result.outcome is Outcome.OK, result
    assert "Subject: wrapped" in Path(out, "wrapped.txt").read_text()
