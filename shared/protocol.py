"""The control API spoken between smtpctl and smtpd over the Unix socket.

Newline-delimited JSON. One request per line:

    {"v": 1, "id": 7, "cmd": "show.queue", "args": {"msgid": "0a1b2c3d"}}

One reply per request, with the same id:

    {"v": 1, "id": 7, "ok": true, "result": ...}
    {"v": 1, "id": 7, "ok": false, "error": {"code": "forbidden", "message": "..."}}

A streaming command (trace.follow, monitor) first sends events, then (when it ends) its reply:

    {"v": 1, "id": 7, "event": {...}}

Consumers ignore fields they do not know. docs/control-api.md is the full schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared.wire import PROTOCOL_VERSION, SURROGATE, encode, request  # noqa: F401 — re-exported, defined there for speed

MAX_REQUEST_BYTES = 65536  # a longer line is an error for that connection only


# Keywords `smtpctl trace`/`untrace` accept: the reference's, plus the table and queue subsystems our daemon
# also traces, and the spellings smtpd -T accepts.
TRACE_KEYWORDS: tuple[str, ...] = (
    "imsg", "io", "smtp", "filters", "mta", "bounce", "scheduler", "lookup", "stat", "rules", "mproc",
    "expand", "all", "table", "queue", "transfer", "bounces", "stats", "tables",
)
PROFILE_KEYWORDS: tuple[str, ...] = ("imsg", "queue")


class Privilege(StrEnum):
    OPEN = "open"  # anyone who can reach the socket (e.g. sendmail's enqueue)
    READ = "read"  # root, the daemon's user, or members of the configured control group
    WRITE = "write"  # root or the daemon's user


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad-request"
    TOO_LARGE = "too-large"
    VERSION = "version-mismatch"
    UNKNOWN_COMMAND = "unknown-command"
    FORBIDDEN = "forbidden"
    FAILED = "failed"
    NOT_FOUND = "not-found"
    TIMEOUT = "timeout"
    BUSY = "busy"


@dataclass(frozen=True)
class CommandSpec:
    name: str
    privilege: Privilege
    streams: bool = False
    changes_state: bool = False


def _spec(name: str, privilege: Privilege, streams: bool = False) -> CommandSpec:
    return CommandSpec(name, privilege, streams, changes_state=privilege is Privilege.WRITE)


_R, _W, _O = Privilege.READ, Privilege.WRITE, Privilege.OPEN

COMMANDS: dict[str, CommandSpec] = {spec.name: spec for spec in (
    _spec("hello", _O),
    _spec("show.status", _R),
    _spec("show.stats", _R),
    _spec("show.queue", _R),
    _spec("show.hosts", _R),
    _spec("show.routes", _R),
    _spec("show.relays", _R),
    _spec("show.hoststats", _R),
    _spec("show.mta.paused", _R),
    _spec("monitor", _R, streams=True),
    _spec("trace.follow", _R, streams=True),
    _spec("explain", _R),
    _spec("pause", _W),
    _spec("resume", _W),
    _spec("pause.envelope", _W),
    _spec("resume.envelope", _W),
    _spec("pause.mta.route", _W),
    _spec("resume.mta.route", _W),
    _spec("resume.route", _W),
    _spec("schedule", _W),
    _spec("remove", _W),
    _spec("discover", _W),
    _spec("trace", _W),
    _spec("untrace", _W),
    _spec("profile", _W),
    _spec("unprofile", _W),
    _spec("log.brief", _W),
    _spec("log.verbose", _W),
    _spec("update.table", _W),
    _spec("reload", _W),
    _spec("stop", _W),
    _spec("enqueue", _O),
)}


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def ok_reply(request_id: Any, result: Any = None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: Any, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": str(code), "message": message}}


def event_message(request_id: Any, event: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "event": event}


class _NotFinite(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotFinite(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"{text} is out of range")
    return value


def decode_request(line: bytes) -> tuple[Any, CommandSpec, dict[str, Any]]:
    """Validate one request line: (id, command spec, args). Raises ProtocolError."""
    if len(line) > MAX_REQUEST_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        # Strict JSON: Python's parser also takes NaN, Infinity and 1e999 (inf), which no handler expects (a NaN
        # interval or timeout would reach the event loop's timer heap and disorder every timer of the daemon).
        message = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"not JSON: {error}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "not JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    if b"\\u" in line and SURROGATE.search(json.dumps(message, ensure_ascii=False)):
        # A \uD800-style escape gives a lone surrogate: no UTF-8 text holds one, so neither a log line nor a
        # file naming such an argument could be written.
        raise ProtocolError(ErrorCode.BAD_REQUEST, "not JSON: a string holds a lone surrogate")
    if type(message.get("v")) is not int or message["v"] != PROTOCOL_VERSION:  # (true and 1.0 equal 1)
        raise ProtocolError(ErrorCode.VERSION, f"protocol version {PROTOCOL_VERSION} expected")
    command = message.get("cmd")
    if not isinstance(command, str) or command not in COMMANDS:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command: {command!r}")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "args must be an object")
    return message.get("id"), COMMANDS[command], args


def decode_reply(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, "incompatible smtpd and smtpctl")
    return message
