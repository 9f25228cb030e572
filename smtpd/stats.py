"""Counters for `smtpctl show stats` and `monitor` (reference §2.4 keys).

A key appears only once it has been set. Subsystems call ``STATS.increment("smtp.session")`` etc.
"""

from __future__ import annotations

import time

from smtpd import trace


class Stats:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.started = time.time()
        # `monitor`'s enq and deq columns: every envelope the scheduler took in (new, loaded at start, discovered)
        # and let go, since the start (counted by the scheduler). Not keys of `show stats` (OpenSMTPD keeps them
        # aside too).
        self.enqueued = 0
        self.dequeued = 0

    def increment(self, key: str, amount: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount
        if trace.wants("stat"):
            trace.emit("stat", f"stat: {key} += {amount} -> {self.values[key]}", key=key, value=self.values[key])

    def decrement(self, key: str, amount: int = 1) -> None:
        self.increment(key, -amount)

    def set(self, key: str, value: int) -> None:
        self.values[key] = value

    def get(self, key: str) -> int:
        return self.values.get(key, 0)

    def digest(self) -> dict[str, int]:
        return {"enqueued": self.enqueued, "dequeued": self.dequeued}

    def snapshot(self) -> dict[str, int]:
        """Every set key plus uptime, as `show stats` prints them (sorted by the caller)."""
        values = dict(self.values)
        values["uptime"] = int(time.time() - self.started)
        return values


STATS = Stats()


class KeyGauge:
    """A `show stats` gauge of the distinct keys in use (mda.user: users with an envelope in the mda; mta.source:
    sources with a route): a key counts once however many times it is in use, until its last use ends."""

    def __init__(self, stat: str) -> None:
        self.stat = stat
        self.uses: dict[object, int] = {}

    def add(self, key: object) -> None:
        count = self.uses.get(key, 0)
        self.uses[key] = count + 1
        if not count:
            STATS.increment(self.stat)

    def remove(self, key: object) -> None:
        count = self.uses.pop(key, 0) - 1
        if count > 0:
            self.uses[key] = count
        elif count == 0:
            STATS.decrement(self.stat)
