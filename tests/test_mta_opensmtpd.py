"""The relay agent talking to the real OpenSMTPD 6.8 as the receiving smarthost (STARTTLS + AUTH, refusals)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers_mta import (
    LOCAL_RESOLV_CONF,
    DnsServer,
    MemoryTables,
    OpenSmtpd,
    free_port,
    maildir_messages,
    make_certificate,
    relay_config,
    wait_until,
)
from helpers_smtp import LineClient

from smtpd.config.model import Relay
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import Resolver
from smtpd.queue.envelope import Envelope


@pytest.fixture()
def opensmtpd_dir():
    # Outside pytest's private (0700) tmp tree: OpenSMTPD's maildir delivery runs as nobody.
    workdir = Path(tempfile.mkdtemp(prefix="pysmtpd-mta-"))
    os.chmod(workdir, 0o755)
    maildir = workdir / "Maildir"
    maildir.mkdir()
    shutil.chown(maildir, "nobody")
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


def opensmtpd_config(workdir: Path, port: int, tls: bool) -> str:
    lines = ['table users { "@" = "nobody" }']
    if tls:
        cert = make_certificate(str(workdir), "smarthost.test", ecdsa=True)
        lines += [f'pki smarthost.test cert "{cert.cert}"', f'pki smarthost.test key "{cert.key}"',
                  f"listen on 127.0.0.1 port {port} tls pki smarthost.test"]
    else:
        lines.append(f"listen on 127.0.0.1 port {port}")
    lines += [f'action "local" maildir "{workdir}/Maildir" virtual <users>',
              'match from any for domain "remote.test" action "local"']
    return "\n".join(lines) + "\n"


def relay_one(agent: MtaAgent, envelopes: list[Envelope], path: str) -> list[DeliveryResult]:
    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            return list(await asyncio.gather(*(agent.deliver(item, path) for item in envelopes)))
        finally:
            await agent.stop()
    return asyncio.run(run())


def message_file(tmp_path: Path) -> str:
    path = tmp_path / "message"
    path.write_bytes(b"From: bob@local.test\nSubject: to OpenSMTPD\n\nrelayed by PySMTPD\n")
    return str(path)


def test_relay_to_opensmtpd_with_sender_rewrite_and_tls_fallback(tmp_path: Path, opensmtpd_dir: Path) -> None:
    """OpenSMTPD offers STARTTLS, but the Debian 6.8 build cannot complete a TLS handshake with OpenSSL 3
    (its log says "EVP lib"; swaks fails the same way). Opportunistic TLS must then fall back to plain text and
    deliver, as OpenSMTPD's own client does; STARTTLS + AUTH are exercised against aiosmtpd and our daemon."""
    port = free_port()
    config_text = opensmtpd_config(opensmtpd_dir, port, tls=True)
    with DnsServer({"smarthost.test": [("A", "127.0.0.1")]}) as dns, OpenSmtpd(str(opensmtpd_dir), config_text, port):
        relay = Relay(host=f"smtp://smarthost.test:{port}", mail_from="@foo.bar")
        agent = MtaAgent(relay_config(relay), MemoryTables(), "sender.test", resolver=Resolver(dns.setting),
                         timeout=20.0)
        envelope = Envelope(evpid=(0x42 << 32) | 1, dispatcher="relay", sender="bob@local.test",
                            rcpt="alice@remote.test", dest="alice@remote.test")
        results = relay_one(agent, [envelope], message_file(tmp_path))
        assert results[0].outcome is Outcome.OK, results[0].text
        assert results[0].text.startswith("250 2.0.0 ") and "Message accepted for delivery" in results[0].text
        assert wait_until(lambda: len(maildir_messages(str(opensmtpd_dir / "Maildir"))) == 1)
    delivered = maildir_messages(str(opensmtpd_dir / "Maildir"))[0]
    assert delivered["Return-Path"] == "<bob@foo.bar>"
    assert delivered["Subject"] == "to OpenSMTPD"
    assert "from sender.test (localhost [127.0.0.1])" in " ".join(delivered["Received"].split())


def test_opensmtpd_refusal_becomes_a_permanent_failure(tmp_path: Path, opensmtpd_dir: Path) -> None:
    port = free_port()
    with OpenSmtpd(str(opensmtpd_dir), opensmtpd_config(opensmtpd_dir, port, tls=False), port):
        agent = MtaAgent(relay_config(Relay(host=f"smtp://127.0.0.1:{port}")), MemoryTables(), "sender.test",
                         resolver=Resolver("127.0.0.1:9"), timeout=20.0)
        envelopes = [Envelope(evpid=(0x43 << 32) | 1, dispatcher="relay", sender="bob@local.test",
                              rcpt="x@elsewhere.test", dest="x@elsewhere.test"),
                     Envelope(evpid=(0x43 << 32) | 2, dispatcher="relay", sender="bob@local.test",
                              rcpt="carol@remote.test", dest="carol@remote.test")]
        results = relay_one(agent, envelopes, message_file(tmp_path))
        assert wait_until(lambda: len(maildir_messages(str(opensmtpd_dir / "Maildir"))) == 1)
    assert results[0].outcome is Outcome.PERMFAIL
    assert results[0].text == "550 Invalid recipient: <x@elsewhere.test>"
    assert results[1].outcome is Outcome.OK
    assert maildir_messages(str(opensmtpd_dir / "Maildir"))[0]["Return-Path"] == "<bob@local.test>"


def test_the_opensmtpd_we_run_asks_no_resolver_beyond_loopback(opensmtpd_dir: Path) -> None:
    """Its view of /etc/resolv.conf is ours (its own mount namespace): /etc/hosts first, then loopback only.
    A client from 127.0.0.1 is named from /etc/hosts; the machine's own resolv.conf is untouched."""
    port = free_port()
    with open("/etc/resolv.conf", "rb") as handle:
        machine_resolv_conf = handle.read()
    with OpenSmtpd(str(opensmtpd_dir), opensmtpd_config(opensmtpd_dir, port, tls=False), port) as daemon:
        assert daemon.process is not None
        seen = Path(f"/proc/{daemon.process.pid}/root/etc/resolv.conf").read_text()
        assert seen == LOCAL_RESOLV_CONF
        assert "nameserver 127.0.0.1" in seen and seen.startswith("lookup file bind")
        client = LineClient(port)
        try:
            assert client.reply()[0].startswith("220")
        finally:
            client.close()
        assert wait_until(lambda: "address=127.0.0.1 host=localhost" in daemon.log(), 10)
    with open("/etc/resolv.conf", "rb") as handle:
        assert handle.read() == machine_resolv_conf
