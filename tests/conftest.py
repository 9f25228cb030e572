"""Shared test setup: make the project root and tests/ importable without installing; keep every DNS question
the tests cause on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


# The names a machine's /etc/hosts gives loopback, and nothing else.
LOOPBACK_NAMES = {
    "1.0.0.127.in-addr.arpa": [("PTR", "localhost.")],
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa": [("PTR", "localhost.")],
    "localhost": [("A", "127.0.0.1"), ("AAAA", "::1")],
}


@pytest.fixture(scope="session", autouse=True)
def loopback_resolver() -> Iterator[None]:
    """Every daemon, config check and tool the tests start asks a DNS server of ours on loopback (SMTPD_RESOLVER,
    which they inherit), never the machine's resolver: client names for PROXY-protocol and IPv6 clients, MX
    lookups, host names in `listen on`. Tests that need other answers set their own server."""
    if os.environ.get("SMTPD_RESOLVER"):
        yield
        return
    from helpers_mta import DnsServer

    with DnsServer(LOOPBACK_NAMES) as server:
        os.environ["SMTPD_RESOLVER"] = server.setting
        try:
            yield
        finally:
            os.environ.pop("SMTPD_RESOLVER", None)
