"""What a delivery attempt (MDA or MTA) reports back to the scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# The most of a result's text kept (the envelope's errorline, in `show queue`, bounces and logs). A remote's reply may
# be 64 lines of 4 KiB (smtpd/mta/client.py) and the queue refuses envelope files over 64 KiB: an errorline of such a
# reply made the next load (a restart) move the message to corrupt/, never retried nor bounced.
TEXT_MAX = 4096
TEXT_LINE_MAX = 1024  # a line of a text cut short (the last line is kept: it carries the final status)


class Outcome(StrEnum):
    OK = "ok"
    TEMPFAIL = "tempfail"
    PERMFAIL = "permfail"
    LOOP = "loop"


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome
    text: str = ""  # the errorline kept on the envelope and shown by show queue / bounces
    esc_class: int = 0  # 2, 4 or 5
    esc_code: int = 0  # e.g. 30 for x.3.0

    def __post_init__(self) -> None:
        if len(self.text) > TEXT_MAX:
            object.__setattr__(self, "text", bounded_text(self.text))

    @classmethod
    def ok(cls, text: str = "Delivered") -> DeliveryResult:
        return cls(Outcome.OK, text, 2, 0)

    @classmethod
    def tempfail(cls, text: str, esc_code: int = 30) -> DeliveryResult:
        return cls(Outcome.TEMPFAIL, text, 4, esc_code)

    @classmethod
    def permfail(cls, text: str, esc_code: int = 30) -> DeliveryResult:
        return cls(Outcome.PERMFAIL, text, 5, esc_code)


def bounded_text(text: str) -> str:
    """text cut to TEXT_MAX characters: its first lines as far as they fit, a `...` line in place of the others, and
    its last line (each line cut to TEXT_LINE_MAX, with `...` at the end of a cut line)."""
    if len(text) <= TEXT_MAX:
        return text

    def cut(line: str) -> str:
        return line if len(line) <= TEXT_LINE_MAX else line[:TEXT_LINE_MAX - 3] + "..."

    *first, last = text.split("\n")
    last = cut(last)
    room = TEXT_MAX - len(last) - len("\n...\n")
    kept: list[str] = []
    for line in first:
        line = cut(line)
        if len(line) + 1 > room:
            break
        kept.append(line)
        room -= len(line) + 1
    return "\n".join([*kept, *(["..."] if len(kept) < len(first) else []), last])
