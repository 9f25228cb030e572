"""Relay URLs, and the relay agent's state: relays, hosts, routes, connection limits, penalties, hoststats.

Vocabulary (OpenSMTPD's, which `show relays|hosts|routes|hoststats` print):
* a **relay** is where a group of envelopes goes: a destination domain (MX delivery) or a smarthost, with the
  options that change the session (port, TLS, auth label, helo, source table, client certificate, backup);
* a **host** is one remote address; a **source** is a local address we connect from (`[]` for any);
* a **route** is a (source, host) pair. Connection errors count against the route; after MAX_ERRORS_PER_ROUTE
  in a row the route is disabled for ROUTE_DELAY_BASE × penalty² seconds (at most ROUTE_DELAY_MAX), and
  `smtpctl resume route ID` enables it again. A success clears the errors and the penalty.
* **hoststats**: the last result seen per recipient domain (as OpenSMTPD keys them), kept 4 hours.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field

from shared.durations import duration_to_text
from shared.numbers import ascii_digits
from smtpd.stats import STATS, KeyGauge

MAX_ERRORS_PER_ROUTE = 4
ROUTE_DELAY_BASE = 200
ROUTE_DELAY_MAX = 4 * 3600
HOSTSTAT_EXPIRE = 4 * 3600
FORGET_AFTER = 3600  # an unused relay, route or host is forgotten after an hour
# The times of routes, hosts and relays (penalties, connection delays, forgetting) are on the monotonic clock:
# on the wall clock, set back a day, a route disabled for 200 s stayed disabled (no relaying) for a day.
clock = time.monotonic

# Limits of reference §10 that the agent enforces (others are accepted by the parser and ignored).
# Decision: the connection delays (conn-delay-*, reconn-delay-route) default to 0, not to OpenSMTPD's
# route 5 s / relay 2 s / reconnect 3 s: the connection limits already protect the remote, and the delays are
# what makes OpenSMTPD relay a queue 20 times slower (docs/relay.md). Configured values are honoured.
CONN_DELAY_KEYS = ("conn-delay-host", "conn-delay-route", "conn-delay-source", "conn-delay-connector",
                   "conn-delay-relay", "conn-delay-domain")
DEFAULT_LIMITS: dict[str, int] = {
    **{key: 0 for key in CONN_DELAY_KEYS},
    "reconn-delay-route": 0,
    "max-conn-per-host": 10,
    "max-conn-per-route": 5,
    "max-conn-per-source": 100,
    "max-conn-per-connector": 20,
    "max-conn-per-relay": 100,
    "max-conn-per-domain": 100,
    "session-mail-max": 100,
    "session-keepalive": 10,
    "max-failures-per-session": 25,
}

SCHEMES: dict[str, tuple[str, int | None]] = {
    # scheme -> (tls mode name, default port); lmtp has no default port: it must be given.
    "smtp": ("opportunistic", 25),
    "smtp+tls": ("starttls", 25),
    "smtp+notls": ("none", 25),
    "lmtp": ("none", None),
    "smtps": ("smtps", 465),
}


class RelayUrlError(ValueError):
    pass


@dataclass(frozen=True)
class RelayHost:
    """A parsed relay URL `[scheme://][label@]host[:port]`."""

    scheme: str
    host: str  # a name, or an address literal without brackets
    port: int
    label: str | None = None

    @property
    def lmtp(self) -> bool:
        return self.scheme == "lmtp"

    @property
    def unix_socket(self) -> bool:
        """`lmtp:///path`: the host is the path of a Unix socket (port 0)."""
        return self.host.startswith("/")

    @property
    def tls_mode(self) -> str:
        return SCHEMES[self.scheme][0]

    def __str__(self) -> str:
        if self.unix_socket:
            return f"{self.scheme}://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        label = f"{self.label}@" if self.label else ""
        return f"{self.scheme}://{label}{host}:{self.port}"


def parse_relay_url(url: str) -> RelayHost:
    text = url.strip()
    scheme = "smtp"
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise RelayUrlError(f"invalid relay URL {url!r}: unknown scheme {scheme!r}")
    if text.startswith("/"):
        return _unix_socket_url(url, scheme, text)
    label = None
    if "@" in text:
        label, _, text = text.rpartition("@")
        if not label:
            raise RelayUrlError(f"invalid relay URL {url!r}: empty label")
        if scheme not in ("smtp+tls", "smtps"):
            raise RelayUrlError(f"invalid relay URL {url!r}: a label needs smtp+tls:// or smtps://")
    port_text = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise RelayUrlError(f"invalid relay URL {url!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    host = host.strip().rstrip(".")
    if not host or "/" in host:
        raise RelayUrlError(f"invalid relay URL {url!r}: no host")
    default_port = SCHEMES[scheme][1]
    if port_text:
        if not ascii_digits(port_text) or not 0 < int(port_text) < 65536:
            raise RelayUrlError(f"invalid relay URL {url!r}: bad port {port_text!r}")
        port = int(port_text)
    elif default_port is None:
        raise RelayUrlError(f"invalid relay URL {url!r}: lmtp:// needs a port")
    else:
        port = default_port
    return RelayHost(scheme, host.lower(), port, label)


def _unix_socket_url(url: str, scheme: str, path: str) -> RelayHost:
    # Our extension (OpenSMTPD relays over TCP only): `lmtp:///run/dovecot/lmtp`, an LMTP server's Unix socket,
    # as the local LMTP servers (Dovecot, Cyrus) usually listen. TLS and AUTH make no sense there.
    if scheme != "lmtp":
        raise RelayUrlError(f"invalid relay URL {url!r}: only lmtp:// may name a Unix socket")
    if path.endswith("/") or "\0" in path or len(path.encode()) > 107:
        raise RelayUrlError(f"invalid relay URL {url!r}: bad socket path")
    return RelayHost(scheme, os.path.normpath(path), 0)


# -- state ------------------------------------------------------------------------------------------------
@dataclass
class Host:
    address: str
    name: str  # the name we reached it by (MX exchanger or relay host)
    ptr: str | None = None  # its reverse DNS name (show hosts), once looked up
    ptr_asked: bool = False
    refcount: int = 0
    nconn: int = 0
    lastconn: float = 0.0


def address_text(address: str) -> str:
    """An IP address in its one usual text, as inet_ntop prints it (`::1` for `0:0::1`, lowercase hex), so that
    the same address given two ways (relay `src`, `smtpctl pause mta from`) is one key; other text as it is."""
    body, mark, scope = address.partition("%")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, body)) + mark + scope
        except (OSError, ValueError):
            continue
    return address


def bracketed(address: str) -> str:
    """An IPv6 address in brackets (`[::1]`), as OpenSMTPD prints a source or a route's host; other text as it is."""
    return f"[{address}]" if ":" in address and not address.startswith("/") else address


@dataclass
class Route:
    id: int
    source: str | None  # None: the system picks the source address
    host: Host
    nconn: int = 0
    nerror: int = 0
    penalty: int = 0
    disabled_until: float = 0.0
    lastconn: float = 0.0
    new: bool = True
    idle: int = 0  # sessions kept open for the next message (K flag)
    lastdisc: float = 0.0  # when its last session ended (reconn-delay-route)

    @property
    def source_text(self) -> str:
        return self.source if self.source else "[]"

    def text(self) -> str:
        """As OpenSMTPD shows a route (`show routes`, its log): an IPv6 address in brackets, `[] <-> [::1]`."""
        host = self.host
        source = bracketed(self.source) if self.source else "[]"
        return f"{source} <-> {bracketed(host.address)} ({host.name})" if host.name else \
            f"{source} <-> {bracketed(host.address)}"

    def disabled(self, now: float) -> bool:
        return self.disabled_until > now


@dataclass
class RelayState:
    key: str  # `[relay:...]` text
    domain: str
    refcount: int = 0
    ntask: int = 0
    nconn: int = 0
    lastconn: float = 0.0


@dataclass
class HostStat:
    time: float  # wall clock, shown
    text: str
    seen: float = 0.0  # clock(), for its expiry


@dataclass
class MtaState:
    """Everything `show hosts|routes|relays|hoststats` reports, and the counters limits are checked on."""

    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    domain_limits: dict[str, dict[str, int]] = field(default_factory=dict)
    families: dict[str | None, str] = field(default_factory=dict)  # `mta limit [for domain D] inet4|inet6`
    hosts: dict[str, Host] = field(default_factory=dict)
    routes: dict[tuple[str | None, str], Route] = field(default_factory=dict)
    relays: dict[str, RelayState] = field(default_factory=dict)
    hoststats: dict[str, HostStat] = field(default_factory=dict)
    domain_conns: dict[str, int] = field(default_factory=dict)
    source_conns: dict[str, int] = field(default_factory=dict)  # source text ("[]": any) -> connections
    connector_conns: dict[tuple[str, str], int] = field(default_factory=dict)  # (relay key, source text)
    # the sources of the routes (None: the default one), as 6.8 counts them
    sources: KeyGauge = field(default_factory=lambda: KeyGauge("mta.source"))
    # when a connection was last opened per source / connector / domain (conn-delay-*)
    last_opened: dict[tuple[str, object], float] = field(default_factory=dict)
    paused: set[tuple[str, str]] = field(default_factory=set)  # (source, domain or "*")
    _next_route_id: int = 1
    _change: asyncio.Event | None = None

    def limit(self, name: str, domain: str | None = None) -> int:
        if domain is not None:
            for pattern, values in self.domain_limits.items():
                if pattern == domain.lower() and name in values:
                    return values[name]
        return self.limits.get(name, DEFAULT_LIMITS.get(name, 0))

    def family(self, domain: str) -> str | None:
        """The only address family to connect over for domain (inet4 or inet6), or None for both."""
        return self.families.get(domain.lower(), self.families.get(None))

    # -- registry --------------------------------------------------------------------------------------
    def host(self, address: str, name: str) -> Host:
        host = self.hosts.get(address)
        if host is None:
            host = self.hosts[address] = Host(address, name)
            STATS.increment("mta.host")
        elif name and not host.name:
            host.name = name
        return host

    def route(self, source: str | None, host: Host) -> Route:
        key = (source, host.address)
        route = self.routes.get(key)
        if route is None:
            route = self.routes[key] = Route(self._next_route_id, source, host)
            self._next_route_id += 1
            STATS.increment("mta.route")
            self.sources.add(source)
        return route

    def relay(self, key: str, domain: str) -> RelayState:
        relay = self.relays.get(key)
        if relay is None:
            relay = self.relays[key] = RelayState(key, domain)
            STATS.increment("mta.relay")
            STATS.increment("mta.domain")
        return relay

    # -- connection limits ---------------------------------------------------------------------------------
    def _has_room(self, route: Route, relay: RelayState, domain: str) -> bool:
        # A limit below 1 would stop relaying for good: at least one connection is always allowed.
        def room(name: str) -> int:
            return max(1, self.limit(name, domain))
        source = route.source_text
        return (route.nconn < room("max-conn-per-route") and route.host.nconn < room("max-conn-per-host")
                and relay.nconn < room("max-conn-per-relay")
                and self.domain_conns.get(domain, 0) < room("max-conn-per-domain")
                and self.source_conns.get(source, 0) < room("max-conn-per-source")
                and self.connector_conns.get((relay.key, source), 0) < room("max-conn-per-connector"))

    def connect_delay(self, route: Route, relay: RelayState, domain: str, now: float) -> float:
        """Seconds to wait before a new connection on this route (conn-delay-*, reconn-delay-route); 0: now."""
        source = route.source_text
        last_times = {
            "conn-delay-host": route.host.lastconn,
            "conn-delay-route": route.lastconn,
            "conn-delay-relay": relay.lastconn,
            "conn-delay-source": self.last_opened.get(("source", source), 0.0),
            "conn-delay-connector": self.last_opened.get(("connector", (relay.key, source)), 0.0),
            "conn-delay-domain": self.last_opened.get(("domain", domain), 0.0),
            "reconn-delay-route": route.lastdisc,
        }
        earliest = 0.0
        for name, last in last_times.items():
            delay = self.limit(name, domain)
            if last and delay > 0:
                earliest = max(earliest, last + delay)
        return max(0.0, earliest - now)

    def reserve(self, route: Route, relay: RelayState, domain: str) -> bool:
        """Take one connection's place on the route, host, relay and domain; False when one of them is full."""
        if not self._has_room(route, relay, domain):
            return False
        now = clock()
        source = route.source_text
        route.nconn += 1
        route.host.nconn += 1
        route.host.refcount += 1
        relay.nconn += 1
        self.domain_conns[domain] = self.domain_conns.get(domain, 0) + 1
        self.source_conns[source] = self.source_conns.get(source, 0) + 1
        self.connector_conns[(relay.key, source)] = self.connector_conns.get((relay.key, source), 0) + 1
        route.lastconn = route.host.lastconn = relay.lastconn = now
        self.last_opened[("source", source)] = self.last_opened[("domain", domain)] = now
        self.last_opened[("connector", (relay.key, source))] = now
        route.new = False
        return True

    def release(self, route: Route, relay: RelayState, domain: str) -> None:
        source = route.source_text
        route.nconn -= 1
        route.host.nconn -= 1
        route.host.refcount -= 1
        relay.nconn -= 1
        route.lastdisc = clock()
        self.domain_conns[domain] -= 1
        self.source_conns[source] -= 1
        self.connector_conns[(relay.key, source)] -= 1
        self.changed()

    def changed(self) -> None:
        """Wake whoever waits for a connection place or an idle session."""
        if self._change is not None:
            self._change.set()
            self._change = None

    async def wait_for_change(self, timeout: float) -> None:
        if self._change is None:
            self._change = asyncio.Event()
        try:
            await asyncio.wait_for(self._change.wait(), timeout)
        except TimeoutError:
            pass

    # -- errors and penalties ----------------------------------------------------------------------------
    def route_error(self, route: Route, now: float | None = None) -> bool:
        """Count a connection-level error. True when the route has just been disabled."""
        now = clock() if now is None else now
        route.nerror += 1
        if route.nerror < MAX_ERRORS_PER_ROUTE:
            return False
        route.penalty += 1
        route.nerror = 0
        route.disabled_until = now + min(ROUTE_DELAY_BASE * route.penalty ** 2, ROUTE_DELAY_MAX)
        return True

    def route_ok(self, route: Route) -> None:
        route.nerror = 0
        route.penalty = 0
        route.disabled_until = 0.0

    def resume_route_id(self, route_id: int) -> bool:
        for route in self.routes.values():
            if route.id == route_id:
                if not route.disabled(clock()) and not route.penalty and not route.nerror:
                    return False
                self.route_ok(route)
                return True
        return False

    def hoststat(self, name: str, text: str) -> None:
        if name:
            self.hoststats[name.lower()] = HostStat(time.time(), text.split("\n")[-1], clock())

    # -- forgetting ---------------------------------------------------------------------------------------
    def prune(self, now: float, idle_for: float = FORGET_AFTER) -> None:
        """Forget relays, routes and hosts unused for idle_for seconds (a busy daemon meets many domains).

        Routes with a penalty are kept until the penalty has expired, so that a failing host stays avoided."""
        for key, relay in list(self.relays.items()):
            if relay.refcount == 0 and relay.nconn == 0 and now - relay.lastconn > idle_for:
                del self.relays[key]
                STATS.decrement("mta.relay")
                STATS.decrement("mta.domain")
        for key, route in list(self.routes.items()):
            if route.nconn or route.idle or route.disabled(now) or now - route.lastconn <= idle_for:
                continue
            del self.routes[key]
            STATS.decrement("mta.route")
            self.sources.remove(route.source)
        used = {route.host.address for route in self.routes.values()}
        for address, host in list(self.hosts.items()):
            if address not in used and host.nconn == 0:
                del self.hosts[address]
                STATS.decrement("mta.host")
        for name, stat in list(self.hoststats.items()):
            if now - stat.seen > HOSTSTAT_EXPIRE:
                del self.hoststats[name]
        for counts in (self.source_conns, self.connector_conns, self.domain_conns):
            for key in [key for key, count in counts.items() if count == 0]:
                del counts[key]
        for key in [key for key, when in self.last_opened.items() if now - when > idle_for]:
            del self.last_opened[key]

    # -- show ------------------------------------------------------------------------------------------------
    def show_hosts(self, now: float) -> list[dict[str, object]]:
        rows = []
        for host in sorted(self.hosts.values(), key=lambda item: _address_key(item.address)):
            lastconn = duration_to_text(now - host.lastconn) if host.lastconn else "-"
            ptr = host.ptr or "-"
            line = f"{host.address} {ptr} refcount={host.refcount} nconn={host.nconn} lastconn={lastconn}"
            rows.append({"address": host.address, "ptr": ptr, "name": host.name, "refcount": host.refcount,
                         "nconn": host.nconn, "lastconn": lastconn, "line": line})
        return rows

    def show_routes(self, now: float) -> list[dict[str, object]]:
        rows = []
        for route in sorted(self.routes.values(), key=lambda item: item.id):
            disabled = route.disabled(now)
            flags = ("N" if route.new else "-") + ("D" if disabled else "-") + ("Q" if disabled else "-") + \
                ("K" if route.idle else "-")
            timeout = duration_to_text(route.disabled_until - now) if disabled else "-"
            line = (f"{route.id}. {route.text()} {flags} nconn={route.nconn} nerror={route.nerror} "
                    f"penalty={route.penalty} timeout={timeout}")
            rows.append({"id": route.id, "route": route.text(), "flags": flags, "nconn": route.nconn,
                         "nerror": route.nerror, "penalty": route.penalty, "timeout": timeout, "line": line})
        return rows

    def show_relays(self, now: float) -> list[dict[str, object]]:
        rows = []
        for relay in sorted(self.relays.values(), key=lambda item: item.key):
            lastconn = duration_to_text(now - relay.lastconn) if relay.lastconn else "-"
            line = (f"{relay.key} refcount={relay.refcount} ntask={relay.ntask} nconn={relay.nconn} "
                    f"lastconn={lastconn} timeout=- wait=")
            rows.append({"text": line, "relay": relay.key, "refcount": relay.refcount, "ntask": relay.ntask,
                         "nconn": relay.nconn, "lastconn": lastconn, "line": line})
        return rows

    def show_hoststats(self, now: float) -> list[dict[str, object]]:
        rows = []
        for name, stat in sorted(self.hoststats.items()):
            if now - stat.seen > HOSTSTAT_EXPIRE:
                continue
            line = f"{name}|{int(stat.time)}|{stat.text}"
            rows.append({"domain": name, "time": int(stat.time), "text": stat.text, "line": line})
        return rows

    def show_paused(self) -> list[dict[str, object]]:
        return [{"source": source, "domain": domain, "line": f"{bracketed(source)} -> {domain}"}
                for source, domain in sorted(self.paused)]


def _address_key(address: str) -> tuple[int, int]:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0)
    return (parsed.version, int(parsed))


