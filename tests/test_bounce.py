"""DSN rendering (RFC 3464 structure) and who gets a report."""

from __future__ import annotations

import email

import pytest

from smtpd.bounce import (
    DELAYED,
    DELIVERED,
    FAILED,
    RELAYED,
    ReportContext,
    duration_text,
    readable_xtext,
    remaining_text,
    render_report,
    wants_report,
)
from smtpd.queue.envelope import DsnNotify, Envelope, EnvelopeType

ORIGINAL = b"From: alice@example.com\nSubject: the original\n\nthe body line\n"


def envelope(**fields: object) -> Envelope:
    values: dict[str, object] = {"evpid": 0x1234567800000001, "type": EnvelopeType.MDA,
                                 "sender": "alice@example.com", "rcpt": "bob@example.org", "dest": "bob@example.org",
                                 "ctime": 1_700_000_000, "ttl": 345600, "errorline": "550 no such user",
                                 "esc_class": 5, "esc_code": 11}
    values.update(fields)
    return Envelope(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 seconds"), (1, "1 second"), (59, "59 seconds"), (60, "1 minute"), (3599, "59 minutes"),
    (3600, "1 hour"), (4 * 3600, "4 hours"), (86400, "1 day"), (7 * 86400, "7 days"),
])
def test_duration_text(seconds: int, text: str) -> None:
    assert duration_text(seconds) == text


@pytest.mark.parametrize(("fields", "kind", "expected"), [
    ({}, FAILED, True),
    ({}, DELAYED, True),
    ({}, DELIVERED, False),
    ({"sender": ""}, FAILED, False),
    ({"flags": {"bounce"}}, FAILED, False),
    ({"dsn_notify": DsnNotify.NEVER}, FAILED, False),
    ({"dsn_notify": DsnNotify.SUCCESS}, FAILED, False),
    ({"dsn_notify": DsnNotify.SUCCESS}, DELIVERED, True),
    ({"dsn_notify": DsnNotify.FAILURE}, DELAYED, False),
    ({"dsn_notify": DsnNotify.DELAY}, DELAYED, True),
])
def test_who_gets_a_report(fields: dict[str, object], kind: str, expected: bool) -> None:
    assert wants_report(envelope(**fields), kind) is expected


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 seconds"), (59, "59 seconds"), (60, "1 minute"), (61, "1 minute 1 second"), (3599, "59 minutes 59 seconds"),
    (3600, "1 hour"), (3 * 3600 - 2, "3 hours"), (3 * 3600 + 1, "3 hours 1 minute"), (86400 - 1, "24 hours"),
    (86400, "1 day"), (4 * 86400 - 4 * 3600 - 3, "3 days 20 hours"), (2 * 86400 + 3600, "2 days 1 hour"),
])
def test_remaining_text_never_understates(seconds: int, text: str) -> None:
    assert remaining_text(seconds) == text


def test_a_delay_warning_promises_a_failure_report_only_to_a_sender_who_asked_for_one() -> None:
    """NOTIFY=DELAY alone: the sender gets the warning but no failure report at expiry (RFC 3461); the warning
    told them "you will receive a failure report", and they waited for one that never came."""
    def text(notify: int) -> str:
        warned = envelope(esc_class=4, esc_code=30, errorline="421 busy", dsn_notify=notify)
        report = parse(render_report(DELAYED, [warned], ORIGINAL, ReportContext("h", 0, delay=3600, remaining=7200)))
        return " ".join(report.get_payload()[0].get_payload().split())

    assert "you will receive a failure report" in text(DsnNotify.NONE)
    assert "you will receive a failure report" in text(DsnNotify.DELAY | DsnNotify.FAILURE)
    only_delay = text(DsnNotify.DELAY)
    assert "you will receive a failure report" not in only_delay
    assert "no failure report" in only_delay


def test_a_delay_warning_does_not_understate_how_long_the_message_stays_queued() -> None:
    """Default settings: a warning 4 hours after arrival, 4 days of ttl. The message stays queued 3 days and 20
    hours more, but the warning said "up to 3 days more": the failure report came most of a day after the time
    the sender was told."""
    remaining = 4 * 86400 - 4 * 3600 - 3  # (the failed try came a few seconds after the warn moment)
    report = parse(render_report(DELAYED, [envelope(esc_class=4, esc_code=30, errorline="421 busy")], ORIGINAL,
                                 ReportContext("h", 0, delay=4 * 3600, remaining=remaining)))
    text = report.get_payload()[0].get_payload()
    assert "up to 3 days 20 hours more" in text


def parse(data: bytes) -> email.message.Message:
    assert b"\r" not in data  # stored with LF line endings like every queued message
    return email.message_from_bytes(data)


def test_failure_report_structure() -> None:
    data = render_report(FAILED, [envelope(dsn_envid="E1"), envelope(rcpt="carol@example.org",
                                                                     dest="carol@example.org")],
                         ORIGINAL, ReportContext("mx.example.net", 1_700_000_100))
    report = parse(data)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    assert report["To"] == "<alice@example.com>"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report.get_content_type() == "multipart/report"
    notification, status, returned = report.get_payload()
    assert notification.get_content_type() == "text/plain"
    assert "<bob@example.org>: 550 no such user" in notification.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.net"
    assert per_message["Original-Envelope-Id"] == "E1"
    # xtext decoded for the reader, unless decoding would break the report's fields
    assert readable_xtext("a+2Bb+3Dc") == "a+b=c" and readable_xtext("x+0D+0AFake: 1") == "x+0D+0AFake: 1"
    assert [block["Final-Recipient"] for block in per_recipient] == ["rfc822; bob@example.org",
                                                                     "rfc822; carol@example.org"]
    assert per_recipient[0]["Status"] == "5.1.1"
    assert per_recipient[0]["Diagnostic-Code"] == "smtp; 550 no such user"
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "the original"


def test_ret_hdrs_returns_headers_only() -> None:
    report = parse(render_report(FAILED, [envelope(dsn_ret="HDRS")], ORIGINAL, ReportContext("h", 0)))
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: the original" in returned.get_payload()
    assert "the body line" not in returned.get_payload()


def test_a_tempfail_class_is_reported_as_permanent_in_a_failure_report() -> None:
    report = parse(render_report(FAILED, [envelope(esc_class=4, esc_code=47, errorline="Envelope expired")],
                                 ORIGINAL, ReportContext("h", 0)))
    assert report.get_payload()[1].get_payload()[1]["Status"] == "5.4.7"


def test_delayed_report_mentions_interval_and_remaining_time() -> None:
    report = parse(render_report(DELAYED, [envelope(esc_class=4, esc_code=30, errorline="421 busy")], ORIGINAL,
                                 ReportContext("h", 0, delay=4 * 3600, remaining=3 * 86400 - 5)))
    text = report.get_payload()[0].get_payload()
    assert "more than 4 hours" in text
    assert "up to 3 days more" in text
    assert report.get_payload()[1].get_payload()[1]["Status"] == "4.3.0"


def test_a_delay_warning_for_several_recipients_states_what_is_true_of_each() -> None:
    """Recipients of one message warned together may have different times left (an action's ttl): the text
    said the last one's. Now the longest time left ("up to") and the shortest delay ("more than")."""
    import asyncio

    from smtpd.bounce import Bouncer

    async def grouped():
        bouncer = Bouncer(None, object(), "mx.example.net", group_delay=60)
        bouncer.report(envelope(dest="a@example.org", rcpt="a@example.org", errorline="421 busy"), DELAYED, delay=4 * 3600,
                       remaining=2 * 86400)
        bouncer.report(envelope(evpid=0x1234567800000002, dest="b@example.org", rcpt="b@example.org", errorline="421 busy"), DELAYED,
                       delay=4 * 3600, remaining=3600)
        (group,) = bouncer.groups.values()
        return render_report(DELAYED, group.envelopes, ORIGINAL, group.context)

    text = parse(asyncio.run(grouped())).get_payload()[0].get_payload()
    assert "<a@example.org>: 421 busy" in text and "<b@example.org>: 421 busy" in text
    assert "up to 2 days more" in text and "more than 4 hours" in text


def test_a_report_about_smtputf8_mail_uses_the_internationalized_parts() -> None:
    """RFC 6533: UTF-8 addresses and headers were declared us-ascii and message/delivery-status."""
    original = "From: jürgen@bücher.test\nSubject: grüße\n\nbody\n".encode()
    utf8 = envelope(sender="jürgen@bücher.test", rcpt="zoë@example.org", dest="zoë@example.org",
                    errorline="550 no such user")
    report = email.message_from_bytes(render_report(FAILED, [utf8], original, ReportContext("h", 0)))
    notification, status, returned = report.get_payload()
    assert notification.get_content_type() == "text/plain" and notification.get_content_charset() == "utf-8"
    assert "<zoë@example.org>: 550 no such user" in notification.get_payload(decode=True).decode()
    assert status.get_content_type() == "message/global-delivery-status"
    assert "Final-Recipient: utf-8; zoë@example.org" in status.as_bytes().decode()
    assert returned.get_content_type() == "message/global"
    ascii_only = email.message_from_bytes(render_report(FAILED, [envelope()], ORIGINAL, ReportContext("h", 0)))
    assert [part.get_content_type() for part in ascii_only.get_payload()] == [
        "text/plain", "message/delivery-status", "message/rfc822"]


def test_a_returned_8bit_message_is_declared_8bit() -> None:
    """An original with a Latin-1 or UTF-8 body (8BITMIME mail) was returned in a message/rfc822 part with no
    Content-Transfer-Encoding, which means 7bit: the report declared its 8-bit content to be 7-bit (RFC 2045,
    2046 5.2.1), and so did the report as a whole. Now the part and the report say 8bit; an ASCII report says
    nothing (7bit)."""
    original = "From: a@example.com\nSubject: caf\u00e9\nContent-Type: text/plain; charset=utf-8\n\nd\u00e9j\u00e0 vu\n"
    original = original.replace("caf\u00e9", "cafe").encode()
    report = email.message_from_bytes(render_report(FAILED, [envelope()], original, ReportContext("h", 0)))
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert report["Content-Transfer-Encoding"] == "8bit"
    plain = email.message_from_bytes(render_report(FAILED, [envelope()], ORIGINAL, ReportContext("h", 0)))
    assert plain["Content-Transfer-Encoding"] is None
    assert all(part["Content-Transfer-Encoding"] is None for part in plain.get_payload())


def test_a_status_with_a_two_digit_detail_is_reported_as_the_server_gave_it() -> None:
    """`550 5.7.26 ... unauthenticated mail` (the usual DMARC refusal) is stored as esc-code 726; the report's
    Status read it as 5.72.6, a code that does not exist, and bounce processors took it for something else."""
    from smtpd.mta.session import esc_code

    refusal = "550 5.7.26 This mail has been blocked because the sender is unauthenticated."
    for text, expected in ((refusal, "5.7.26"), ("550 5.1.1 no such user", "5.1.1"), ("552 5.3.4 too big", "5.3.4")):
        data = render_report(FAILED, [envelope(errorline=text, esc_class=5, esc_code=esc_code(text))], ORIGINAL,
                             ReportContext("h", 0))
        _, per_recipient = parse(data).get_payload()[1].get_payload()
        assert per_recipient["Status"] == expected


def test_a_very_long_error_does_not_make_lines_longer_than_998_characters() -> None:
    """A delivery program's last line (kept up to 4 KiB) or a server's long reply went into the report's text and
    its Diagnostic-Code as one line, over RFC 5322's 998 characters: a strict receiving server refuses such a
    report, and a report is never reported on (double bounce), so the sender heard nothing."""
    words = "550 5.7.1 " + " ".join(f"reason{number}" for number in range(600))
    glued = '"' + "x" * 3000 + '"'
    for errorline in (words, glued):
        data = render_report(FAILED, [envelope(errorline=errorline)], ORIGINAL, ReportContext("h", 0))
        assert max(len(line) for line in data.split(b"\n")) <= 998
        _, per_recipient = parse(data).get_payload()[1].get_payload()
        diagnostic = " ".join(per_recipient["Diagnostic-Code"].split())
        assert diagnostic.replace(" ", "") == ("smtp; " if errorline is words else "X-PySMTPD; ").replace(" ", "") \
            + errorline.replace(" ", "")  # the whole text, folded


@pytest.mark.parametrize(("errorline", "diagnostic"), [
    ("550 5.1.1 no such user", "smtp; 550 5.1.1 no such user"),
    ("Connection failed: Connection refused", "X-PySMTPD; Connection failed: Connection refused"),
    ("Loop detected", "X-PySMTPD; Loop detected"),
])
def test_the_diagnostic_code_is_typed_smtp_only_for_an_smtp_reply(errorline: str, diagnostic: str) -> None:
    """RFC 3464 2.3.6: `smtp` says the text is an SMTP reply (code first). Our own texts (a connection refused, a
    loop, a delivery program's message) were typed `smtp` too, and a bounce processor that reads the reply code
    from it found none."""
    data = render_report(FAILED, [envelope(errorline=errorline)], ORIGINAL, ReportContext("h", 0))
    _, per_recipient = parse(data).get_payload()[1].get_payload()
    assert per_recipient["Diagnostic-Code"] == diagnostic


def test_a_report_refers_to_the_message_it_reports_on() -> None:
    """The report had no In-Reply-To or References: a mail reader could not show it with the message sent (in its
    thread), and a sender with many messages out had to open the returned copy to tell which one it was about."""
    original = b"From: alice@example.com\nMessage-ID:\n <orig.1@client.example>\nSubject: s\n\nbody\n"
    report = parse(render_report(FAILED, [envelope(dsn_ret="HDRS")], original, ReportContext("h", 0)))
    assert report["In-Reply-To"] == "<orig.1@client.example>"
    assert report["References"] == "<orig.1@client.example>"
    without = parse(render_report(FAILED, [envelope()], ORIGINAL, ReportContext("h", 0)))
    assert without["In-Reply-To"] is None and without["References"] is None


def test_a_relayed_notice_with_ret_full_does_not_call_the_message_undelivered() -> None:
    """NOTIFY=SUCCESS with RET=FULL, relayed to a host without DSN: the notice says the message was passed on,
    and its copy of the message was described as "Undelivered message"."""
    report = email.message_from_bytes(render_report(RELAYED, [envelope(dsn_ret="FULL")], ORIGINAL,
                                                    ReportContext("h", 0)))
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Relayed message"


def test_reports_are_routed_by_the_ruleset_and_expansion(tmp_path) -> None:
    """The DSN to the sender goes where the real rules and expansion send a local submission to that address:
    here a relay action for the sender's domain, and nothing at all for a domain no rule accepts."""
    import asyncio

    from helpers_queue import Harness, run, wait_for

    from smtpd.config.model import Action, Condition, Config, MatchRule, Method, TableDecl
    from smtpd.delivery import DeliveryResult
    from smtpd.lookup.tables import Tables

    senders = TableDecl("senders", "file", items=("example.com",), inline=True)
    config = Config(path="test.conf",
                    actions={"local": Action("local", Method.MBOX), "out": Action("out", Method.RELAY)},
                    rules=(MatchRule((Condition("from", "any"), Condition("for", "domain", table="senders")),
                                     action="out", number=1),),
                    tables={"senders": senders})

    async def scenario():
        harness = Harness(tmp_path, config)
        harness.scheduler.bouncer.router = harness.scheduler.bouncer._route_by_rules  # noqa: SLF001 — the real one
        harness.daemon.tables = Tables(config, mailname="mx.test.example", addresses=["127.0.0.1"])
        harness.mda.policy = lambda envelope: DeliveryResult.permfail("550 unknown user")
        harness.daemon.set_paused("mta", True)  # keep the report queued to look at it
        async with harness:
            await harness.submit(sender="alice@example.com")
            await harness.submit(sender="mallory@elsewhere.test")
            await wait_for(lambda: len(harness.mda.attempts) == 2, what="two failures")
            await wait_for(lambda: len(harness.scheduler.entries) == 1, what="only the report left")
            await asyncio.sleep(0.3)
            return [entry.envelope for entry in harness.scheduler.entries.values()]

    (report,) = run(scenario())
    assert report.sender == "" and report.dest == "alice@example.com"
    assert report.dispatcher == "out" and str(report.type) == "mta"
    assert "bounce" in report.flags



def test_only_a_failed_report_of_a_report_is_logged_as_a_double_bounce(caplog) -> None:
    """A report is never reported on; the log says "double bounce" only when it failed (a delivered report with
    NOTIFY=SUCCESS, or a delayed one, was logged as a dropped double bounce too)."""
    import asyncio
    import logging

    from smtpd.bounce import Bouncer

    async def ask(kind: str) -> bool:
        bouncer = Bouncer(None, object(), "mx.example.net")
        return await bouncer.report(envelope(sender="", flags=frozenset({"bounce"}),
                                             dsn_notify=DsnNotify.SUCCESS | DsnNotify.FAILURE), kind)

    with caplog.at_level(logging.INFO):
        assert asyncio.run(ask(DELIVERED)) is False and asyncio.run(ask(DELAYED)) is False
        assert "double bounce" not in caplog.text
        assert asyncio.run(ask(FAILED)) is False
    assert "double bounce for 1234567800000001 (550 no such user): dropped" in caplog.text


def test_a_reply_of_several_lines_is_folded_in_the_status_part() -> None:
    """A peer's refusal over two lines: the second line started a line of its own in the per-recipient block,
    where it read as a malformed field (a parser gave up on the block)."""
    refusal = "550-5.1.1 The email account that you tried to reach does not exist.\n550 5.1.1 Please check it"
    data = render_report(FAILED, [envelope(errorline=refusal)], ORIGINAL, ReportContext("mx.example.net", 1))
    _, status, _ = parse(data).get_payload()
    _, per_recipient = status.get_payload()
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.org"
    assert per_recipient["Diagnostic-Code"].split() == ("smtp; " + refusal).split()
    assert per_recipient.defects == [] and len(per_recipient.keys()) == len(set(per_recipient.keys()))
