"""Shared test setup: make the project root and tests/ importable without installing; keep every DNS question
the tests cause on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# The table backends' bounds for a server that hangs (connect, answer: 5-15 s, docs/tables.md) shortened, in this
# process (whose tests compare against them) and in every daemon it starts, so that the tests of those bounds take
# seconds less each.
os.environ["SMTPD_TABLE_TIMEOUT_SCALE"] = "0.4"

# Tests stop `smtpctl trace --follow` and `monitor` with SIGINT, as a user's Ctrl-C. A suite started as a
# background job of a script (`make test &`, nohup) inherits SIGINT ignored, and so would every program it starts
# (an ignored signal stays ignored across exec): those would never stop. A handler of our own is reset to the
# default at exec instead.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def home_of_our_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests run as root: a sendmail they start that cannot submit appends to $HOME/dead.letter, which was
    the machine's /root/dead.letter, growing with every run. Every program the tests start gets a home of
    the session's instead (shells and mail readers find no rc files there either)."""
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


@pytest.fixture(scope="session", autouse=True)
def loopback_resolver() -> Iterator[None]:
    """Every daemon, config check and tool the tests start asks a DNS server of ours on loopback (SMTPD_RESOLVER,
    which they inherit), never the machine's resolver: client names for PROXY-protocol and IPv6 clients, MX
    lookups, host names in `listen on`. Tests that need other answers set their own server. It runs as a
    process (tests/loopback_dns.py): a thread here would make the tests' forks unsafe."""
    if os.environ.get("SMTPD_RESOLVER"):
        yield
        return
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "loopback_dns.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    port = server.stdout.readline().strip()
    os.environ["SMTPD_RESOLVER"] = f"127.0.0.1:{port}"
    try:
        yield
    finally:
        os.environ.pop("SMTPD_RESOLVER", None)
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
