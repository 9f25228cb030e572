"""OpenSMTPD's stable text for the show commands (reference §2.4), shared by the Click commands and the
fast path. No Click, no rich here."""

from __future__ import annotations

SUBSYSTEM_LABELS = (("mda", "MDA"), ("mta", "MTA"), ("smtp", "SMTP"))


def status_lines(status: dict[str, str]) -> list[str]:
    return [f"{label} {status.get(name, 'running')}" for name, label in SUBSYSTEM_LABELS]


def stats_lines(stats: dict[str, object]) -> list[str]:
    # strcmp order of the keys, as OpenSMTPD's RB tree walks them; byte order equals strcmp for ASCII keys.
    return [f"{key}={stats[key]}" for key in sorted(stats, key=lambda key: key.encode())]


def _line(row: dict[str, object], made: str) -> str:
    """The relay's own rendering of a row when it gives one (field "line"), else ours from the fields."""
    line = row.get("line")
    return str(line) if isinstance(line, str) else made


def hosts_lines(rows: list[dict[str, object]]) -> list[str]:
    return [_line(row, f"{row.get('address', '?')} {row.get('ptr', '')} refcount={row.get('refcount', 0)} "
            f"nconn={row.get('nconn', 0)} lastconn={row.get('lastconn') or '-'}") for row in rows]


def routes_lines(rows: list[dict[str, object]]) -> list[str]:
    return [_line(row, f"{row.get('id', 0)}. {row.get('route', '')} {row.get('flags', '')} nconn={row.get('nconn', 0)} "
            f"nerror={row.get('nerror', 0)} penalty={row.get('penalty', 0)} "
            f"timeout={row.get('timeout') or '-'}") for row in rows]


def hoststats_lines(rows: list[dict[str, object]]) -> list[str]:
    return [_line(row, f"{row.get('domain', '')}|{row.get('time', 0)}|{row.get('text', '')}") for row in rows]


def relays_lines(rows: list[dict[str, object]]) -> list[str]:
    return [_line(row, str(row.get("text", ""))) for row in rows]


def mta_paused_lines(rows: list[dict[str, object]]) -> list[str]:
    return [_line(row, f"{_bracketed(str(row.get('source', '')))} -> {row.get('domain') or '*'}") for row in rows]


def _bracketed(address: str) -> str:
    # OpenSMTPD prints an IPv6 source in brackets: `[::1] -> example.org`.
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
