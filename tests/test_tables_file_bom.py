"""A table file saved by an editor that puts a UTF-8 byte order mark first (Notepad does): the mark is no part of
the first entry. OpenSMTPD 6.8 keeps it, so the first domain of such a file silently never matches; we drop it,
in file tables and in makemap's db files alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_smtp import SmtpDaemon
from helpers_tables import domains_relay_config, rcpt_code

from smtpctl.commands.maps import makemap_main

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("backend", ["file", "db"])
def test_a_byte_order_mark_is_not_part_of_the_first_entry(tmp_path: Path, backend: str) -> None:
    source = tmp_path / "domains"
    source.write_bytes(BOM + b"first.example\r\nsecond.example\r\n")
    path = source
    if backend == "db":
        assert makemap_main(["-t", "set", str(source)], "makemap") == 0
        path = tmp_path / "domains.db"
    with SmtpDaemon(tmp_path / "daemon", domains_relay_config(f"{backend}:{path}")) as daemon:
        assert rcpt_code(daemon.port, "bob@first.example") == 250
        assert rcpt_code(daemon.port, "bob@second.example") == 250
        assert rcpt_code(daemon.port, "bob@third.example") == 550
