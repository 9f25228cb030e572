"""What a delivery attempt (MDA or MTA) reports back to the scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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

    @classmethod
    def ok(cls, text: str = "Delivered") -> DeliveryResult:
        return cls(Outcome.OK, text, 2, 0)

    @classmethod
    def tempfail(cls, text: str, esc_code: int = 30) -> DeliveryResult:
        return cls(Outcome.TEMPFAIL, text, 4, esc_code)

    @classmethod
    def permfail(cls, text: str, esc_code: int = 30) -> DeliveryResult:
        return cls(Outcome.PERMFAIL, text, 5, esc_code)
