"""The byte pipe under an SMTP session: what it reads lands in the session's own buffer, what it writes goes out.

Two kinds behind one small Protocol: ``SocketConnection``, an asyncio protocol on a socket (an accepted one; the
relay's client connects with it too) whose received bytes are appended straight to the session's buffer (no
stream buffer in between, no copy out of it, no future per read unless the session has to wait), and
``StreamConnection``, the same face over an existing reader/writer pair (sendmail's session through the control
socket).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Protocol

# Unconsumed input beyond this stops reading from the socket (a client pipelining without end); below half of it
# reading resumes.
HIGH_WATER = 1 << 20
STREAM_READ_SIZE = 256 * 1024
# Replies held for a pipelined group (see SocketConnection.write) beyond this go out at once: a client that
# pipelines thousands of commands gets its replies as they come, and the transport's flow control applies.
HELD_MAX = 16 * 1024


class Connection(Protocol):
    buffer: bytearray  # received, not yet consumed by the session (the session consumes from the front)

    async def receive(self) -> int:
        """Wait until more bytes are in ``buffer``; how many came (0: the client closed its side)."""
        ...

    def write(self, data: bytes, hold: bool = False) -> None:
        """Send data. ``hold``: more replies follow at once (pipelined commands wait in ``buffer``), so the data
        may be kept back and sent with them, at the latest by the next write without ``hold``, ``receive()``,
        ``drain()``, ``start_tls()`` or ``close()``."""
        ...

    def pending_output(self) -> int:
        """Bytes written but not yet taken by the kernel (held ones included)."""
        ...

    def unread(self) -> int:
        """Bytes read from the socket that are not in ``buffer`` yet."""
        ...

    async def drain(self) -> None: ...

    def pause_reading(self) -> None: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool:
        """The client is gone (or closed its side): replies can no longer reach it."""
        ...

    async def wait_closed(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None: ...


class SocketConnection(asyncio.Protocol):
    """An accepted TCP connection, read straight into ``buffer``."""

    def __init__(self, on_made: Callable[[SocketConnection], None] | None = None) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.on_made = on_made
        self._loop = asyncio.get_running_loop()
        self._reader: asyncio.Future[None] | None = None  # the session waiting for input
        self._received = 0  # bytes that came since the session last asked
        self._eof = False
        self._lost_error: BaseException | None = None
        self._lost = False
        self._reading_paused = False  # by us, for HIGH_WATER
        self._writing_paused = False  # by the transport: its buffer is full
        self._drainers: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # Replies to pipelined commands, sent together with the last of their group (see write): one segment and
        # one send for the group, as RFC 2920 allows, where each reply on its own would cost a send.
        self._held: list[bytes] = []
        self._held_bytes = 0

    # -- the transport's side -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        on_made, self.on_made = self.on_made, None  # (called once; not kept: it refers to the session)
        if on_made is not None:
            on_made(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._received += len(data)
        if len(self.buffer) > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # close the transport: SMTP has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost, self._eof, self._lost_error = True, True, exc
        self._wake_reader()
        drainers, self._drainers = self._drainers, []
        for drainer in drainers:
            if not drainer.done():
                drainer.set_exception(ConnectionResetError("Connection lost"))
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drainers, self._drainers = self._drainers, []
        for drainer in drainers:
            if not drainer.done():
                drainer.set_result(None)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- the session's side -------------------------------------------------------------------------------
    async def receive(self) -> int:
        if self._held:
            self._send_held()
        if self._reading_paused and len(self.buffer) <= HIGH_WATER // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if not self._received and not self._eof:
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        received, self._received = self._received, 0
        if not received and self._lost_error is not None:
            raise self._lost_error
        return received

    def write(self, data: bytes, hold: bool = False) -> None:
        assert self.transport is not None
        if hold and self._held_bytes + len(data) <= HELD_MAX:
            self._held.append(data)
            self._held_bytes += len(data)
        elif self._held:
            self._held.append(data)
            self._send_held()
        else:
            self.transport.write(data)

    def _send_held(self) -> None:
        data = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if self.transport is not None:
            self.transport.write(data)

    def pending_output(self) -> int:
        return self._held_bytes + (self.transport.get_write_buffer_size() if self.transport is not None else 0)

    def unread(self) -> int:
        return 0  # everything received is in buffer at once

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if self._held:
            self._send_held()
        if not self._writing_paused:
            return
        drainer: asyncio.Future[None] = self._loop.create_future()
        self._drainers.append(drainer)
        await drainer

    def pause_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.pause_reading()

    def close(self) -> None:
        if self._held and not self._lost:
            self._send_held()  # (the transport sends what it holds before it closes)
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport is not None else default

    @property
    def closed(self) -> bool:
        """The peer closed or the connection is lost or closing: nothing more can be said on it."""
        return self._lost or self._eof or self.transport is None or self.transport.is_closing()

    async def start_tls(self, context: ssl.SSLContext, timeout: float, server_hostname: str | None = None,
                        server_side: bool = True) -> None:
        """Switch to TLS, as the server unless ``server_side`` is False (the relay's client, which checks the
        certificate against ``server_hostname``). The caller has paused reading or knows that nothing more
        comes before the handshake, and has checked or emptied ``buffer``: plaintext must not pass as TLS."""
        assert self.transport is not None
        if self._held:
            self._send_held()  # plaintext replies go out before the handshake
        transport = await self._loop.start_tls(self.transport, self, context, server_side=server_side,
                                               server_hostname=None if server_side else server_hostname,
                                               ssl_handshake_timeout=timeout)
        if transport is None:  # the connection went away during the handshake
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = transport  # type: ignore[assignment]


class StreamConnection:
    """The Connection face over an asyncio reader/writer pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.buffer = bytearray()
        self.reader = reader
        self.writer = writer

    async def receive(self) -> int:
        data = await self.reader.read(STREAM_READ_SIZE)
        self.buffer += data
        return len(data)

    def write(self, data: bytes, hold: bool = False) -> None:
        # Never held: local submissions come through a Unix socket (no segments, no Nagle delay) and seldom
        # pipeline.
        self.writer.write(data)

    def pending_output(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    def pause_reading(self) -> None:
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        await self.writer.wait_closed()

    @property
    def closed(self) -> bool:
        return self.writer.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.writer.get_extra_info(name, default)

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        await self.writer.start_tls(context, ssl_handshake_timeout=timeout)

    def unread(self) -> int:
        # A StreamReader shows no public count of what it holds. Only local submissions come this way: they cannot
        # STARTTLS, and a local client that speaks before the banner is served, not answered 503.
        return 0
