"""A real filter written for OpenSMTPD: Debian's opensmtpd-filter-dkimsign (C, libopensmtpd) signs what our daemon
accepts, configured as its manual and OpenSMTPD administrators write it, and the signature verifies (dkimpy, with
the public key given as the DNS record would give it)."""

from __future__ import annotations

import base64
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from helpers_filters import open_folder
from helpers_smtp import SmtpDaemon

FILTER = "/usr/libexec/opensmtpd/filter-dkimsign"
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@remote.test\r\nSubject: signed by a filter\r\n"
           b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\n\r\nHello,\r\n.a line that began with a dot\r\n\r\nAlice\r\n")


@pytest.fixture()
def signing() -> Iterator[tuple[Path, bytes]]:
    """A folder with a 2048-bit key only the filter's own user reads, and the DNS record of its public half."""
    with open_folder("dkimsign") as folder:
        key = folder / "dkim.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        public = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                                capture_output=True).stdout
        shutil.chown(key, "_dkimsign", "_dkimsign")
        key.chmod(0o400)
        yield folder, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def test_filter_dkimsign_signs_and_the_signature_verifies(signing: tuple[Path, bytes]) -> None:
    folder, record = signing
    config = (f'filter "dkim" proc-exec "{FILTER} -d example.org -s sel -k {folder}/dkim.key" '
              "user _dkimsign group _dkimsign\n"
              'listen on 127.0.0.1 port {port} filter "dkim"\n'
              'action "relay" relay\nmatch from any for any action "relay"\n')
    with SmtpDaemon(folder / "daemon", config) as daemon, smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@example.org")
        client.rcpt("bob@remote.test")
        code, text = client.data(MESSAGE)
        assert code == 250, text
        stored = daemon.message(text.split()[1].decode())
    # Signed above our Received header (the filter saw it first, as under OpenSMTPD 6.8).
    assert stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b"\nReceived: from client.test" in stored.split(b"\n\n")[0]
    wire = stored.replace(b"\n", b"\r\n")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.example.org."
        return record

    assert dkim.verify(wire, dnsfunc=dns)
    assert not dkim.verify(wire.replace(b"Alice\r\n", b"Mallory\r\n"), dnsfunc=dns)  # a check that can fail
