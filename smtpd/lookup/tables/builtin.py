"""The built-in tables every configuration has (reference §3.2).

`<localhost>`: `local` and every interface address; `<anyhost>`: `local`, `0.0.0.0/0`, `::/0`;
`<localnames>`: `localhost`, the server name, and every interface address bare and in brackets;
`<anydestination>`: `*`; `<getpwnam>`: the system user database.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from smtpd.lookup.tables.base import TableBackend
from smtpd.lookup.tables.passwd import GetpwnamTable
from smtpd.lookup.tables.static import InlineTable, content_from_items

BUILTIN_NAMES = ("localhost", "anyhost", "localnames", "anydestination", "getpwnam")


def local_addresses() -> list[str]:
    """Every address of every interface (through the config parser's getifaddrs reader)."""
    try:
        from smtpd.config.interfaces import interface_addresses
    except ImportError:
        return ["127.0.0.1", "::1"]
    addresses: list[str] = []
    for per_interface in interface_addresses().values():
        addresses.extend(per_interface)
    return list(dict.fromkeys(addresses)) or ["127.0.0.1", "::1"]


def _bracketed(address: str) -> list[str]:
    try:
        version = ipaddress.ip_address(address.split("%", 1)[0]).version
    except ValueError:
        return [f"[{address}]"]
    if version == 6:
        return [f"[{address}]", f"[ipv6:{address}]"]
    return [f"[{address}]"]


def builtin_table(name: str, mailname: str, addresses: Iterable[str], delimiter: str = "+") -> TableBackend:
    addresses = list(addresses)
    if name == "getpwnam":
        return GetpwnamTable(name)
    if name == "localhost":
        items = ["local", *addresses]
    elif name == "anyhost":
        items = ["local", "0.0.0.0/0", "::/0"]
    elif name == "localnames":
        items = ["localhost", mailname]
        for address in addresses:
            items += [address, *_bracketed(address)]
    elif name == "anydestination":
        items = ["*"]
    else:
        raise KeyError(name)
    return InlineTable(name, content_from_items(items), delimiter)
