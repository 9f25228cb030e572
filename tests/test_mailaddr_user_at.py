"""A mailaddr table entry `user@` (that user at any domain), through the real daemon: OpenSMTPD reads it as a user
with an empty domain, so `mail-from <t>` matches `alice@any.domain`, with or without a sub-address, in a file
table and in a db table made by makemap."""

from __future__ import annotations

import smtplib
import subprocess
import sys

from daemon import ROOT, SmtpdProcess


def rcpt_reply(port: int, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        code, _ = client.rcpt("someone@in.test")
        client.rset()
        return code


def test_user_at_entry_matches_every_domain(tmp_path) -> None:
    (tmp_path / "senders").write_text("# senders allowed in\nalice@\n@friends.test\n")
    (tmp_path / "senders2").write_text("carol@\n")
    made = subprocess.run([sys.executable, "-c",
                           "import sys; sys.argv[0] = 'makemap'; from smtpctl.cli import main; sys.exit(main())",
                           "-t", "set", "-o", str(tmp_path / "senders2.db"), str(tmp_path / "senders2")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
                          timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    config = ("listen on 127.0.0.1 port {port}\n"
              "table allowed file:{dir}/senders\n"
              "table allowed2 db:{dir}/senders2.db\n"
              'action "out" relay host smtp://127.0.0.1:{port2}\n'
              'match from any mail-from <allowed> for domain "in.test" action "out"\n'
              'match from any mail-from <allowed2> for domain "in.test" action "out"\n')
    with SmtpdProcess(tmp_path, config) as daemon:
        for sender in ("alice@example.org", "Alice@Other.Example", "alice+lists@example.org", "bob@friends.test",
                       "carol@example.net", "carol+x@sub.example.net"):
            assert rcpt_reply(daemon.port, sender) == 250, sender
        for sender in ("bob@example.org", "malice@example.org", "alice.b@example.org"):
            assert rcpt_reply(daemon.port, sender) == 550, sender
