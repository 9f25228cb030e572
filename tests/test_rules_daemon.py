"""Which rule an envelope takes, through the real daemon: clients on loopback source addresses with (or without)
a reverse name from a loopback DNS server, local submissions through sendmail. Every case here was compared
with real OpenSMTPD 6.8 (its daemon, the same rules, the same clients)."""

from __future__ import annotations

import os
import pwd
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess
from helpers_mta import DnsServer

SENDMAIL = [sys.executable, "-c", "import sys; from smtpctl.cli import main; main(sys.argv[1:], 'sendmail')"]
RECORDS = {
    "10.0.0.127.in-addr.arpa": [("PTR", "mail.example.org.")],
    "mail.example.org": [("A", "127.0.0.10")],
    # 127.0.0.20: no reverse name
}


@pytest.fixture()
def dns() -> Iterator[DnsServer]:
    with DnsServer(RECORDS) as server:
        yield server


def make_daemon(tmp_path: Path, dns: DnsServer, rules: str, virtual: str = "") -> SmtpdProcess:
    """A daemon whose rules reject what they are asked about; everything else is accepted."""
    config = ('listen on 127.0.0.1 port {port}\naction "local" mbox virtual { ' + virtual + '"@" = "root" }\n'
              + rules
              + 'match from any for any action "local"\n')
    return SmtpdProcess(tmp_path, config, paused=("mda",), env={"SMTPD_RESOLVER": dns.setting})


def rcpt_code(daemon: SmtpdProcess, source: str, rcpt: str, sender: str = "a@sender.test") -> int:
    with smtplib.SMTP("127.0.0.1", daemon.port, source_address=(source, 0), timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        return client.rcpt(rcpt)[0]


def sendmail_ok(daemon: SmtpdProcess, rcpt: str) -> bool:
    result = subprocess.run([*SENDMAIL, "-f", "a@sender.test", rcpt], input="Subject: t\n\nx\n", text=True,
                            capture_output=True, timeout=60, env=daemon.env, cwd="/")
    return result.returncode == 0


def test_negated_rdns_table_does_not_match_a_client_without_a_reverse_name(tmp_path: Path, dns: DnsServer) -> None:
    rules = ('match !from rdns { "example.org" } for domain "m.test" reject\n'
             'match !from rdns regex { "^nomatch" } for domain "r.test" reject\n'
             'match !from rdns for domain "n.test" reject\n')
    with make_daemon(tmp_path, dns, rules) as daemon:
        # No reverse name: the negated table tests fail (OpenSMTPD 6.8), the bare `! from rdns` holds.
        assert rcpt_code(daemon, "127.0.0.20", "x@m.test") == 250
        assert rcpt_code(daemon, "127.0.0.20", "x@r.test") == 250
        assert rcpt_code(daemon, "127.0.0.20", "x@n.test") == 550
        # A reverse name not in the table: the negation holds.
        assert rcpt_code(daemon, "127.0.0.10", "x@m.test") == 550
        assert rcpt_code(daemon, "127.0.0.10", "x@r.test") == 550
        assert rcpt_code(daemon, "127.0.0.10", "x@n.test") == 250


def test_rdns_table_entries_are_names_not_patterns(tmp_path: Path, dns: DnsServer) -> None:
    rules = ('match from rdns { "*.example.org" } for domain "glob.test" reject\n'
             'match from rdns { "*" } for domain "star.test" reject\n'
             'match from rdns { "MAIL.example.org" } for domain "exact.test" reject\n')
    with make_daemon(tmp_path, dns, rules) as daemon:
        assert rcpt_code(daemon, "127.0.0.10", "x@glob.test") == 250
        assert rcpt_code(daemon, "127.0.0.10", "x@star.test") == 250
        assert rcpt_code(daemon, "127.0.0.10", "x@exact.test") == 550


def test_expanded_envelopes_are_local_to_rdns_tables(tmp_path: Path, dns: DnsServer) -> None:
    """f@e.test expands to x@t.test, which goes through the rules again with "local" as its reverse name."""
    virtual = '"f@e.test" = "x@t.test", "f2@e.test" = "x@t2.test", '
    rules = ('match from rdns { "mail.example.org" } for domain "t.test" reject\n'
             'match from rdns regex { "^local$" } for domain "t2.test" reject\n')
    with make_daemon(tmp_path, dns, rules, virtual) as daemon:
        assert rcpt_code(daemon, "127.0.0.10", "x@t.test") == 550
        assert rcpt_code(daemon, "127.0.0.10", "f@e.test") == 250
        assert rcpt_code(daemon, "127.0.0.10", "f2@e.test") == 550
        assert rcpt_code(daemon, "127.0.0.20", "f2@e.test") == 550
        assert rcpt_code(daemon, "127.0.0.10", "x@t2.test") == 250


def test_a_mail_from_regex_sees_the_empty_sender_as_an_at_sign(tmp_path: Path, dns: DnsServer) -> None:
    rules = ('match from mail-from regex { "^@$" } for domain "at.test" reject\n'
             'match from mail-from regex { "^$" } for domain "empty.test" reject\n'
             'match from any mail-from regex { "@" } for domain "opt.test" reject\n'
             'match from mail-from { "@" } for domain "table.test" reject\n')
    with make_daemon(tmp_path, dns, rules) as daemon:
        assert rcpt_code(daemon, "127.0.0.20", "x@at.test", sender="") == 550
        assert rcpt_code(daemon, "127.0.0.20", "x@empty.test", sender="") == 250
        assert rcpt_code(daemon, "127.0.0.20", "x@opt.test", sender="") == 550
        assert rcpt_code(daemon, "127.0.0.20", "x@table.test", sender="") == 550
        assert rcpt_code(daemon, "127.0.0.20", "x@at.test", sender="a@b.test") == 250


def test_an_untagged_session_has_the_empty_tag(tmp_path: Path, dns: DnsServer) -> None:
    rules = ('match from any tag regex { "^$" } for domain "a.test" reject\n'
             'match from any !tag regex { "^$" } for domain "b.test" reject\n'
             'match from any tag { "" } for domain "c.test" reject\n'
             'match from any !tag { "mytag" } for domain "d.test" reject\n')
    with make_daemon(tmp_path, dns, rules) as daemon:
        assert rcpt_code(daemon, "127.0.0.20", "x@a.test") == 550
        assert rcpt_code(daemon, "127.0.0.20", "x@b.test") == 250
        assert rcpt_code(daemon, "127.0.0.20", "x@c.test") == 550
        assert rcpt_code(daemon, "127.0.0.20", "x@d.test") == 550
        assert not sendmail_ok(daemon, "x@a.test")
        assert sendmail_ok(daemon, "x@b.test")


def test_a_local_submission_is_authenticated_without_a_user_name(tmp_path: Path, dns: DnsServer) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    rules = (f'match from auth {{ "{me}" }} for domain "user.test" reject\n'
             'match from auth { "" } for domain "empty.test" reject\n'
             'match from auth for domain "any.test" reject\n'
             'match from any !auth { "" } for domain "not.test" reject\n')
    with make_daemon(tmp_path, dns, rules) as daemon:
        assert sendmail_ok(daemon, "x@user.test")
        assert not sendmail_ok(daemon, "x@empty.test")
        assert not sendmail_ok(daemon, "x@any.test")
        assert sendmail_ok(daemon, "x@not.test")
