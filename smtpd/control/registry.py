"""Daemon-side handlers of control commands, registered by name (names and privileges: shared/protocol.py).

A module of the daemon registers its commands with ``@command("show.queue")``; the handler receives the running
Daemon and the request's args and returns a JSON-able result, or raises ControlFailure. Streaming commands
register with ``@stream(...)`` and receive an async ``send(event_dict)`` callable as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shared.protocol import COMMANDS, ErrorCode

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

Handler = Callable[["Daemon", dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[["Daemon", dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[Any]]

HANDLERS: dict[str, Handler] = {}
STREAM_HANDLERS: dict[str, StreamHandler] = {}


class ControlFailure(Exception):
    """The command ran and failed (smtpctl prints `command failed`, or the message)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def command(name: str) -> Callable[[Handler], Handler]:
    if name not in COMMANDS:
        raise KeyError(f"{name} is not in shared.protocol.COMMANDS")

    def register(handler: Handler) -> Handler:
        HANDLERS[name] = handler
        return handler

    return register


def stream(name: str) -> Callable[[StreamHandler], StreamHandler]:
    if name not in COMMANDS or not COMMANDS[name].streams:
        raise KeyError(f"{name} is not a streaming command in shared.protocol.COMMANDS")

    def register(handler: StreamHandler) -> StreamHandler:
        STREAM_HANDLERS[name] = handler
        return handler

    return register
