"""Direct delivery: MX lookups through a DNS server on loopback, route penalties, limits, show output."""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
import sys

import pytest
from daemon import ROOT, SmtpdProcess
from helpers_mta import (
    CLOSE,
    DnsServer,
    MemoryTables,
    RawRemote,
    Remote,
    free_port,
    relay_config,
    standard_script,
    wait_until,
)

from smtpd import trace
from smtpd.config.model import Action, Config, Method, MtaLimit, Relay
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import MxError, Resolver
from smtpd.queue.envelope import Envelope

MESSAGE = b"Subject: mx test\n\nbody\n"


def message(tmp_path: os.PathLike[str], name: str = "message") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as handle:
        handle.write(MESSAGE)
    return path


def envelope(dest: str, msgid: int = 0x11, n: int = 1) -> Envelope:
    return Envelope(evpid=(msgid << 32) | n, dispatcher="relay", sender="bob@local.test", rcpt=dest, dest=dest)


def mx_agent(dns: DnsServer, port: int, relay: Relay | None = None, config: Config | None = None,
             mailname: str = "sender.test") -> MtaAgent:
    config = config or relay_config(relay or Relay())
    return MtaAgent(config, MemoryTables(), mailname, resolver=Resolver(dns.setting), mx_port=port, timeout=10.0)


async def _deliver_all(agent: MtaAgent, envelopes: list[Envelope], path: str) -> list[DeliveryResult]:
    return list(await asyncio.gather(*(agent.deliver(item, path) for item in envelopes)))


def deliver(agent: MtaAgent, envelopes: list[Envelope], path: str, stop: bool = True) -> list[DeliveryResult]:
    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            return await _deliver_all(agent, envelopes, path)
        finally:
            if stop:
                await agent.stop()
    return asyncio.run(run())


ZONE = {
    "example.test": [("MX", "10 mx1.example.test."), ("MX", "20 mx2.example.test.")],
    "mx1.example.test": [("A", "127.0.0.2")],
    "mx2.example.test": [("A", "127.0.0.3")],
    "implicit.test": [("A", "127.0.0.3")],
    "3.0.0.127.in-addr.arpa": [("PTR", "mx.reverse.test.")],
    "nullmx.test": [("MX", "0 .")],
    "halfnull.test": [("MX", "0 ."), ("MX", "10 mx1.example.test.")],
    "broken.test": [("SERVFAIL", "")],
    "equal.test": [("MX", "10 a.equal.test."), ("MX", "10 b.equal.test."), ("MX", "30 c.equal.test.")],
    "a.equal.test": [("A", "127.0.0.4")],
    "b.equal.test": [("A", "127.0.0.5")],
    "c.equal.test": [("A", "127.0.0.6")],
    "sixonly.test": [("MX", "10 mx.sixonly.test.")],
    "mx.sixonly.test": [("SERVFAIL", "A"), ("AAAA", "::1")],
}


def test_lower_preference_first_then_the_next_mx(tmp_path: os.PathLike[str]) -> None:
    port = free_port("127.0.0.3")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.3", port=port) as mx2:
        agent = mx_agent(dns, port)
        results = deliver(agent, [envelope("alice@example.test")], message(tmp_path))
        routes = agent.control_view("routes")
    assert results[0].outcome is Outcome.OK
    assert mx2.received[0].rcpt_tos == ["alice@example.test"]
    assert [row["route"] for row in routes] == ["[] <-> 127.0.0.2 (mx1.example.test)",
                                                "[] <-> 127.0.0.3 (mx2.example.test)"]
    assert [row["nerror"] for row in routes] == [1, 0]
    assert ("example.test", "MX") in dns.queries


def test_equal_preferences_are_tried_in_random_order() -> None:
    async def orders() -> set[tuple[str, ...]]:
        resolver = Resolver(dns.setting)
        seen = set()
        for _ in range(40):
            hosts = await resolver.mx_hosts("equal.test")
            seen.add(tuple(host.name for host in hosts))
        return seen
    with DnsServer(ZONE) as dns:
        seen = asyncio.run(orders())
    assert seen == {("a.equal.test", "b.equal.test", "c.equal.test"),
                    ("b.equal.test", "a.equal.test", "c.equal.test")}


def relayed_by_mx(tmp_path: os.PathLike[str], host: str, address: str,
                  zone: dict[str, list[tuple[str, str]]] = ZONE) -> list[tuple[str, str]]:
    """Relay one envelope for address, found through the zone, to a server at host, and check that it took the
    mail. Returns the DNS questions asked."""
    port = free_port(host)
    with DnsServer(zone) as dns, Remote(host=host, port=port) as remote:
        results = deliver(mx_agent(dns, port), [envelope(address)], message(tmp_path))
    assert results[0].outcome is Outcome.OK, results[0].text
    assert remote.received[0].rcpt_tos == [address]
    return dns.queries


def test_implicit_mx_on_an_address_record(tmp_path: os.PathLike[str]) -> None:
    relayed_by_mx(tmp_path, "127.0.0.3", "bob@implicit.test")


def test_a_domain_with_sharp_s_is_asked_as_idna_2008_writes_it(tmp_path: os.PathLike[str]) -> None:
    """straße.test is xn--strae-oqa.test (IDNA 2008, as Postfix and Exim ask); IDNA 2003 made it strasse.test,
    someone else's domain, and the mail went there."""
    zone = {"xn--strae-oqa.test": [("A", "127.0.0.3")], "strasse.test": [("A", "127.0.0.4")]}
    asked = relayed_by_mx(tmp_path, "127.0.0.3", "bob@straße.test", zone)
    assert ("strasse.test", "MX") not in asked


@pytest.mark.parametrize(("domain", "host"), [("[127.0.0.3]", "127.0.0.3"), ("[IPv6:::1]", "::1"),
                                            ("[ipv6:0:0:0:0:0:0:0:1]", "::1")])
def test_address_literal_domains_are_delivered_to_that_address(tmp_path: os.PathLike[str], domain: str,
                                                               host: str) -> None:
    # RFC 5321 4.1.3: an IPv6 address literal carries the "IPv6:" tag; it is an address, not a name to look up.
    port = free_port(host)
    with DnsServer(ZONE) as dns, Remote(host=host, port=port) as remote:
        results = deliver(mx_agent(dns, port), [envelope(f"bob@{domain}")], message(tmp_path))
        asked = list(dns.queries)
    assert results[0].outcome is Outcome.OK, results[0].text
    assert remote.received[0].rcpt_tos == [f"bob@{domain}"]
    assert not [name for name, rdtype in asked if rdtype in ("MX", "A", "AAAA")]


def test_a_bare_address_as_domain_is_a_name_that_does_not_exist(tmp_path: os.PathLike[str]) -> None:
    # RFC 5321 4.1.3: only `[192.0.2.1]` is an address literal. `bob@127.0.0.3` is asked about as a name (as
    # OpenSMTPD 6.8 and Postfix do) and bounces; nothing connects to the address written without brackets.
    port = free_port("127.0.0.3")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.3", port=port) as remote:
        results = deliver(mx_agent(dns, port), [envelope("bob@127.0.0.3")], message(tmp_path))
        asked = list(dns.queries)
    assert (results[0].outcome, results[0].text) == (Outcome.PERMFAIL, "Domain does not exist")
    assert remote.received == []
    assert ("127.0.0.3", "MX") in asked


def test_an_exchanger_whose_a_question_fails_is_reached_over_its_aaaa(tmp_path: os.PathLike[str]) -> None:
    # Its name server fails A questions (SERVFAIL) but answers AAAA: the IPv6 address takes the mail, rather
    # than the failed A question deferring it without the AAAA question ever being asked.
    relayed_by_mx(tmp_path, "::1", "bob@sixonly.test")


@pytest.mark.parametrize(("domain", "outcome", "text"), [
    ("nullmx.test", Outcome.PERMFAIL, "Domain does not accept mail (null MX)"),
    ("nowhere.test", Outcome.PERMFAIL, "Domain does not exist"),
])
def test_domains_that_take_no_mail_bounce(tmp_path: os.PathLike[str], domain: str, outcome: Outcome,
                                          text: str) -> None:
    with DnsServer(ZONE) as dns:
        results = deliver(mx_agent(dns, 2525), [envelope(f"x@{domain}")], message(tmp_path))
    assert (results[0].outcome, results[0].text) == (outcome, text)


def test_null_mx_beside_a_real_exchanger_is_ignored(tmp_path: os.PathLike[str]) -> None:
    relayed_by_mx(tmp_path, "127.0.0.2", "bob@halfnull.test")


def test_dns_failure_is_temporary(tmp_path: os.PathLike[str]) -> None:
    with DnsServer(ZONE) as dns:
        results = deliver(mx_agent(dns, 2525), [envelope("x@broken.test")], message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text.startswith("Temporary failure in MX lookup")


def test_null_mx_raises_a_permanent_error() -> None:
    with DnsServer(ZONE) as dns:
        with pytest.raises(MxError) as caught:
            asyncio.run(Resolver(dns.setting).mx_hosts("nullmx.test"))
    assert caught.value.permanent


def test_backup_mx_relays_only_to_better_exchangers(tmp_path: os.PathLike[str]) -> None:
    port = free_port("127.0.0.2")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.2", port=port) as primary:
        ok = deliver(mx_agent(dns, port, Relay(backup=True, backup_mx="mx2.example.test")),
                     [envelope("a@example.test")], message(tmp_path))
        best = deliver(mx_agent(dns, port, Relay(backup=True), mailname="mx1.example.test"),
                       [envelope("a@example.test", msgid=2)], message(tmp_path))
    assert ok[0].outcome is Outcome.OK and len(primary.received) == 1
    assert best[0].outcome is Outcome.TEMPFAIL
    assert "better preference" in best[0].text


def test_route_is_disabled_after_repeated_errors_and_resumed(tmp_path: os.PathLike[str]) -> None:
    port = free_port("127.0.0.2")
    zone = {"down.test": [("MX", "10 mx.down.test.")], "mx.down.test": [("A", "127.0.0.2")]}
    with DnsServer(zone) as dns:
        agent = mx_agent(dns, port)

        async def run() -> tuple[list[DeliveryResult], list[dict[str, object]], bool, list[dict[str, object]]]:
            results = []
            for number in range(5):
                results.extend(await _deliver_all(agent, [envelope("a@down.test", msgid=number + 1)],
                                                  message(tmp_path)))
            disabled = agent.control_view("routes")
            resumed = agent.resume_route_id(int(disabled[0]["id"]))
            return results, disabled, resumed, agent.control_view("routes")
        results, disabled, resumed, after = asyncio.run(run())
    assert all(result.outcome is Outcome.TEMPFAIL for result in results)
    assert results[3].text.startswith("Connection failed")
    assert results[4].text == "Route [] <-> 127.0.0.2 (mx.down.test) is disabled after repeated errors"
    assert disabled[0]["flags"] == "-DQ-" and disabled[0]["penalty"] == 1
    assert str(disabled[0]["line"]).startswith("1. [] <-> 127.0.0.2 (mx.down.test) -DQ- nconn=0 nerror=0 "
                                               "penalty=1 timeout=3m")
    assert resumed is True
    assert after[0]["flags"] == "----" and after[0]["timeout"] == "-"


def test_connections_per_host_are_limited(tmp_path: os.PathLike[str]) -> None:
    limit = MtaLimit(domain=None, family=None, values=(("max-conn-per-host", 2),))
    with RawRemote(standard_script(), eom_delay=0.3) as remote:
        config = Config(path="<t>", actions={"relay": Action("relay", Method.RELAY,
                                                              relay=Relay(host=f"smtp://127.0.0.1:{remote.port}"))},
                        mta_limits=(limit,))
        agent = MtaAgent(config, MemoryTables(), "sender.test", resolver=Resolver("127.0.0.1:9"), timeout=10.0)
        envelopes = [envelope("a@remote.test", msgid=number + 1) for number in range(6)]
        results = deliver(agent, envelopes, message(tmp_path))
    assert all(result.outcome is Outcome.OK for result in results)
    assert remote.max_active == 2
    assert remote.commands.count("<EOM>") == 6


def test_show_hosts_relays_and_hoststats(tmp_path: os.PathLike[str]) -> None:
    port = free_port("127.0.0.3")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.3", port=port):
        agent = mx_agent(dns, port)

        async def run() -> dict[str, list[dict[str, object]]]:
            await agent.start()
            await agent.deliver(envelope("bob@implicit.test"), message(tmp_path))
            for _ in range(100):  # the PTR lookup runs beside the delivery; wait for its answer
                if agent.control_view("hosts")[0]["ptr"] != "-":
                    break
                await asyncio.sleep(0.05)
            views = {kind: agent.control_view(kind) for kind in ("hosts", "relays", "hoststats", "routes")}
            await agent.stop()
            return views
        views = asyncio.run(run())
    host_line = str(views["hosts"][0]["line"])
    # the PTR column is the reverse DNS name of the address, not the name (implicit.test) we connected by
    assert host_line.startswith("127.0.0.3 mx.reverse.test refcount=1 nconn=1 lastconn=")
    assert str(views["relays"][0]["text"]).startswith("[relay:implicit.test,smtp,mx] refcount=0 ntask=0 nconn=1")
    stat = views["hoststats"][0]
    assert stat["domain"] == "implicit.test" and stat["text"] == "250 2.0.0 Ok: queued"
    assert str(stat["line"]).startswith("implicit.test|") and str(stat["line"]).endswith("|250 2.0.0 Ok: queued")
    assert views["routes"][0]["flags"] == "---K"  # the session is kept open for the next message


def test_show_hosts_without_a_ptr_record_prints_a_dash(tmp_path: os.PathLike[str]) -> None:
    port = free_port("127.0.0.4")
    zone = {"noptr.test": [("A", "127.0.0.4")]}
    subscription = trace.BUS.subscribe({"mta"})
    seen: list[str] = []
    with DnsServer(zone) as dns, Remote(host="127.0.0.4", port=port):
        agent = mx_agent(dns, port)

        async def run() -> list[dict[str, object]]:
            await agent.start()
            result = await agent.deliver(envelope("bob@noptr.test"), message(tmp_path))
            assert result.outcome is Outcome.OK
            for _ in range(100):  # until the lookup has got its answer (NXDOMAIN)
                seen.extend(event.message for event in subscription.drain()[0])
                if "PTR of 127.0.0.4: none" in seen:
                    break
                await asyncio.sleep(0.05)
            hosts = agent.control_view("hosts")
            await agent.stop()
            return hosts
        try:
            hosts = asyncio.run(run())
        finally:
            subscription.close()
    assert "PTR of 127.0.0.4: none" in seen
    assert ("4.0.0.127.in-addr.arpa", "PTR") in dns.queries
    assert str(hosts[0]["line"]).startswith("127.0.0.4 - refcount=1 nconn=1 lastconn=")
    assert hosts[0]["name"] == "noptr.test"


def test_show_relays_names_the_backup_mx_even_when_it_is_our_mailname(tmp_path: os.PathLike[str]) -> None:
    port = free_port("127.0.0.2")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.2", port=port):
        agent = mx_agent(dns, port, Relay(backup=True), mailname="mx2.example.test")

        async def run() -> tuple[DeliveryResult, list[dict[str, object]]]:
            await agent.start()
            result = await agent.deliver(envelope("a@example.test"), message(tmp_path))
            relays = agent.control_view("relays")
            await agent.stop()
            return result, relays
        result, relays = asyncio.run(run())
    assert result.outcome is Outcome.OK, result.text
    # `backup` alone: our own name is the cut-off, and show relays says so (it said `backup=None`)
    assert str(relays[0]["text"]).startswith("[relay:example.test,smtp,mx,backup=mx2.example.test] ")


def test_an_mx_pointing_back_at_us_is_never_connected_to(tmp_path: os.PathLike[str]) -> None:
    # RFC 5321 5.1: an MTA that is itself an exchanger of the domain uses only better ones; relaying to itself
    # made the message loop through our own server until its hop count bounced it.
    port = free_port("127.0.0.7")
    zone = {**ZONE, "self.test": [("MX", "10 ours.test.")], "ours.test": [("A", "127.0.0.7")],
            "secondary.test": [("MX", "10 mx1.example.test."), ("MX", "20 OURS.test.")]}
    with DnsServer(zone) as dns, RawRemote(standard_script(), host="127.0.0.7", port=port) as ours:
        results = deliver(mx_agent(dns, port, mailname="ours.test"),
                          [envelope("a@self.test"), envelope("b@secondary.test", msgid=2)], message(tmp_path))
    assert ours.connections == 0
    assert [result.outcome for result in results] == [Outcome.TEMPFAIL, Outcome.TEMPFAIL]
    assert results[0].text == "MX for self.test points back to us (ours.test): the mail would loop"
    assert results[1].text.startswith("Connection failed")  # only the better exchanger was tried


def test_an_exchanger_closing_with_421_at_starttls_passes_the_mail_to_the_next(tmp_path: os.PathLike[str]) -> None:
    # 421 to STARTTLS: the server is closing. With opportunistic TLS the session went on in clear text, MAIL FROM
    # met the closed connection, and the mail waited ("Connection closed unexpectedly") instead of going to MX 2.
    port = free_port("127.0.0.2")
    closing = standard_script({"EHLO": b"250-mx1.test\r\n250 STARTTLS\r\n",
                               "STARTTLS": b"421 4.3.2 Service shutting down\r\n" + CLOSE})
    with DnsServer(ZONE) as dns, RawRemote(closing, host="127.0.0.2", port=port) as mx1, \
            Remote(host="127.0.0.3", port=port) as mx2:
        agent = mx_agent(dns, port)
        results = deliver(agent, [envelope("alice@example.test")], message(tmp_path))
    assert results[0].outcome is Outcome.OK, results[0].text
    assert mx1.commands == ["EHLO sender.test", "STARTTLS"]
    assert mx2.received[0].rcpt_tos == ["alice@example.test"]


def test_a_null_mx_bounce_has_the_status_rfc_7505_gives_it(tmp_path: os.PathLike[str]) -> None:
    # RFC 7505 3.2: mail to a domain with a null MX fails with 5.1.10 ("Recipient address has null MX"); the bounce
    # said 5.1.2 (bad destination system), as for a domain that does not exist.
    from smtpd.bounce import FAILED, status_code
    with DnsServer(ZONE) as dns:
        results = deliver(mx_agent(dns, 2525), [envelope("x@nullmx.test"), envelope("y@nowhere.test", msgid=2)],
                          message(tmp_path))
    statuses = []
    for result in results:
        failed = envelope("x@nullmx.test")
        failed.esc_class, failed.esc_code = result.esc_class, result.esc_code
        statuses.append(status_code(failed, FAILED))
    assert statuses == ["5.1.10", "5.1.2"]


def test_an_exchanger_that_failed_is_logged_before_the_next_one_takes_the_mail(
        tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture) -> None:
    import logging
    port = free_port("127.0.0.3")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.3", port=port), \
            caplog.at_level(logging.INFO, logger="smtpd"):
        results = deliver(mx_agent(dns, port), [envelope("alice@example.test")], message(tmp_path))
    assert results[0].outcome is Outcome.OK
    lines = [record.getMessage() for record in caplog.records if " mta " in record.getMessage()]
    connecting = next(line for line in lines if "mta connecting" in line and "mx1.example.test" in line)
    session = connecting.split()[0]
    assert f"{session} mta error reason=Connection failed: Connection refused" in lines


def test_a_domain_missing_from_the_relay_domain_map_is_not_sent_to_its_mx(tmp_path: os.PathLike[str]) -> None:
    # `relay domain <map>` relays through the smarthost the map gives for the domain. A domain the map lacks was
    # sent straight to its MX, around the smarthost the administrator set up; it waits, as in OpenSMTPD 6.8.
    port = free_port("127.0.0.2")
    with DnsServer(ZONE) as dns, Remote(host="127.0.0.2", port=port) as mx1:
        agent = MtaAgent(relay_config(Relay(domain_table="routes")), MemoryTables(maps={"routes": {}}),
                         "sender.test", resolver=Resolver(dns.setting), mx_port=port, timeout=10.0)
        results = deliver(agent, [envelope("alice@example.test")], message(tmp_path))
    assert mx1.received == []
    assert (results[0].outcome, results[0].text) == (Outcome.TEMPFAIL, "Cannot retrieve smarthost for example.test")


def test_a_host_failing_one_relays_tls_policy_is_not_disabled_for_the_others(tmp_path: os.PathLike[str]) -> None:
    # An action with `tls` (STARTTLS required) to an exchanger without STARTTLS: its mail waits, but that is its
    # policy, not a fault of the network path. Counted against the route, four such messages disabled it, and the
    # mail of every other action to that host (opportunistic TLS, which the host serves well) waited too.
    port = free_port("127.0.0.3")
    config = Config(path="<test>", actions={"strict": Action("strict", Method.RELAY, relay=Relay(tls="no-verify")),
                                            "relay": Action("relay", Method.RELAY, relay=Relay())})
    with DnsServer(ZONE) as dns, RawRemote(standard_script(), host="127.0.0.3", port=port) as remote:
        agent = mx_agent(dns, port, config=config)

        async def run() -> list[DeliveryResult]:
            await agent.start()
            results = []
            for number in range(1, 6):
                strict = Envelope(evpid=(number << 32) | 1, dispatcher="strict", sender="bob@local.test",
                                  rcpt="a@implicit.test", dest="a@implicit.test")
                results.append(await agent.deliver(strict, message(tmp_path)))
            results.append(await agent.deliver(envelope("b@implicit.test", msgid=99), message(tmp_path)))
            await agent.stop()
            return results
        results = asyncio.run(run())
    assert [result.text for result in results[:5]] == ["TLS required but not supported by remote host"] * 5
    assert results[5].outcome is Outcome.OK, results[5].text
    assert remote.commands.count("<EOM>") == 1


def test_a_resolv_conf_without_nameservers_means_the_local_one(tmp_path: os.PathLike[str]) -> None:
    """resolv.conf(5): no `nameserver` line means the server on this machine (libc and OpenSMTPD take it so). The
    daemon, without the resolver setting, runs in a mount namespace whose /etc/resolv.conf is empty: it starts,
    takes mail and relays it (to an address literal, which needs no DNS)."""
    empty = os.path.join(tmp_path, "resolv.conf")
    with open(empty, "w", encoding="utf-8") as handle:
        handle.write("search example.test\n")
    port = free_port("127.0.0.2")
    config = 'listen on 127.0.0.1 port {port}\naction "r" relay\nmatch from any for any action "r"\n'
    with Remote(host="127.0.0.2", port=port) as remote:
        daemon = SmtpdProcess(os.path.join(tmp_path, "d"), config, env={"SMTPD_RESOLVER": "",
                                                                         "SMTPD_MX_PORT": str(port)},
                              wrapper=("unshare", "--mount", "--propagation", "private", "sh", "-c",
                                       'mount --bind "$0" /etc/resolv.conf && exec "$@"', empty))
        daemon.start()
        try:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                client.sendmail("bob@local.test", ["alice@[127.0.0.2]"], MESSAGE.replace(b"\n", b"\r\n"))
            assert wait_until(lambda: len(remote.received) == 1), daemon.log()
        finally:
            daemon.stop()
    assert remote.received[0].rcpt_tos == ["alice@[127.0.0.2]"]


ASK_TWICE = """
import asyncio, sys
from smtpd.mta.mx import Resolver
resolver = Resolver("")
for _ in range(2):
    hosts = asyncio.run(resolver.mx_hosts("moved.test"))
    print(*(host.preference for host in hosts), flush=True)
    sys.stdin.readline()
"""


def test_a_changed_resolv_conf_is_read_again(tmp_path: os.PathLike[str]) -> None:
    """Without the resolver setting the MX questions go to the servers of /etc/resolv.conf, and when the file
    changes (a DHCP client rewrote it, a local cache was set up) to the new ones, as libc and OpenSMTPD do; they
    kept going to the servers of the daemon's start. A resolver in a mount namespace whose /etc/resolv.conf is
    the test's file (which names no port: two servers on loopback port 53) asks, the file changes, it asks again."""
    resolv_conf = os.path.join(tmp_path, "resolv.conf")
    with open(resolv_conf, "w", encoding="utf-8") as handle:
        handle.write("nameserver 127.0.0.2\n")
    # (the exchangers' addresses come from the system's getaddrinfo: `localhost`, named by /etc/hosts)
    before = {"moved.test": [("MX", "10 localhost.")]}
    after = {"moved.test": [("MX", "20 localhost.")]}
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf, sys.executable, "-c", ASK_TWICE]
    with DnsServer(before, host="127.0.0.2", port=53), DnsServer(after, host="127.0.0.3", port=53), \
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "SMTPD_RESOLVER": ""}) as child:
        assert child.stdin is not None and child.stdout is not None
        first = child.stdout.readline().strip()
        with open(resolv_conf, "w", encoding="utf-8") as handle:  # in place: the bind mount sees it
            handle.write("# moved to the other cache\nnameserver 127.0.0.3\n")
        child.stdin.write("\n")
        child.stdin.flush()
        second = child.stdout.readline().strip()
        child.stdin.write("\n")
        child.stdin.close()
    assert (first, second) == ("10", "20")
