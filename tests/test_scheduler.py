"""The scheduler: first attempts, retry timing, expiry, delay warnings, failure reports, pauses, and the
daemon-side queue commands (called through the control registry, as the control server calls them)."""

from __future__ import annotations

import asyncio
import email
import email.utils
import logging
import os
import re
import time
from pathlib import Path

from helpers_queue import Harness, queue_config, run, wait_for

from smtpd.control.registry import HANDLERS
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.queue.envelope import DsnNotify, EnvelopeType
from smtpd.queue.format import load_envelope
from smtpd.scheduler import next_try_after_failure


def reports(harness: Harness) -> list[email.message.Message]:
    return [email.message_from_bytes(item.data) for item in harness.mda.delivered if item.envelope.sender == ""]


def status_blocks(report: email.message.Message) -> list[dict[str, str]]:
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    return [dict(block.items()) for block in part.get_payload()[1:]]


def test_new_mail_is_delivered_at_once_and_removed_from_the_spool(tmp_path: Path) -> None:
    async def scenario() -> Harness:
        async with Harness(tmp_path) as harness:
            msgid, _ = await harness.submit(b"Subject: now\n\nx\n", recipients=("a@x.test", "b@x.test"))
            await wait_for(lambda: len(harness.mda.delivered) == 2, what="two deliveries")
            await wait_for(lambda: not harness.scheduler.entries, what="envelopes forgotten")
            await asyncio.sleep(0.05)
            return harness

    harness = run(scenario())
    assert {item.envelope.rcpt for item in harness.mda.delivered} == {"a@x.test", "b@x.test"}
    assert list((tmp_path / "spool" / "queue").glob("*/*")) == []
    assert reports(harness) == []  # no NOTIFY=SUCCESS, no report


def test_retry_timing_follows_ctime_plus_base_times_n_squared() -> None:
    from smtpd.queue.envelope import Envelope

    mta = Envelope(type=EnvelopeType.MTA, ctime=1000, retry=1)
    assert next_try_after_failure(mta, now=1001) == 1400
    mta.retry = 2
    assert next_try_after_failure(mta, now=1001) == 1000 + 400 * 4
    # n grows until the time is in the future
    assert next_try_after_failure(mta, now=1000 + 400 * 9) == 1000 + 400 * 16
    mda = Envelope(type=EnvelopeType.MDA, ctime=1000, retry=3)
    assert next_try_after_failure(mda, now=1001) == 1090
    bounce = Envelope(type=EnvelopeType.MTA, ctime=1000, retry=1, flags={"bounce"})
    assert next_try_after_failure(bounce, now=1001) == 1010


def test_tempfail_is_recorded_on_disk_and_retried_when_scheduled(tmp_path: Path) -> None:
    answers = iter([DeliveryResult.tempfail("452 mailbox full"), DeliveryResult.ok()])

    async def scenario() -> tuple[list, object, int, dict]:
        harness = Harness(tmp_path)
        harness.mda.policy = lambda envelope: next(answers)
        async with harness:
            msgid, (evpid,) = await harness.submit()
            await wait_for(lambda: harness.scheduler.entries[evpid].envelope.retry == 1, what="tempfail")
            await wait_for(lambda: harness.scheduler.entries[evpid].state == "pending", what="rescheduled")
            shown = await HANDLERS["show.queue"](harness.daemon, {})
            stored = load_envelope(Path(harness.queue.envelope_path(evpid)).read_bytes())
            scheduled = await HANDLERS["schedule"](harness.daemon, {"target": f"{evpid:016x}"})
            await wait_for(lambda: len(harness.mda.delivered) == 1, what="retry")
            return shown["rows"], stored, len(harness.mda.attempts), scheduled

    rows, stored, attempts, scheduled = run(scenario())
    (row,) = rows
    assert row[10] == 1 and row[11] == "pending"
    assert 5 <= row[12] <= 10  # next try = ctime + 10 s for a local delivery
    assert row[13] == "452 mailbox full"
    assert stored.retry == 1 and stored.errorline == "452 mailbox full" and stored.esc_class == 4
    assert scheduled == {"count": 1}
    assert attempts == 2


def test_permanent_failure_sends_one_grouped_report_and_removes_the_envelopes(tmp_path: Path) -> None:
    async def scenario() -> Harness:
        harness = Harness(tmp_path)
        harness.mda.policy = lambda envelope: (DeliveryResult.permfail("550 no such user", 11)
                                               if envelope.sender else DeliveryResult.ok())
        async with harness:
            await harness.submit(b"Subject: lost\n\ncontent\n", recipients=("x@x.test", "y@x.test"),
                                 dsn_envid="ENV-42", dsn_orcpt="rfc822;X@x.test")
            await wait_for(lambda: len(reports(harness)) == 1, what="the report")
            await wait_for(lambda: not harness.scheduler.entries, what="queue empty")
            await asyncio.sleep(0.1)
            return harness

    harness = run(scenario())
    (report,) = reports(harness)
    delivered = [item for item in harness.mda.delivered if item.envelope.sender == ""]
    assert delivered[0].envelope.dest == "alice@example.com"
    assert "bounce" in delivered[0].envelope.flags
    assert report["Subject"] == "Delivery status notification: failed"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    blocks = status_blocks(report)
    blocks.sort(key=lambda block: block["Final-Recipient"])
    assert [block["Final-Recipient"] for block in blocks] == ["rfc822; x@x.test", "rfc822; y@x.test"]
    assert {block["Status"] for block in blocks} == {"5.1.1"}
    assert {block["Action"] for block in blocks} == {"failed"}
    assert blocks[0]["Original-Recipient"] == "rfc822;X@x.test"
    header = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status").get_payload()[0]
    assert header["Original-Envelope-Id"] == "ENV-42"
    text = report.get_payload()[0].get_payload()
    assert "<x@x.test>: 550 no such user" in text
    assert "Subject: lost" in report.as_string()  # the original is returned (no RET: full for failures)
    assert list((tmp_path / "spool" / "queue").glob("*/*")) == []


def test_no_report_for_null_sender_bounces_or_notify_never(tmp_path: Path) -> None:
    async def scenario() -> Harness:
        harness = Harness(tmp_path)
        harness.mda.policy = lambda envelope: DeliveryResult.permfail("550 gone")
        async with harness:
            await harness.submit(sender="")
            await harness.submit(recipients=("n@x.test",), dsn_notify=DsnNotify.NEVER)
            await harness.submit(sender="", recipients=("r@x.test",), flags={"bounce"})
            await wait_for(lambda: len(harness.mda.attempts) == 3 and not harness.scheduler.entries, what="done")
            await asyncio.sleep(0.3)
            return harness

    harness = run(scenario())
    assert len(harness.mda.attempts) == 3  # no report was ever queued
    assert list((tmp_path / "spool" / "queue").glob("*/*")) == []


def test_notify_success_gets_a_delivered_report_with_headers_only_for_ret_hdrs(tmp_path: Path) -> None:
    async def scenario() -> Harness:
        async with Harness(tmp_path) as harness:
            await harness.submit(b"Subject: tracked\n\nsecret body\n", dsn_notify=DsnNotify.SUCCESS, dsn_ret="HDRS")
            await wait_for(lambda: len(reports(harness)) == 1, what="delivered report")
            return harness

    (report,) = reports(run(scenario()))
    assert report["Subject"] == "Delivery status notification: delivered"
    assert status_blocks(report)[0]["Status"] == "2.0.0"
    assert "Subject: tracked" in report.as_string()
    assert "secret body" not in report.as_string()


def test_loop_is_a_failure_with_loop_detected(tmp_path: Path) -> None:
    async def scenario() -> Harness:
        harness = Harness(tmp_path)
        harness.mda.policy = lambda envelope: (DeliveryResult(Outcome.LOOP, "loop") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            await harness.submit()
            await wait_for(lambda: len(reports(harness)) == 1, what="loop report")
            return harness

    (report,) = reports(run(scenario()))
    assert "Loop detected" in report.get_payload()[0].get_payload()
    assert status_blocks(report)[0]["Status"] == "5.4.6"


def test_the_expire_log_line_gives_the_delay_as_the_other_delivery_lines_do(tmp_path: Path, caplog) -> None:
    """`delay=2s`, one word like every key=value of the line and like the Ok/TempFail lines (OpenSMTPD's
    duration_to_text); it said `delay=2 seconds` (`delay=4 days`), which splits a log parser's fields."""
    async def scenario() -> None:
        harness = Harness(tmp_path, queue_config(queue_ttl=2))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("421 try later") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            await harness.submit(recipients=("slow@x.test",))
            await wait_for(lambda: len(reports(harness)) == 1, what="expiry report")

    with caplog.at_level(logging.INFO, logger="smtpd"):
        run(scenario())
    (line,) = [record.getMessage() for record in caplog.records if ": Expire for " in record.getMessage()]
    # OpenSMTPD's line for an envelope dropped without a delivery (as its `Remove` one, checked against 6.8)
    assert re.fullmatch(r"delivery: Expire for [0-9a-f]{16}: from=<[^>]*>, to=<slow@x\.test>, rcpt=<->, "
                        r"delay=[2-9]s, stat=Envelope expired", line), line


def test_expired_mail_is_reported_as_failed_at_ctime_plus_ttl(tmp_path: Path) -> None:
    async def scenario() -> tuple[Harness, float]:
        harness = Harness(tmp_path, queue_config(queue_ttl=2))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("421 try later") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            await harness.submit(recipients=("slow@x.test",))
            await wait_for(lambda: len(reports(harness)) == 1, what="expiry report")
            return harness, time.time()

    harness, reported_at = run(scenario())
    (report,) = reports(harness)
    assert report["Subject"] == "Delivery status notification: failed"  # QUIRK fixed: not "delayed"
    assert status_blocks(report)[0]["Status"] == "5.4.7"
    assert "Envelope expired" in report.get_payload()[0].get_payload()
    assert len([a for a in harness.mda.attempts if a.sender]) == 1  # expired before the 10 s retry
    assert reported_at >= harness.mda.attempts[0].ctime + 2  # not before ctime + ttl


def test_delay_warning_states_the_real_remaining_time(tmp_path: Path) -> None:
    async def scenario() -> tuple[Harness, int]:
        harness = Harness(tmp_path, queue_config(queue_ttl=3 * 3600, warn=(1,)))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("451 greylisted") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            _, (evpid,) = await harness.submit()
            await wait_for(lambda: len(reports(harness)) == 1, what="warning")
            await wait_for(lambda: harness.scheduler.entries[evpid].state == "pending", what="rescheduled")
            stored = load_envelope(Path(harness.queue.envelope_path(evpid)).read_bytes())
            return harness, stored.last_bounce

    harness, last_bounce = run(scenario())
    (report,) = reports(harness)
    assert report["Subject"] == "Delivery status notification: delayed"
    text = report.get_payload()[0].get_payload()
    assert "more than 1 second" in text
    assert "up to 3 hours more" in text  # 3 h ttl, a few seconds used: not "up to 2 hours" (2:59:5x left)
    block = status_blocks(report)[0]
    assert block["Action"] == "delayed" and block["Status"] == "4.3.0"
    assert "Will-Retry-Until" in block
    assert last_bounce > 0


def test_pause_mda_holds_deliveries_until_resume(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            await harness.submit()
            await asyncio.sleep(0.3)
            while_paused = len(harness.mda.attempts)
            harness.daemon.set_paused("mda", False)
            await wait_for(lambda: len(harness.mda.delivered) == 1, what="delivery after resume")
            return while_paused, len(harness.mda.delivered)

    assert run(scenario()) == (0, 1)


def test_pause_resume_remove_envelopes_with_counts_and_filters(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            msgid, evpids = await harness.submit(recipients=("a@one.test", "b@two.test", "c@two.test"))
            await harness.submit(recipients=("d@three.test",))
            call = HANDLERS
            results: dict[str, object] = {}
            results["dry"] = await call["remove"](harness.daemon, {"target": "all", "domain": "two.test",
                                                                   "dry_run": True})
            results["paused"] = await call["pause.envelope"](harness.daemon, {"target": f"{msgid:08x}"})
            rows = (await call["show.queue"](harness.daemon, {"state": "suspended"}))["rows"]
            results["suspended_flags"] = sorted(row[3] for row in rows)
            results["resumed"] = await call["resume.envelope"](harness.daemon, {"target": f"{evpids[0]:016x}"})
            results["removed"] = await call["remove"](harness.daemon, {"target": "all", "domain": "two.test"})
            results["removed_again"] = await call["remove"](harness.daemon, {"target": f"{evpids[1]:016x}"})
            results["left"] = sorted(row[5] for row in (await call["show.queue"](harness.daemon, {}))["rows"])
            results["on_disk"] = sorted(p.name for p in (tmp_path / "spool" / "queue").glob("*/*/*")
                                        if p.name != "message")
            results["evpids"] = evpids
            return results

    results = run(scenario())
    assert results["dry"]["count"] == 2 and len(results["dry"]["rows"]) == 2
    assert results["paused"] == {"count": 3}
    assert results["suspended_flags"] == ["suspend"] * 3
    assert results["resumed"] == {"count": 1}
    assert results["removed"] == {"count": 2}
    assert results["removed_again"] == {"count": 0}
    assert results["left"] == ["a@one.test", "d@three.test"]
    assert f"{results['evpids'][1]:016x}" not in results["on_disk"]
    assert len(results["on_disk"]) == 2


def test_discover_reads_envelopes_the_scheduler_does_not_know(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict, dict, int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            msgid, evpids = await harness.submit(recipients=("a@x.test", "b@x.test"))
            for evpid in evpids:  # forget them in memory only, as if another process had written them
                harness.scheduler._forget(evpid)  # noqa: SLF001
            first = await HANDLERS["discover"](harness.daemon, {"target": f"{msgid:08x}"})
            again = await HANDLERS["discover"](harness.daemon, {"target": f"{evpids[0]:016x}"})
            return first, again, len(harness.scheduler.entries)

    assert run(scenario()) == ({"count": 2}, {"count": 0}, 2)


def test_discover_does_not_bring_back_an_envelope_delivered_while_its_file_is_being_deleted(tmp_path: Path) -> None:
    """A delivered envelope is forgotten first and its file deleted just after, on the queue's writer thread.
    `smtpctl discover` in between read the file and queued the envelope again: delivered twice."""

    async def scenario() -> tuple[dict, int, list[str]]:
        async with Harness(tmp_path) as harness:
            gate = asyncio.Event()
            remove_envelope = harness.queue.remove_envelope

            async def held(evpid: int) -> bool:
                await gate.wait()
                return await remove_envelope(evpid)

            harness.queue.remove_envelope = held
            msgid, _ = await harness.submit(recipients=("a@x.test", "b@x.test"))
            await wait_for(lambda: len(harness.mda.delivered) == 2 and not harness.scheduler.entries,
                           what="both delivered")
            on_disk = sorted(os.listdir(harness.spool / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}"))
            during = await HANDLERS["discover"](harness.daemon, {"target": f"{msgid:08x}"})
            gate.set()
            await asyncio.sleep(0.3)  # (before the fix: the envelopes discovered are delivered again meanwhile)
            return during, len(harness.mda.delivered), on_disk

    during, delivered, on_disk = run(scenario())
    assert len(on_disk) == 3  # the message and both envelope files were still there when discover read them
    assert during == {"count": 0}
    assert delivered == 2


def test_a_failing_delivery_agent_does_not_stop_the_scheduler(tmp_path: Path) -> None:
    calls = []

    class Broken:
        async def deliver(self, envelope, path):
            calls.append(envelope.evpid)
            raise RuntimeError("agent crashed")

    async def scenario() -> int:
        harness = Harness(tmp_path)
        harness.scheduler.deliverers["mda"] = Broken()
        async with harness:
            _, (evpid,) = await harness.submit()
            await wait_for(lambda: calls and harness.scheduler.entries[evpid].state == "pending", what="retry")
            return harness.scheduler.entries[evpid].envelope.retry

    assert run(scenario()) == 1


def test_cached_show_queue_lines_match_the_row_format(tmp_path: Path) -> None:
    from smtpd.queue.listing import format_line

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        harness = Harness(tmp_path)
        harness.mda.policy = lambda envelope: DeliveryResult.tempfail("451 a|b\x02c")
        async with harness:
            harness.daemon.set_paused("mda", True)
            await harness.submit(recipients=("a@x.test", "b@x.test"))
            entries = harness.scheduler.select("all")
            before = harness.scheduler.lines(entries).splitlines()
            expected_before = [format_line(row) for row in harness.scheduler.rows(entries)]
            harness.daemon.set_paused("mda", False)  # one attempt each: retry, error line and last try change
            await wait_for(lambda: all(entry.envelope.retry == 1 and entry.state == "pending"
                                       for entry in harness.scheduler.entries.values()), what="tempfails")
            entries = harness.scheduler.select("all")
            after = harness.scheduler.lines(entries).splitlines()
            expected_after = [format_line(row) for row in harness.scheduler.rows(entries)]
            same = [_without_runvalue(line) for line in before] == [_without_runvalue(line) for line in
                                                                    expected_before]
            return same, after, expected_after

    same_before, after, expected_after = run(scenario())
    assert same_before
    assert [_without_runvalue(line) for line in after] == [_without_runvalue(line) for line in expected_after]
    assert all(line.endswith("|451 a|b\\^Bc") and "|pending|" in line for line in after)


def _without_runvalue(line: str) -> str:
    """The line without its runvalue (seconds from now: two calls a moment apart may differ by one)."""
    fields = line.split("|")
    return "|".join(fields[:12] + fields[13:])


def test_an_envelope_removed_while_its_temporary_failure_is_recorded_is_removed(tmp_path: Path) -> None:
    """`smtpctl remove` while a delay warning for the envelope is being queued (the envelope is still in
    flight): before, the removal was noted and then forgotten, and the envelope stayed "inflight" for good,
    never tried again and impossible to remove, until a restart."""

    async def scenario() -> tuple[object, bool, list]:
        harness = Harness(tmp_path, queue_config(queue_ttl=3600, warn=(1,)), group_delay=0.3)
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("451 try later") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            _, (evpid,) = await harness.submit()
            await wait_for(lambda: harness.scheduler.bouncer.groups, what="the delay warning being gathered")
            assert harness.scheduler.entries[evpid].state == "inflight"
            await HANDLERS["remove"](harness.daemon, {"target": f"{evpid:016x}"})
            await wait_for(lambda: evpid not in harness.scheduler.entries, what="the envelope removed")
            await wait_for(lambda: not Path(harness.queue.envelope_path(evpid)).exists(), what="its file deleted")
            rows = (await HANDLERS["show.queue"](harness.daemon, {}))["rows"]
            return evpid, evpid in harness.scheduler.entries, [row for row in rows if row[0] == f"{evpid:016x}"]

    _, known, rows = run(scenario())
    assert not known and rows == []


def test_no_delay_warning_for_an_interval_that_ends_after_the_envelope_expires(tmp_path: Path) -> None:
    """ttl 2 s, warn-interval 30 s, a relay whose next try (ctime + 400 s) is past the interval: the envelope
    expires long before 30 s, so the sender gets the failure report only, not a "delayed for more than 30
    seconds" warning first."""
    async def scenario() -> Harness:
        harness = Harness(tmp_path, queue_config(queue_ttl=2, warn=(30,)))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("451 try later") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            await harness.submit(agent=EnvelopeType.MTA)
            await wait_for(lambda: any(r["Subject"].endswith("failed") for r in reports(harness)), what="expiry")
            await asyncio.sleep(0.2)
            return harness

    subjects = [report["Subject"] for report in reports(run(scenario()))]
    assert subjects == ["Delivery status notification: failed"]


def test_one_delay_warning_per_warn_interval_even_when_retried_after_it(tmp_path: Path) -> None:
    """The warning goes out at the first failure at or after ctime + interval; a later failure (here one asked for
    with `schedule`) must not send a second warning for the same interval."""
    async def scenario() -> tuple[Harness, int, int]:
        harness = Harness(tmp_path, queue_config(queue_ttl=86400, warn=(3600,)))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("451 greylisted") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            created = int(time.time()) - 3599  # the warn moment comes a second after the first try
            _, (evpid,) = await harness.submit(ctime=created)
            await wait_for(lambda: len(reports(harness)) == 1, what="warning")
            await wait_for(lambda: harness.scheduler.entries[evpid].state == "pending", what="rescheduled")
            tries = len([a for a in harness.mda.attempts if a.sender])
            result = await HANDLERS["schedule"](harness.daemon, {"target": f"{evpid:016x}"})
            assert result == {"count": 1}
            await wait_for(lambda: len([a for a in harness.mda.attempts if a.sender]) == tries + 1, what="another try")
            await wait_for(lambda: harness.scheduler.entries[evpid].state == "pending", what="rescheduled again")
            await asyncio.sleep(0.3)  # (longer than the report grouping delay)
            stored = load_envelope(Path(harness.queue.envelope_path(evpid)).read_bytes())
            return harness, stored.last_bounce, created

    harness, last_bounce, created = run(scenario())
    assert len(reports(harness)) == 1
    assert last_bounce == created + 3600


def test_a_delay_warning_is_never_sent_ahead_of_its_moment(tmp_path: Path) -> None:
    """OpenSMTPD warns at the failure whose next try lies past ctime + interval: "not delivered after more than
    4 hours" about mail a minute old. Here the first failure (next try 10 s later) is before the 2 s warn moment:
    no warning then; the next try is brought forward to the moment, and the warning follows its failure."""
    async def scenario() -> tuple[Harness, float, list[float]]:
        harness = Harness(tmp_path, queue_config(queue_ttl=86400, warn=(2,)), group_delay=0.1)
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("451 greylisted") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            _, (evpid,) = await harness.submit()
            await wait_for(lambda: len(reports(harness)) == 1, what="warning")
            tries = [time.time() for a in harness.mda.attempts if a.sender]
            return harness, harness.scheduler.entries[evpid].envelope.ctime, tries

    harness, ctime, tries = run(scenario())
    (warning,) = reports(harness)
    assert warning["Subject"] == "Delivery status notification: delayed"
    assert "more than 2 seconds" in warning.get_payload()[0].get_payload()
    sent = email.utils.parsedate_to_datetime(warning["Date"]).timestamp()
    assert sent >= ctime + 2  # not before the moment it speaks of
    assert len(tries) == 2  # the first try, then the one brought forward to the warn moment


def test_an_envelope_removed_while_its_failure_report_cannot_be_queued_stays_removed(tmp_path: Path) -> None:
    """`smtpctl remove` while a failed envelope's report is being queued, and the report cannot be queued for
    now (the sender's address cannot be routed yet): `remove` said "1 envelope removed", but the envelope was
    kept for a later try with its report, and was delivered again then."""
    from smtpd.bounce import BounceRoutingDeferred

    async def scenario() -> tuple[dict, bool, bool, int]:
        harness = Harness(tmp_path, group_delay=0.3)
        harness.mda.policy = lambda envelope: DeliveryResult.permfail("550 no such user")

        async def deferred(sender: str, smtpname: str) -> list:
            raise BounceRoutingDeferred("a table failed")

        harness.scheduler.bouncer.router = deferred
        async with harness:
            _, (evpid,) = await harness.submit()
            await wait_for(lambda: harness.scheduler.bouncer.groups, what="the failure report being gathered")
            removed = await HANDLERS["remove"](harness.daemon, {"target": f"{evpid:016x}"})
            await wait_for(lambda: not harness.scheduler.bouncer.groups, what="the report given up for now")
            await wait_for(lambda: evpid not in harness.scheduler.entries, timeout=3, what="the envelope removed")
            await HANDLERS["schedule"](harness.daemon, {"target": "all"})  # (nothing left to try)
            await asyncio.sleep(0.2)
            gone = not Path(harness.queue.envelope_path(evpid)).exists()
            return removed, evpid in harness.scheduler.entries, gone, len(harness.mda.attempts)

    removed, known, gone, attempts = run(scenario())
    assert removed == {"count": 1}
    assert not known and gone
    assert attempts == 1  # never tried again


def test_the_expiry_report_gives_the_last_error_that_kept_the_mail_back(tmp_path: Path) -> None:
    """A message that expires after temporary failures: the report said only "Envelope expired", in the text and
    as the Diagnostic-Code, and the sender could not tell why the mail never went (a full mailbox, a remote
    host greylisting it...). The status stays 5.4.7; the reason is the last failure."""
    async def scenario() -> Harness:
        harness = Harness(tmp_path, queue_config(queue_ttl=1))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("452 4.2.2 mailbox full", 22)
                                               if envelope.sender else DeliveryResult.ok())
        async with harness:
            await harness.submit(recipients=("full@x.test",))
            await wait_for(lambda: len(reports(harness)) == 1, what="expiry report")
            return harness

    (report,) = reports(run(scenario()))
    (block,) = status_blocks(report)
    assert block["Status"] == "5.4.7" and block["Action"] == "failed"
    assert block["Diagnostic-Code"] == "smtp; 452 4.2.2 mailbox full"
    text = report.get_payload()[0].get_payload()
    assert "<full@x.test>: Envelope expired; the last attempt said: 452 4.2.2 mailbox full" in text


def test_a_paused_envelope_does_not_expire_until_it_is_resumed(tmp_path: Path) -> None:
    """`pause envelope` holds mail for as long as the administrator wants, past its expiry too; once resumed it is
    reported as expired at once (docs/queue.md, "Pausing envelopes")."""
    async def scenario() -> tuple[bool, int, list]:
        harness = Harness(tmp_path, queue_config(queue_ttl=60))
        harness.mda.policy = lambda envelope: (DeliveryResult.tempfail("421 later") if envelope.sender
                                               else DeliveryResult.ok())
        async with harness:
            harness.daemon.set_paused("mda", True)
            # (arrived 2 minutes ago: past its expiry already)
            _, (evpid,) = await harness.submit(recipients=("held@x.test",), ctime=int(time.time()) - 120)
            assert await HANDLERS["pause.envelope"](harness.daemon, {"target": f"{evpid:016x}"}) == {"count": 1}
            harness.daemon.set_paused("mda", False)
            await asyncio.sleep(0.3)  # (nothing happens meanwhile)
            still_there = evpid in harness.scheduler.entries
            reports_while_paused = len(reports(harness))
            await HANDLERS["resume.envelope"](harness.daemon, {"target": f"{evpid:016x}"})
            await wait_for(lambda: len(reports(harness)) == 1, what="the expiry report")
            return still_there, reports_while_paused, [a for a in harness.mda.attempts if a.sender]

    still_there, reports_while_paused, attempts = run(scenario())
    assert still_there and reports_while_paused == 0
    assert attempts == []  # expired without a try
