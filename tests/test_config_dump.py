"""`smtpd -n --dump`: the effective configuration in modern syntax; parsing it gives the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_config import case_names, load_case, materialize, parse

from smtpd.config import parse_text
from smtpd.config.dump import comparable, dump


def accepted_cases() -> list[str]:
    """Every corpus case our checker accepts (the whole corpus is checked by test_config_corpus.py)."""
    return case_names()


@pytest.mark.parametrize("case", accepted_cases())
def test_dump_round_trip_over_the_corpus(case: str, tmp_path: Path) -> None:
    result = load_case(case, tmp_path)
    if not result.ok:
        assert result.config is None
        return
    text = dump(result.config)
    again = parse_text(text, str(tmp_path / "dumped.conf"), check_files=True)
    assert again.ok, (text, again.lines())
    # The dump is modern: no legacy warning survives it.
    assert not [w for w in again.warnings if "legacy" in w.text], again.lines()
    assert comparable(again.config) == comparable(result.config), text
    # And dumping is stable.
    assert dump(again.config) == text


def test_round_trip_covers_legacy_and_accepted_cases(tmp_path: Path) -> None:
    """The round trip above is not vacuous: most cases, legacy ones included, are accepted."""
    accepted = [case for case in case_names() if load_case(case, tmp_path / case).ok]
    assert len(accepted) >= 100
    assert sum(1 for case in accepted if case.startswith("legacy-")) >= 20


def test_dump_expands_macros_includes_and_legacy(tmp_path: Path) -> None:
    config_path = materialize("include-macros", tmp_path)
    result = parse_text(config_path.read_text(), str(config_path))
    assert result.ok
    text = dump(result.config)
    assert "$" not in text and "include" not in text
    legacy = parse('listen on lo mask-source\naccept for any relay via "tls://smtp.example.com"\n')
    assert dump(legacy.config) == (
        'listen on "lo" mask-src\n\n'
        'action "relay" relay host "smtp+tls://smtp.example.com"\n\n'
        'match from local for any action "relay"\n'
        'match from any for any auth action "relay"\n'
    )


def test_dump_quotes_what_needs_quoting() -> None:
    result = parse('table "senders" { "relay" = "a b" }\naction "relay" mda "say \\"hi\\""\n'
                   'listen on lo tag "x y"\nmatch for local action "relay"\n')
    assert result.ok, result.lines()
    text = dump(result.config)
    assert 'table "senders" { "relay" = "a b" }' in text
    assert 'action "relay" mda "say \\"hi\\""' in text
    assert comparable(parse(text).config) == comparable(result.config)




# (as written in smtpd.conf, the string it means): real OpenSMTPD 6.8 reads each the same way (checked through
# its `no such dispatcher: NAME` message).
BACKSLASH_STRINGS = [
    ('"a\\\\ b"', "a\\ b"),
    ('"a\\\\\tb"', "a\\\tb"),
    ('"ends in \\\\\n"', "ends in \\"),
    ('"a\\\\\\ b"', "a\\\\ b"),
    ('"a\\\\"b"', 'a\\"b'),
]


@pytest.mark.parametrize(("written", "value"), BACKSLASH_STRINGS)
def test_dump_keeps_backslashes_before_blanks_and_at_the_end(written: str, value: str) -> None:
    """A backslash before a blank or at the end of a string survives the dump (it used to be written bare, and
    then escaped the blank or the closing quote when read back)."""
    result = parse(f'listen on lo\naction "x" mda {written}\nmatch for local action "x"\n')
    assert result.ok, result.lines()
    assert result.config.actions["x"].mda_command == value
    again = parse(dump(result.config))
    assert again.ok, again.lines()
    assert again.config.actions["x"].mda_command == value

def test_dump_round_trip_of_mutated_configs(tmp_path: Path) -> None:
    """Spliced corpus configs that still parse dump to text that parses back to the same model."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    names = [name for name in case_names() if not name.startswith(("err-", "crlf-"))]
    texts = {name: materialize(name, tmp_path / name).read_text() for name in names}
    words = ["from any", "for any", "! tls", "tag T", "auth", "helo x.org", "mail-from { a@b }", "rcpt-to regex r",
             "ttl 2d", "junk", "user mail", "mask-src", "no-dsn", "proxy-v2", "port 2526", "tls no-verify",
             "src 127.0.0.1", "helo h.example", "backup", "rcpt-to", "virtual { a = b }", "\n"]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(names), st.data())
    def round_trip(name: str, data: st.DataObject) -> None:
        text = texts[name]
        lines = text.split("\n")
        index = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
        lines[index] = lines[index] + " " + data.draw(st.sampled_from(words))
        result = parse_text("\n".join(lines), str(tmp_path / name / "smtpd.conf"))
        if not result.ok:
            return
        dumped = dump(result.config)
        again = parse_text(dumped, str(tmp_path / name / "dumped.conf"))
        assert again.ok, (dumped, again.lines())
        assert comparable(again.config) == comparable(result.config), dumped

    round_trip()
