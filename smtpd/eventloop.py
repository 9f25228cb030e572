"""The daemon's event loop: asyncio's selector loop, polling its sockets for a moment before it sleeps.

Why: when a thread sleeps and its CPU has nothing else to run, the CPU goes idle, and waking it again is slow on a
virtual machine whose guest does not poll before halting (this one's ``guest_halt_poll_ns`` is 0): the hypervisor
has to wake the vCPU, tens of microseconds each time. In a quick exchange (a client on the same host or LAN
answering within a fraction of a millisecond) the loop would sleep and be woken several times per message.
Polling for up to ``SMTPD_LOOP_POLL_US`` microseconds [200] first catches the answer on a CPU that is still awake
(one client: 10-20% more messages a second, measured; docs/queue.md, "Polling before sleeping").

The poll is adaptive, so that a daemon with nothing to do burns nothing: a wait polls first only while the waits
before it ended quickly. After a wait that came within the poll time the next one polls; after a wait longer than
IDLE_FACTOR times the poll time (no quick exchange going on: a client across the Internet, or an idle daemon) the
next one sleeps at once. ``SMTPD_LOOP_POLL_US=0`` turns polling off.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time

POLL_SECONDS = max(0.0, float(os.environ.get("SMTPD_LOOP_POLL_US", "200")) / 1e6)
# A wait longer than this many poll times means no quick exchange is going on. With events arriving just too
# late for the poll, at most one poll time in IDLE_FACTOR is spent polling in vain.
IDLE_FACTOR = 10

_clock = time.perf_counter


class PollingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's selector; ``select`` with a timeout first polls while ``polling`` is set."""

    def __init__(self, poll_seconds: float = POLL_SECONDS) -> None:
        super().__init__()
        self.poll_seconds = poll_seconds
        self.polling = False  # whether the next wait polls first (the waits before it ended quickly)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(0)  # (the loop has callbacks ready: no wait, nothing to learn)
        began = _clock()
        if self.polling:
            limit = self.poll_seconds if timeout is None else min(self.poll_seconds, timeout)
            while True:
                ready = super().select(0)  # (releases the GIL: threads of the daemon run meanwhile)
                if ready:
                    return ready
                polled = _clock() - began
                if polled >= limit:
                    break
            if timeout is not None:
                timeout = max(0.0, timeout - polled)
        ready = super().select(timeout)
        self._learn(_clock() - began)
        return ready

    def _learn(self, waited: float) -> None:
        """Poll in the next wait if this one ended within the poll time (it would have been caught); stop after a
        long one."""
        if waited <= self.poll_seconds:
            self.polling = True
        elif waited > self.poll_seconds * IDLE_FACTOR:
            self.polling = False


class PollingEventLoop(asyncio.SelectorEventLoop):  # type: ignore[misc,valid-type]
    """asyncio's selector loop (signals, subprocesses and all) over a PollingSelector."""

    polls = True  # (the queue hands a lone commit's files to its file writer process: see SpoolWriter)

    def __init__(self, poll_seconds: float = POLL_SECONDS) -> None:
        super().__init__(PollingSelector(poll_seconds))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The daemon's loop: polling unless SMTPD_LOOP_POLL_US=0."""
    if POLL_SECONDS <= 0:
        return asyncio.SelectorEventLoop()
    return PollingEventLoop()
