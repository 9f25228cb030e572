"""`smtpctl spf walk`: the addresses a domain's SPF record allows, for building allow lists.

Reads domain names from standard input, one per line, and prints every address or network their SPF records
name, following `include:` and `redirect=`, and resolving `a` and `mx` mechanisms. Each result is printed once.
Needs neither root nor the daemon. DNS questions go to SMTPD_RESOLVER (host:port) when it is set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from shared.paths import parse_resolver_setting, read_system_resolver
from smtpctl.words import Leaf, WordGroup

MAX_LOOKUPS = 50  # how many records one domain may pull in (loops and huge include trees end here)


@click.group(cls=WordGroup)
def spf() -> None:
    """SPF helpers.

    \b
    Example:
      echo example.org | smtpctl spf walk
    """


@spf.command("walk", cls=Leaf)
def walk() -> None:
    """Print the addresses and networks the SPF records of the domains on standard input allow.

    \b
    Example:
      printf 'gmail.com\\noutlook.com\\n' | smtpctl spf walk
    """
    resolver = _resolver()
    printed: set[str] = set()
    for line in sys.stdin:
        domain = line.strip().rstrip(".")
        if not domain or domain.startswith("#"):
            continue
        for network in SpfWalker(resolver).walk(domain):
            if network not in printed:
                printed.add(network)
                sys.stdout.write(network + "\n")
                sys.stdout.flush()


def _resolver() -> Any:
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    address = os.environ.get("SMTPD_RESOLVER")
    if not address:
        read_system_resolver(resolver)
    else:
        try:
            host, port = parse_resolver_setting(address)
        except ValueError as error:
            raise click.UsageError(f"SMTPD_RESOLVER={address}: {error}") from None
        resolver.nameservers = [host]
        resolver.port = port
    resolver.lifetime = 10.0
    return resolver


class SpfWalker:
    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.visited: set[str] = set()

    def walk(self, domain: str) -> Iterator[str]:
        domain = domain.lower()
        if domain in self.visited or len(self.visited) >= MAX_LOOKUPS:
            return
        self.visited.add(domain)
        for record in self._txt(domain):
            words = record.split()
            if not words or words[0].lower() != "v=spf1":
                continue
            for term in words[1:]:
                yield from self._term(domain, term)

    def _term(self, domain: str, term: str) -> Iterator[str]:
        mechanism = term.lstrip("+-~?").lower() if term[:1] in "+-~?" else term.lower()
        if term[:1] == "-" or term[:1] == "~":
            return  # addresses that fail or softfail are not allowed ones
        name, _, value = mechanism.partition(":")
        if "=" in name:
            key, _, target = mechanism.partition("=")
            if key == "redirect":
                yield from self.walk(target)
            return
        if name == "ip4" or name == "ip6":
            yield term.split(":", 1)[1]
        elif name == "include" and value:
            yield from self.walk(value)
        elif name.split("/")[0] in ("a", "mx"):
            target, prefix = _split_prefix(value or domain, name)
            hosts = [target] if name.startswith("a") else self._mx(target)
            for host in hosts:
                for address, family in self._addresses(host):
                    yield address + _prefix_for(prefix, family)

    def _query(self, name: str, kind: str) -> list[Any]:
        import dns.exception
        import dns.resolver

        try:
            return list(self.resolver.resolve(name, kind))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.Timeout, dns.name.EmptyLabel):
            return []

    def _txt(self, domain: str) -> list[str]:
        return [b"".join(answer.strings).decode(errors="replace") for answer in self._query(domain, "TXT")]

    def _mx(self, domain: str) -> list[str]:
        return [str(answer.exchange).rstrip(".") for answer in self._query(domain, "MX")]

    def _addresses(self, host: str) -> Iterator[tuple[str, int]]:
        for kind, family in (("A", 4), ("AAAA", 6)):
            for answer in self._query(host, kind):
                yield answer.address, family


def _split_prefix(value: str, name: str) -> tuple[str, str]:
    """`a:host/24//64` or `a/24`: the host and the prefix part ("/24//64"), if any."""
    text = value
    prefix = ""
    if "/" in name:
        prefix = name[name.index("/"):]
    elif "/" in text:
        text, prefix = text[:text.index("/")], text[text.index("/"):]
    return text, prefix


def _prefix_for(prefix: str, family: int) -> str:
    if not prefix:
        return ""
    four, _, six = prefix.lstrip("/").partition("//")
    chosen = four if family == 4 else six
    return f"/{chosen}" if chosen else ""
