"""`smtpctl spf walk` against a DNS server of the test's own on loopback (SMTPD_RESOLVER)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from helpers_control import ROOT

ZONE = {
    ("example.org", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 include:_spf.example.net a mx/28 -ip4:203.0.113.9 ~all"',
                             '"some other text"'],
    ("_spf.example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/32 redirect=last.example.com"'],
    ("last.example.com", "TXT"): ['"v=spf1 ip4:198.51.100.7 include:example.org"'],  # a loop back
    ("example.org", "A"): ["192.0.2.80"],
    ("example.org", "AAAA"): ["2001:db8::80"],
    ("example.org", "MX"): ["10 mx.example.org."],
    ("mx.example.org", "A"): ["192.0.2.25"],
    ("nospf.example", "TXT"): ['"hello"'],
}


class DnsServer:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.running = True

    def serve(self) -> None:
        self.sock.settimeout(0.1)  # so that the loop sees `running` turn off
        while self.running:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            name = str(question.name).rstrip(".").lower()
            kind = dns.rdatatype.to_text(question.rdtype)
            values = ZONE.get((name, kind))
            if values:
                reply.answer.append(dns.rrset.from_text(question.name, 300, "IN", kind, *values))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    server.thread.start()
    yield server
    server.close()


def spf_walk(server: DnsServer, text: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SMTPD_RESOLVER": f"127.0.0.1:{server.port}",
           "SMTPD_SOCKET": "/nonexistent/smtpd.sock"}
    return subprocess.run([sys.executable, "-m", "smtpctl", "spf", "walk"], input=text, capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=60)


def test_walk_follows_includes_redirects_a_and_mx(dns_server: DnsServer) -> None:
    result = spf_walk(dns_server, "example.org\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "192.0.2.80", "2001:db8::80", "192.0.2.25/28"]


def test_walk_without_daemon_and_with_unknown_domains(dns_server: DnsServer) -> None:
    result = spf_walk(dns_server, "nospf.example\nmissing.example\n\n")
    assert (result.returncode, result.stdout) == (0, "")


def test_listing(dns_server: DnsServer) -> None:
    result = subprocess.run([sys.executable, "-m", "smtpctl", "spf"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert (result.returncode, result.stderr) == (255, "possibilities are:\nspf walk\n")


def test_walk_with_a_resolver_setting_that_is_no_address_says_so() -> None:
    """`SMTPD_RESOLVER=resolver.example` died with a ValueError traceback (each program read the setting its own
    way); now one reader says what is wrong, as a usage error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SMTPD_RESOLVER": "resolver.example"}
    result = subprocess.run([sys.executable, "-m", "smtpctl", "spf", "walk"], input="example.org\n",
                            capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=60)
    assert result.returncode == 255
    assert "SMTPD_RESOLVER=resolver.example" in result.stderr and "Traceback" not in result.stderr


def test_walk_with_a_resolv_conf_without_nameservers_uses_the_local_one(tmp_path) -> None:  # noqa: ANN001
    """resolv.conf(5): no `nameserver` line means the server on this machine. `spf walk` (no resolver setting,
    in a mount namespace whose /etc/resolv.conf has none) died with dnspython's "no nameservers" traceback."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SMTPD_RESOLVER": ""}
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(conf),
                             sys.executable, "-m", "smtpctl", "spf", "walk"], input="# no domain\n",
                            capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
