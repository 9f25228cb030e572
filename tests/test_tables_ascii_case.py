"""Tables compare case as OpenSMTPD does, folding A-Z only. Python's Unicode lowercase would make the KELVIN SIGN
(U+212A) an ASCII `k`, so that a client could have an SMTPUTF8 recipient at `\u212ade.org` accepted by a rule written for
`kde.org` (and relayed), or its mail to `\u212aevin` delivered to the user kevin."""

from __future__ import annotations

from pathlib import Path

from helpers_smtp import LineClient, SmtpDaemon

KELVIN = "\u212a"


def rcpt_reply(port: int, recipient: str) -> str:
    client = LineClient(port)
    try:
        client.reply()
        client.send(b"EHLO client.example.net\r\n")
        client.reply()
        client.send(b"MAIL FROM:<alice@example.net> SMTPUTF8\r\n")
        assert client.reply()[-1].startswith("250")
        client.send(f"RCPT TO:<{recipient}>\r\n".encode())
        return client.reply()[-1]
    finally:
        client.sock.close()


def test_a_unicode_letter_does_not_fold_into_an_ascii_table_entry(tmp_path: Path) -> None:
    (tmp_path / "domains").write_text("kde.org\n*.example.org\n", encoding="utf-8")
    config = (f"table domains file:{tmp_path}/domains\nlisten on 127.0.0.1 port {{port}}\n"
              'action "out" relay host smtp://127.0.0.1:9\nmatch from any for domain <domains> action "out"\n'
              'action "local" mbox\nmatch from any for domain "mx.test" action "local"\n')
    with SmtpDaemon(tmp_path / "daemon", config) as daemon:
        assert rcpt_reply(daemon.port, "x@KDE.Org").startswith("250")
        assert rcpt_reply(daemon.port, "x@Mail.EXAMPLE.org").startswith("250")
        assert rcpt_reply(daemon.port, f"x@{KELVIN}de.org").startswith("550")
        assert rcpt_reply(daemon.port, f"x@mail.{KELVIN}de.org").startswith("550")
        assert rcpt_reply(daemon.port, f"x@mail.example.org{KELVIN}").startswith("550")
        assert rcpt_reply(daemon.port, "ROOT@mx.test").startswith("250")
