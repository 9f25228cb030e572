"""Helpers for the tables tests: configs with hand-made table declarations, and a trace recorder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from smtpd import trace
from smtpd.config.model import Config, Location, SmtpOptions, TableDecl, TableShape
from smtpd.lookup.tables import Tables


def file_decl(name: str, path: Path | str, backend: str = "file", line: int = 1) -> TableDecl:
    return TableDecl(name, backend, str(path), location=Location("smtpd.conf", line))


def inline_list(name: str, *items: str) -> TableDecl:
    return TableDecl(name, "file", None, TableShape.LIST, items=items, inline=True)


def inline_map(name: str, **pairs: str) -> TableDecl:
    return TableDecl(name, "file", None, TableShape.MAPPING, mapping=tuple(pairs.items()), inline=True)


def config_with(*decls: TableDecl, delimiter: str = "+", **fields: object) -> Config:
    return Config(path="smtpd.conf", tables={decl.name: decl for decl in decls},
                  smtp=SmtpOptions(sub_addr_delim=delimiter), **fields)  # type: ignore[arg-type]


def tables_with(*decls: TableDecl, delimiter: str = "+") -> Tables:
    return Tables(config_with(*decls, delimiter=delimiter), mailname="mx.example.org",
                  addresses=["127.0.0.1", "192.0.2.7", "::1"])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def recorded_lookups() -> Iterator[list[str]]:
    """The `lookup` trace lines emitted inside the block, as `smtpd -T lookup` prints them."""
    subscription = trace.BUS.subscribe(["lookup", "table"], capacity=100_000)
    lines: list[str] = []
    try:
        yield lines
    finally:
        events, _ = subscription.drain()
        lines.extend(event.to_line() for event in events)
        subscription.close()
