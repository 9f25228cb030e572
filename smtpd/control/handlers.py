"""Daemon-side handlers of the control commands other than the queue's (those are in queue_commands.py).

Results are JSON-able dicts whose fields docs/control-api.md describes. A handler raises ControlFailure when the
command ran and failed; smtpctl prints `command failed` (or the message) and exits 1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shared.durations import duration_to_text
from smtpd import log, trace
from smtpd.control.registry import ControlFailure, command, stream
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

LOG = log.get("control")
Send = Callable[[dict[str, Any]], Awaitable[None]]

PAUSABLE = ("mda", "mta", "smtp")
PROFILE_KEYWORDS = {"imsg": "profile-imsg", "queue": "profile-queue"}
FOLLOW_CAPACITY = 1000  # events buffered per trace follower before it starts losing them
MONITOR_INTERVAL = 1.0


# -- show -----------------------------------------------------------------------------------------------
@command("show.status")
async def show_status(daemon: Daemon, args: dict[str, Any]) -> dict[str, str]:
    return {name: "paused" if daemon.is_paused(name) else "running" for name in PAUSABLE}


def stats_snapshot() -> dict[str, int | str]:
    values: dict[str, int | str] = dict(STATS.snapshot())
    values["uptime.human"] = duration_to_text(int(values["uptime"]))
    return dict(sorted(values.items()))


@command("show.stats")
async def show_stats(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return {"stats": stats_snapshot()}


def _mta_view(daemon: Daemon, kind: str) -> list[dict[str, Any]]:
    """What the relay agent reports for `show hosts|routes|relays|hoststats|mta paused`; empty without one."""
    view = getattr(daemon.mta, "control_view", None)
    if view is None:
        return []
    return list(view(kind))


for _kind in ("hosts", "routes", "relays", "hoststats", "mta.paused"):
    def _make(kind: str) -> None:
        @command(f"show.{kind}")
        async def show_mta_state(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
            return {"rows": _mta_view(daemon, kind)}
    _make(_kind)


# -- pause / resume ---------------------------------------------------------------------------------------
def _subsystem(args: dict[str, Any]) -> str:
    name = str(args.get("subsystem", ""))
    if name not in PAUSABLE:
        raise ControlFailure(f"invalid subsystem {name!r}: expected mda, mta or smtp")
    return name


@command("pause")
async def pause(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    name = _subsystem(args)
    if not daemon.set_paused(name, True):
        raise ControlFailure(f"{name} is already paused")
    return {"subsystem": name, "state": "paused"}


@command("resume")
async def resume(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    name = _subsystem(args)
    if not daemon.set_paused(name, False):
        raise ControlFailure(f"{name} is not paused")
    return {"subsystem": name, "state": "running"}


def _mta_call(daemon: Daemon, method: str, *call_args: Any) -> Any:
    function = getattr(daemon.mta, method, None)
    if function is None:
        raise ControlFailure("the relay agent is not running")
    return function(*call_args)


@command("pause.mta.route")
async def pause_mta_route(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    source, domain = _route_args(args)
    if not _mta_call(daemon, "pause_route", source, domain):
        raise ControlFailure(f"route from {source} for {domain} is already paused")
    return {"source": source, "domain": domain}


@command("resume.mta.route")
async def resume_mta_route(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    source, domain = _route_args(args)
    if not _mta_call(daemon, "resume_route", source, domain):
        raise ControlFailure(f"route from {source} for {domain} is not paused")
    return {"source": source, "domain": domain}


def _route_args(args: dict[str, Any]) -> tuple[str, str]:
    source = str(args.get("source", ""))
    try:
        ipaddress.ip_address(source)
    except ValueError:
        raise ControlFailure(f"invalid address {source!r}") from None
    from smtpd.mta.routes import address_text

    return address_text(source), str(args.get("domain", ""))


@command("resume.route")
async def resume_route(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    route = args.get("route")
    if not isinstance(route, int) or route < 1:
        raise ControlFailure(f"invalid route id {route!r}")
    if not _mta_call(daemon, "resume_route_id", route):
        raise ControlFailure(f"no suspended route {route}")
    return {"route": route}


# -- trace, profile, log ----------------------------------------------------------------------------------
def _trace_keywords(args: dict[str, Any]) -> list[str]:
    keywords = args.get("keywords")
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, list) or not keywords:
        raise ControlFailure("no trace keyword given")
    for keyword in keywords:
        if keyword not in trace.CONTROL_KEYWORDS and trace.canonical_subsystem(str(keyword)) is None:
            raise ControlFailure(f"invalid trace keyword: {keyword}")
    return [str(keyword) for keyword in keywords]


@command("trace")
async def trace_on(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    for keyword in _trace_keywords(args):
        trace.BUS.enable(keyword)
    return {"enabled": sorted(trace.BUS.enabled)}


@command("untrace")
async def trace_off(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    for keyword in _trace_keywords(args):
        trace.BUS.disable(keyword)
    return {"enabled": sorted(trace.BUS.enabled)}


def _profile_keyword(args: dict[str, Any]) -> str:
    keyword = str(args.get("keyword", ""))
    if keyword not in PROFILE_KEYWORDS:
        raise ControlFailure(f"invalid profile keyword: {keyword}")
    return PROFILE_KEYWORDS[keyword]


@command("profile")
async def profile_on(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    trace.BUS.enable(_profile_keyword(args))
    return {"enabled": sorted(trace.BUS.enabled)}


@command("unprofile")
async def profile_off(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    trace.BUS.disable(_profile_keyword(args))
    return {"enabled": sorted(trace.BUS.enabled)}


@command("log.verbose")
async def log_verbose(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    logging.getLogger(log.LOGGER_NAME).setLevel(logging.DEBUG)
    return {"level": "verbose"}


@command("log.brief")
async def log_brief(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    logging.getLogger(log.LOGGER_NAME).setLevel(logging.INFO)
    return {"level": "brief"}


# -- tables, reload, stop -----------------------------------------------------------------------------------
@command("update.table")
async def update_table(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    name = str(args.get("table", ""))
    if name not in daemon.config.tables:
        LOG.warning('Lookup table not found: "%s"', name)
        raise ControlFailure(f'Lookup table not found: "{name}"')
    tables = daemon.tables
    if tables is None:
        raise ControlFailure("the tables are not loaded")
    try:
        # Reading a table's file or database may take a while: off the event loop.
        outcome = await asyncio.to_thread(tables.reload, name)
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
    except Exception as error:  # noqa: BLE001 — TableError or a backend's own: the reload failed, say why
        LOG.warning('table "%s": reload failed: %s', name, error)
        LOG.info('info: Failed to update table "%s"', name)  # OpenSMTPD's line (reference §5.5)
        raise ControlFailure(f'table "{name}": reload failed: {error}') from None
    if outcome is False:
        LOG.info('info: Failed to update table "%s"', name)
        raise ControlFailure(f'table "{name}": reload failed')
    LOG.info('info: Table "%s" successfully updated', name)  # OpenSMTPD's line (reference §5.5)
    return {"table": name}


@command("reload")
async def reload(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    outcome = await daemon.reload()
    return {"ok": outcome.ok, "errors": outcome.errors, "warnings": outcome.warnings, "changes": outcome.changes}


@command("stop")
async def stop(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    # Answer first: the stop begins once this reply is on its way.
    asyncio.get_running_loop().call_later(0.05, daemon.request_stop)
    return {"stopping": True}


# -- explain ----------------------------------------------------------------------------------------------
@command("explain")
async def explain(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    from smtpd.control.explain import explain_delivery

    return await asyncio.to_thread(explain_delivery, daemon, args)


# -- streams ----------------------------------------------------------------------------------------------
@stream("monitor")
async def monitor(daemon: Daemon, args: dict[str, Any], send: Send) -> None:
    """The counters every second; smtpctl turns them into the reference's columns (deltas between rows)."""
    interval = _bounded(args.get("interval"), MONITOR_INTERVAL, 0.1, 60.0)
    while True:
        await send({"type": "stats", "time": time.time(), "stats": STATS.snapshot(), "digest": STATS.digest()})
        await asyncio.sleep(interval)


def _bounded(value: Any, default: float, lowest: float, highest: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return default
    return min(max(float(value), lowest), highest)


def event_filter(args: dict[str, Any]) -> Callable[[trace.TraceEvent], bool] | None:
    """The follower's filters (session, address, msgid): an event passes if it mentions every one given."""
    wanted = [str(args[key]).lower() for key in ("session", "address", "msgid") if args.get(key)]
    if not wanted:
        return None

    def accept(event: trace.TraceEvent) -> bool:
        text = " ".join([event.message, *(str(value) for value in event.fields.values())]).lower()
        return all(value in text for value in wanted)

    return accept


@stream("trace.follow")
async def trace_follow(daemon: Daemon, args: dict[str, Any], send: Send) -> None:
    """Stream the named subsystems' events until the client leaves; they go to the log meanwhile (BUS.hold)."""
    keywords = _trace_keywords(args)
    subsystems: set[str] = set()
    for keyword in keywords:
        subsystems |= trace.expand_keyword(keyword)
    capacity = int(_bounded(args.get("capacity"), FOLLOW_CAPACITY, 1, 100_000))
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    wake_pending = False

    def set_ready() -> None:
        nonlocal wake_pending
        wake_pending = False
        ready.set()

    def wake() -> None:
        # emit() may run in a worker thread (expansion runs in to_thread): hand the wake-up to the loop, once
        # per batch rather than once per event (each call_soon_threadsafe writes to the loop's wake-up pipe).
        nonlocal wake_pending
        if not wake_pending:
            wake_pending = True
            loop.call_soon_threadsafe(set_ready)

    subscription = trace.BUS.subscribe(subsystems, capacity=capacity, accept=event_filter(args), notify=wake)
    turned_on = trace.BUS.hold(subsystems)
    try:
        await send({"type": "start", "subsystems": sorted(subsystems), "enabled": turned_on,
                    "capacity": capacity})
        while True:
            await ready.wait()
            ready.clear()
            await _forward_events(subscription, send)
    finally:
        subscription.close()
        trace.BUS.release(subsystems)


async def _forward_events(subscription: trace.Subscription, send: Send) -> None:
    events = subscription.events
    while events:
        dropped, subscription.dropped = subscription.dropped, 0
        if dropped:
            await send({"type": "dropped", "count": dropped})
        event = events.popleft()
        await send({"type": "trace", **event.to_json()})
    dropped, subscription.dropped = subscription.dropped, 0
    if dropped:
        await send({"type": "dropped", "count": dropped})
