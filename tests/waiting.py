"""Polling with a bound: wait for something the daemon does in the background.

The bound only keeps a broken run from hanging; it is not a speed check (speed is measured under bench/).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until[T](condition: Callable[[], T], bound: float = 30.0, interval: float = 0.05,
               explain: Callable[[], str] | None = None) -> T:
    """Return condition()'s first truthy value; fail the test (with explain()) if none comes within the bound."""
    give_up = time.monotonic() + bound
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"still not true after {bound:g} s" + (f": {explain()}" if explain else ""))
        time.sleep(interval)
