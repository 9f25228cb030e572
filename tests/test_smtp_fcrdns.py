"""Forward-confirmed reverse DNS (reference §7.2: "FCrDNS is recorded"), through the resolver setting and a real
DNS server on loopback. Clients connect from several loopback source addresses, each with its own DNS story.
"""

from __future__ import annotations

import re
import smtplib

import pytest
from helpers_mta import DnsServer
from helpers_smtp import SmtpDaemon

RECORDS = {
    # 127.0.0.1: the reverse name resolves back to the client: pass
    "1.0.0.127.in-addr.arpa": [("PTR", "good.client.test.")],
    "good.client.test": [("A", "127.0.0.9"), ("A", "127.0.0.1")],
    # 127.0.0.2: the reverse name claims a name that points elsewhere: fail
    "2.0.0.127.in-addr.arpa": [("PTR", "liar.client.test.")],
    "liar.client.test": [("A", "127.0.0.9")],
    # 127.0.0.3: the reverse name has no address at all (only AAAA of another host): fail
    "3.0.0.127.in-addr.arpa": [("PTR", "six.client.test.")],
    "six.client.test": [("AAAA", "2001:db8::3")],
    # 127.0.0.4: the forward lookup fails temporarily: error
    "4.0.0.127.in-addr.arpa": [("PTR", "broken.client.test.")],
    "broken.client.test": [("SERVFAIL", "")],
    # 127.0.0.5: no reverse name: fail
    # 127.0.0.6: a reverse "name" that is no host name (written to shift a filter report's fields): no name, fail
    "6.0.0.127.in-addr.arpa": [("PTR", "a|fail|9.9.9.9:25|x.evil.test.")],
    # 127.0.0.7: the name resolves back, but its server fails every AAAA question (IPv4 client): still pass
    "7.0.0.127.in-addr.arpa": [("PTR", "noaaaa.client.test.")],
    "noaaaa.client.test": [("A", "127.0.0.7"), ("SERVFAIL", "AAAA")],
    # 127.0.0.8: a reverse "name" that is an address (another one, to dress up the Received line): no name, fail
    "8.0.0.127.in-addr.arpa": [("PTR", "10.0.0.8.")],
    "10.0.0.8": [("A", "127.0.0.8")],
    # ::1: an IPv6 client whose name's server fails A questions: its AAAA confirms it
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa": [("PTR", "six.client6.test.")],
    "six.client6.test": [("SERVFAIL", "A"), ("AAAA", "::1")],
}

CONFIG = """
listen on 127.0.0.1 port {port}
listen on ::1 port {port}
action "local" mbox
match from any for domain "example.org" action "local"
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("fcrdns")
    with DnsServer(RECORDS) as dns:
        daemon = SmtpDaemon(folder, CONFIG, env={"SMTPD_RESOLVER": dns.setting}, traces=("smtp",))
        daemon.start()
        try:
            yield daemon, dns
        finally:
            daemon.stop()


def send_from(daemon: SmtpDaemon, source: str) -> str:
    """One message from the source address; returns the first line of the stored message."""
    with smtplib.SMTP(source if ":" in source else "127.0.0.1", daemon.port, source_address=(source, 0),
                      timeout=30) as client:
        client.ehlo("helo.test")
        assert client.mail("a@sender.test")[0] == 250
        assert client.rcpt("root@example.org")[0] == 250
        code, text = client.data(b"Subject: fcrdns\r\n\r\nx\r\n")
        assert code == 250, text
    return daemon.message(text.split()[1].decode()).decode().split("\n")[0]


def fcrdns_trace(daemon: SmtpDaemon, source: str) -> list[str]:
    return re.findall(rf"fcrdns=(\w+) address={re.escape(source)} host=(\S+)", daemon.log())


@pytest.mark.parametrize(("source", "status", "host"), [
    ("127.0.0.1", "pass", "good.client.test"),
    ("127.0.0.2", "fail", "liar.client.test"),
    ("127.0.0.3", "fail", "six.client.test"),
    ("127.0.0.4", "error", "broken.client.test"),
    ("127.0.0.5", "fail", "<unknown>"),
    ("127.0.0.6", "fail", "<unknown>"),
    ("127.0.0.7", "pass", "noaaaa.client.test"),
    ("127.0.0.8", "fail", "<unknown>"),
    ("::1", "pass", "six.client6.test"),
])
def test_fcrdns_is_recorded_for_each_client(served: tuple[SmtpDaemon, DnsServer], source: str, status: str,
                                            host: str) -> None:
    daemon, dns = served
    first_line = send_from(daemon, source)
    # The reverse name is kept whether or not it is confirmed (as OpenSMTPD does): Received and `from rdns`
    # see it; FCrDNS is a separate fact.
    assert first_line == f"Received: from helo.test ({host} [{source}])"  # IPv6 too: `[::1]`, as 6.8 writes it
    assert set(fcrdns_trace(daemon, source)) == {(status, host)}  # 127.0.0.1 also had the readiness probe
    if host != "<unknown>":
        assert (host, "AAAA" if ":" in source else "A") in dns.queries


def test_without_the_resolver_setting_the_system_resolver_names_the_client(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """No SMTPD_RESOLVER: the system's resolver, which names 127.0.0.1 from /etc/hosts (no DNS question). The
    tests' own server (set for every test, see conftest.py) would name it otherwise here, and is not asked."""
    with DnsServer({"1.0.0.127.in-addr.arpa": [("PTR", "not.the.system.test.")]}) as other:
        monkeypatch.setenv("SMTPD_RESOLVER", other.setting)
        daemon = SmtpDaemon(tmp_path, CONFIG, env={"SMTPD_RESOLVER": ""}, traces=("smtp",))
        daemon.start()
        try:
            first_line = send_from(daemon, "127.0.0.1")
        finally:
            daemon.stop()
        assert other.queries == []
    assert first_line == "Received: from helo.test (localhost [127.0.0.1])"
    assert set(fcrdns_trace(daemon, "127.0.0.1")) == {("pass", "localhost")}
