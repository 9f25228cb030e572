"""Finding where a domain's mail goes: MX records (RFC 5321 §5.1), implicit MX, null MX (RFC 7505).

All questions go to the resolver named by the SMTPD_RESOLVER setting ("host:port"), or to the system's
resolver configuration when it is unset. Tests always set it to a DNS server of their own on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from shared.paths import ENV_RESOLVER, RESOLV_CONF, parse_resolver_setting, read_system_resolver
from smtpd import trace

DNS_TIMEOUT = 10.0
NULL_MX_ESC = 110  # x.1.10, "Recipient address has null MX" (RFC 7505 3.2), as an envelope esc-code
PTR_TIMEOUT = 5.0  # a missing PTR only leaves `show hosts` with "-": do not wait long


class MxError(Exception):
    """No usable answer. ``permanent``: the domain cannot receive mail (bounce); otherwise retry later."""

    def __init__(self, message: str, permanent: bool, esc_code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.esc_code = esc_code  # the envelope's esc-code when not the usual one (5.1.2, 4.4.4)


@dataclass(frozen=True)
class MxHost:
    name: str  # the exchanger's host name (or the domain itself for an implicit MX)
    preference: int
    addresses: tuple[str, ...]  # IPv4 and IPv6 literals, in the order to try


class Resolver:
    """A thin asynchronous resolver over dnspython, configured from SMTPD_RESOLVER, else from resolv.conf."""

    def __init__(self, setting: str | None = None, resolv_conf: str = RESOLV_CONF) -> None:
        setting = os.environ.get(ENV_RESOLVER) if setting is None else setting
        self.setting = setting or ""
        self._resolv_conf = resolv_conf
        self._stamp: tuple[int, int, int] | None = None
        if self.setting:
            host, port = parse_resolver_setting(self.setting)
            self._dns = _with_timeouts(dns.asyncresolver.Resolver(configure=False))
            self._dns.nameservers = [host]
            self._dns.port = port
        else:
            self._dns = self._load_resolv_conf()

    @property
    def _resolver(self) -> dns.asyncresolver.Resolver:
        # resolv.conf is read again when it changes (a DHCP client, a local cache installed later), as libc and
        # OpenSMTPD do: a daemon running for months kept asking the servers it had at start.
        if not self.setting and _file_stamp(self._resolv_conf) != self._stamp:
            self._dns = self._load_resolv_conf()
        return self._dns

    def _load_resolv_conf(self) -> dns.asyncresolver.Resolver:
        self._stamp = _file_stamp(self._resolv_conf)
        resolver = dns.asyncresolver.Resolver(configure=False)
        read_system_resolver(resolver, self._resolv_conf)
        return _with_timeouts(resolver)

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """The exchangers of domain, in the order to try: by preference, random among equals."""
        domain = domain.rstrip(".").lower()
        if domain.startswith("["):
            literal = _literal_address(domain)
            if literal is not None:
                return [MxHost(domain, 0, (literal,))]
        # A bare address (`user@192.0.2.1`) is no address literal (RFC 5321 4.1.3 wants the brackets): it is asked
        # about as a name, as OpenSMTPD 6.8 and Postfix do, and does not exist; taking it as the address sent the
        # mail to whatever host the sender wrote without the brackets that say "this address, no DNS".
        try:
            answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise MxError("Domain does not exist", permanent=True) from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as error:
            raise MxError(f"Temporary failure in MX lookup: {error.__class__.__name__}", permanent=False) from None
        except dns.exception.DNSException as error:
            raise MxError(f"Invalid domain name: {error}", permanent=True) from None
        records = [(record.preference, record.exchange) for record in (answer.rrset or [])]
        if not records:
            return await self._implicit_mx(domain)
        if all(exchange == dns.name.root for _, exchange in records):
            # RFC 7505: a single "MX 0 ." says the domain accepts no mail at all.
            raise MxError("Domain does not accept mail (null MX)", permanent=True, esc_code=NULL_MX_ESC)
        # A "." published beside real exchangers (a zone in the middle of a change) is no exchanger: the others
        # are used, as OpenSMTPD does, rather than bouncing the mail.
        records = [(preference, exchange) for preference, exchange in records if exchange != dns.name.root]
        hosts = await self._resolve_exchangers(records)
        trace.emit("mta", f"mta: MX for {domain}: " +
                   ", ".join(f"{host.name} pref {host.preference} {list(host.addresses)}" for host in hosts),
                   domain=domain)
        if not any(host.addresses for host in hosts):
            raise MxError("No MX found for domain", permanent=False)
        return hosts

    async def _implicit_mx(self, domain: str) -> list[MxHost]:
        addresses = await self._dns_addresses(domain)
        if not addresses:
            raise MxError("No MX found for domain", permanent=False)
        trace.emit("mta", f"mta: no MX for {domain}, implicit MX {list(addresses)}", domain=domain)
        return [MxHost(domain, 0, addresses)]

    async def _resolve_exchangers(self, records: list[tuple[int, dns.name.Name]]) -> list[MxHost]:
        by_preference: dict[int, list[str]] = {}
        for preference, exchange in records:
            by_preference.setdefault(preference, []).append(exchange.to_text(omit_final_dot=True).lower())
        ordered: list[tuple[int, str]] = []
        for preference in sorted(by_preference):
            names = by_preference[preference]
            random.shuffle(names)
            ordered.extend((preference, name) for name in names)
        resolved = await asyncio.gather(*(self.addresses(name) for _, name in ordered), return_exceptions=True)
        failures = [answer for answer in resolved if isinstance(answer, BaseException)]
        if failures and len(failures) == len(resolved):
            raise failures[0] if isinstance(failures[0], MxError) else \
                MxError("Temporary failure in MX host lookup", permanent=False)
        return [MxHost(name, preference, () if isinstance(addresses, BaseException) else addresses)
                for (preference, name), addresses in zip(ordered, resolved, strict=True)]

    async def addresses(self, name: str) -> tuple[str, ...]:
        """A and AAAA addresses of a host name (IPv4 first). Empty when it has none; MxError on failure."""
        literal = _literal_address(name)
        if literal is not None:
            return (literal,)
        return await self._dns_addresses(name)

    async def _dns_addresses(self, name: str) -> tuple[str, ...]:
        """The A and AAAA addresses of name, which is taken as a name even when it reads as an address."""
        if not self.setting:
            return await _system_addresses(name)
        found: list[str] = []
        failure: dns.exception.DNSException | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return ()
            except dns.exception.DNSException as error:
                # One family failing does not hide the other's addresses (either way round): an IPv6-only
                # exchanger whose server fails A questions is still reachable.
                failure = error
                continue
            found.extend(record.address for record in (answer.rrset or []))
        if not found and failure is not None:
            raise MxError(f"Temporary failure in host lookup: {failure.__class__.__name__}", permanent=False)
        return tuple(found)

    async def ptr(self, address: str) -> str | None:
        """The host name a reverse (PTR) lookup gives for address, or None (no record, or no answer)."""
        try:
            name = dns.reversename.from_address(address)
            answer = await self._resolver.resolve(name, "PTR", raise_on_no_answer=False, lifetime=PTR_TIMEOUT)
        except (ValueError, dns.exception.DNSException):
            return None
        for record in answer.rrset or []:
            return record.target.to_text(omit_final_dot=True).lower()
        return None

    async def preference_of(self, domain: str, exchanger: str) -> int | None:
        """The preference of exchanger among domain's MX records (for `backup`), or None if absent."""
        try:
            answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except dns.exception.DNSException:
            return None
        wanted = exchanger.rstrip(".").lower()
        for record in answer.rrset or []:
            if record.exchange.to_text(omit_final_dot=True).lower() == wanted:
                return int(record.preference)
        return None


def _with_timeouts(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    resolver.lifetime = DNS_TIMEOUT
    resolver.timeout = DNS_TIMEOUT / 3
    return resolver


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


async def _system_addresses(name: str) -> tuple[str, ...]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return ()
        raise MxError(f"Temporary failure in host lookup: {error.strerror}", permanent=False) from None
    seen: list[str] = []
    for family, *_rest, sockaddr in infos:
        address = sockaddr[0]
        if address not in seen and family in (socket.AF_INET, socket.AF_INET6):
            seen.append(address)
    return tuple(sorted(seen, key=lambda address: ":" in address))


def _literal_address(name: str) -> str | None:
    """The IP address of an address literal (`[192.0.2.1]`, RFC 5321 `[IPv6:2001:db8::1]`, or a bare address),
    None for a host name."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
