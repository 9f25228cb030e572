"""A relay `src` address connects only to MX addresses of its own family (IPv4 source, IPv6 exchanger and the
reverse), as OpenSMTPD's routing skips the others: an attempt across families failed as "Unknown error -9" and
counted against a route. With a `src` table holding both families, the entry that suits the exchanger is used."""

from __future__ import annotations

import asyncio
import os

from helpers_mta import DnsServer, MemoryTables, Remote, free_port, relay_config

from smtpd.config.model import Relay
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import Resolver
from smtpd.queue.envelope import Envelope

ZONE = {
    "six.test": [("MX", "10 mx.six.test.")],
    "mx.six.test": [("AAAA", "::1")],
    "four.test": [("MX", "10 mx.four.test.")],
    "mx.four.test": [("A", "127.0.0.1")],
}


def _deliver(tmp_path: os.PathLike[str], relay: Relay, tables: MemoryTables, port: int, dests: list[str],
             dns: DnsServer) -> tuple[list[DeliveryResult], MtaAgent]:
    path = os.path.join(tmp_path, "message")
    with open(path, "wb") as handle:
        handle.write(b"Subject: family\n\nbody\n")
    agent = MtaAgent(relay_config(relay), tables, "sender.test", resolver=Resolver(dns.setting), mx_port=port,
                     timeout=10.0)

    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            results = []
            for n, dest in enumerate(dests, 1):  # one after the other: each takes the table's next entry
                envelope = Envelope(evpid=(0x22 << 32) | n, dispatcher="relay", sender="bob@local.test", rcpt=dest,
                                    dest=dest)
                results.append(await agent.deliver(envelope, path))
            return results
        finally:
            await agent.stop()

    return asyncio.run(run()), agent


def test_an_ipv4_source_does_not_try_an_ipv6_only_exchanger(tmp_path: os.PathLike[str]) -> None:
    port = free_port("::1")
    with DnsServer(ZONE) as dns, Remote(host="::1", port=port) as remote:
        results, agent = _deliver(tmp_path, Relay(src="127.0.0.1"), MemoryTables(), port, ["bob@six.test"], dns)
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "Address family mismatch on destination MXs"
    assert remote.received == []
    assert all(route.nerror == 0 for route in agent.state.routes.values())


def test_a_source_table_gives_each_exchanger_a_source_of_its_family(tmp_path: os.PathLike[str]) -> None:
    port = free_port("::1")
    tables = MemoryTables(lists={"sources": ["127.0.0.1", "::1"]})
    with DnsServer(ZONE) as dns, Remote(host="::1", port=port) as six:
        results, _ = _deliver(tmp_path, Relay(src_table="sources"), tables, port,
                              ["a@six.test", "b@six.test", "c@six.test", "d@six.test"], dns)
    assert [result.outcome for result in results] == [Outcome.OK] * 4, [result.text for result in results]
    assert sorted(rcpt for received in six.received for rcpt in received.rcpt_tos) == \
        ["a@six.test", "b@six.test", "c@six.test", "d@six.test"]
