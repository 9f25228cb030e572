"""Resolving a `listen on TARGET` to addresses, in OpenSMTPD's order (reference §3.4).

Interface name, then IPv4 literal, IPv6 literal, then a host name (`localhost` gives 127.0.0.1 and ::1).
Interface addresses come from getifaddrs(3) through ctypes, the only source with every address of every
interface (the socket module offers names only).

Host names go to the system resolver (getaddrinfo), like OpenSMTPD's, unless SMTPD_RESOLVER names a DNS
server ("host:port"): then /etc/hosts is read first and the rest is asked of that server only, so tests
never send DNS questions anywhere else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ipaddress
import os
import socket

from shared.paths import ENV_RESOLVER, parse_resolver_setting

HOSTS_FILE = "/etc/hosts"
DNS_TIMEOUT = 3.0

INET4 = "inet4"
INET6 = "inet6"


class _SockAddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _SockAddrIn6(ctypes.Structure):
    _fields_ = [("sin6_family", ctypes.c_ushort), ("sin6_port", ctypes.c_uint16),
                ("sin6_flowinfo", ctypes.c_uint32), ("sin6_addr", ctypes.c_ubyte * 16),
                ("sin6_scope_id", ctypes.c_uint32)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_IfAddrs)), ("ifa_name", ctypes.c_char_p), ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_SockAddr)), ("ifa_netmask", ctypes.POINTER(_SockAddr)),
    ("ifa_ifu", ctypes.POINTER(_SockAddr)), ("ifa_data", ctypes.c_void_p),
]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library is slow: it runs ldconfig)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def interface_addresses() -> dict[str, list[str]]:
    """Every interface's IPv4 and IPv6 addresses, by interface name (empty if getifaddrs is unavailable)."""
    result: dict[str, list[str]] = {}
    libc = _libc()
    if libc is None:
        return result
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return result
    try:
        node = head
        while node:
            entry = node.contents
            name = (entry.ifa_name or b"").decode(errors="replace")
            address = _address_of(entry.ifa_addr)
            if address is not None:
                result.setdefault(name, []).append(address)
            else:
                result.setdefault(name, [])
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return result


def _address_of(pointer: ctypes._Pointer) -> str | None:  # type: ignore[type-arg]
    if not pointer:
        return None
    family = pointer.contents.sa_family
    if family == socket.AF_INET:
        raw = bytes(pointer.contents.sa_data[2:6])
        return socket.inet_ntop(socket.AF_INET, raw)
    if family == socket.AF_INET6:
        six = ctypes.cast(pointer, ctypes.POINTER(_SockAddrIn6)).contents
        return socket.inet_ntop(socket.AF_INET6, bytes(six.sin6_addr))
    return None


def _family_of(address: str) -> str:
    return INET6 if ":" in address else INET4


def _literal(target: str, family_wanted: str) -> str | None:
    try:
        if family_wanted == INET4:
            socket.inet_pton(socket.AF_INET, target)
        else:
            socket.inet_pton(socket.AF_INET6, target)
    except (OSError, ValueError):
        return None
    return str(ipaddress.ip_address(target))


def resolve_listen_target(target: str, family: str | None) -> list[str]:
    """The addresses `listen on TARGET [inet4|inet6]` binds, or [] when TARGET is nothing known."""
    return resolve_listen_target_checked(target, family)[0]


def resolve_listen_target_checked(target: str, family: str | None) -> tuple[list[str], str | None]:
    """Addresses, and OpenSMTPD's `warn: host_dns: could not parse ...` line when the resolver refuses the
    question outright (e.g. `listen on ::1 inet4`): then OpenSMTPD makes no listener and goes on."""
    interfaces = interface_addresses()
    if target in interfaces:
        addresses = [_scoped(a, target) for a in interfaces[target] if family is None or _family_of(a) == family]
        if addresses:
            return addresses, None
    for wanted in (INET4, INET6):
        literal = _literal(target, wanted)
        if literal is None:
            continue
        if family in (None, wanted):
            return [literal], None
        return [], f'warn: host_dns: could not parse "{target}": Address family for hostname not supported'
    return _resolve_host(target, family)


def _resolve_host(target: str, family: str | None) -> tuple[list[str], str | None]:
    setting = os.environ.get(ENV_RESOLVER)
    if setting:
        return _numeric_scoped(target, family) or _hosts_file(target, family) or \
            _ask_resolver(target, family, setting), None
    socket_family = {None: socket.AF_UNSPEC, INET4: socket.AF_INET, INET6: socket.AF_INET6}[family]
    try:
        infos = socket.getaddrinfo(target, None, socket_family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
    except socket.gaierror as error:
        quiet = {getattr(socket, name, None) for name in ("EAI_AGAIN", "EAI_NODATA", "EAI_NONAME")}
        if error.errno in quiet:
            return [], None
        return [], f'warn: host_dns: could not parse "{target}": {error.strerror}'
    except (OSError, UnicodeError, ValueError):
        return [], None
    addresses: list[str] = []
    for info in infos:
        if info[0] not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(info[4][0]).split("%")[0]
        if info[0] == socket.AF_INET6 and info[4][3]:  # a link-local address names its interface (`%eth0`)
            address = _scoped(address, _interface_name(info[4][3]))
        if address not in addresses:
            addresses.append(address)
    return addresses, None


def _scoped(address: str, interface: str | None) -> str:
    """A link-local IPv6 address with its interface (`fe80::1%eth0`): without it the kernel cannot bind it.
    Other addresses are returned as they are."""
    if not interface or "%" in address:
        return address
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    return f"{address}%{interface}" if parsed.version == 6 and parsed.is_link_local else address


def _interface_name(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def _numeric_scoped(target: str, family: str | None) -> list[str]:
    """A scoped IPv6 literal (`fe80::1%eth0`): numeric, so no resolver is asked, as getaddrinfo treats it."""
    if "%" not in target or family == INET4:
        return []
    try:
        infos = socket.getaddrinfo(target, None, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return []
    return [_scoped(str(infos[0][4][0]).split("%")[0], _interface_name(infos[0][4][3]))] if infos else []


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _hosts_file(target: str, family: str | None) -> list[str]:
    addresses: list[str] = []
    try:
        with open(HOSTS_FILE, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return addresses
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2 or target.lower() not in (word.lower() for word in words[1:]):
            continue
        address = words[0].split("%")[0]
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            continue
        if family is not None and _family_of(str(parsed)) != family:
            continue
        if str(parsed) not in addresses:
            addresses.append(str(parsed))
    return addresses


def _ask_resolver(target: str, family: str | None, setting: str) -> list[str]:
    import dns.exception
    import dns.resolver

    try:
        host, port = parse_resolver_setting(setting)
    except ValueError:
        return []
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = DNS_TIMEOUT
    addresses: list[str] = []
    kinds = [kind for kind, wanted in (("A", INET4), ("AAAA", INET6)) if family in (None, wanted)]
    for kind in kinds:
        try:
            answer = resolver.resolve(target, kind, raise_on_no_answer=False, search=False)
        except (dns.exception.DNSException, ValueError):
            continue
        addresses += [record.to_text() for record in (answer.rrset or [])]
    return addresses
