"""Small pieces of the relay agent: relay URLs, the mail-from rewrite, enhanced status codes, IPv6."""

from __future__ import annotations

import asyncio
import logging
import os
import re

import pytest
from helpers_mta import DnsServer, MemoryTables, Remote, free_port, relay_config

from shared.paths import parse_resolver_setting
from smtpd.config.model import Relay
from smtpd.delivery import Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import Resolver
from smtpd.mta.plan import rewrite_sender
from smtpd.mta.routes import RelayHost, RelayUrlError, clock, parse_relay_url
from smtpd.mta.session import esc_code
from smtpd.queue.envelope import Envelope


@pytest.mark.parametrize(("url", "expected"), [
    ("mx.example.org", RelayHost("smtp", "mx.example.org", 25)),
    ("smtp://Mx.Example.org:2525", RelayHost("smtp", "mx.example.org", 2525)),
    ("smtp+tls://bob@smtp.example.com", RelayHost("smtp+tls", "smtp.example.com", 25, "bob")),
    ("smtps://lbl@smtp.example.com", RelayHost("smtps", "smtp.example.com", 465, "lbl")),
    ("smtp+notls://10.0.0.1", RelayHost("smtp+notls", "10.0.0.1", 25)),
    ("lmtp://127.0.0.1:24", RelayHost("lmtp", "127.0.0.1", 24)),
    ("smtp://[::1]:2525", RelayHost("smtp", "::1", 2525)),
    ("[2001:db8::1]", RelayHost("smtp", "2001:db8::1", 25)),
])
def test_relay_urls(url: str, expected: RelayHost) -> None:
    assert parse_relay_url(url) == expected


@pytest.mark.parametrize(("url", "problem"), [
    ("lmtp://127.0.0.1", "lmtp:// needs a port"),
    ("gopher://x", "unknown scheme"),
    ("smtp://bob@x", "a label needs smtp+tls:// or smtps://"),
    ("smtp://x:99999", "bad port"),
    ("smtp://", "no host"),
])
def test_bad_relay_urls(url: str, problem: str) -> None:
    with pytest.raises(RelayUrlError, match=re.escape(problem)):
        parse_relay_url(url)


@pytest.mark.parametrize(("sender", "mail_from", "expected"), [
    ("bob@here.test", "@foo.bar", "bob@foo.bar"),
    ("bob@here.test", "relay@foo.bar", "relay@foo.bar"),
    ("bob@here.test", "relay", "relay@here.test"),
    ("bob@here.test", "relay@", "relay@here.test"),
    ("", "@foo.bar", ""),
    ("bob@here.test", None, "bob@here.test"),
])
def test_mail_from_rewrite(sender: str, mail_from: str | None, expected: str) -> None:
    assert rewrite_sender(sender, mail_from) == expected


@pytest.mark.parametrize(("reply", "code"), [
    ("550 5.1.1 no such user", 11), ("451 4.7.1 greylisted", 71), ("554 no status code", 0),
    ("550-5.1.1 a\n550 5.1.1 b", 11), ("556 5.1.10 null MX", 110),
])
def test_enhanced_status_codes(reply: str, code: int) -> None:
    assert esc_code(reply) == code


def test_resolver_setting_forms() -> None:
    assert parse_resolver_setting("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver_setting("[::1]:5353") == ("::1", 5353)
    assert parse_resolver_setting("127.0.0.1") == ("127.0.0.1", 53)
    # A bare IPv6 address is port 53 (the listener's reverse lookups read `::1` as host `:` port 1 and failed all)
    assert parse_resolver_setting("::1") == ("::1", 53)
    assert parse_resolver_setting("[::1]") == ("::1", 53)
    for bad in ("resolver.example:53", "127.0.0.1:x", "127.0.0.1:0", "[::1]:99999"):
        with pytest.raises(ValueError):
            parse_resolver_setting(bad)


def test_ipv6_mx_delivery(tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture) -> None:
    port = free_port("::1")
    zone = {"six.test": [("MX", "10 mx.six.test.")], "mx.six.test": [("AAAA", "::1")]}
    path = os.path.join(tmp_path, "message")
    with open(path, "wb") as handle:
        handle.write(b"Subject: v6\n\nhello\n")
    with DnsServer(zone) as dns, Remote(host="::1", port=port) as remote:
        agent = MtaAgent(relay_config(Relay()), MemoryTables(), "sender.test", resolver=Resolver(dns.setting),
                         mx_port=port, timeout=10.0)
        envelope = Envelope(evpid=(9 << 32) | 1, dispatcher="relay", sender="a@b.test", rcpt="x@six.test",
                            dest="x@six.test")

        async def run() -> Outcome:
            result = await agent.deliver(envelope, path)
            routes = agent.control_view("routes")
            await agent.stop()
            assert routes[0]["route"] == "[] <-> [::1] (mx.six.test)"  # OpenSMTPD brackets IPv6
            return result.outcome
        with caplog.at_level(logging.INFO, logger="smtpd"):
            assert asyncio.run(run()) is Outcome.OK
    assert remote.received[0].rcpt_tos == ["x@six.test"]
    # the address and the port told apart, as in a URL (it read smtp://::1:PORT)
    assert f"mta connecting address=smtp://[::1]:{port} host=mx.six.test" in caplog.text


def test_unused_state_is_forgotten_but_penalties_are_kept() -> None:
    from smtpd.mta.routes import MtaState
    state = MtaState()
    now = 1_000_000.0
    quiet = state.route(None, state.host("192.0.2.1", "quiet.test"))
    failing = state.route(None, state.host("192.0.2.2", "failing.test"))
    state.relay("[relay:quiet.test,mx]", "quiet.test")
    quiet.lastconn = failing.lastconn = now - 7200
    for _ in range(4):
        state.route_error(failing, now - 60)
    state.prune(now)
    assert [route.host.name for route in state.routes.values()] == ["failing.test"]
    assert list(state.hosts) == ["192.0.2.2"]
    assert state.relays == {}
    state.prune(now + 4 * 3600)
    assert state.routes == {} and state.hosts == {}


def test_reload_closes_kept_sessions_and_applies_new_limits(tmp_path: os.PathLike[str]) -> None:
    from helpers_mta import RawRemote, standard_script

    from smtpd.config.model import MtaLimit
    path = os.path.join(tmp_path, "message")
    with open(path, "wb") as handle:
        handle.write(b"Subject: reload\n\nhello\n")
    with RawRemote(standard_script()) as remote:
        old = relay_config(Relay(host=f"smtp://127.0.0.1:{remote.port}"))
        new = relay_config(Relay(host=f"smtp://127.0.0.1:{remote.port}"))
        new = type(new)(path=new.path, actions=new.actions,
                        mta_limits=(MtaLimit(None, None, (("max-conn-per-host", 3),)),))
        agent = MtaAgent(old, MemoryTables(), "sender.test", resolver=Resolver("127.0.0.1:9"), timeout=10.0)

        async def run() -> tuple[str, str, int]:
            await agent.start()
            envelope = Envelope(evpid=(3 << 32) | 1, dispatcher="relay", sender="a@b.test", rcpt="x@y.test",
                                dest="x@y.test")
            await agent.deliver(envelope, path)
            before = agent.control_view("routes")[0]["flags"]
            await agent.reconfigure(old, new)
            after = agent.control_view("routes")[0]["flags"]
            return str(before), str(after), agent.state.limit("max-conn-per-host")
        before, after, limit = asyncio.run(run())
        assert before == "---K" and after == "----" and limit == 3
        from helpers_mta import wait_until
        assert wait_until(lambda: remote.commands[-1:] == ["QUIT"], 5)


def test_connection_counters_of_sources_and_connectors_are_given_back_and_forgotten() -> None:
    from smtpd.mta.routes import MtaState
    state = MtaState()
    route = state.route(None, state.host("192.0.2.9", "mx.nine.test"))
    relay = state.relay("[relay:nine.test,mx]", "nine.test")
    assert state.reserve(route, relay, "nine.test")
    assert state.source_conns == {"[]": 1} and state.connector_conns == {("[relay:nine.test,mx]", "[]"): 1}
    state.release(route, relay, "nine.test")
    assert route.lastdisc > 0  # reconn-delay-route counts from here
    state.prune(clock() + 7200)
    assert state.source_conns == {} and state.connector_conns == {} and state.last_opened == {}
