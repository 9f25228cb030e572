"""SRS: forwarded mail leaves with our domain in MAIL FROM and comes back to the original sender."""

from __future__ import annotations

import asyncio
import os

from helpers_mta import MemoryTables, Remote

from smtpd.config.model import Action, Config, Method, Relay, SrsOptions
from smtpd.delivery import Outcome
from smtpd.mta import MtaAgent, srs
from smtpd.mta.mx import Resolver
from smtpd.queue.envelope import Envelope

KEY = "a long and secret srs key"
NOW = 1_795_594_469.0
DAY = 86400


def test_srs0_round_trip() -> None:
    address = srs.encode("Alice@Origin.example", KEY, "forwarder.test", now=NOW)
    assert address.startswith("SRS0=") and address.endswith("@forwarder.test")
    assert address.split("=")[3:] == ["Origin.example", "Alice@forwarder.test"]
    assert srs.decode(address, [KEY], 4 * DAY, now=NOW + 3 * DAY) == "Alice@Origin.example"


def test_srs0_decode_refuses_forgeries_and_old_addresses() -> None:
    address = srs.encode("alice@origin.example", KEY, "forwarder.test", now=NOW)
    assert srs.decode(address, ["another key"], 4 * DAY, now=NOW) is None
    assert srs.decode(address, [KEY], 4 * DAY, now=NOW + 5 * DAY) is None
    forged = address.replace("alice", "mallory")
    assert srs.decode(forged, [KEY], 4 * DAY, now=NOW) is None
    assert srs.decode("plain@forwarder.test", [KEY], 4 * DAY, now=NOW) is None


def test_backup_key_still_decodes() -> None:
    address = srs.encode("alice@origin.example", "old key", "forwarder.test", now=NOW)
    assert srs.decode(address, [KEY, "old key"], 4 * DAY, now=NOW) == "alice@origin.example"


def test_second_forward_becomes_srs1_and_decodes_one_hop_back() -> None:
    first = srs.encode("alice@origin.example", "first key", "first.test", now=NOW)
    second = srs.encode(first, KEY, "second.test", now=NOW)
    assert second.startswith("SRS1=") and second.endswith("@second.test")
    assert srs.decode(second, [KEY], 4 * DAY, now=NOW) == first
    assert srs.decode(first, ["first key"], 4 * DAY, now=NOW) == "alice@origin.example"


def test_our_own_senders_are_not_rewritten() -> None:
    assert srs.encode("bob@forwarder.test", KEY, "forwarder.test") == "bob@forwarder.test"


def test_relay_with_srs_rewrites_forwarded_mail_only(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "message")
    with open(path, "wb") as handle:
        handle.write(b"Subject: forwarded\n\nhi\n")
    with Remote() as remote:
        config = Config(path="<t>", srs=SrsOptions(key=KEY), actions={
            "relay": Action("relay", Method.RELAY, relay=Relay(host=f"smtp://127.0.0.1:{remote.port}", srs=True))})
        agent = MtaAgent(config, MemoryTables(), "forwarder.test", resolver=Resolver("127.0.0.1:9"), timeout=10.0)
        forwarded = Envelope(evpid=(1 << 32) | 1, dispatcher="relay", sender="alice@origin.example",
                             rcpt="bob@forwarder.test", dest="bob@elsewhere.test", flags={"internal"},
                             smtpname="forwarder.test")
        direct = Envelope(evpid=(2 << 32) | 1, dispatcher="relay", sender="carol@origin.example",
                          rcpt="dave@elsewhere.test", dest="dave@elsewhere.test", smtpname="forwarder.test")

        async def run() -> list[Outcome]:
            results = await asyncio.gather(agent.deliver(forwarded, path), agent.deliver(direct, path))
            await agent.stop()
            return [result.outcome for result in results]
        assert asyncio.run(run()) == [Outcome.OK, Outcome.OK]
    senders = {item.rcpt_tos[0]: item.mail_from for item in remote.received}
    assert senders["dave@elsewhere.test"] == "carol@origin.example"
    rewritten = senders["bob@elsewhere.test"]
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=origin.example=alice@forwarder.test")
    assert srs.decode(rewritten, [KEY], 4 * DAY) == "alice@origin.example"
