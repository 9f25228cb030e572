"""Reading a PROXY protocol header (v1 or v2) from a raw socket, exactly.

A stream reader would read the socket in large blocks and keep whatever followed the header; for an `smtps`
listener that is the client's TLS ClientHello, which must reach the TLS layer. So the header is read here from
the socket itself, to its last byte and no further: v2 announces its length in its first 16 bytes, v1 is a
line of at most 107 bytes read a byte at a time. Parsing is aiosmtpd's (`aiosmtpd.proxy_protocol.get_proxy`),
fed with exactly those bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from typing import Any

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the protocol's longest v1 line, CRLF included
V2_FIXED = 16
V2_LOCAL = 0  # the v2 command byte's low nibble: LOCAL (the proxy's own connection), PROXY is 1
AIOSMTPD_LOGGER = "mail.debug"  # aiosmtpd.proxy_protocol's
AF_UNSPEC, AF_UNIX = 0, 3  # the v2 address family nibble; v1's UNKNOWN is AF_UNSPEC too


class ProxyHeaderError(Exception):
    pass


async def _exactly(connection: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(connection, size - len(data))
        if not chunk:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        data += chunk
    return data


async def read_bytes(connection: socket.socket) -> bytes:
    """The header's bytes, nothing after them (the socket must be non-blocking)."""
    start = await _exactly(connection, len(V1_PREFIX))
    if start == V1_PREFIX:
        line = start
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 line too long")
            line += await _exactly(connection, 1)
        return line
    if not V2_SIGNATURE.startswith(start):
        raise ProxyHeaderError("no PROXY header")
    fixed = start + await _exactly(connection, V2_FIXED - len(start))
    if not fixed.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("no PROXY header")
    (length,) = struct.unpack("!H", fixed[14:16])
    return fixed + await _exactly(connection, length)


async def read(connection: socket.socket) -> Any:
    """Read and parse the header; returns aiosmtpd's ProxyData, which either gives the client's address
    (``source``) or says the connection's own endpoints are the ones to use."""
    from aiosmtpd.proxy_protocol import get_proxy

    # aiosmtpd tells of a bad header on its own logger ("PROXY error: ..."): a second, unformatted line (Python's
    # last-resort handler writes it to stderr) for what our `connection dropped: bad PROXY header` line says.
    logging.getLogger(AIOSMTPD_LOGGER).disabled = True
    header = await read_bytes(connection)
    reader = asyncio.StreamReader()
    reader.feed_data(header)
    reader.feed_eof()
    try:
        data = await get_proxy(reader)
    except (asyncio.IncompleteReadError, ValueError) as error:
        raise ProxyHeaderError(f"malformed PROXY header: {error}") from None
    if not data.valid:
        raise ProxyHeaderError(f"malformed PROXY header: {data.error or 'invalid'}")
    if source(data) is None and not _real_endpoints(data):
        raise ProxyHeaderError("malformed PROXY header: no source address")
    return data


def source(data: Any) -> tuple[str, int] | None:
    """The client's address and port as the proxy names them; None: the connection's own endpoints apply."""
    address = data.src_addr
    if _real_endpoints(data) or not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A proxy on a dual-stack socket (HAProxy's `bind :::25 v4v6`) names its IPv4 clients `::ffff:a.b.c.d`
        # in a TCP6 header: the client is that IPv4 address, for the rules (`from src 192.0.2.0/24`), the
        # reverse DNS and Received, as Postfix takes it too.
        address = address.ipv4_mapped
    return str(address), int(data.src_port or 0)


def _real_endpoints(data: Any) -> bool:
    """Headers that carry no client address to use (the spec: take the connection's own endpoints): a v2 LOCAL
    command (the proxy's own connection, e.g. HAProxy's health checks; OpenSMTPD 6.8 serves it with the real
    address), a v2 client of a Unix socket, a v1 `PROXY UNKNOWN`."""
    if data.version == 2:
        return data.command == V2_LOCAL or data.family == AF_UNIX
    return data.family == AF_UNSPEC
