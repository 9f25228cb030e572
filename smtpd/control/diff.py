"""What a reload changes, in words (`smtpctl reload` prints these, the daemon logs them).

Statements are compared as the configuration dumper writes them, so a change of location alone (a comment
added above) is not a change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from smtpd.config import dump
from smtpd.config.model import Config, without_locations


def _texts(items: Iterable[Any], config: Config, render: Callable[[Any, Config], str]) -> list[str]:
    return [render(item, config) for item in items]


def _added_removed(kind: str, old: list[str], new: list[str]) -> list[str]:
    changes = [f"{kind} removed: {text}" for text in old if text not in new]
    changes += [f"{kind} added: {text}" for text in new if text not in old]
    return changes


def _named(kind: str, old: dict[str, str], new: dict[str, str]) -> list[str]:
    changes = [f"{kind} removed: {old[name]}" for name in old if name not in new]
    changes += [f"{kind} added: {new[name]}" for name in new if name not in old]
    changes += [f"{kind} changed: {new[name]}" for name in new if name in old and old[name] != new[name]]
    return changes


def describe_changes(old: Config, new: Config) -> list[str]:
    changes = _added_removed("listener", _texts(old.listeners, old, dump.format_listener),
                             _texts(new.listeners, new, dump.format_listener))
    changes += _named("table", _user_tables(old), _user_tables(new))
    changes += _inline_tables(old, new)
    changes += _named("filter", _filters(old), _filters(new))
    changes += _named("action", {name: dump.format_action(action, old) for name, action in old.actions.items()},
                      {name: dump.format_action(action, new) for name, action in new.actions.items()})
    old_rules = _texts(old.rules, old, dump.format_rule)
    new_rules = _texts(new.rules, new, dump.format_rule)
    if old_rules != new_rules:
        changes += _added_removed("rule", old_rules, new_rules) or ["rules reordered"]
    for label, before, after in (("smtp options", old.smtp, new.smtp), ("queue options", old.queue, new.queue),
                                 ("srs options", old.srs, new.srs),
                                 ("bounce warn-interval", old.bounce_warn_intervals, new.bounce_warn_intervals),
                                 ("mta limits", old.mta_limits, new.mta_limits),
                                 ("mda limits", old.mda_limits, new.mda_limits),
                                 ("pki", without_locations(old.pkis), without_locations(new.pkis)),
                                 ("mta max-deferred", old.mta_max_deferred, new.mta_max_deferred),
                                 ("scheduler limits", old.scheduler_limits, new.scheduler_limits),
                                 ("admd", old.admd, new.admd)):
        if before != after:
            changes.append(f"{label} changed")
    if _queue_codec_settings(old) != _queue_codec_settings(new):
        changes.append("queue compression or encryption changed: it takes effect at the next start (until then "
                       "the queue is stored as before)")
    changes += _named("ca", {name: _format_ca(ca) for name, ca in old.cas.items()},
                      {name: _format_ca(ca) for name, ca in new.cas.items()})
    changes += _named("mda wrapper", _wrappers(old), _wrappers(new))
    changes += _named("proc", _procs(old), _procs(new))
    if not changes and dump.comparable(old) != dump.comparable(new):
        changes.append("other statements changed")  # a statement not compared above: never "no changes"
    return changes


def _queue_codec_settings(config: Config) -> tuple[bool, bool, str | None]:
    """What the queue's codec is made of: chosen at the start (the key may have been typed in), kept until
    the daemon stops."""
    return config.queue.compression, config.queue.encryption, config.queue.encryption_key


def _format_ca(ca: Any) -> str:
    return f"ca {dump.quote(ca.name)} cert {dump.quote(ca.cert)}"


def _wrappers(config: Config) -> dict[str, str]:
    return {name: f"mda wrapper {dump.quote(name)} {dump.quote(command)}"
            for name, command in config.mda_wrappers.items()}


def _procs(config: Config) -> dict[str, str]:
    return {name: f"proc {dump.quote(proc.name)} {dump.quote(proc.command)}"
            + "".join(f" {key} {dump.quote(value)}" for key, value in
                      (("user", proc.user), ("group", proc.group), ("chroot", proc.chroot)) if value is not None)
            for name, proc in config.procs.items()
            # (a `filter NAME proc-exec` declares its process too: its change is the filter's, said once)
            if getattr(config.filters.get(name), "kind", None) != "proc-exec"}


def _user_tables(config: Config) -> dict[str, str]:
    return {name: dump.format_table(decl) for name, decl in config.tables.items()
            if not decl.builtin and not decl.inline and not dump.is_anonymous(name)}


def _inline_tables(old: Config, new: Config) -> list[str]:
    """Named inline tables (`table x { ... }`) by name only: their values may be credentials."""
    before, after = (_inline_contents(config) for config in (old, new))
    changes = [f"table removed: {name}" for name in before if name not in after]
    changes += [f"table added: {name}" for name in after if name not in before]
    changes += [f"table changed: {name}" for name in after if name in before and before[name] != after[name]]
    return changes


def _inline_contents(config: Config) -> dict[str, str]:
    return {name: dump.format_table(decl) for name, decl in config.tables.items()
            if not decl.builtin and decl.inline and not dump.is_anonymous(name)}


def _filters(config: Config) -> dict[str, str]:
    """Declared filters, chains and procs (the inline lists of listeners show in their listener's text)."""
    return {name: dump.format_filter(item, config) for name, item in config.filters.items()
            if not name.startswith("<dynchain:")}
