"""docs/control-api.md describes the protocol the code speaks: every command, privilege, error code and limit."""

from __future__ import annotations

import re
from pathlib import Path

from shared import protocol, wire
from smtpd.control import server

DOC = (Path(__file__).resolve().parent.parent / "docs" / "control-api.md").read_text()


def command_rows() -> dict[str, str]:
    """cmd -> privilege column, from the Commands table (a row may name several commands)."""
    rows: dict[str, str] = {}
    section = DOC.split("## Commands", 1)[1].split("\n### ", 1)[0]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`([a-z.]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def test_every_command_is_documented_with_its_privilege() -> None:
    rows = command_rows()
    assert set(rows) == set(protocol.COMMANDS)
    for name, spec in protocol.COMMANDS.items():
        assert rows[name].startswith(str(spec.privilege)), name
        assert ("stream" in rows[name]) == spec.streams, name


def test_every_error_code_is_documented() -> None:
    section = DOC.split("## Errors", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.MULTILINE))
    assert documented == {str(code) for code in protocol.ErrorCode}


def test_limits_and_version_match_the_code() -> None:
    assert f'{{"v": {wire.PROTOCOL_VERSION}, "id": 7' in DOC
    assert f"| request line | {protocol.MAX_REQUEST_BYTES} bytes |" in DOC
    assert f"| time to send one request line | {server.REQUEST_TIMEOUT:g} s |" in DOC
    assert f"| connections per uid | {server.MAX_CONNECTIONS_PER_UID} |" in DOC
    assert "`SMTPD_CONTROL_GROUP`" in DOC and server.ENV_CONTROL_GROUP == "SMTPD_CONTROL_GROUP"


def test_trace_keywords_match() -> None:
    for keyword in protocol.TRACE_KEYWORDS:
        assert f"{keyword}" in DOC.split("Trace keywords:", 1)[1].split("\n\n", 1)[0]


def test_fast_path_agrees_with_the_click_definitions() -> None:
    from shared.paths import DEFAULT_SOCKET
    from smtpctl import fast
    from smtpctl.commands.show import SHOW_CHILDREN

    assert fast._SHOW_CHILDREN == tuple(SHOW_CHILDREN)
    assert fast.DEFAULT_SOCKET == DEFAULT_SOCKET
