"""Relaying (OpenSMTPD's mta): envelopes of relay actions go to a smarthost or to the domain's MX hosts.

`await daemon.mta.deliver(envelope, message_path)` relays one envelope and never raises. The scheduler hands
envelopes over one at a time; the agent groups those of one message that go the same way (same relay, same
MAIL FROM) during a short window (BATCH_WINDOW) and sends them in one transaction, and keeps sessions open a
few seconds (`session-keepalive`) so that the next message to the same host reuses the connection.

Results: a remote 2xx → Ok; 4xx → tempfail; 5xx → permfail carrying the remote's whole reply (every line);
connection, TLS and protocol failures → tempfail (the next MX is tried first). A malformed or oversized reply
(the CVE-2020-8794 shapes) ends that session and tempfails the envelopes in it, nothing more.

The port of MX deliveries is 25; the environment variable SMTPD_MX_PORT changes it (tests, and setups that
reach their MX through a port-mapping firewall). DNS questions go to the SMTPD_RESOLVER resolver (mx.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.durations import duration_to_text
from smtpd import log, trace
from smtpd.config.model import Config, Method
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.lookup.tables import asked_off_the_loop
from smtpd.lookup.tables.base import Service, TableError
from smtpd.mta.mx import MxError, Resolver
from smtpd.mta.plan import Plan, PlanError, make_plan
from smtpd.mta.reports import Opener, SessionReports, listeners, opener
from smtpd.mta.routes import DEFAULT_LIMITS, Host, MtaState, RelayState, Route, clock
from smtpd.mta.session import Job, Session, SessionError, message_facts, open_session, transfer
from smtpd.mta.tls import TlsMode
from smtpd.queue import codec
from smtpd.queue.codec import QueueCodecError
from smtpd.queue.envelope import Envelope
from smtpd.smtp.address import valid_domain
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

ENV_MX_PORT = "SMTPD_MX_PORT"
ENV_TIMEOUT = "SMTPD_MTA_TIMEOUT"
SOURCE_TRIES = 32  # entries of a `src` table tried for one that suits the MX's address family
BATCH_WINDOW = 0.05  # seconds to wait for the other envelopes of a message before connecting
MAX_RCPT_PER_TRANSACTION = 100
DEFAULT_TIMEOUT = 300.0
PRUNE_INTERVAL = 60.0

LOG = log.get("mta")


@dataclass
class _Batch:
    plan: Plan
    message_path: str
    jobs: list[Job] = field(default_factory=list)


@dataclass
class _Pooled:
    session: Session
    route: Route
    relay: RelayState
    domain: str
    timer: asyncio.TimerHandle | None = None


class MtaAgent:
    """The relay agent: one per daemon."""

    def __init__(self, config_source: Any, tables: Any = None, mailname: str = "localhost", *,
                 resolver: Resolver | None = None, mx_port: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, batch_window: float = BATCH_WINDOW) -> None:
        # config_source: the Daemon (its .config and .tables are read at each delivery) or a Config.
        self._config_source = config_source
        self._tables = tables
        self.mailname = mailname
        self.resolver = resolver or Resolver()
        self.mx_port = mx_port or int(os.environ.get(ENV_MX_PORT) or 25)
        self.timeout = timeout
        self.batch_window = batch_window
        self.state = MtaState()
        self._batches: dict[tuple[Any, ...], _Batch] = {}
        self._pool: dict[tuple[str, str], list[_Pooled]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_prune = clock()
        self._ptr_lookups: dict[str, asyncio.Task[None]] = {}  # by address, while under way
        self._deferred: dict[str, int] = {}  # relay key -> envelopes handed over and not yet resolved
        self.held = 0  # envelopes waiting for their relay to drain below `mta max-deferred`

    @property
    def config(self) -> Config:
        source = self._config_source
        return source if isinstance(source, Config) else source.config

    @property
    def tables(self) -> Any:
        return getattr(self._config_source, "tables", None) or self._tables

    # -- component ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._apply_limits(self.config)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._close_pool()

    async def reconfigure(self, old_config: Config, new_config: Config) -> list[str]:
        self._apply_limits(new_config)
        # Idle sessions were opened with the old relay options: closed, but in the background. Each QUIT may
        # wait seconds for a slow server, and the reload must not: until it ends, new SMTP sessions would pair
        # the old config with the new tables (swapped first), and later reloads would wait.
        idle = self._detach_pool()  # at once: no delivery may take one of them from now on
        closing = asyncio.get_running_loop().create_task(self._close_detached(idle))
        self._tasks.add(closing)
        closing.add_done_callback(self._tasks.discard)
        return []

    def _apply_limits(self, config: Config) -> None:
        self.state.limits = dict(DEFAULT_LIMITS)
        self.state.domain_limits = {}
        self.state.families = {}
        for limit in config.mta_limits:
            values = dict(limit.values)
            if limit.domain is None:
                self.state.limits.update(values)
            else:
                self.state.domain_limits.setdefault(limit.domain.lower(), {}).update(values)
            if limit.family is not None:
                self.state.families[limit.domain.lower() if limit.domain else None] = limit.family

    # -- the contract ---------------------------------------------------------------------------------------
    async def deliver(self, envelope: Envelope, message_path: str) -> DeliveryResult:
        STATS.increment("mta.envelope")
        job: Job | None = None
        plan: Plan | None = None
        try:
            plan = await asked_off_the_loop(self.tables, self._plan, envelope)  # src, relay tables
            await self._wait_below_max_deferred(plan.relay_key, envelope)
            try:
                job = self._enqueue(envelope, plan, message_path)
                result = await asyncio.shield(job.future)
            finally:
                self._deferred[plan.relay_key] -= 1
                if not self._deferred[plan.relay_key]:
                    del self._deferred[plan.relay_key]
                self.state.changed()
        except PlanError as error:
            result = (DeliveryResult.permfail if error.permanent else DeliveryResult.tempfail)(error.message, 0)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — a delivery never takes the daemon down
            LOG.exception("mta: unexpected error relaying %016x", envelope.evpid)
            result = DeliveryResult.tempfail(f"internal error: {type(error).__name__}: {error}")
        finally:
            STATS.decrement("mta.envelope")
        self._log_delivery(envelope, plan, job, result)
        return result

    def _plan(self, envelope: Envelope) -> Plan:
        config = self.config
        action = config.actions.get(envelope.dispatcher)
        if action is None:
            raise PlanError(f"no such dispatcher: {envelope.dispatcher}")
        if action.method is not Method.RELAY or action.relay is None:
            raise PlanError(f"dispatcher {action.name} does not relay")
        plan = make_plan(config, self.tables, action.relay, envelope, self.mx_port, self.mailname)
        if plan.source and self._paused(plan.source, plan.domain):
            raise PlanError(f"relaying from {plan.source} for {plan.domain} is paused")
        return plan

    async def _wait_below_max_deferred(self, relay_key: str, envelope: Envelope) -> None:
        """`mta max-deferred N`: at most N envelopes per relay are in the agent's hands (waiting for a session,
        or being sent); further ones are held back here, without costing an attempt, until one is done."""
        def full() -> bool:
            return self._deferred.get(relay_key, 0) >= max(1, self.config.mta_max_deferred)
        if full():
            trace.emit("mta", f"mta: {envelope.evpid:016x} held: {relay_key} has "
                       f"{self._deferred[relay_key]} envelopes in progress (max-deferred)",
                       evpid=f"{envelope.evpid:016x}", relay=relay_key)
            self.held += 1
            try:
                while full():
                    await self.state.wait_for_change(1.0)
            finally:
                self.held -= 1
        self._deferred[relay_key] = self._deferred.get(relay_key, 0) + 1

    def _enqueue(self, envelope: Envelope, plan: Plan, message_path: str) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(envelope, loop.create_future(), time.time())
        key = (envelope.msgid, plan.session_key, plan.sender, message_path)
        batch = self._batches.get(key)
        if batch is None or len(batch.jobs) >= MAX_RCPT_PER_TRANSACTION:
            batch = self._batches[key] = _Batch(plan, message_path)
            loop.call_later(self.batch_window, self._flush, key, batch)
        batch.jobs.append(job)
        trace.emit("mta", f"mta: {envelope.evpid:016x} for <{envelope.dest}> queued on {plan.relay_key}",
                   evpid=f"{envelope.evpid:016x}", relay=plan.relay_key)
        return job

    def _flush(self, key: tuple[Any, ...], batch: _Batch) -> None:
        if self._batches.get(key) is batch:
            del self._batches[key]
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one message, one relay -----------------------------------------------------------------------------
    async def _run_batch(self, batch: _Batch) -> None:
        plan = batch.plan
        now = clock()
        if now - self._last_prune > PRUNE_INTERVAL:
            self._last_prune = now
            self.state.prune(now)
        relay = self.state.relay(plan.relay_key, plan.domain)
        relay.ntask += 1
        relay.refcount += 1
        STATS.increment("mta.task")
        STATS.increment("mta.task.running")
        try:
            await self._deliver_batch(batch, relay)
        except asyncio.CancelledError:
            _resolve_pending(batch.jobs, DeliveryResult.tempfail("relay agent stopping"))
            raise
        except Exception as error:  # noqa: BLE001
            LOG.exception("mta: unexpected error on %s", plan.relay_key)
            _resolve_pending(batch.jobs, DeliveryResult.tempfail(f"internal error: {type(error).__name__}"))
        finally:
            _resolve_pending(batch.jobs, DeliveryResult.tempfail("relay attempt ended without a result"))
            relay.ntask -= 1
            relay.refcount -= 1
            STATS.decrement("mta.task")
            STATS.decrement("mta.task.running")

    async def _deliver_batch(self, batch: _Batch, relay: RelayState) -> None:
        try:
            message = await asyncio.to_thread(codec.open_message, batch.message_path)
        except OSError as error:
            _resolve_pending(batch.jobs, DeliveryResult.tempfail(f"cannot read the message: {error.strerror}"))
            return
        except QueueCodecError as error:
            _resolve_pending(batch.jobs, DeliveryResult.tempfail(f"cannot read the message: {error}"))
            return
        # Held open until the batch ends: an encoded message's clear copy is then decoded once for its facts
        # and shared by every transfer of the batch (codec._SharedCopies), rather than decoded for each.
        with message:
            try:
                has_8bit, size = await asyncio.to_thread(message_facts, message)
            except OSError as error:
                _resolve_pending(batch.jobs, DeliveryResult.tempfail(f"cannot read the message: {error.strerror}"))
                return
            await self._deliver_read_batch(batch, relay, has_8bit, size)

    async def _deliver_read_batch(self, batch: _Batch, relay: RelayState, has_8bit: bool, size: int) -> None:
        plan = batch.plan
        try:
            candidates = await self._candidates(plan)
        except MxError as error:
            result = (DeliveryResult.permfail if error.permanent else DeliveryResult.tempfail)(
                error.message, error.esc_code or (12 if error.permanent else 44))
            trace.emit("mta", f"mta: {plan.domain}: {error.message}", domain=plan.domain)
            _resolve_pending(batch.jobs, result)
            return
        family = self.state.family(plan.domain)
        if family is not None:
            candidates = [(name, address) for name, address in candidates if _family_of(address) in (family, None)]
            if not candidates:
                _resolve_pending(batch.jobs, DeliveryResult.tempfail(
                    f"No {family} address for {plan.domain} (mta limit {family})", 42))
                return
        if plan.source:
            # A source address connects only to addresses of its own family (as OpenSMTPD's routing skips the
            # others): an IPv4 source cannot reach an IPv6-only MX, and trying failed as "Unknown error -9".
            plan = await asked_off_the_loop(self.tables, self._source_for, plan, candidates)
            candidates = [(name, address) for name, address in candidates
                          if _family_of(address) in (_family_of(plan.source or ""), None)]
            if not candidates:
                trace.emit("mta", f"mta: {plan.domain}: no MX address of the family of source {plan.source}",
                           domain=plan.domain)
                _resolve_pending(batch.jobs, DeliveryResult.tempfail("Address family mismatch on destination MXs", 42))
                return
        last_error = "No MX host could be reached"
        now = clock()
        for name, address in candidates:
            pending = [job for job in batch.jobs if not job.future.done()]
            if not pending:
                return
            route = self.state.route(plan.source, self.state.host(address, "" if name == address else name))
            self._look_up_ptr(route.host)
            if route.disabled(now):
                last_error = f"Route {route.text()} is disabled after repeated errors"
                trace.emit("mta", f"mta: skipping disabled route {route.id}. {route.text()}", route=route.id)
                continue
            outcome = await self._try_route(plan, relay, route, name, address, pending, batch, has_8bit, size)
            if outcome is None:
                return
            last_error = outcome
        _resolve_pending(batch.jobs, DeliveryResult.tempfail(last_error, 42))

    def _source_for(self, plan: Plan, candidates: list[tuple[str, str]]) -> Plan:
        """The plan itself when its source suits some candidate address; else, with a `src <table>`, the plan
        with another entry of that table that does (an IPv6 one for an IPv6-only MX), if there is one."""
        def suits(source: str) -> bool:
            return any(_family_of(address) in (_family_of(source), None) for _, address in candidates)

        if not plan.source or suits(plan.source) or not plan.source_table:
            return plan
        for _ in range(SOURCE_TRIES):
            try:
                other = self.tables.fetch(plan.source_table, Service.SOURCE)
            except TableError:
                return plan
            if not other or other == plan.source:
                continue
            if suits(other) and not self._paused(other, plan.domain):
                return dataclasses.replace(plan, source=other)
        return plan

    def _record_hoststats(self, jobs: list[Job]) -> None:
        """`show hoststats`: the last reply per recipient domain, as OpenSMTPD keys it. A refused recipient is
        recorded before the message's final reply, in the order 6.8 meets them (RCPT replies, then end of data)."""
        results = [(job, job.future.result()) for job in jobs if job.future.done()]
        results.sort(key=lambda pair: pair[1].outcome is Outcome.OK)  # (stable: RCPT order within each)
        for job, result in results:
            self.state.hoststat(_recipient_domain(job), result.text or "Ok")

    def _paused(self, source: str, domain: str) -> bool:
        return (source, domain) in self.state.paused or (source, "*") in self.state.paused

    async def _try_route(self, plan: Plan, relay: RelayState, route: Route, name: str, address: str,
                         jobs: list[Job], batch: _Batch, has_8bit: bool, size: int) -> str | None:
        """Deliver over this route. None when every job got its result; else why the route failed."""
        session = await self._idle_session_or_place(plan, relay, route, address)
        if session is None:
            try:
                session = await self._connect(plan, relay, route, name, address)
            except SessionError as error:
                for job in jobs:
                    self.state.hoststat(_recipient_domain(job), error.message)
                if error.permanent:
                    _resolve_pending(jobs, DeliveryResult.permfail(error.message, 0))
                    return None
                if error.policy:  # (the next host may meet the policy; this one is no worse for others)
                    return error.message
                if not error.route_failure:
                    _resolve_pending(jobs, DeliveryResult.tempfail(error.message, 0))
                    return None
                if self.state.route_error(route):
                    LOG.info("smtp-out: Disabling route %s for %ds", route.text(),
                             int(route.disabled_until - clock()))
                return error.message
        sockname = session.client.get_extra_info("sockname")
        source = sockname[0] if isinstance(sockname, tuple) and sockname else ""
        for job in jobs:
            job.relay_text = f"{address} ({name})" if name != address else address
            job.session_id = session.id
            job.source = source
        usable = await transfer(session, plan, jobs, batch.message_path, has_8bit, size)
        self._record_hoststats(jobs)
        if usable:
            self.state.route_ok(route)
            await self._keep_or_close(plan, session, route, relay)
        else:
            self.state.route_error(route)
            await self._discard(session, route, relay, plan.domain)
        return None

    async def _idle_session_or_place(self, plan: Plan, relay: RelayState, route: Route,
                                     address: str) -> Session | None:
        """An idle session to reuse, or None once a connection place is reserved for a new one."""
        while True:
            pooled = await self._take_pooled(plan.session_key, address)
            if pooled is not None:
                return pooled.session
            delay = self.state.connect_delay(route, relay, plan.domain, clock())
            if delay > 0:
                # conn-delay-* / reconn-delay-route: wait, but take a session that becomes idle meanwhile.
                trace.emit("mta", f"mta: route {route.id}. {route.text()}: next connection in {delay:.1f}s",
                           route=route.id, delay=round(delay, 1))
                await self.state.wait_for_change(delay)
                continue
            if self.state.reserve(route, relay, plan.domain):
                return None
            # Full: sessions kept idle for other relays to this host give their place up first.
            if not await self._close_one_idle(address):
                await self.state.wait_for_change(1.0)

    async def _close_one_idle(self, address: str) -> bool:
        for (_key, pooled_address), entries in self._pool.items():
            if pooled_address == address and entries:
                pooled = entries.pop(0)
                if pooled.timer is not None:
                    pooled.timer.cancel()
                pooled.route.idle -= 1
                await self._discard(pooled.session, pooled.route, pooled.relay, pooled.domain, polite=True)
                return True
        return False

    async def _connect(self, plan: Plan, relay: RelayState, route: Route, name: str, address: str) -> Session:
        """Open a session on a reserved connection place (given back if it fails)."""
        try:
            reports = self._reports(plan)
            rdns = await self._rdns(route.host) if reports is not None else ""
            try:
                session = await open_session(plan, name, address, self.tables, self.mailname, self.timeout,
                                             reports=reports, rdns=rdns)
            except SessionError as error:
                if plan.tls.mode is not TlsMode.OPPORTUNISTIC or "TLS" not in error.message:
                    raise
                # Opportunistic TLS that fails is not a reason to keep the mail: start again in plain text.
                trace.emit("mta", f"mta: {address}: {error.message}; retrying without TLS", address=address)
                session = await open_session(plan, name, address, self.tables, self.mailname, self.timeout,
                                             allow_tls=False, reports=reports, rdns=rdns)
        except BaseException:
            self.state.release(route, relay, plan.domain)
            raise
        STATS.increment("mta.session")
        return session

    def _reports(self, plan: Plan) -> Opener | None:
        """Who hears of the relay's sessions (smtp-out reports): None for a relay without a filter process.

        The processes are looked up again once the connection is open: the PTR wait and the connection may span
        a reload, and the processes it replaces stop as soon as no session holds them (a set taken before would
        be reported to when stopped, and the new processes would hear nothing of the session)."""
        if self._opener_now(plan) is None:
            return None

        def open_reports(session_id: str) -> SessionReports | None:
            now = self._opener_now(plan)  # (None: a reload took the relay's filter processes away meanwhile)
            return now(session_id) if now is not None else None
        return open_reports

    def _told_as_now(self, plan: Plan, session: Session) -> bool:
        """Whether the session is told to the processes the relay's filter runs now. One opened before a reload
        that replaced them is not kept for reuse: the next messages' reports would go to the old processes, kept
        running for it, and the new ones would hear nothing (the reload closes only the sessions idle then)."""
        if not plan.report_filter:
            return True
        told = session.client.reports.reporters if session.client.reports is not None else ()
        return told == listeners(getattr(self._config_source, "processors", None), self.config, plan.report_filter)

    def _opener_now(self, plan: Plan) -> Opener | None:
        if not plan.report_filter:
            return None
        return opener(getattr(self._config_source, "processors", None), self.config, plan.report_filter)

    async def _rdns(self, host: Host) -> str:
        """The host's PTR name for link-connect (its address without one). 6.8 connects once it knows it: a
        session reported waits for the lookup under way (bounded by the resolver's PTR timeout)."""
        lookup = self._ptr_lookups.get(host.address)
        if lookup is not None and not lookup.done():
            await asyncio.wait([lookup])  # (shields it, and raises nothing: a failed lookup is no name)
        # The PTR record is written by the remote's owner: a name that is no host name (one with `|` would shift
        # the fields after it) is told as no name at all.
        return host.ptr if host.ptr and valid_domain(host.ptr) else host.address

    # -- the session pool -------------------------------------------------------------------------------------
    async def _take_pooled(self, plan_key: str, address: str) -> _Pooled | None:
        entries = self._pool.get((plan_key, address))
        while entries:
            pooled = entries.pop()
            if pooled.timer is not None:
                pooled.timer.cancel()
            pooled.route.idle -= 1
            client = pooled.session.client
            if not client.closed and not client.has_unread():  # unread: the server spoke out of turn, or closes
                try:
                    reply = await client.rset()  # is it still there?
                    if reply.is_ok:
                        trace.emit("mta", f"{pooled.session.id}: reusing the session", session=pooled.session.id)
                        return pooled
                except Exception:  # noqa: BLE001 — any failure: the session is gone
                    pass
            await self._discard(pooled.session, pooled.route, pooled.relay, pooled.domain)
        return None

    async def _keep_or_close(self, plan: Plan, session: Session, route: Route, relay: RelayState) -> None:
        keepalive = self.state.limit("session-keepalive", plan.domain)
        if session.client.closed or session.messages >= self.state.limit("session-mail-max", plan.domain) \
                or keepalive <= 0 or not self._told_as_now(plan, session):
            await self._discard(session, route, relay, plan.domain, polite=True)
            return
        pooled = _Pooled(session, route, relay, plan.domain)
        key = (plan.session_key, session.address)
        self._pool.setdefault(key, []).append(pooled)
        route.idle += 1
        pooled.timer = asyncio.get_running_loop().call_later(keepalive, self._expire, key, pooled)
        self.state.changed()

    def _expire(self, key: tuple[str, str], pooled: _Pooled) -> None:
        entries = self._pool.get(key, [])
        if pooled in entries:
            entries.remove(pooled)
            pooled.route.idle -= 1
            task = asyncio.get_running_loop().create_task(
                self._discard(pooled.session, pooled.route, pooled.relay, pooled.domain, polite=True))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _discard(self, session: Session, route: Route, relay: RelayState, domain: str,
                       polite: bool = False) -> None:
        if polite:
            await session.client.quit()
        else:
            await session.client.close()
        LOG.info("%s mta disconnected reason=%s messages=%d", session.id, "quit" if polite else "error",
                 session.messages)
        STATS.decrement("mta.session")
        self.state.release(route, relay, domain)

    async def _close_pool(self) -> None:
        await self._close_detached(self._detach_pool())

    def _detach_pool(self) -> list[_Pooled]:
        """Take every idle session out of the pool (no longer kept, nor counted as idle); the caller closes them."""
        pool, self._pool = self._pool, {}
        detached = [pooled for entries in pool.values() for pooled in entries]
        for pooled in detached:
            if pooled.timer is not None:
                pooled.timer.cancel()
            pooled.route.idle -= 1
        if detached:
            self.state.changed()
        return detached

    async def _close_detached(self, detached: list[_Pooled]) -> None:
        for pooled in detached:
            await self._discard(pooled.session, pooled.route, pooled.relay, pooled.domain, polite=True)

    # -- where to go --------------------------------------------------------------------------------------------
    async def _candidates(self, plan: Plan) -> list[tuple[str, str]]:
        if plan.smarthost is not None and plan.smarthost.unix_socket:
            return [(plan.smarthost.host, plan.smarthost.host)]
        if plan.smarthost is not None:
            addresses = await self.resolver.addresses(plan.smarthost.host)
            if not addresses:
                raise MxError(f"No address found for relay host {plan.smarthost.host}", permanent=False)
            return [(plan.smarthost.host, address) for address in addresses]
        hosts = await self.resolver.mx_hosts(plan.domain)
        return [(host.name, address) for host in self._higher_than_us(plan, hosts) for address in host.addresses]

    def _higher_than_us(self, plan: Plan, hosts: list[Any]) -> list[Any]:
        """The exchangers better than us (RFC 5321 5.1): when our own name (the `backup mx` name, else the
        mailname) is among them, it and those no better are dropped, with or without `backup`. OpenSMTPD does it
        only for `backup`: a plain relay to a domain whose MX is us sent the mail to our own server, which
        relayed it again, round after round, until its hop count bounced it."""
        ours = (plan.backup_name or self.mailname).rstrip(".").lower()
        preference = next((host.preference for host in hosts if host.name == ours), None)
        if preference is None:
            return hosts
        better = [host for host in hosts if host.preference < preference]
        if not better:
            if plan.backup:
                raise MxError(f"No MX host with a better preference than {ours} (backup)", permanent=False)
            # Kept (not bounced) with a clear error: it is a setup mistake (a rule relaying mail for one of our
            # own domains) that the administrator can mend, and the queue then delivers it.
            raise MxError(f"MX for {plan.domain} points back to us ({ours}): the mail would loop", permanent=False)
        return better

    def _look_up_ptr(self, host: Host) -> None:
        """Find the host's reverse DNS name for `show hosts`, once, in the background (never delays mail)."""
        if host.ptr_asked or host.address.startswith("/"):
            return
        host.ptr_asked = True

        async def look_up() -> None:
            host.ptr = await self.resolver.ptr(host.address)
            trace.emit("mta", f"mta: PTR of {host.address}: {host.ptr or 'none'}", address=host.address)
        task = asyncio.get_running_loop().create_task(look_up())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._ptr_lookups[host.address] = task
        task.add_done_callback(lambda _: self._ptr_lookups.pop(host.address, None))

    # -- smtpctl -------------------------------------------------------------------------------------------------
    def control_view(self, kind: str) -> list[dict[str, object]]:
        now = clock()
        views = {"hosts": self.state.show_hosts, "routes": self.state.show_routes,
                 "relays": self.state.show_relays, "hoststats": self.state.show_hoststats}
        if kind == "mta.paused":
            return self.state.show_paused()
        view = views.get(kind)
        return view(now) if view is not None else []

    def pause_route(self, source: str, domain: str) -> bool:
        key = (source, (domain or "*").lower())
        if key in self.state.paused:
            return False
        self.state.paused.add(key)
        return True

    def resume_route(self, source: str, domain: str) -> bool:
        key = (source, (domain or "*").lower())
        if key not in self.state.paused:
            return False
        self.state.paused.discard(key)
        return True

    def resume_route_id(self, route_id: int) -> bool:
        return self.state.resume_route_id(route_id)

    # -- logging ------------------------------------------------------------------------------------------------
    def _log_delivery(self, envelope: Envelope, plan: Plan | None, job: Job | None, result: DeliveryResult) -> None:
        """OpenSMTPD 6.8's line, field for field: from= is the MAIL FROM sent (after mail-from and srs), rcpt= the
        original recipient when an alias or forward changed it (else -), source= our end of the session (- when
        none was opened), relay= the remote host (or, when no session was opened, the smarthost or domain), and
        delay= the envelope's age."""
        word = {Outcome.OK: "Ok", Outcome.TEMPFAIL: "TempFail", Outcome.PERMFAIL: "PermFail"}.get(
            result.outcome, "PermFail")
        relay = job.relay_text if job is not None and job.relay_text else plan.domain if plan is not None else ""
        session = job.session_id if job is not None and job.session_id else f"{envelope.evpid:016x}"
        sender = plan.sender if plan is not None else envelope.sender
        rcpt = envelope.rcpt if envelope.rcpt and envelope.rcpt != envelope.dest else "-"
        source = job.source if job is not None and job.source else "-"
        delay = duration_to_text(max(0, int(time.time() - envelope.ctime))) if envelope.ctime else "0s"
        stat = result.text.split("\n")[-1] if result.text else ""
        LOG.info('%s mta delivery evpid=%016x from=<%s> to=<%s> rcpt=<%s> source="%s" relay="%s" delay=%s '
                 'result="%s" stat="%s"', session, envelope.evpid, sender, envelope.dest, rcpt, source, relay,
                 delay, word, stat)
        trace.emit("mta", f"mta: {envelope.evpid:016x} <{envelope.dest}>: {word}: {stat}",
                   evpid=f"{envelope.evpid:016x}", result=str(result.outcome), text=result.text)


def _family_of(address: str) -> str | None:
    """inet4 / inet6 for an IP address; None for a Unix socket path (no family to choose)."""
    if address.startswith("/"):
        return None
    return "inet6" if ":" in address else "inet4"


def _recipient_domain(job: Job) -> str:
    return job.envelope.dest.rpartition("@")[2]


def _resolve_pending(jobs: list[Job], result: DeliveryResult) -> None:
    for job in jobs:
        job.resolve(result)


def build(daemon: Daemon) -> MtaAgent:
    # SMTPD_MTA_TIMEOUT: seconds a remote may take to answer (300, as OpenSMTPD; shorter in tests).
    timeout = float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT)
    agent = MtaAgent(daemon, daemon.tables, daemon.mailname, timeout=timeout)
    daemon.mta = agent
    return agent
