"""Relaying to an LMTP server's Unix socket (`relay host "lmtp:///path"`), against a real Dovecot."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from helpers_codec import KEY
from helpers_dovecot import Dovecot, DovecotUser
from helpers_mta import MemoryTables

from smtpd.config import parse_text
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import Resolver
from smtpd.mta.routes import RelayHost, RelayUrlError, parse_relay_url
from smtpd.queue import codec
from smtpd.queue.envelope import Envelope

NOBODY = 65534
MESSAGE = b"From: bob@local.test\nTo: carol@example.org\nSubject: over a unix socket\n\nHello Carol.\n.dot\n"


@pytest.fixture()
def dovecot() -> Iterator[Dovecot]:
    # Not under pytest's 0700 tmp_path: Dovecot's unprivileged processes must reach their sockets.
    base = tempfile.mkdtemp(prefix="pysmtpd-lmtp-")
    os.chmod(base, 0o755)
    home = os.path.join(base, "carol")
    os.mkdir(home, 0o700)
    os.chown(home, NOBODY, NOBODY)
    try:
        with Dovecot(base, [DovecotUser("carol", NOBODY, NOBODY, home)], "maildir:~/Maildir") as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def relay(socket_path: str, message_path: str, recipients: list[str]) -> list[DeliveryResult]:
    text = f'action to_lmtp relay host "lmtp://{socket_path}"\nmatch from any for any action to_lmtp\n'
    result = parse_text(text, "<test>")
    assert result.errors == [] and result.config is not None
    agent = MtaAgent(result.config, MemoryTables(), "sender.test", resolver=Resolver("127.0.0.1:9"), timeout=10.0)
    envelopes = [Envelope(evpid=(0x42 << 32) | number, dispatcher="to_lmtp", sender="bob@local.test", rcpt=rcpt,
                          dest=rcpt) for number, rcpt in enumerate(recipients, 1)]

    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            return list(await asyncio.gather(*(agent.deliver(item, message_path) for item in envelopes)))
        finally:
            await agent.stop()
    return asyncio.run(run())


def test_relay_to_dovecot_lmtp_over_its_unix_socket(dovecot: Dovecot) -> None:
    message_path = os.path.join(dovecot.base, "message")
    with open(message_path, "wb") as handle:
        handle.write(MESSAGE)
    results = relay(dovecot.lmtp_socket, message_path, ["carol@example.org", "nosuchuser@example.org"])
    # LMTP: one answer per recipient — Carol's is delivered, the unknown user is refused for good
    assert results[0].outcome is Outcome.OK, results[0].text
    assert results[1].outcome is Outcome.PERMFAIL
    assert results[1].text.startswith("550 5.1.1")
    stored = dovecot.fetch("carol")
    assert len(stored) == 1
    assert "Subject: over a unix socket" in stored[0] and "Hello Carol.\n.dot\n" in stored[0].replace("\r\n", "\n")


def test_missing_socket_is_a_temporary_failure(tmp_path: os.PathLike[str]) -> None:
    message_path = os.path.join(tmp_path, "message")
    with open(message_path, "wb") as handle:
        handle.write(MESSAGE)
    results = relay(os.path.join(tmp_path, "no-such-socket"), message_path, ["carol@example.org"])
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "Connection failed: No such file or directory"


@pytest.mark.parametrize(("url", "expected"), [
    ("lmtp:///run/dovecot/lmtp", RelayHost("lmtp", "/run/dovecot/lmtp", 0)),
    ("lmtp:///run//dovecot/./lmtp", RelayHost("lmtp", "/run/dovecot/lmtp", 0)),
])
def test_unix_socket_urls(url: str, expected: RelayHost) -> None:
    parsed = parse_relay_url(url)
    assert parsed == expected and parsed.unix_socket and str(parsed) == "lmtp:///run/dovecot/lmtp"


@pytest.mark.parametrize(("url", "message"), [
    ("smtp:///run/socket", "only lmtp:// may name a Unix socket"),
    ("lmtp:///run/dir/", "bad socket path"),
    ("lmtp:///" + "x" * 120, "bad socket path"),
])
def test_bad_unix_socket_urls(url: str, message: str) -> None:
    with pytest.raises(RelayUrlError, match=message):
        parse_relay_url(url)


def test_an_encrypted_message_is_decoded_once_for_its_relay(dovecot: Dovecot, monkeypatch) -> None:  # noqa: ANN001
    """With `queue encryption`, the relay read the message once for its size and 8-bit check and once more to
    send it, decrypting a clear copy each time: the batch now holds the one copy until it ends."""
    queue_codec = codec.QueueCodec(compress=True, key=KEY.encode())
    monkeypatch.setattr(codec, "_current", queue_codec)
    decoded: list[str] = []
    original = codec.QueueCodec._decoded_copy

    def counted(self: codec.QueueCodec, source: int, head: bytes):  # noqa: ANN202
        decoded.append(head.hex())
        return original(self, source, head)

    monkeypatch.setattr(codec.QueueCodec, "_decoded_copy", counted)
    message_path = os.path.join(dovecot.base, "message")
    with open(message_path, "wb") as handle:
        handle.write(queue_codec.encode(MESSAGE))
    [result] = relay(dovecot.lmtp_socket, message_path, ["carol@example.org"])
    assert result.outcome is Outcome.OK, result.text
    [stored] = dovecot.fetch("carol")
    assert "Hello Carol.\n.dot\n" in stored.replace("\r\n", "\n")
    assert len(decoded) == 1, decoded
