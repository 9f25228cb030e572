"""Fuzzed and truncated configs always end in error lines or OK: never a traceback, never a half answer."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_config import CASES, case_names, materialize
from helpers_mta import DnsServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpd.config import parse_text
from smtpd.config.lexer import KEYWORDS

LOCATED = re.compile(r"^.+:\d+: (warning: )?.+$")
UNLOCATED_PREFIXES = ("warn: ", "smtpd", "pushfile: ", "pki name not found: ", "ca name not found: ")
VOCABULARY = sorted(KEYWORDS) + [
    "{", "}", "<", ">", "!", ",", "=", "=>", "\n", "\\\n", "\r\n", "\r", "#", "$m", "$", '"', "'", '"quoted"',
    "'single'", "lo", "localhost", "127.0.0.1", "::1", "25", "-1", "0", "99999999999999999999", "4d", "1h",
    "10M", "1.5M", "a", "b", "t", "x.example.org", "smtp://x", "foo://x", "<t>", "<a>", "{ a, b }",
    "{ k = v }", "m = \"v\"", "accept", "deliver", "to", "via", "as", "expire", "source", "sender",
    "certificate", "mask-source", "secure", "authenticated", "/abs/path", '"/nonexistent/file"',
    "file:/nonexistent", "\x00", "é", "\t",
]


@pytest.fixture(scope="module", autouse=True)
def hermetic_dns() -> Iterator[None]:
    """Host names in `listen on` are asked of a DNS server of our own that knows nothing (no other DNS)."""
    with DnsServer({}) as server:
        previous = os.environ.get("SMTPD_RESOLVER")
        os.environ["SMTPD_RESOLVER"] = server.setting
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("SMTPD_RESOLVER", None)
            else:
                os.environ["SMTPD_RESOLVER"] = previous


def check_outcome(text: str, path: str = "F") -> None:
    result = parse_text(text, path)
    output = result.lines()
    for line in output:
        assert LOCATED.match(line) or line.startswith(UNLOCATED_PREFIXES) or ": " in line, line
        assert "Traceback" not in line
    if result.ok:
        assert result.config is not None
        assert not result.errors or all(not d.is_error for d in result.errors)
        assert result.config.rules
    else:
        assert result.config is None
        assert any(d.is_error for d in result.diagnostics), output


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(VOCABULARY), max_size=40).map(" ".join))
def test_random_token_soup_never_crashes(text: str) -> None:
    check_outcome(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_crashes(text: str) -> None:
    check_outcome(text)


CORPUS_TEXTS = {name: (CASES / name / "smtpd.conf").read_bytes().decode("utf-8", "replace")
                for name in case_names()}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CORPUS_TEXTS)), st.data())
def test_truncated_and_spliced_corpus_configs_never_crash(name: str, data: st.DataObject) -> None:
    text = CORPUS_TEXTS[name]
    cut = data.draw(st.integers(min_value=0, max_value=len(text)))
    insert = data.draw(st.sampled_from(VOCABULARY))
    position = data.draw(st.integers(min_value=0, max_value=cut))
    check_outcome(text[:position] + insert + text[position:cut])


def test_every_prefix_of_a_full_config_is_handled(tmp_path: Path) -> None:
    """Exhaustively: every truncation of the largest corpus config (with its real files)."""
    config = materialize("full-mx-with-everything", tmp_path)
    text = config.read_text()
    for end in range(len(text) + 1):
        check_outcome(text[:end], str(config))
