"""`mta max-deferred` and the `mta limit` keys: connections per source/connector/relay, connection delays,
messages per session — each checked by what the remote server saw (sessions at once, connections)."""

from __future__ import annotations

import asyncio
import os

import pytest
from helpers_mta import DnsServer, MemoryTables, RawRemote, Remote, free_port, standard_script

from smtpd import trace
from smtpd.config import parse_text
from smtpd.config.model import Config
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import Resolver
from smtpd.queue.envelope import Envelope

MESSAGE = b"Subject: limits\n\nbody\n"


def message(tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(tmp_path, "message")
    with open(path, "wb") as handle:
        handle.write(MESSAGE)
    return path


def envelope(number: int) -> Envelope:
    # one envelope per message: every one is its own transaction
    return Envelope(evpid=((number + 1) << 32) | 1, dispatcher="out", sender="bob@local.test",
                    rcpt="alice@remote.test", dest="alice@remote.test")


def config_for(remote: RawRemote, statements: str = "") -> Config:
    text = (f"{statements}\naction out relay host \"smtp://127.0.0.1:{remote.port}\"\n"
            "match from any for any action out\n")
    result = parse_text(text, "<test>")
    assert result.errors == [] and result.config is not None
    return result.config


def agent_for(config: Config) -> MtaAgent:
    return MtaAgent(config, MemoryTables(), "sender.test", resolver=Resolver("127.0.0.1:9"), timeout=10.0)


def relay_concurrently(agent: MtaAgent, count: int, path: str) -> list[DeliveryResult]:
    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            return list(await asyncio.gather(*(agent.deliver(envelope(n), path) for n in range(count))))
        finally:
            await agent.stop()
    return asyncio.run(run())


def relay_one_after_another(agent: MtaAgent, count: int, path: str) -> list[DeliveryResult]:
    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            return [await agent.deliver(envelope(n), path) for n in range(count)]
        finally:
            await agent.stop()
    return asyncio.run(run())


# -- mta max-deferred ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("statements", "expected_at_once"), [
    ("", 5),  # without it: max-conn-per-route (5) is what limits the sessions
    ("mta max-deferred 2", 2),
])
def test_max_deferred_holds_back_envelopes_of_a_busy_relay(tmp_path: os.PathLike[str], statements: str,
                                                           expected_at_once: int) -> None:
    subscription = trace.BUS.subscribe({"mta"})
    try:
        with RawRemote(standard_script(), eom_delay=0.3) as remote:
            results = relay_concurrently(agent_for(config_for(remote, statements)), 6, message(tmp_path))
        events, _lost = subscription.drain()
    finally:
        subscription.close()
    assert [result.outcome for result in results] == [Outcome.OK] * 6  # held back, never failed
    assert remote.commands.count("<EOM>") == 6
    assert remote.max_active == expected_at_once
    held = [event for event in events if "(max-deferred)" in event.message]
    assert (len(held) >= 4) if statements else not held


# -- connections per source / connector / relay ---------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [
    ("max-conn-per-source", 1),
    ("max-conn-per-connector", 2),
    ("max-conn-per-relay", 3),
])
def test_connection_limits_per_source_connector_relay(tmp_path: os.PathLike[str], key: str, value: int) -> None:
    with RawRemote(standard_script(), eom_delay=0.3) as remote:
        results = relay_concurrently(agent_for(config_for(remote, f"mta limit {key} {value}")), 6,
                                     message(tmp_path))
    assert all(result.outcome is Outcome.OK for result in results)
    assert remote.commands.count("<EOM>") == 6
    assert remote.max_active == value


# -- connection delays ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("statements", "connections"), [
    ("", 3),  # no delay (our default): three sessions at once
    ("mta limit conn-delay-route 60", 1),  # a second connection would wait a minute: the kept session serves all
    ("mta limit conn-delay-host 60", 1),
    ("mta limit conn-delay-relay 60", 1),
])
def test_connection_delay_makes_messages_share_the_open_session(tmp_path: os.PathLike[str], statements: str,
                                                                connections: int) -> None:
    with RawRemote(standard_script(), eom_delay=0.2) as remote:
        results = relay_concurrently(agent_for(config_for(remote, statements)), 3, message(tmp_path))
    assert all(result.outcome is Outcome.OK for result in results)
    assert remote.commands.count("<EOM>") == 3
    assert remote.connections == connections


def test_reconnect_delay_after_a_session_ended(tmp_path: os.PathLike[str]) -> None:
    statements = "mta limit session-keepalive 0 reconn-delay-route 1"
    subscription = trace.BUS.subscribe({"mta"})
    try:
        with RawRemote(standard_script()) as remote:
            results = relay_one_after_another(agent_for(config_for(remote, statements)), 2, message(tmp_path))
        events, _lost = subscription.drain()
    finally:
        subscription.close()
    assert all(result.outcome is Outcome.OK for result in results)
    assert remote.connections == 2  # no session kept: a new connection, after the wait
    assert any("next connection in" in event.message for event in events)


# -- messages per session ----------------------------------------------------------------------------------------
def test_session_mail_max_closes_the_session_after_n_messages(tmp_path: os.PathLike[str]) -> None:
    with RawRemote(standard_script()) as remote:
        results = relay_one_after_another(agent_for(config_for(remote, "mta limit session-mail-max 2")), 5,
                                          message(tmp_path))
    assert all(result.outcome is Outcome.OK for result in results)
    assert remote.commands.count("<EOM>") == 5
    assert remote.connections == 3  # 2 + 2 + 1
    assert remote.commands.count("QUIT") == 3


# -- mta limit inet4 | inet6 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("statement", "outcome", "routes"), [
    ("", Outcome.OK, ["127.0.0.6", "::1"]),  # IPv4 first (refused), then IPv6
    ("mta limit inet6", Outcome.OK, ["::1"]),
    ("mta limit for domain dual.test inet4", Outcome.TEMPFAIL, ["127.0.0.6"]),
    ("mta limit for domain other.test inet4", Outcome.OK, ["127.0.0.6", "::1"]),
])
def test_address_family_limit(tmp_path: os.PathLike[str], statement: str, outcome: Outcome,
                              routes: list[str]) -> None:
    port = free_port("::1")
    zone = {"dual.test": [("A", "127.0.0.6"), ("AAAA", "::1")]}
    text = f"{statement}\naction out relay\nmatch from any for any action out\n"
    result = parse_text(text, "<test>")
    assert result.errors == [] and result.config is not None
    with DnsServer(zone) as dns, Remote(host="::1", port=port) as remote:
        agent = MtaAgent(result.config, MemoryTables(), "sender.test", resolver=Resolver(dns.setting),
                         mx_port=port, timeout=10.0)
        item = Envelope(evpid=(7 << 32) | 1, dispatcher="out", sender="bob@local.test", rcpt="x@dual.test",
                        dest="x@dual.test")

        async def run() -> tuple[DeliveryResult, list[dict[str, object]]]:
            await agent.start()
            try:
                return await agent.deliver(item, message(tmp_path)), agent.control_view("routes")
            finally:
                await agent.stop()
        delivered, shown = asyncio.run(run())
    assert delivered.outcome is outcome, delivered.text
    # the route's host as shown: an IPv6 address in brackets, as OpenSMTPD shows it
    assert [str(row["route"]).split(" <-> ")[1].split(" ")[0].strip("[]") for row in shown] == routes
    assert len(remote.received) == (1 if outcome is Outcome.OK else 0)
