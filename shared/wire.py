"""The control protocol's framing, kept free of heavy imports so that smtpctl's fast path stays fast.

shared/protocol.py re-exports these; everything else about the protocol (commands, privileges, errors) is there.
"""

from __future__ import annotations

import json

PROTOCOL_VERSION = 1


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def request(request_id: int | str, command: str, **args: object) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "cmd": command, "args": args}
