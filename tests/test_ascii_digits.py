"""Numbers read from outside (config, tables, a peer's replies) take ASCII digits only. Python's str.isdigit()
also takes "²" (which int() refuses: `smtpd -n` died with a traceback on a relay URL's port "²") and "٥"
(which int() reads as 5). Each place says what is wrong in its own words instead."""

from __future__ import annotations

import pytest

from smtpd.config.parser import relay_url_problem
from smtpd.lookup.userinfo import UserInfoError, parse_userinfo
from smtpd.mda.lmtp import LmtpError, parse_destination
from smtpd.mta.routes import RelayUrlError, parse_relay_url


@pytest.mark.parametrize("digits", ["²5", "٢٥"])
def test_non_ascii_digits_are_refused_in_words(digits: str) -> None:
    assert relay_url_problem(f"smtp://mx.example.net:{digits}") == \
        f'relay URL "smtp://mx.example.net:{digits}": invalid port "{digits}"'
    with pytest.raises(RelayUrlError, match="bad port"):
        parse_relay_url(f"smtp://mx.example.net:{digits}")
    with pytest.raises(LmtpError, match="invalid LMTP destination"):
        parse_destination(f"127.0.0.1:{digits}")
    with pytest.raises(UserInfoError, match="invalid userinfo"):
        parse_userinfo("bob", f"{digits}:100:/home/bob")


def test_ascii_digits_still_read() -> None:
    assert not relay_url_problem("smtp://mx.example.net:25")
    assert parse_destination("127.0.0.1:24") == ("127.0.0.1", 24)
    assert parse_userinfo("bob", "1000:100:/home/bob").uid == 1000
