"""What runs when: first attempts, retries, expiry, delay warnings, pauses, and the queue commands' effects.

Reference §8.4, with its QUIRKs fixed: an envelope expires at creation + ttl (the action's ttl or the queue
ttl), an expired envelope is reported as *failed* (5.4.7), and a delay warning states the real remaining time.

Every envelope the queue knows is in memory here as an ``Entry``: pending (waiting for its next try, in a heap),
inflight (a delivery is running), or suspended (`smtpctl pause envelope`). Due envelopes go to a ready line per
agent (mda, mta) that is drained while the agent is not paused and under its concurrency limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.durations import duration_to_text
from smtpd import log, trace
from smtpd.bounce import DELAYED, DELIVERED, FAILED, RELAYED, Bouncer, duration_text
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.queue import codec
from smtpd.queue.envelope import Envelope, EnvelopeType, shared_flags
from smtpd.queue.format import dump_envelope
from smtpd.queue.listing import EnvelopeFilter, Row, envelope_row, line_parts
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.config.model import Config
    from smtpd.daemon import Daemon

LOG = log.get("scheduler")
RETRY_BASE = {"mta": 400, "mda": 10, "bounce": 10}
MAX_WARN_INTERVALS = 4
DEFAULT_LIMITS = {"mda": 50, "mta": 100}
MAX_INFLIGHT = 5000
# Removals after a delivery run behind it: the delivery's slot is free once the envelope is forgotten here, and
# its file is deleted by the queue's writer thread meanwhile. Past this many removals not yet done, deliveries
# wait for theirs (the writer thread sets the pace).
MAX_REMOVALS_BEHIND = 1000
IDLE_WAKE = 60.0  # the loop wakes up at least this often even with nothing due
# A wall clock that moved back by more than this against the monotonic clock between two looks was set back
# (an admin correcting a date, a virtual machine's clock resynchronized): see _follow_clock.
CLOCK_STEP = 5.0

PENDING, INFLIGHT, SUSPENDED = "pending", "inflight", "suspended"
EXPIRED = "Envelope expired"  # an expired envelope's error line (reference §8.4)


@dataclass(slots=True)
class Entry:
    envelope: Envelope
    state: str
    nexttry: float
    remove_after: bool = False  # removed by smtpctl while in flight
    # The unchanging parts of this envelope's `show queue` line, made once: (fields before runstate, errorline).
    # Cleared whenever the envelope changes (see _schedule, suspend, resume, _attempt).
    line_parts: tuple[str, str] | None = None
    planned: float = 0.0  # the monotonic time nexttry was set at (see _follow_clock)
    last_error: str = ""  # expired: the failure before the expiry, for its report (see _expire)


def _log_envelope(envelope: Envelope, what: str, status: str) -> None:
    """An envelope the queue drops without a delivery, logged as OpenSMTPD logs it (`delivery: Remove for EVPID:
    from=<...>, to=<...>, rcpt=<->, delay=3s, stat=Removed by administrator`; `relay:` for a relayed one; rcpt=
    the original recipient when an alias changed it, else -). The null sender is `<>` (6.8 wrote `<@>`)."""
    rcpt = envelope.rcpt if envelope.rcpt and envelope.rcpt != envelope.dest else "-"
    delay = duration_to_text(max(0, int(time.time() - envelope.ctime))) if envelope.ctime else "0s"
    LOG.info("%s: %s for %016x: from=<%s>, to=<%s>, rcpt=<%s>, delay=%s, stat=%s",
             "relay" if envelope.type is EnvelopeType.MTA else "delivery", what, envelope.evpid, envelope.sender,
             envelope.dest, rcpt, delay, status)


def agent_of(envelope: Envelope) -> str:
    return "mta" if envelope.type is EnvelopeType.MTA else "mda"


def retry_base(envelope: Envelope) -> int:
    if "bounce" in envelope.flags:
        return RETRY_BASE["bounce"]
    return RETRY_BASE[agent_of(envelope)]


def next_try_after_failure(envelope: Envelope, now: float) -> float:
    """ctime + base × n², n = the retry count, increased until that time is in the future.

    An envelope whose ctime is still ahead of the clock (the clock was set back past its arrival) counts from
    now instead: from its ctime, it was not retried before the clock had caught up (a day set back, a day
    without a try)."""
    base = retry_base(envelope)
    origin = min(envelope.ctime, now)
    count = max(1, envelope.retry)
    when = origin + base * count * count
    while when <= now:
        count += 1
        when = origin + base * count * count
    return when


def expire_time(envelope: Envelope) -> int:
    return envelope.ctime + envelope.ttl


class Scheduler:
    def __init__(self, daemon: Daemon | None, queue: Any, bouncer: Bouncer | None = None,
                 limits: dict[str, int] | None = None) -> None:
        self.daemon = daemon
        self.queue = queue
        smtpname = daemon.mailname if daemon is not None else "localhost"
        self.bouncer = bouncer or Bouncer(daemon, queue, smtpname)
        self.limits = dict(DEFAULT_LIMITS, **(limits or {}))
        self.entries: dict[int, Entry] = {}
        self.messages: dict[int, list[int]] = {}  # msgid -> evpids (lists: smaller than sets)
        self.heap: list[tuple[float, int]] = []
        self.ready: dict[str, deque[int]] = {"mda": deque(), "mta": deque()}
        self.inflight: dict[str, int] = {"mda": 0, "mta": 0}
        self.tasks: set[asyncio.Task[None]] = set()
        self.removals: set[asyncio.Future[Any]] = set()  # removals running behind their deliveries
        # Envelopes forgotten here whose files are not deleted yet, and the sets of those forgotten while each
        # `discover` reads the spool: what it reads of them must not come back (see discover).
        self.removing: set[int] = set()
        self._discovering: list[set[int]] = []
        # Delivery components by agent; None: daemon.mda / daemon.mta at the time of the delivery.
        self.deliverers: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._flags_lock = asyncio.Lock()
        # Envelope files being rewritten by pause/resume envelope (evpid -> the rewrite): a removal of one waits
        # for its rewrite, which would otherwise put a file deleted meanwhile back (see _save_flags).
        self._saving: dict[int, asyncio.Future[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._clock_mark: tuple[float, float] | None = None  # (wall, monotonic) at the last look (_follow_clock)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.queue.on_envelopes = self.add_envelopes
        if self.daemon is not None:
            self.daemon.pause_listeners.append(self._on_pause)
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        tasks = [task for task in (self._loop_task, *self.tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The queue stops after us: let the removals already asked finish on its writer thread.
        await asyncio.gather(*self.removals, return_exceptions=True)

    async def reconfigure(self, old: Config, new: Config) -> list[str]:
        """A reload: `mda limit max-session` takes effect for the deliveries started from now on (those running
        finish; a raised limit starts more at once)."""
        self.limits = dict(DEFAULT_LIMITS, **_limits_from_config(new))
        self.wake()
        return []

    def _on_pause(self, daemon: Any, subsystem: str, paused: bool) -> None:
        if subsystem in self.ready and not paused:
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def is_paused(self, agent: str) -> bool:
        return self.daemon is not None and self.daemon.is_paused(agent)

    # -- learning of envelopes ----------------------------------------------------------------------------
    def add_envelopes(self, envelopes: Iterable[Envelope], loaded: bool = False) -> int:
        """New (just committed) or loaded (at start, discover) envelopes. Returns how many were new to us."""
        envelopes = list(envelopes)  # walked twice when traced
        now = time.time()
        self._follow_clock(now)
        planned_at = self._mark()
        added = 0
        for envelope in envelopes:
            if envelope.evpid in self.entries:
                continue
            if not envelope.ttl:  # (OpenSMTPD 6.8's envelope, left in its spool: its expiry is the config's)
                envelope.ttl = self.queue.ttl_for(envelope)
            nexttry = now
            if loaded and envelope.retry and envelope.ctime <= now:
                # (one that arrived "after now", the clock set back since, is tried at once: the try planned
                # from its ctime may be as far off as the clock was set back)
                base = retry_base(envelope)
                planned = envelope.ctime + base * envelope.retry * envelope.retry
                nexttry = max(now, min(planned, expire_time(envelope)))
            suspended = "suspend" in envelope.flags  # paused by smtpctl before a restart
            entry = Entry(envelope, SUSPENDED if suspended else PENDING, nexttry, planned=planned_at)
            self.entries[envelope.evpid] = entry
            evpids = self.messages.setdefault(envelope.msgid, [])
            if not evpids:
                STATS.increment("scheduler.ramqueue.message")
            evpids.append(envelope.evpid)
            if not suspended:
                heapq.heappush(self.heap, (nexttry, envelope.evpid))
            added += 1
            if trace.wants("scheduler"):
                trace.emit("scheduler", f"scheduler: {'loaded' if loaded else 'new'} envelope {envelope.evpid:016x}",
                           evpid=f"{envelope.evpid:016x}")
        if added and trace.wants("imsg"):
            self._trace_added(envelopes, loaded)
        if added:
            STATS.increment("scheduler.envelope", added)
            STATS.increment("scheduler.ramqueue.envelope", added)
            STATS.enqueued += added
            self.wake()
        return added

    def _not_handed_over(self, msgid: int) -> bool:
        """A message being received or committed: the queue gives its envelopes here once it is placed."""
        return msgid in getattr(self.queue, "receiving", ())

    def _forget(self, evpid: int) -> None:
        entry = self.entries.pop(evpid, None)
        if entry is None:
            return
        for forgotten in self._discovering:
            forgotten.add(evpid)
        STATS.decrement("scheduler.envelope")
        STATS.decrement("scheduler.ramqueue.envelope")
        STATS.dequeued += 1
        evpids = self.messages.get(evpid >> 32)
        if evpids is not None:
            if evpid in evpids:
                evpids.remove(evpid)
            if not evpids:
                del self.messages[evpid >> 32]
                STATS.decrement("scheduler.ramqueue.message")

    def _schedule(self, entry: Entry, when: float) -> None:
        # (a step found only now came after the caller read the clock for `when`: moved back as the others)
        when += self._follow_clock(time.time())
        entry.line_parts = None
        entry.state = PENDING
        entry.nexttry = when
        entry.planned = self._mark()
        heapq.heappush(self.heap, (when, entry.envelope.evpid))
        self.wake()

    def _mark(self) -> float:
        """The monotonic time of the last look at the clock: what is planned now counts as planned then."""
        return self._clock_mark[1] if self._clock_mark is not None else time.monotonic()

    def _follow_clock(self, now: float) -> float:
        """Notice the wall clock set back, and move the tries planned before that back by as much.

        The tries are planned on the wall clock (envelope times are wall times, and survive restarts): set back
        by a day, the clock took a day to reach a try planned 10 minutes ahead, and no mail went out meanwhile.
        Measured against the monotonic clock, the step is known; tries planned before it keep their real
        waiting time. (A clock set forward needs nothing: what was planned is due sooner.) Returns the step
        found (negative), or 0. Every planning looks first, so what was planned before a step is known."""
        monotonic = time.monotonic()
        mark, self._clock_mark = self._clock_mark, (now, monotonic)
        if mark is None:
            return 0.0
        step = (now - mark[0]) - (monotonic - mark[1])
        if step >= -CLOCK_STEP:
            return 0.0
        moved = 0
        for entry in self.entries.values():
            # Not those planned since the last look: maybe already on the clock as it is now.
            if entry.state in (PENDING, SUSPENDED) and entry.planned <= mark[1] and entry.nexttry > now:
                entry.nexttry = max(now, entry.nexttry + step)
                entry.line_parts = None
                moved += 1
        self.heap = [(entry.nexttry, evpid) for evpid, entry in self.entries.items() if entry.state == PENDING]
        heapq.heapify(self.heap)
        LOG.warning("scheduler: the clock was set back by %s; %d planned tr%s moved back as much",
                    duration_text(round(-step)), moved, "y" if moved == 1 else "ies")
        return step

    # -- the loop -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            self._follow_clock(now)
            self._move_due(now)
            for agent in self.ready:
                self._drain(agent)
            timeout = IDLE_WAKE
            if self.heap:
                timeout = min(timeout, max(0.0, self.heap[0][0] - time.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                pass

    def _move_due(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            when, evpid = heapq.heappop(self.heap)
            entry = self.entries.get(evpid)
            if entry is None or entry.state != PENDING or entry.nexttry != when:
                continue  # stale: removed, suspended, rescheduled or already on its way
            entry.state = "ready"
            self.ready[agent_of(entry.envelope)].append(evpid)

    def _drain(self, agent: str) -> None:
        line = self.ready[agent]
        while line:
            if self.is_paused(agent) or self.inflight[agent] >= self.limits[agent]:
                return
            if sum(self.inflight.values()) >= MAX_INFLIGHT:
                return
            entry = self.entries.get(line.popleft())
            if entry is None or entry.state != "ready":
                continue
            entry.state = INFLIGHT
            self.inflight[agent] += 1
            STATS.increment("scheduler.envelope.inflight")
            task = asyncio.create_task(self._attempt(entry, agent))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    # -- one attempt ------------------------------------------------------------------------------------
    async def _attempt(self, entry: Entry, agent: str) -> None:
        envelope = entry.envelope
        try:
            now = time.time()
            if now >= expire_time(envelope):
                await self._expire(entry)
                return
            if envelope.type is EnvelopeType.BOUNCE:
                await self._send_opensmtpd_report(entry)
                return
            envelope.last_try = int(now)
            entry.line_parts = None
            trace.emit("scheduler", f"scheduler: {agent} delivery of {envelope.evpid:016x} to <{envelope.dest}>",
                       evpid=f"{envelope.evpid:016x}", agent=agent, rcpt=envelope.rcpt)  # (rcpt: the address
            # before expansion, so that `trace --follow --address` with the address the client gave sees it)
            problem = self.queue.message_problem(envelope)
            if problem:
                await self._set_aside(envelope.msgid, problem)
                return
            result = await self._deliver(envelope, agent)
            if entry.remove_after:
                await self._delete(entry, "removed")
                return
            await self._handle_result(entry, agent, result)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — one envelope's trouble must not stop the scheduler
            LOG.warning("scheduler: %016x: %s; retrying later", envelope.evpid, error)
            if envelope.evpid in self.entries:
                if entry.remove_after:  # (removed by smtpctl during the attempt: not tried again)
                    try:
                        await self._delete(entry, "removed")
                    except Exception as removal_error:  # noqa: BLE001 — forgotten here; the file stays
                        LOG.warning("scheduler: %016x: removed but its file was not: %s", envelope.evpid,
                                    removal_error)
                else:
                    self._schedule(entry, time.time() + retry_base(envelope))
        finally:
            self.inflight[agent] -= 1
            STATS.decrement("scheduler.envelope.inflight")
            self.wake()

    async def _set_aside(self, msgid: int, problem: str) -> None:
        """The message file is not what its commit wrote: none of its envelopes is delivered (a part of a
        message delivered as the whole, and marked done, is mail lost). The scheduler forgets them all and the
        queue moves the folder to corrupt/ whole, envelopes included, for whoever repairs it. An attempt of
        another of its envelopes already under way ends as it would (its file is gone: nothing is rewritten)."""
        for evpid in list(self.messages.get(msgid, ())):
            self._forget(evpid)
        await self.queue.set_message_aside(msgid, problem)

    async def _deliver(self, envelope: Envelope, agent: str) -> DeliveryResult:
        deliverer = self.deliverers.get(agent)
        if deliverer is None and self.daemon is not None:
            deliverer = getattr(self.daemon, agent, None)
        if deliverer is None:
            return DeliveryResult.tempfail("no relay yet" if agent == "mta" else "no local delivery agent")
        evpid, msgid = f"{envelope.evpid:016x}", f"{envelope.msgid:08x}"
        trace.emit("imsg", f"scheduler -> {agent}: envelope {evpid} handed over", evpid=evpid, msgid=msgid,
                   agent=agent, address=envelope.dest)
        bound = trace.bind(evpid=evpid, msgid=msgid)
        try:
            result = await deliverer.deliver(envelope, self.queue.message_path(envelope.msgid))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — the contract says deliver never raises; be safe anyway
            result = DeliveryResult.tempfail(f"delivery agent error: {error}")
        finally:
            trace.unbind(bound)
        trace.emit("imsg", f"{agent} -> scheduler: envelope {evpid} {result.outcome.name.lower()}", evpid=evpid,
                   msgid=msgid, agent=agent, outcome=result.outcome.name.lower(), text=result.text)
        return result

    def _trace_added(self, envelopes: list[Envelope], loaded: bool) -> None:
        by_message: dict[int, list[str]] = {}
        for envelope in envelopes:
            entry = self.entries.get(envelope.evpid)
            if entry is None or entry.envelope is not envelope:
                continue  # known before, or already gone again
            by_message.setdefault(envelope.msgid, []).append(f"{envelope.evpid:016x}")
        for msgid, evpids in by_message.items():
            trace.emit("imsg", f"queue -> scheduler: {len(evpids)} {'loaded ' if loaded else ''}envelope(s) of "
                       f"message {msgid:08x}", msgid=f"{msgid:08x}", evpids=evpids, loaded=loaded)

    async def _handle_result(self, entry: Entry, agent: str, result: DeliveryResult) -> None:
        envelope = entry.envelope
        if result.outcome is Outcome.OK:
            STATS.increment("scheduler.delivery.ok")
            kind = DELIVERED if agent == "mda" else RELAYED
            await self._report_then_delete(entry, kind, "delivered", wait=False)
        elif result.outcome is Outcome.TEMPFAIL:
            STATS.increment("scheduler.delivery.tempfail")
            await self._tempfail(entry, result)
        else:
            loop = result.outcome is Outcome.LOOP
            STATS.increment("scheduler.delivery.loop" if loop else "scheduler.delivery.permfail")
            envelope.errorline = "Loop detected" if loop else result.text
            envelope.esc_class = 5
            envelope.esc_code = 46 if loop else result.esc_code
            await self._report_then_delete(entry, FAILED, "failed", wait=False)

    async def _tempfail(self, entry: Entry, result: DeliveryResult) -> None:
        envelope = entry.envelope
        now = time.time()
        self._follow_clock(now)  # (see _schedule)
        envelope.retry += 1
        envelope.errorline = result.text
        envelope.esc_class = 4
        envelope.esc_code = result.esc_code
        nexttry = next_try_after_failure(envelope, now)
        expire = expire_time(envelope)
        await self._maybe_warn(entry, now)
        STATS.increment("scheduler.envelope.updated")
        await self.queue.update_envelope(envelope)
        warning = self._next_warning(envelope, now)
        when = min(nexttry, expire, warning if warning is not None else expire)
        trace.emit("scheduler", f"scheduler: {envelope.evpid:016x} tempfail ({result.text}), retry {envelope.retry} "
                   f"in {duration_text(int(when - now))}", evpid=f"{envelope.evpid:016x}", retry=envelope.retry,
                   rcpt=envelope.rcpt)
        if envelope.evpid not in self.entries:
            return
        if entry.remove_after:  # `smtpctl remove` while the failure was being recorded (a warning queued...)
            await self._delete(entry, "removed")
            return
        self._schedule(entry, when)

    def _warn_thresholds(self, envelope: Envelope) -> list[float]:
        """The moments (creation + each warn interval, at most 4) at which a delay warning is due, those before
        the envelope expires only: a message that expires first gets its failure report instead ("delayed for
        more than 4 hours" about mail that expires after 1)."""
        expire = expire_time(envelope)
        return [envelope.ctime + interval for interval in self._warn_intervals() if envelope.ctime + interval < expire]

    def _next_warning(self, envelope: Envelope, now: float) -> float | None:
        """The next warn moment not reached yet and not covered by a warning sent, if any."""
        later = [when for when in self._warn_thresholds(envelope) if when > now and envelope.last_bounce < when]
        return min(later) if later else None

    async def _maybe_warn(self, entry: Entry, now: float) -> None:
        """A delay warning once a warn moment has passed with the mail still undelivered: one for the latest moment
        passed that no warning covers yet. It is never sent ahead of its moment, as OpenSMTPD does (at the try
        before it), which told a sender "not delivered after more than 4 hours" about mail a minute old whose
        next try was far off; instead the try after a failure is brought forward to the warn moment (_tempfail),
        so a warning comes when it says and not later."""
        envelope = entry.envelope
        passed = [when for when in self._warn_thresholds(envelope) if when <= now and envelope.last_bounce < when]
        if not passed:
            return
        threshold = max(passed)
        remaining = int(expire_time(envelope) - now)
        try:
            await self.bouncer.report(envelope, DELAYED, delay=int(threshold - envelope.ctime), remaining=remaining)
        except Exception as error:  # noqa: BLE001 — a lost warning is not worth keeping the mail back
            LOG.warning("scheduler: delay warning for %016x not queued: %s", envelope.evpid, error)
        # Record the moment covered (as OpenSMTPD does), so that no later failure warns for it again.
        envelope.last_bounce = int(threshold)

    def _warn_intervals(self) -> list[int]:
        config = self.daemon.config if self.daemon is not None else None
        values = config.bounce_warn_intervals if config is not None else (4 * 3600,)
        return sorted(value for value in values if value > 0)[:MAX_WARN_INTERVALS]

    async def _send_opensmtpd_report(self, entry: Entry) -> None:
        """A `type: bounce` envelope: a report OpenSMTPD 6.8 had queued but not sent before the switch (it
        keeps the recipient's envelope, as it was when the report was asked, with the report's kind). Ours are
        sent from the recipient's envelope at once, so only 6.8's spool has these: sent as ours would be."""
        envelope = entry.envelope
        kind = envelope.bounce_type if envelope.bounce_type in (FAILED, DELAYED, DELIVERED) else FAILED
        recipient = dataclasses.replace(envelope, type=EnvelopeType.MTA)  # (any type but bounce: about a recipient)
        try:
            await self.bouncer.report(recipient, kind, delay=envelope.bounce_delay, remaining=envelope.bounce_ttl)
        except Exception as error:  # noqa: BLE001 — kept, and tried again later
            LOG.warning("scheduler: %016x: report not queued (%s); keeping the envelope", envelope.evpid, error)
            envelope.retry += 1
            self._schedule(entry, time.time() + retry_base(envelope))
            return
        await self._delete(entry, "reported")

    async def _expire(self, entry: Entry) -> None:
        envelope = entry.envelope
        # The report says why the mail never went: the last temporary failure (kept here, since the envelope's
        # error line is `Envelope expired` from now on, also when the report has to be tried again later).
        if envelope.errorline and envelope.errorline != EXPIRED:
            entry.last_error = envelope.errorline
        envelope.errorline = EXPIRED
        envelope.esc_class = 5
        envelope.esc_code = 47
        STATS.increment("scheduler.envelope.expired")
        _log_envelope(envelope, "Expire", EXPIRED)
        await self._report_then_delete(entry, FAILED, "expired", last_error=entry.last_error)

    async def _report_then_delete(self, entry: Entry, kind: str, why: str, wait: bool = True,
                                  last_error: str = "") -> None:
        """Queue the report first (durable), then delete the envelope: a crash in between duplicates, never
        loses, the report."""
        envelope = entry.envelope
        try:
            await self.bouncer.report(envelope, kind, last_error=last_error)
        except Exception as error:  # noqa: BLE001 — keep the envelope and try again
            if entry.remove_after:  # `smtpctl remove` meanwhile: it said removed, so no later try
                await self._delete(entry, "removed")
                return
            LOG.warning("scheduler: %016x: report not queued (%s); keeping the envelope", envelope.evpid, error)
            if kind == FAILED:
                envelope.retry += 1
                self._schedule(entry, time.time() + retry_base(envelope))
                return
        await self._delete(entry, why, wait)

    async def _delete(self, entry: Entry, why: str, wait: bool = True) -> None:
        """Forget the envelope and delete its file; with ``wait`` False, return before the file is gone (see
        MAX_REMOVALS_BEHIND): a crash before then delivers it again, as a crash just before the delivery's end
        would."""
        evpid = entry.envelope.evpid
        self._forget(evpid)
        self.removing.add(evpid)
        saving = self._saving.get(evpid)
        removal = asyncio.ensure_future(self.queue.remove_envelope(evpid) if saving is None
                                        else self._remove_after(saving, evpid))
        removal.add_done_callback(lambda _future: self.removing.discard(evpid))
        if wait or len(self.removals) >= MAX_REMOVALS_BEHIND:
            await removal
            self._trace_removed(evpid, why)
            return
        self.removals.add(removal)
        removal.add_done_callback(functools.partial(self._removed, evpid, why))

    def _removed(self, evpid: int, why: str, removal: asyncio.Future[Any]) -> None:
        self.removals.discard(removal)
        if removal.cancelled():
            return
        error = removal.exception()
        if error is not None:
            LOG.warning("scheduler: %016x: %s but its file was not removed: %s", evpid, why, error)
            return
        self._trace_removed(evpid, why)

    @staticmethod
    def _trace_removed(evpid: int, why: str) -> None:
        trace.emit("scheduler", f"scheduler: {evpid:016x} {why}, removed from the queue", evpid=f"{evpid:016x}")

    # -- commands -------------------------------------------------------------------------------------
    def select(self, target: str | int, selector: EnvelopeFilter | None = None) -> list[Entry]:
        """Entries named by "all", a msgid or an evpid (ints: >32 bits is an evpid), narrowed by a filter."""
        if target == "all":
            candidates: Iterable[Entry] = list(self.entries.values())
        elif isinstance(target, int) and target > 0xFFFFFFFF:
            entry = self.entries.get(target)
            candidates = [entry] if entry is not None else []
        elif isinstance(target, int):
            candidates = [self.entries[evpid] for evpid in sorted(self.messages.get(target, ()))]
        else:
            raise ValueError(f"bad target {target!r}")
        if selector is None or selector.empty:
            return list(candidates)
        now = time.time()
        return [entry for entry in candidates if selector.matches(entry.envelope, self.state_of(entry), now)]

    @staticmethod
    def state_of(entry: Entry) -> str:
        return PENDING if entry.state == "ready" else entry.state

    def rows(self, entries: Iterable[Entry]) -> list[Row]:
        now = time.time()
        rows = []
        for entry in entries:
            state = self.state_of(entry)
            if state == INFLIGHT:
                value: int | None = int(now - entry.envelope.last_try)
            elif state == PENDING:
                value = int(entry.nexttry - now)
            else:
                value = int(entry.nexttry - now)
            row = envelope_row(entry.envelope, "pending" if state == SUSPENDED else state, value)
            rows.append(row)
        return rows

    def lines(self, entries: Iterable[Entry]) -> str:
        """The piped `show queue` text of these entries (reference §2.4), built from cached parts: 50,000
        envelopes in a fraction of a second."""
        now = time.time()
        out: list[str] = []
        for entry in entries:
            parts = entry.line_parts
            if parts is None:
                parts = entry.line_parts = line_parts(entry.envelope)
            state = self.state_of(entry)
            if state == INFLIGHT:
                value = int(now - entry.envelope.last_try)
            else:
                value = int(entry.nexttry - now)
                state = PENDING
            out.append(f"{parts[0]}|{state}|{value}|{parts[1]}\n")
        return "".join(out)

    def schedule_now(self, entries: list[Entry]) -> int:
        now = time.time()
        count = 0
        for entry in entries:
            if entry.state == PENDING:
                self._schedule(entry, now)
                count += 1
            elif entry.state == "ready":  # already due (its agent is paused or busy): nothing to advance
                count += 1
        return count

    async def suspend(self, entries: list[Entry]) -> int:
        """Pause envelopes. The state changes in memory at once (no delivery starts from here on), then the
        `suspend` flag is written to each envelope file, so that the pause survives a restart."""
        changed: list[Entry] = []
        for entry in entries:
            if entry.state in (PENDING, "ready"):
                entry.state = SUSPENDED
                entry.envelope.flags = shared_flags((*entry.envelope.flags, "suspend"))
                entry.line_parts = None
                changed.append(entry)
        await self._save_flags(changed)
        return len(changed)

    async def resume(self, entries: list[Entry]) -> int:
        """Resume paused envelopes: the flag is cleared on disk first, then they are scheduled (so that no
        delivery, which may rewrite the same file, runs while the file is being rewritten here)."""
        changed = [entry for entry in entries if entry.state == SUSPENDED]
        for entry in changed:
            entry.envelope.flags = shared_flags(entry.envelope.flags - {"suspend"})
            entry.line_parts = None
        await self._save_flags(changed)
        now = time.time()
        for entry in changed:
            if entry.state == SUSPENDED and entry.envelope.evpid in self.entries and \
                    "suspend" not in entry.envelope.flags:
                self._schedule(entry, max(now, entry.nexttry))
        return len(changed)

    async def _remove_after(self, saving: asyncio.Future[None], evpid: int) -> bool:
        await asyncio.shield(saving)
        return bool(await self.queue.remove_envelope(evpid))

    async def _save_flags(self, entries: list[Entry]) -> None:
        spool = getattr(self.queue, "spool", None)
        if not entries or spool is None:
            return
        files = [(entry.envelope.evpid, codec.stored(dump_envelope(entry.envelope))) for entry in entries]
        # The rewrite checks that each file is still there, then replaces it: a removal in between (`smtpctl
        # remove` while the pause runs) would find its file put back, and the removed mail would return at the next
        # start. So a removal asked from here on waits until the rewrite is done, then deletes the file.
        saving: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for evpid, _ in files:
            self._saving[evpid] = saving
        try:
            async with self._flags_lock:  # one rewrite of a file at a time (they share its temporary name)
                failures = await asyncio.to_thread(spool.rewrite_envelopes, files)
        finally:
            saving.set_result(None)
            for evpid, _ in files:
                if self._saving.get(evpid) is saving:
                    del self._saving[evpid]
        for evpid, error in failures:
            LOG.warning("scheduler: %016x: suspend flag not saved: %s", evpid, error.strerror or error)

    async def remove(self, entries: list[Entry]) -> int:
        count = 0
        for entry in entries:
            if entry.state == INFLIGHT:
                # As OpenSMTPD: marked, removed when its attempt ends, and counted (once: not when marked already)
                if not entry.remove_after:
                    entry.remove_after = True
                    STATS.increment("scheduler.envelope.removed")
                    _log_envelope(entry.envelope, "Remove", "Removed by administrator")
                    count += 1
                continue
            if entry.envelope.evpid not in self.entries:
                continue
            STATS.increment("scheduler.envelope.removed")
            _log_envelope(entry.envelope, "Remove", "Removed by administrator")
            await self._delete(entry, "removed")
            count += 1
        return count

    async def discover(self, msgid: int, evpid: int | None = None) -> int:
        """Take the message's envelope files that the scheduler does not know. Not those it forgot (delivered,
        failed, removed) while their files were still there, before or during the read: a delivered envelope
        would be delivered again, a removed one come back. Nor those of a message the queue has not handed over
        yet (under queue/, waiting for its checkpoint, or for room on the disk): the queue hands them over
        later all the same, and they were delivered twice (once discovered, once handed over)."""
        if self._not_handed_over(msgid):
            return 0
        forgotten = set(self.removing)
        self._discovering.append(forgotten)
        try:
            envelopes = await self.queue.discover(msgid)
        finally:
            self._discovering.remove(forgotten)
        forgotten |= self.removing
        if self._not_handed_over(msgid):
            return 0
        envelopes = [envelope for envelope in envelopes if envelope.evpid not in forgotten
                     and (evpid is None or envelope.evpid == evpid)]
        return self.add_envelopes(envelopes, loaded=True)


def build(daemon: Daemon) -> Scheduler:
    import smtpd.control.queue_commands  # noqa: F401 — registers the queue's control commands

    scheduler = Scheduler(daemon, daemon.queue, limits=_limits_from_config(daemon))
    daemon.scheduler = scheduler
    return scheduler


def _limits_from_config(source: Daemon | Config) -> dict[str, int]:
    limits: dict[str, int] = {}
    config = getattr(source, "config", source)
    for key, value in getattr(config, "mda_limits", ()):
        if key == "max-session":
            limits["mda"] = value
    return limits
