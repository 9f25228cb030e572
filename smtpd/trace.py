"""The trace bus: structured events from every subsystem.

A subsystem calls ``emit("expand", "lka_expand: address: bob@example.org", depth=0)``. An event is delivered
to the console when its subsystem was enabled with ``smtpd -T NAME`` (or ``smtpctl trace NAME``), and to every
subscriber (``smtpctl trace --follow``) that asked for it. Subscribers have bounded buffers: a slow reader
loses events (they are counted and reported to it), the daemon never waits for it.

Emitting is cheap when nobody listens: ``wants(subsystem)`` is one set lookup, so hot paths may guard
expensive message formatting with it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, TextIO

# The reference's trace keywords, in its order. Those named after OpenSMTPD's plumbing mean, in our one process:
# io: bytes of SMTP sessions and control connections (open/close, TLS handshake, read/write sizes, EOF, timeout);
# imsg: hand-offs between subsystems (smtp -> queue -> scheduler -> mda/mta and back, control -> daemon);
# mproc: processes (the fork helper, each delivery child and MDA command with pid/uid/exit status);
# filters: each builtin filter a session's phase ran, and its decision.
SUBSYSTEMS: tuple[str, ...] = (
    "imsg", "io", "smtp", "filters", "mta", "bounce", "scheduler", "lookup", "stat", "rules", "mproc",
    "expand", "table", "queue",
)
# smtpd -T accepts these spellings too.
ALIASES: dict[str, str] = {"transfer": "mta", "bounces": "bounce", "stats": "stat", "tables": "table"}
# smtpctl trace accepts this smaller set (reference §2.3).
CONTROL_KEYWORDS: tuple[str, ...] = (
    "imsg", "io", "smtp", "filters", "mta", "bounce", "scheduler", "lookup", "stat", "rules", "mproc",
    "expand", "all",
)
PROFILE_KEYWORDS: tuple[str, ...] = ("profstat", "profile-imsg", "profile-queue")


def canonical_subsystem(name: str) -> str | None:
    """The subsystem a trace keyword names, "all", or None if unknown."""
    name = ALIASES.get(name, name)
    if name == "all" or name in SUBSYSTEMS or name in PROFILE_KEYWORDS:
        return name
    return None


def expand_keyword(name: str) -> set[str]:
    canonical = canonical_subsystem(name)
    if canonical is None:
        return set()
    if canonical == "all":
        return set(SUBSYSTEMS)
    return {canonical}


@dataclass(frozen=True)
class TraceEvent:
    time: float
    subsystem: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "subsystem": self.subsystem, "message": self.message, **self.fields}

    def to_line(self) -> str:
        return f"{self.subsystem}: {self.message}"


class Subscription:
    """A bounded buffer of events for one reader. Never blocks the emitter."""

    def __init__(self, bus: TraceBus, subsystems: Iterable[str], capacity: int,
                 accept: Callable[[TraceEvent], bool] | None, notify: Callable[[], None] | None) -> None:
        self.bus = bus
        self.subsystems = frozenset(subsystems)
        self.capacity = capacity
        self.accept = accept
        self.notify = notify
        self.events: deque[TraceEvent] = deque()
        self.dropped = 0

    def offer(self, event: TraceEvent) -> None:
        if event.subsystem not in self.subsystems:
            return
        if self.accept is not None and not self.accept(event):
            return
        if len(self.events) >= self.capacity:
            self.dropped += 1
            return
        self.events.append(event)
        if self.notify is not None:
            self.notify()

    def drain(self) -> tuple[list[TraceEvent], int]:
        """The buffered events and the number lost since the last drain."""
        events = list(self.events)
        self.events.clear()
        dropped, self.dropped = self.dropped, 0
        return events, dropped

    def close(self) -> None:
        self.bus.unsubscribe(self)


class TraceBus:
    def __init__(self) -> None:
        # What goes to the console (the daemon's log): what was asked for (-T, `smtpctl trace`) and what
        # followers hold. A follower's hold ends when it leaves; what was asked for stays until `untrace`.
        self.enabled: set[str] = set()
        self._asked: set[str] = set()
        self._held: Counter[str] = Counter()
        self.console: TextIO | None = None
        self._subscriptions: list[Subscription] = []
        self._wanted: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        # Lines come from worker threads too (tables asked off the event loop): each is written whole, where
        # print's two writes (the line, then its newline) let two threads' lines run into one.
        self._console_lock = threading.Lock()

    # -- switches -------------------------------------------------------------------------------------
    def enable(self, keyword: str) -> bool:
        subsystems = expand_keyword(keyword)
        if not subsystems:
            return False
        self._asked |= subsystems
        self.enabled |= subsystems
        self._recompute()
        return True

    def disable(self, keyword: str) -> bool:
        """Switch off what was asked for, at once (followers still get their events: they subscribed)."""
        subsystems = expand_keyword(keyword)
        if not subsystems:
            return False
        self._asked -= subsystems
        self.enabled -= subsystems
        self._recompute()
        return True

    def hold(self, subsystems: Iterable[str]) -> list[str]:
        """A follower's subsystems go to the log while it follows. Returns those this switched on."""
        wanted = set(subsystems)
        turned_on = sorted(wanted - self.enabled)
        self._held.update(wanted)
        self.enabled |= wanted
        self._recompute()
        return turned_on

    def release(self, subsystems: Iterable[str]) -> None:
        """A follower left: what it held goes off, unless another follower holds it or it was asked for
        (`smtpctl trace` while it followed)."""
        for subsystem in set(subsystems):
            self._held[subsystem] -= 1
            if self._held[subsystem] <= 0:
                del self._held[subsystem]
                if subsystem not in self._asked:
                    self.enabled.discard(subsystem)
        self._recompute()

    def wants(self, subsystem: str) -> bool:
        return subsystem in self._wanted

    def _recompute(self) -> None:
        wanted = set(self.enabled) if self.console is not None else set()
        for subscription in self._subscriptions:
            wanted |= subscription.subsystems
        self._wanted = frozenset(wanted)

    # -- consumers ------------------------------------------------------------------------------------
    def set_console(self, stream: TextIO | None) -> None:
        """Print enabled subsystems' events to this stream (smtpd -d -T NAME)."""
        self.console = stream
        self._recompute()

    def subscribe(self, subsystems: Iterable[str], capacity: int = 1000,
                  accept: Callable[[TraceEvent], bool] | None = None,
                  notify: Callable[[], None] | None = None) -> Subscription:
        subscription = Subscription(self, subsystems, capacity, accept, notify)
        with self._lock:
            self._subscriptions.append(subscription)
            self._recompute()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
            self._recompute()

    # -- producers ------------------------------------------------------------------------------------
    def emit(self, subsystem: str, message: str, **fields: Any) -> None:
        if subsystem not in self._wanted:
            return
        if message.startswith(subsystem) and message.startswith(": ", len(subsystem)):
            # (many messages name their subsystem, as OpenSMTPD's trace lines do; the event names it once)
            message = message[len(subsystem) + 2:]
        event = TraceEvent(time.time(), subsystem, message, fields)
        if self.console is not None and subsystem in self.enabled:
            try:
                with self._console_lock:
                    self.console.write(event.to_line() + "\n")
                    self.console.flush()
            except (OSError, ValueError):
                pass
        for subscription in list(self._subscriptions):
            subscription.offer(event)


BUS = TraceBus()


# The bus's own bound methods: asked dozens of times per message, so no wrapper call in between.
emit = BUS.emit
wants = BUS.wants


def console_to_stderr() -> None:
    BUS.set_console(sys.stderr)


# -- fields bound to the running task ----------------------------------------------------------------------------
# Code deep in a delivery (the fork helper's client, the MDA command runner) does not know which envelope it
# works for; the scheduler binds the evpid/msgid to the delivery task, and such code adds bound() to its events.
_BOUND: ContextVar[dict[str, Any] | None] = ContextVar("trace_bound_fields", default=None)


def bind(**fields: Any) -> Token[dict[str, Any] | None]:
    """Attach fields to every bound() call in this task (and the tasks and threads it starts) until unbind()."""
    return _BOUND.set({**(_BOUND.get() or {}), **fields})


def unbind(token: Token[dict[str, Any] | None]) -> None:
    _BOUND.reset(token)


def bound() -> dict[str, Any]:
    return dict(_BOUND.get() or {})
