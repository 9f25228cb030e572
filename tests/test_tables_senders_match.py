"""`senders <table>` over a real AUTH session: the addresses in the table's value are mailaddr patterns, matched
with the same rules as every other mailaddr table (reference §5.1): the domain is OpenSMTPD's glob, whose `*`
stops at the next pattern character (`*.example.org` is one label deep), and `?` or `[...]` are plain text."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_smtp import SmtpDaemon, make_certificate
from helpers_tables import starttls_client

from shared.passwords import hash_password


def senders_config(folder: Path, value: str) -> str:
    (folder / "credentials").write_text(f"bob {hash_password('secret')}\n", encoding="utf-8")
    (folder / "senders").write_text(f"bob {value}\n", encoding="utf-8")
    return (f'pki mx.test.example cert "{folder}/mx.test.example.crt"\n'
            f'pki mx.test.example key "{folder}/mx.test.example.key"\n'
            f"table creds file:{folder}/credentials\ntable sendermap file:{folder}/senders\n"
            "listen on 127.0.0.1 port {port} tls-require pki mx.test.example auth <creds> senders <sendermap>\n"
            'action "out" relay\nmatch auth from any for any action "out"\n')


@pytest.mark.parametrize(("value", "sender", "code"), [
    ("@*.example.org", "alice@www.example.org", 250),
    ("@*.example.org", "alice@WWW.Example.ORG", 250),
    ("@*.example.org", "alice@a.b.example.org", 530),  # the glob's `*` does not cross a dot
    ("@ex?mple.org", "alice@example.org", 530),  # `?` is no wildcard in a mailaddr domain
    ("@ex[a]mple.org", "alice@example.org", 530),  # nor is a bracket
    ("Alice@*.example.org", "ALICE+list@www.example.org", 250),
    ("alice@*.example.org", "carol@www.example.org", 530),
])
def test_senders_domains_match_as_every_mailaddr_table(tmp_path: Path, value: str, sender: str, code: int) -> None:
    make_certificate(tmp_path)
    with SmtpDaemon(tmp_path / "daemon", senders_config(tmp_path, value)) as daemon, \
            starttls_client(daemon.port) as client:
        assert client.login("bob", "secret")[0] == 235
        assert client.mail(sender)[0] == code
