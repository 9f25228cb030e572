"""The control protocol's framing, kept free of heavy imports so that smtpctl's fast path stays fast.

shared/protocol.py re-exports these; everything else about the protocol (commands, privileges, errors) is there.
"""

from __future__ import annotations

import json
import re

PROTOCOL_VERSION = 1
SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(value: object) -> str:
    """One JSON value as text that is valid UTF-8. Text made from bytes that are not UTF-8 (a hand-edited queue
    file, an argument) holds lone surrogates, which UTF-8 cannot encode: they are written as JSON escapes
    (`\\udcff`), which a reader decodes back to the same text, instead of failing the whole answer."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if SURROGATE.search(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def encode(message: dict) -> bytes:
    return json_text(message).encode() + b"\n"


def request(request_id: int | str, command: str, **args: object) -> dict:
    # "args" first: the request then begins `{"args"`, whose bytes 4 and 5 ("gs"), read as the length of an imsg
    # header by OpenSMTPD's control process (at the same socket path, /var/run/smtpd.sock), make 29543, over
    # any imsg's limit: it hangs up at once. With `{"v":1`, 12602 bytes, it waited for them without end (and
    # smtpctl, mailq and sendmail with it).
    return {"args": args, "v": PROTOCOL_VERSION, "id": request_id, "cmd": command}
