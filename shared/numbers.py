"""Numbers read from outside (a config, a table, a peer's reply, a queue file, a command line)."""

from __future__ import annotations


def ascii_digits(text: str) -> bool:
    """Whether text is a non-empty run of ASCII digits. str.isdigit() alone also takes "²" (which int() refuses)
    and "٥" (which int() reads as 5); a sign, a blank or a `_` (which int() takes too) are not digits either."""
    return text.isascii() and text.isdigit()
