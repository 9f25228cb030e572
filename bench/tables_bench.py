"""Lookup speed of file and db tables with 100,000 entries (prints figures; not a test).

    .venv/bin/python bench/tables_bench.py [--entries N]

For each backend: the load (file) or makemap (db) time, then the mean time of key lookups (hits and misses)
and of match questions answered through the index (domain, mailaddr, netaddr) and by a scan (regex).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpctl.commands.maps import makemap_main  # noqa: E402
from smtpd.config.model import Config, TableDecl  # noqa: E402
from smtpd.lookup.tables import Service, Tables  # noqa: E402


def timed(action: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        action()
    return (time.perf_counter() - start) / repeat


def build_sources(folder: Path, entries: int) -> dict[str, Path]:
    mapping = folder / "users"
    mapping.write_text("".join(f"user{index}@example{index % 500}.org  mailbox-{index}\n" for index in range(entries)))
    domains = folder / "domains"
    domains.write_text("".join(f"host{index}.example.org\n" for index in range(entries - 100))
                       + "".join(f"*.wild{index}.example.net\n" for index in range(100)))
    nets = folder / "nets"
    nets.write_text("# @list\n" + "".join(f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}\n"
                                          for index in range(entries - 100))
                    + "".join(f"172.{16 + index % 16}.{index}.0/24\n" for index in range(100)))
    regexes = folder / "regexes"
    regexes.write_text("".join(f"^bounce-{index}-[0-9]+@\n" for index in range(1000)))
    return {"users": mapping, "domains": domains, "nets": nets, "regexes": regexes}


def report(label: str, seconds: float) -> None:
    rate = 1 / seconds if seconds else float("inf")
    print(f"  {label:<44} {seconds * 1e6:10.1f} µs   {rate:12,.0f} /s")


def bench_backend(backend: str, sources: dict[str, Path], repeat: int) -> None:
    decls = {}
    for name, path in sources.items():
        if backend == "db":
            start = time.perf_counter()
            options = ["-t", "set"] if name != "users" else []
            makemap_main([*options, str(path)], "makemap")
            print(f"  makemap {name:<36} {time.perf_counter() - start:10.3f} s")
            decls[name] = TableDecl(name, "db", f"{path}.db")
        else:
            decls[name] = TableDecl(name, "file", str(path))
    start = time.perf_counter()
    tables = Tables(Config(path="bench.conf", tables=decls), mailname="mx.example.org", addresses=["127.0.0.1"])
    print(f"  open all tables{'':<29} {time.perf_counter() - start:10.3f} s")
    report("lookup ALIAS hit", timed(lambda: tables.lookup("users", Service.ALIAS, "user4242@example242.org"), repeat))
    report("lookup ALIAS miss", timed(lambda: tables.lookup("users", Service.ALIAS, "nobody@nowhere.test"), repeat))
    report("match MAILADDR hit (tagged)",
           timed(lambda: tables.match("users", Service.MAILADDR, "user77+x@example77.org"), repeat))
    report("match MAILADDR miss", timed(lambda: tables.match("users", Service.MAILADDR, "x@none.test"), repeat))
    report("match DOMAIN exact hit", timed(lambda: tables.match("domains", Service.DOMAIN, "host5.example.org"), repeat))
    report("match DOMAIN wildcard hit",
           timed(lambda: tables.match("domains", Service.DOMAIN, "mx.wild99.example.net"), repeat))
    report("match DOMAIN miss", timed(lambda: tables.match("domains", Service.DOMAIN, "else.test"), repeat))
    report("match NETADDR exact hit", timed(lambda: tables.match("nets", Service.NETADDR, "10.0.1.2"), repeat))
    report("match NETADDR CIDR hit", timed(lambda: tables.match("nets", Service.NETADDR, "172.31.99.7"), repeat))
    report("match NETADDR miss", timed(lambda: tables.match("nets", Service.NETADDR, "192.0.2.1"), repeat))
    report("match REGEX (1,000 patterns, miss)",
           timed(lambda: tables.match("regexes", Service.REGEX, "someone@example.org"), max(1, repeat // 20)))
    tables.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2000)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        sources = build_sources(Path(folder), arguments.entries)
        for backend in ("file", "db"):
            print(f"{backend} tables, {arguments.entries:,} entries")
            bench_backend(backend, sources, arguments.repeat)


if __name__ == "__main__":
    main()
