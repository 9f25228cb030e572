"""Daemon side of the queue commands: show.queue, schedule, remove, pause.envelope, resume.envelope, discover.

Arguments (JSON): ``target`` = "all" | 8 hex digits (a msgid) | 16 hex digits (an evpid); the filter fields of
``smtpd.queue.listing.EnvelopeFilter`` (sender, rcpt, domain, older, newer, state); ``dry_run`` (bool).
Results: show.queue -> {"fields": [...], "rows": [[...], ...], "corrupt": [...], "loading": bool,
"waiting_for_disk": [msgid, ...]} (with
``format: "lines"``: "lines", the piped text, instead of "rows"; with ``corrupt_only``: only "corrupt");
the others -> {"count": N, "rows": [...] (with dry_run: the envelopes that would be affected)}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.ids import format_msgid, parse_evpid, parse_msgid
from smtpd.control.registry import ControlFailure, command
from smtpd.queue.listing import ROW_FIELDS, EnvelopeFilter

if TYPE_CHECKING:
    from smtpd.daemon import Daemon
    from smtpd.scheduler import Entry, Scheduler


def _by_age(entry: Entry) -> int:
    """The order of `show queue`: oldest first (ctime, then evpid), as one integer (an evpid has 64 bits):
    50,000 integers sort in a third of the time the (ctime, evpid) tuples take."""
    envelope = entry.envelope
    return (envelope.ctime << 64) | envelope.evpid


def parse_target(value: Any, allow_all: bool = True) -> str | int:
    text = str(value if value is not None else "")
    if allow_all and text == "all":
        return "all"
    identifier = parse_evpid(text) if len(text) == 16 else parse_msgid(text)
    if identifier is None:
        expected = "<evpid>|<msgid>|all" if allow_all else "<evpid>|<msgid>"
        raise ControlFailure(f"invalid target {text!r}: expected {expected}")
    return identifier


def _scheduler(daemon: Daemon) -> Scheduler:
    if daemon.scheduler is None:
        raise ControlFailure("the scheduler is not running")
    return daemon.scheduler


def _filter(args: dict[str, Any]) -> EnvelopeFilter:
    try:
        return EnvelopeFilter.from_args(args)
    except ValueError as error:
        raise ControlFailure(str(error)) from None


async def _loaded(daemon: Daemon) -> None:
    """The changing commands act on the queue as it is on disk: right after a start, while the queue is still
    being loaded, they wait until the scheduler has all of it. (`remove all` removed the envelopes loaded so far
    and printed their count; the others were loaded afterwards and delivered. A `discover` of a message not
    loaded yet gave its envelopes twice, once by the loader.)"""
    await daemon.queue.wait_loaded()


async def _selection(daemon: Daemon, args: dict[str, Any]) -> tuple[Scheduler, list[Entry]]:
    scheduler = _scheduler(daemon)
    target = parse_target(args.get("target", "all"))
    selector = _filter(args)
    await _loaded(daemon)
    return scheduler, scheduler.select(target, selector)


@command("show.queue")
async def show_queue(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    if args.get("corrupt_only"):  # smtpctl show queue --corrupt: the files moved aside, nothing else
        return {"corrupt": [entry.__dict__ for entry in daemon.queue.corrupt_entries()]}
    scheduler = _scheduler(daemon)
    target: str | int = "all"
    if args.get("msgid"):
        target = parse_target(args["msgid"])
    entries = scheduler.select(target, _filter(args))
    entries.sort(key=_by_age)
    corrupt = [entry.__dict__ for entry in daemon.queue.corrupt_entries()]
    result: dict[str, Any] = {"fields": list(ROW_FIELDS), "corrupt": corrupt,
                              "loading": not daemon.queue.loading_done.is_set(),
                              "waiting_for_disk": [format_msgid(msgid) for msgid in daemon.queue.waiting_for_disk()]}
    if args.get("format") == "lines":
        # The piped output, made here as one string: much cheaper to encode and decode than 50,000 lists.
        result["lines"] = scheduler.lines(entries)
    else:
        result["rows"] = scheduler.rows(entries)
    return result


def _dry_run(scheduler: Scheduler, entries: list[Entry]) -> dict[str, Any]:
    return {"count": len(entries), "rows": scheduler.rows(entries), "dry_run": True}


@command("schedule")
async def schedule(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    scheduler, entries = await _selection(daemon, args)
    if args.get("dry_run"):
        return _dry_run(scheduler, [entry for entry in entries if entry.state in ("pending", "ready")])
    return {"count": scheduler.schedule_now(entries)}


@command("remove")
async def remove(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    scheduler, entries = await _selection(daemon, args)
    if args.get("dry_run"):
        # (an envelope in flight is removed when its attempt ends: listed, unless a remove marked it already)
        return _dry_run(scheduler, [entry for entry in entries if entry.state != "inflight" or not entry.remove_after])
    return {"count": await scheduler.remove(entries)}


@command("pause.envelope")
async def pause_envelope(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    scheduler, entries = await _selection(daemon, args)
    if args.get("dry_run"):
        return _dry_run(scheduler, [entry for entry in entries if entry.state in ("pending", "ready")])
    return {"count": await scheduler.suspend(entries)}


@command("resume.envelope")
async def resume_envelope(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    scheduler, entries = await _selection(daemon, args)
    if args.get("dry_run"):
        return _dry_run(scheduler, [entry for entry in entries if entry.state == "suspended"])
    return {"count": await scheduler.resume(entries)}


@command("discover")
async def discover(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    scheduler = _scheduler(daemon)
    target = parse_target(args.get("target"), allow_all=False)
    assert isinstance(target, int)
    await _loaded(daemon)
    if target > 0xFFFFFFFF:
        return {"count": await scheduler.discover(target >> 32, evpid=target)}
    return {"count": await scheduler.discover(target)}
