"""Message content processing (smtpd/smtp/headers.py) and path parsing (smtpd/smtp/address.py)."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpd.smtp import address as addr
from smtpd.smtp import replies
from smtpd.smtp.headers import MessageBuilder, qualify_addresses, received_header, time_to_text
from smtpd.smtp.session import _first_dot_line


def build(blocks: list[bytes], *, strict: bool = True, max_size: int = 1 << 20, local: bool = False,
          masquerade: str | None = None) -> tuple[bytes, replies.Reply | None]:
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    async def run() -> replies.Reply | None:
        builder = MessageBuilder(write, max_size=max_size, received="Received: test", hostname="mx.test",
                                 local_listener=local, masquerade_from=masquerade, strict=strict)
        for block in blocks:
            await builder.feed(block)
        return await builder.finish()

    error = asyncio.run(run())
    return b"".join(written), error


def test_headers_rewritten_and_body_passed_through() -> None:
    stored, error = build([b"To: bob,\r\n carol <carol>\r\nBcc: x@y\r\nSubject: s\r\n\r\nbody\r\n"])
    assert error is None
    assert stored == b"Received: test\nTo: bob@mx.test,\n carol <carol@mx.test>\nSubject: s\n\nbody\n"


def test_address_found_outside_comments() -> None:
    assert qualify_addresses("(mail root) root", "h") == "(mail root) root@h"
    assert qualify_addresses("root (root's box),\n\tbob ", "h") == "root@h (root's box),\n\tbob@h "


def test_group_and_quoted_names_are_kept() -> None:
    assert qualify_addresses(' undisclosed-recipients:;', "h") == ' undisclosed-recipients:;'
    assert qualify_addresses('"Doe, John" <john>, x@y', "h") == '"Doe, John" <john@h>, x@y'


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8))
def test_block_boundaries_do_not_matter(cuts: list[int]) -> None:
    message = b"Subject: a\r\nX-Long: " + b"y" * 50 + b"\r\n\r\nline 1\r\nline 2\r\n" + b"z" * 30 + b"\r\n"
    blocks, position = [], 0
    for cut in cuts:
        blocks.append(message[position:position + cut])
        position += cut
    blocks.append(message[position:])
    assert build(blocks) == build([message])


@given(st.integers(min_value=0, max_value=20),
       st.lists(st.sampled_from([b"x", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n."]), max_size=40))
def test_first_dot_line_is_the_first_crlf_dot(dots_inside_lines: int, pieces: list[bytes]) -> None:
    # Many dots inside lines take the scan past its dot-to-dot stage into the fallback search.
    buffer = bytearray(b"x." * dots_inside_lines + b"".join(pieces))
    assert _first_dot_line(buffer) == buffer.find(b"\r\n.")


@pytest.mark.parametrize("body", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n.\nb\r\n", b"a\r"])
def test_bare_line_endings_are_refused(body: bytes) -> None:
    _, error = build([b"Subject: s\r\n\r\n" + body])
    assert error == replies.BARE_LINE_ENDING


def test_local_submissions_may_use_lf() -> None:
    stored, error = build([b"Subject: s\n\nbody\n"], strict=False)
    assert error is None and stored == b"Received: test\nSubject: s\n\nbody\n"


def test_refusals() -> None:
    assert build([b"no header here\r\n"])[1] == replies.MALFORMED
    assert build([b"Received: x\r\n" * 100 + b"\r\nb\r\n"])[1] == replies.LOOP_DETECTED
    assert build([b"Subject: s\r\n\r\n" + b"x" * 100 + b"\r\n"], max_size=50)[1] == replies.TOO_BIG


def test_local_listener_adds_date_and_message_id_and_masquerade() -> None:
    stored, _ = build([b"From: Me <me@elsewhere>\r\nSubject: s\r\n\r\nb\r\n"], local=True, masquerade="a@b")
    text = stored.decode()
    assert "From: Me <a@b>\n" in text and "\nDate: " in text and "\nMessage-ID: <" in text
    assert text.index("Message-ID") < text.index("\n\nb")


def test_received_header_layout() -> None:
    header = received_header(helo="h.test", rdns=None, client="::1", mask_src=False, smtpname="mx",
                             protocol="ESMTPS", msgid="0000abcd", tls_text="TLSv1.3:X:256:NO", rcpt=None)
    lines = header.split("\n\t")
    assert lines[0] == "Received: from h.test (<unknown> [::1])"
    assert lines[1] == "by mx (PySMTPD) with ESMTPS id 0000abcd (TLSv1.3:X:256:NO);"
    assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [1-9]\d? [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(\S+\)",
                        lines[2])


def test_date_is_not_zero_padded_and_not_localised() -> None:
    assert re.fullmatch(r"\w{3}, [1-9]\d? \w{3} \d{4} .*", time_to_text(1_700_000_000 - 13 * 86400))


@pytest.mark.parametrize("text", ["user@example.org", "a.b+c@sub.example.org", "`x`$y|z@ex.org", "u@[127.0.0.1]",
                                  "u@[IPv6:::1]", "o'brien@ex.org", "u@under_score.ex"])
def test_valid_paths(text: str) -> None:
    assert str(addr.parse_mailaddr(text, default_domain="d")) == text


@pytest.mark.parametrize("text", ["a b@ex.org", ";sleep 5;", '"q"@ex.org', "a@b@c", "a@ex.org.",
                                  "a..b@ex.org", ".a@ex.org", "a@-ex.org", "a@[1.2.3]", "a@ex..org", "a\\@b@c",
                                  "a@" + "x" * 64 + ".org", "ü@ex.org"])
def test_invalid_paths(text: str) -> None:
    with pytest.raises(addr.AddressError):
        addr.parse_mailaddr(text, default_domain="d")


def test_utf8_paths_need_smtputf8() -> None:
    assert str(addr.parse_mailaddr("ü@exämple.org", default_domain="d", utf8=True)) == "ü@exämple.org"


def test_parameters() -> None:
    parameters = addr.parse_mail_parameters("SIZE=10 BODY=8bitmime RET=hdrs ENVID=e SMTPUTF8", dsn=True,
                                            smtputf8_offered=True)
    assert (parameters.size, parameters.body, parameters.ret, parameters.envid, parameters.smtputf8) == (
        10, "8BITMIME", "HDRS", "e", True)
    with pytest.raises(addr.ParameterError):
        addr.parse_mail_parameters("RET=FULL", dsn=False, smtputf8_offered=True)
    rcpt = addr.parse_rcpt_parameters("NOTIFY=success,delay,bogus ORCPT=rfc822;a+2Bb@c.d", dsn=True, utf8=False,
                                      default_domain="d")
    assert rcpt.notify == {"SUCCESS", "DELAY"} and rcpt.orcpt == "a+2Bb@c.d"
    # UTF-8 in ORCPT only in an SMTPUTF8 transaction (tests/dialogs/reply_orcpt_utf8_without_smtputf8.dialog)
    assert addr.parse_rcpt_parameters("ORCPT=rfc822;jos\u00e9@c.d", dsn=True, utf8=True,
                                      default_domain="d").orcpt == "jos\u00e9@c.d"


def test_source_routes_are_dropped() -> None:
    assert str(addr.parse_mailaddr("@a.test,@b.test:u@c.test", default_domain="d")) == "u@c.test"
    with pytest.raises(addr.AddressError):
        addr.parse_mailaddr("@a.test", default_domain="d")
    with pytest.raises(addr.AddressError):
        addr.parse_mailaddr("@bad..hop:u@c.test", default_domain="d")
