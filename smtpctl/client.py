"""The control socket's client: one request, one reply (or a stream of events), as shared/protocol.py says.

Kept free of Click, rich and typing so that `smtpctl show status` starts fast.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

from shared import wire as protocol

NOT_RUNNING = "smtpd doesn't seem to be running"
INCOMPATIBLE = "incompatible smtpd and smtpctl"
CLOSED = "connection closed by smtpd"  # it took the request, then went away (stopped, crashed) without an answer
NO_ANSWER = "no answer from smtpd"  # it took the request and said nothing for DEFAULT_TIMEOUT seconds (hung)
DEFAULT_TIMEOUT = 120.0  # reload and explain may take a while; a stream has no timeout


class ControlError(Exception):
    """The daemon answered with an error (code from shared.protocol.ErrorCode)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DaemonNotRunning(ControlError):
    def __init__(self) -> None:
        super().__init__("not-running", NOT_RUNNING)


class Client:
    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._socket: socket.socket | None = None
        self._buffer = bytearray()  # bytes read past the last reply line
        self._next_id = 1

    # -- connection -----------------------------------------------------------------------------------
    def connect(self) -> socket.socket:
        if self._socket is None:
            deadline = time.monotonic() + (self.timeout or 0)
            while True:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.settimeout(self.timeout)
                try:
                    connection.connect(self.socket_path)
                    break
                except BlockingIOError:
                    # EAGAIN: the daemon's backlog of connections not yet accepted is full. It is busy, not
                    # down: try again until the timeout (or a busy daemon reads as "not running").
                    connection.close()
                    if time.monotonic() >= deadline:
                        raise DaemonNotRunning() from None
                    time.sleep(0.02)
                except OSError:
                    connection.close()
                    raise DaemonNotRunning() from None
            self._socket = connection
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def detach(self) -> tuple[socket.socket, bytes]:
        """Give up the socket (after `enqueue`, the connection speaks SMTP) with the bytes already read past
        the last reply (the start of the SMTP greeting, typically)."""
        connection = self.connect()
        pending, self._buffer = bytes(self._buffer), bytearray()
        self._socket = None
        return connection, pending

    # -- requests -------------------------------------------------------------------------------------
    def send(self, command: str, **args: object) -> int:
        request_id = self._next_id
        self._next_id += 1
        try:
            self.connect().sendall(protocol.encode(protocol.request(request_id, command, **args)))
        except OSError:
            self.close()
            raise DaemonNotRunning() from None
        return request_id

    def call(self, command: str, **args: object) -> object:
        """Run one command and return its result; raises ControlError (DaemonNotRunning if no daemon)."""
        request_id = self.send(command, **args)
        while True:
            message = self._receive()
            if message.get("id") not in (request_id, None):
                continue
            if "event" in message:
                continue
            return _result(message)

    def stream(self, command: str, **args: object) -> Iterator[dict[str, object]]:
        """Yield a streaming command's events until it ends (its final reply); a daemon that goes away first
        (stopped, crashed) raises ControlError (code `closed`): the stream was cut, not finished."""
        request_id = self.send(command, **args)
        if self._socket is not None:
            self._socket.settimeout(None)
        while True:
            message = self._receive()
            if message.get("id") not in (request_id, None):
                continue
            if "event" in message:
                event = message["event"]
                if isinstance(event, dict):
                    yield event
                continue
            _result(message)
            return

    def _receive(self) -> dict[str, object]:
        connection = self.connect()
        # Linear in the reply's size: only the new bytes are searched, the bytearray grows in place (a reply
        # with 50,000 envelopes is many megabytes, read 64 KiB at a time).
        end = self._buffer.find(b"\n")
        while end < 0:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                raise ControlError("timeout", NO_ANSWER) from None
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                raise ControlError("closed", CLOSED)
            searched = len(self._buffer)
            self._buffer += chunk
            end = self._buffer.find(b"\n", searched)
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # (not JSON, not UTF-8, or nested deeper than the parser goes)
            raise ControlError("version-mismatch", INCOMPATIBLE) from None
        if not isinstance(message, dict) or message.get("v") != protocol.PROTOCOL_VERSION:
            raise ControlError("version-mismatch", INCOMPATIBLE)
        return message


def _result(message: dict[str, object]) -> object:
    if message.get("ok"):
        return message.get("result")
    error = message.get("error") or {}
    if not isinstance(error, dict):
        raise ControlError("version-mismatch", INCOMPATIBLE)
    code = str(error.get("code", "failed"))
    if code == "version-mismatch":
        raise ControlError(code, INCOMPATIBLE)
    raise ControlError(code, str(error.get("message", "command failed")))
