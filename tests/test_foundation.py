"""The shared foundation: ids, paths, the trace bus, the control protocol."""

from __future__ import annotations

import pytest

from shared import ids, protocol
from shared.paths import Paths
from smtpd.trace import TraceBus


def test_evpid_carries_msgid_in_upper_half() -> None:
    msgid = ids.new_msgid()
    evpid = ids.new_evpid(msgid)
    assert ids.msgid_of(evpid) == msgid
    assert ids.parse_evpid(ids.format_evpid(evpid)) == evpid
    assert ids.parse_msgid(ids.format_msgid(msgid)) == msgid
    assert ids.parse_msgid("00000000") is None
    assert ids.parse_evpid("0123") is None


def test_paths_environment_then_explicit_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTPD_SPOOL", "/tmp/spool-env")
    assert Paths.from_environment().spool == "/tmp/spool-env"
    assert Paths.from_environment(spool="/tmp/explicit").spool == "/tmp/explicit"
    assert Paths.from_environment().config == "/etc/smtpd.conf"


def test_slow_subscriber_loses_events_and_is_told() -> None:
    bus = TraceBus()
    subscription = bus.subscribe(["expand"], capacity=3)
    for number in range(10):
        bus.emit("expand", f"event {number}")
    bus.emit("smtp", "not subscribed")
    events, dropped = subscription.drain()
    assert [event.message for event in events] == ["event 0", "event 1", "event 2"]
    assert dropped == 7
    subscription.close()
    assert not bus.wants("expand")


def test_protocol_rejects_garbage_and_unknown_commands() -> None:
    with pytest.raises(protocol.ProtocolError) as error:
        protocol.decode_request(b"{not json")
    assert error.value.code is protocol.ErrorCode.BAD_REQUEST
    with pytest.raises(protocol.ProtocolError) as error:
        protocol.decode_request(protocol.encode(protocol.request(1, "no.such")))
    assert error.value.code is protocol.ErrorCode.UNKNOWN_COMMAND
    request_id, spec, args = protocol.decode_request(protocol.encode(protocol.request(5, "show.queue", msgid="x")))
    assert (request_id, spec.name, args) == (5, "show.queue", {"msgid": "x"})
