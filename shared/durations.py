"""Durations as OpenSMTPD prints them (reference §2.4): `show stats` uptime.human, `show hosts`/`show routes`,
and the `delay=` of the delivery log lines. One place, so every output agrees."""

from __future__ import annotations


def duration_to_text(seconds: float) -> str:
    """`1d2h3s`: the non-zero parts of days, hours, minutes and seconds; `0s` for zero; `-` before a negative."""
    whole = int(seconds)
    sign = "-" if whole < 0 else ""
    whole = abs(whole)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if whole or not parts:
        parts.append(f"{whole}s")
    return sign + "".join(parts)
