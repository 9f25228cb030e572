"""`smtpctl explain`: why was my mail rejected, where did it go — answered by the running daemon."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    workdir = make_workdir()
    aliases = workdir / "aliases"
    aliases.write_text("root: bob, |/bin/cat\nbob: bob@example.org\nlost: error:550 gone away\n")
    text = (f"table aliases file:{aliases}\n"
            f"listen on 127.0.0.1 port {free_port()} tag inbound\n"
            'action "local" mbox alias <aliases>\n'
            'action "out" relay\n'
            "match from src 10.0.0.0/8 for any reject\n"
            'match from local for local action "local"\n'
            'match for domain "example.org" action "out"\n'
            'match tag inbound from any for domain "example.com" action "out"\n')
    running = DaemonProcess(workdir, text).start()
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def section(lines: list[str], title: str) -> list[str]:
    start = lines.index(title) + 1
    end = start
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    return lines[start:end]


def test_alias_expansion_tree(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("explain", "--to", "root")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "mail from <> to <root@mx.control.test>"
    assert section(lines, "rules:") == ["  rule #1: `from src <dynamic:0>` does not hold", "  rule #2: matched"]
    assert f"matched rule #2 ({Path(daemon.config_path)}:6): match from local for local action \"local\"" in lines
    assert "action (" in result.stdout and 'action "local" mbox alias <aliases>' in result.stdout
    tree = section(lines, "expansion:")
    assert tree[0].startswith("  address: root@mx.control.test [depth=0")
    assert tree[1].startswith("    username: root [depth=1")
    # bob's own expansion sits under bob, the command beside him.
    assert tree[2].startswith("      username: bob [depth=2")
    assert tree[3].startswith("        address: bob@example.org [depth=3")
    assert tree[4].startswith("      filter: /bin/cat [depth=2")
    deliveries = section(lines, "deliveries:")
    assert "  mta via action out: bob@example.org" in deliveries
    assert any(line.startswith("  mda via action local: |/bin/cat as ") for line in deliveries)


def test_why_rejected(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("explain", "--from", "spammer@example.net", "--to", "bob@example.org",
                            "--src", "10.9.8.7")
    assert result.returncode == 1
    assert "matched rule #1" in result.stdout and "match from src" in result.stdout
    assert result.stdout.splitlines()[-1] == \
        "the rule rejects: the recipient is refused (550 Invalid recipient: <bob@example.org>)"


def test_no_rule_matched(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("explain", "--to", "someone@elsewhere.example", "--src", "192.0.2.9")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "  rule #4: matched" not in lines
    assert lines[-1] == "no rule matched: the recipient is refused (550 Invalid recipient: <someone@elsewhere.example>)"


def test_listener_tag_decides(daemon: DaemonProcess) -> None:
    untagged = daemon.smtpctl("explain", "--to", "x@example.com", "--src", "192.0.2.9")
    assert untagged.returncode == 1
    tagged = daemon.smtpctl("explain", "--to", "x@example.com", "--src", "192.0.2.9", "--listener", "inbound")
    assert tagged.returncode == 0, tagged.stdout
    assert "session: from 192.0.2.9 (tag inbound)" in tagged.stdout
    assert "  mta via action out: x@example.com" in tagged.stdout


def test_alias_error_refusal(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("explain", "--to", "lost")
    assert result.returncode == 1
    assert "refused: 550" in result.stdout and "lost@mx.control.test" in result.stdout


def test_unknown_listener_is_a_clear_error(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("explain", "--to", "x@example.org", "--listener", "nope")
    assert result.returncode == 1
    assert result.stderr.startswith("smtpctl: no listener 'nope' (listeners: 127.0.0.1:")


def test_explain_json(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("explain", "--to", "root", "--json")
    answer = json.loads(result.stdout)
    assert answer["matched"]["number"] == 2
    assert answer["action"]["name"] == "local"
    assert answer["expansion"]["accepted"] is True
    kinds = [node["type"] for node in answer["expansion"]["tree"]]
    assert kinds[:2] == ["address", "username"] and "filter" in kinds
    assert {delivery["type"] for delivery in answer["expansion"]["deliveries"]} == {"mda", "mta"}
    assert "rdns" in answer["facts"]


def test_explain_sends_nothing(daemon: DaemonProcess) -> None:
    daemon.smtpctl("explain", "--to", "root")
    stats = json.loads(daemon.smtpctl("show", "stats", "--json").stdout)
    assert stats.get("scheduler.envelope.incoming", 0) == 0
    assert stats.get("smtp.session.local", 0) == 0


def test_update_table_rereads_the_file(daemon: DaemonProcess) -> None:
    aliases = daemon.workdir / "aliases"
    before = daemon.smtpctl("explain", "--to", "newcomer")
    assert before.returncode == 1  # not an alias, not a system user
    aliases.write_text(aliases.read_text() + "newcomer: bob\n")
    result = daemon.smtpctl("update", "table", "aliases")
    assert (result.returncode, result.stdout) == (0, "command succeeded\n"), result.stderr
    after = daemon.smtpctl("explain", "--to", "newcomer")
    assert after.returncode == 0
    assert "username: bob [depth=2, from alias <aliases> key newcomer" in after.stdout


def test_delivery_user_is_the_actions_user() -> None:
    """An action with `user NAME` delivers as NAME whoever the recipient is (smtpd/mda); explain said
    `as root` for an alias to root there, which is not who writes the mail."""
    workdir = make_workdir()
    try:
        (workdir / "aliases").write_text("postmaster: root\n")
        text = (f"table aliases file:{workdir / 'aliases'}\n"
                f'action "fixed" maildir "{workdir}/Maildir" alias <aliases> user "nobody"\n'
                'action "plain" mbox alias <aliases>\n'
                'match from local for domain "fixed.test" action "fixed"\n'
                'match from local for local action "plain"\n')
        running = DaemonProcess(workdir, text).start()
        try:
            fixed = running.smtpctl("explain", "--to", "postmaster@fixed.test")
            assert fixed.returncode == 0, fixed.stderr
            assert section(fixed.stdout.splitlines(), "deliveries:") == [
                "  mda via action fixed: postmaster@fixed.test as nobody (the action's user)"]
            answer = json.loads(running.smtpctl("explain", "--to", "postmaster@fixed.test", "--json").stdout)
            [delivery] = answer["expansion"]["deliveries"]
            assert (delivery["mda_user"], delivery["user"]) == ("root", "nobody")
            plain = json.loads(running.smtpctl("explain", "--to", "postmaster", "--json").stdout)
            assert [(item["mda_user"], item["user"]) for item in plain["expansion"]["deliveries"]] == [("root", None)]
        finally:
            running.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_local_submission_is_explained_as_sendmail_makes_it() -> None:
    """Without --src, explain answers for a local submission: the one sendmail makes, on the socket listener
    (its tag), named after this host (`from rdns` holds) and authenticated as the submitting user, whose name
    `auth <t>` does not see (as in OpenSMTPD 6.8). Each rule below holds for such a submission only through one
    of these; sendmail's own submission is the referee."""
    import getpass
    import os
    import subprocess
    import sys

    from helpers_control import ROOT

    me = getpass.getuser()
    text = ("listen on socket tag submitted\n"
            'action "out" relay\n'
            'match tag submitted for domain "tag.example" action "out"\n'
            'match from rdns for domain "rdns.example" action "out"\n'
            'match from any auth for domain "auth.example" action "out"\n'
            f'match from any auth {{ {me} }} for domain "user.example" action "out"\n'
            'match from local ! auth for domain "anonymous.example" action "out"\n')
    workdir = make_workdir()
    try:
        with DaemonProcess(workdir, text, paused=("mta",)) as daemon:
            for domain, accepted in (("tag.example", True), ("rdns.example", True), ("auth.example", True),
                                     ("user.example", False), ("anonymous.example", False)):
                code = "import sys; from smtpctl.cli import main; main(sys.argv[1:], prog='sendmail')"
                sendmail = subprocess.run([sys.executable, "-c", code, f"x@{domain}"], input="Subject: t\n\nhi\n",
                                          capture_output=True, text=True, timeout=60, cwd="/",
                                          env={**os.environ, **daemon.env, "PYTHONPATH": str(ROOT)})
                explained = daemon.smtpctl("explain", "--to", f"x@{domain}")
                assert (sendmail.returncode == 0) is accepted, (domain, sendmail.stderr)
                assert (explained.returncode == 0) is accepted, (domain, explained.stdout)
            session = explained.stdout.splitlines()[1]
            assert session == (f"session: local submission (rdns mx.control.test, helo localhost, auth {me}, "
                               "tag submitted)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_table_failure_is_explained_as_a_451(tmp_path: Path) -> None:
    """A table that fails while the rules are tried makes the daemon answer `451 Temporary failure`: explain
    must say so, not "no rule matched ... 550" (no rule was chosen, but nothing was refused either)."""
    import os
    import subprocess
    import sys

    from helpers_control import running_daemon

    source = tmp_path / "domains"
    source.write_text("example.org\n")
    code = "import sys; from smtpctl.cli import main; main(sys.argv[1:], prog='makemap')"
    subprocess.run([sys.executable, "-c", code, "-t", "set", str(source)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    database = tmp_path / "domains.db"
    text = (f"table domains db:{database}\n"
            'action "out" relay\n'
            'match from any for domain <domains> action "out"\n')
    with running_daemon(text) as daemon:
        assert daemon.smtpctl("explain", "--src", "192.0.2.9", "--to", "x@example.org").returncode == 0
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"this is not a table database\n" * 64)
        os.replace(garbage, database)
        result = daemon.smtpctl("explain", "--src", "192.0.2.9", "--to", "x@example.org")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[-2].startswith("  rule #1: table error: ")
    assert lines[-1] == "a table lookup failed: the recipient is deferred (451 Temporary failure: <x@example.org>)"
    assert "550" not in result.stdout


def test_a_delivery_that_will_fail_as_root_is_said_so() -> None:
    """Mail to root (here through `postmaster: root`) on a maildir action is accepted, as OpenSMTPD accepts it,
    and then bounces: the MDA never writes a maildir as root (`not allowed to deliver to: root`). explain listed
    the delivery `as root` and stopped there; it now says the delivery will fail, in the MDA's own words. mbox
    for root is written (by the unprivileged user), and is not flagged."""
    import smtplib

    from waiting import wait_until

    workdir = make_workdir()
    try:
        (workdir / "aliases").write_text("postmaster: root\n")
        text = (f"table aliases file:{workdir / 'aliases'}\n"
                "listen on 127.0.0.1 port {port}\n"
                'action "md" maildir alias <aliases>\n'
                'action "box" mbox alias <aliases>\n'
                'match from any for domain "md.test" action "md"\n'
                'match from any for domain "box.test" action "box"\n')
        with DaemonProcess(workdir, text) as daemon:
            explained = daemon.smtpctl("explain", "--to", "postmaster@md.test")
            assert explained.returncode == 0, explained.stderr  # accepted at RCPT all the same
            assert section(explained.stdout.splitlines(), "deliveries:") == [
                "  mda via action md: postmaster@md.test as root",
                "    this delivery will fail (bounced): not allowed to deliver to: root"]
            answer = json.loads(daemon.smtpctl("explain", "--to", "postmaster@md.test", "--json").stdout)
            [delivery] = answer["expansion"]["deliveries"]
            assert (delivery["fails"], delivery["fails_class"]) == ("not allowed to deliver to: root", 5)
            mbox = daemon.smtpctl("explain", "--to", "postmaster@box.test")
            assert section(mbox.stdout.splitlines(), "deliveries:") == [
                "  mda via action box: postmaster@box.test as root"]
            # What really happens to such a message: the same words.
            daemon.wait_listening(daemon.port)
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
                client.sendmail("", ["postmaster@md.test"], b"Subject: t\r\n\r\nhi\r\n")
            wait_until(lambda: "result=PermFail stat=Error (not allowed to deliver to: root)" in daemon.log(),
                       explain=daemon.log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_filters_and_senders_table_are_explained_as_the_session_refuses() -> None:
    """A listener's builtin filters and its `senders` table refuse mail before the rules are tried. explain
    skipped both and said "accepted" (exit 0) where the live session answered 550 or 530: its answer must be
    the session's reply, the same code and text, for the same listener, client and addresses."""
    import smtplib
    import ssl

    from helpers_smtp import make_certificate

    from shared.passwords import hash_password

    workdir = make_workdir()
    try:
        make_certificate(workdir)
        (workdir / "creds").write_text(f"alice {hash_password('secret', 'sha512')}\n")
        (workdir / "senders").write_text("alice alice@example.org, @alice.example\n")
        text = ('pki mx.test.example cert "{dir}/mx.test.example.crt"\n'
                'pki mx.test.example key "{dir}/mx.test.example.key"\n'
                "table creds file:{dir}/creds\n"
                "table sendermap file:{dir}/senders\n"
                'filter "nospam" phase mail-from match mail-from regex "^spam" reject "550 5.7.1 no spammers"\n'
                'filter "badrcpt" phase rcpt-to match rcpt-to regex "^blocked" reject "550 5.7.1 blocked here"\n'
                'filter "marked" phase rcpt-to match rcpt-to regex "^junk" junk\n'
                'filter "inbound" chain { "nospam", "badrcpt", "marked" }\n'
                'listen on 127.0.0.1 port {port} filter "inbound"\n'
                "listen on 127.0.0.1 port {port2} tls pki mx.test.example auth <creds> senders <sendermap> tag SUB\n"
                'action "out" relay\n'
                'match from any for domain "example.net" action "out"\n'
                'match auth from any for any action "out"\n')
        with DaemonProcess(workdir, text, paused=("mta",)) as daemon:
            daemon.wait_listening(daemon.port)
            inbound = ("--src", "127.0.0.1", "--listener", f"127.0.0.1:{daemon.port}")
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as client:
                client.ehlo("client.test")
                assert client.mail("spam@example.com") == (550, b"5.7.1 no spammers")
                client.rset()
                assert client.mail("ham@example.com")[0] == 250
                assert client.rcpt("blocked@example.net") == (550, b"5.7.1 blocked here")
                assert client.rcpt("junk@example.net")[0] == 250
            spam = daemon.smtpctl("explain", *inbound, "--from", "spam@example.com", "--to", "x@example.net")
            assert spam.returncode == 1, spam.stdout
            assert spam.stdout.splitlines()[-1] == 'refused at MAIL FROM: 550 5.7.1 no spammers (filter "nospam")'
            assert "rules:" not in spam.stdout
            blocked = daemon.smtpctl("explain", *inbound, "--from", "ham@example.com", "--to", "blocked@example.net")
            assert blocked.returncode == 1, blocked.stdout
            assert blocked.stdout.splitlines()[-1] == \
                'refused at RCPT TO: 550 5.7.1 blocked here (filter "badrcpt")'
            junk = daemon.smtpctl("explain", *inbound, "--from", "ham@example.com", "--to", "junk@example.net")
            assert junk.returncode == 0, junk.stdout
            assert "  the message will be marked as junk (X-Spam: Yes)" in junk.stdout.splitlines()
            answer = json.loads(daemon.smtpctl("explain", *inbound, "--from", "ham@example.com", "--to",
                                               "blocked@example.net", "--json").stdout)
            assert answer["session"]["refusal"] == {"phase": "rcpt-to", "filter": "badrcpt", "code": 550,
                                                    "text": "5.7.1 blocked here", "reason": 'filter "badrcpt"'}
            assert answer["matched"] is None and answer["expansion"] is None

            daemon.wait_listening(daemon.port2)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", daemon.port2, timeout=20) as client:
                client.ehlo("client.test")
                client.starttls(context=context)
                client.ehlo("client.test")
                client.login("alice", "secret")
                assert client.mail("bob@example.com") == (530, b"Sender rejected")
                assert client.mail("me@alice.example")[0] == 250
            submission = ("--src", "127.0.0.1", "--listener", "SUB", "--auth-user", "alice", "--tls")
            refused = daemon.smtpctl("explain", *submission, "--from", "bob@example.com", "--to", "x@example.com")
            assert refused.returncode == 1, refused.stdout
            assert refused.stdout.splitlines()[-1] == ("refused at MAIL FROM: 530 Sender rejected (senders table "
                                                       "<sendermap>: alice may send as alice@example.org, @alice.example)")
            allowed = daemon.smtpctl("explain", *submission, "--from", "me@alice.example", "--to", "x@example.com")
            assert allowed.returncode == 0, allowed.stdout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
