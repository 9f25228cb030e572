"""The effective configuration as modern (6.8) smtpd.conf text: `smtpd -n --dump`.

Macros are expanded, includes inlined, legacy statements translated, defaults left out. Parsing the output
gives the same model again (``comparable`` shows what "the same" means: locations and the generated names of
anonymous tables and filter chains aside). The formatters are also used for the legacy warnings, which
show the modern lines to write.
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass, replace

from smtpd.config.lexer import KEYWORDS
from smtpd.config.model import (
    DEFAULT_CIPHERS,
    DEFAULT_MAX_MAILS,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_RCPT,
    DEFAULT_QUEUE_TTL,
    DEFAULT_SRS_TTL,
    DEFAULT_SUBADDRESS_DELIMITER,
    DEFAULT_WARN_INTERVALS,
    Action,
    AuthMode,
    Condition,
    Config,
    Filter,
    Listener,
    MatchRule,
    Method,
    TableDecl,
    TableShape,
    TlsMode,
)

_PLAIN_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def quote(text: str) -> str:
    """A double-quoted config string that lexes back to ``text``.

    The lexer's escapes: ``\\"``, ``\\ `` and ``\\TAB`` stand for the second character, any other backslash is
    itself. So a backslash of the text is doubled where it comes before a space, a tab or the end (the first
    of the two is then a plain backslash, the second escapes what follows); at the end the second one is
    followed by a line continuation, which the lexer drops.
    """
    out: list[str] = []
    for index, char in enumerate(text):
        following = text[index + 1] if index + 1 < len(text) else None
        if char == '"':
            out.append('\\"')
        elif char == "\\" and following in (" ", "\t"):
            out.append("\\\\")
        elif char == "\\" and following is None:
            out.append("\\\\\n")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def name_word(text: str) -> str:
    """A name as a bare word when that lexes back to the same string, else quoted."""
    if _PLAIN_WORD.match(text) and text not in KEYWORDS:
        return text
    return quote(text)


def delay(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def is_anonymous(name: str) -> bool:
    return name.startswith("<dynamic:")


def inline_values(decl: TableDecl) -> str:
    if decl.shape is TableShape.MAPPING:
        entries = [f"{quote(key)} = {quote(value)}" for key, value in decl.mapping]
    else:
        entries = [quote(item) for item in decl.items]
    return "{ " + ", ".join(entries) + " }"


def table_ref(name: str, tables: dict[str, TableDecl]) -> str:
    if is_anonymous(name):
        decl = tables[name]
        if decl.shape is TableShape.LIST and len(decl.items) == 1:
            return quote(decl.items[0])
        return inline_values(decl)
    return f"<{name_word(name)}>"


def format_table(decl: TableDecl) -> str:
    if decl.inline:
        return f"table {name_word(decl.name)} {inline_values(decl)}"
    if decl.backend == "file" and decl.source is not None:
        return f"table {name_word(decl.name)} {quote('file:' + decl.source)}"
    spec = decl.backend if decl.source is None else f"{decl.backend}:{decl.source}"
    return f"table {name_word(decl.name)} {quote(spec)}"


def filter_ref(name: str, filters: dict[str, Filter]) -> str:
    if name.startswith("<dynchain:"):
        return "{ " + ", ".join(quote(member) for member in filters[name].chain) + " }"
    return quote(name)


def format_listener(listener: Listener, config: Config) -> str:
    tables = config.tables
    if listener.is_socket:
        words = ["listen on socket"]
    else:
        words = [f"listen on {quote(listener.interface)}"]
        if listener.family:
            words.append(listener.family)
        if listener.port_explicit:
            words.append(f"port {listener.port}")
        if listener.tls is not TlsMode.NONE:
            words.append(listener.tls.value + (" verify" if listener.verify else ""))
        words += [f"pki {quote(pki)}" for pki in listener.pki]
        if listener.ca:
            words.append(f"ca {quote(listener.ca)}")
        if listener.auth is not AuthMode.NONE:
            words.append(listener.auth.value)
            if listener.auth_table:
                words.append(table_ref(listener.auth_table, tables))
    if listener.tag is not None:
        words.append(f"tag {quote(listener.tag)}")
    if not listener.is_socket:
        if listener.hostname is not None:
            words.append(f"hostname {quote(listener.hostname)}")
        if listener.hostnames_table:
            words.append(f"hostnames {table_ref(listener.hostnames_table, tables)}")
    if listener.mask_src:
        words.append("mask-src")
    if not listener.is_socket:
        if listener.no_dsn:
            words.append("no-dsn")
        if listener.received_auth:
            words.append("received-auth")
        if listener.senders_table:
            words.append(f"senders {table_ref(listener.senders_table, tables)}")
            if listener.masquerade:
                words.append("masquerade")
        if listener.proxy_v2:
            words.append("proxy-v2")
    if listener.filter:
        words.append(f"filter {filter_ref(listener.filter, config.filters)}")
    return " ".join(words)


def format_action(action: Action, config: Config) -> str:
    tables = config.tables
    words = [f"action {quote(action.name)}"]
    if action.method is Method.RELAY:
        words.append("relay")
        words += _relay_words(action, config)
    else:
        words.append(action.method.value)
        if action.method is Method.MAILDIR:
            if action.maildir_path is not None:
                words.append(quote(action.maildir_path))
            if action.junk:
                words.append("junk")
        elif action.method is Method.LMTP:
            words.append(quote(action.lmtp_destination or ""))
            if action.lmtp_rcpt_to:
                words.append("rcpt-to")
        elif action.method is Method.MDA:
            words.append(quote(action.mda_command or ""))
        if action.alias_table:
            words.append(f"alias {table_ref(action.alias_table, tables)}")
        if action.virtual_table:
            words.append(f"virtual {table_ref(action.virtual_table, tables)}")
        if action.userbase_table:
            words.append(f"userbase {table_ref(action.userbase_table, tables)}")
        if action.user is not None:
            words.append(f"user {quote(action.user)}")
        if action.wrapper is not None:
            words.append(f"wrapper {quote(action.wrapper)}")
    if action.ttl is not None:
        words.append(f"ttl {delay(action.ttl)}")
    return " ".join(words)


def _relay_words(action: Action, config: Config) -> list[str]:
    relay = action.relay
    if relay is None:
        return []
    tables = config.tables
    words: list[str] = []
    if relay.host_table:
        words.append(f"host {table_ref(relay.host_table, tables)}")
    if relay.domain_table:
        words.append(f"domain {table_ref(relay.domain_table, tables)}")
    if relay.backup:
        words.append("backup" + (f" mx {quote(relay.backup_mx)}" if relay.backup_mx else ""))
    if relay.tls is not None:
        words.append("tls" if relay.tls == "tls" else "tls no-verify")
    if relay.auth_table:
        words.append(f"auth {table_ref(relay.auth_table, tables)}")
    if relay.helo is not None:
        words.append(f"helo {quote(relay.helo)}")
    if relay.helo_src_table:
        words.append(f"helo-src {table_ref(relay.helo_src_table, tables)}")
    if relay.src_table:
        words.append(f"src {table_ref(relay.src_table, tables)}")
    if relay.pki is not None:
        words.append(f"pki {quote(relay.pki)}")
    if relay.ca is not None:
        words.append(f"ca {quote(relay.ca)}")
    if relay.mail_from is not None:
        words.append(f"mail-from {quote(relay.mail_from)}")
    if relay.srs:
        words.append("srs")
    if relay.filter:
        words.append(f"filter {filter_ref(relay.filter, config.filters)}")
    return words


def format_condition(condition: Condition, tables: dict[str, TableDecl]) -> str:
    words = ["!"] if condition.negated else []
    family, variant = condition.family, condition.variant
    words.append(family)
    if family in ("from", "for"):
        words.append(variant)
    if condition.regex:
        words.append("regex")
    if condition.table is not None:
        words.append(table_ref(condition.table, tables))
    return " ".join(words)


def format_rule(rule: MatchRule, config: Config) -> str:
    words = ["match"] + [format_condition(condition, config.tables) for condition in rule.conditions]
    words.append("reject" if rule.reject else f"action {quote(rule.action or '')}")
    return " ".join(words)


def format_filter(item: Filter, config: Config) -> str:
    head = f"filter {quote(item.name)}"
    if item.kind == "proc":
        return f"{head} proc {quote(item.proc or '')}"
    if item.kind == "proc-exec":
        words = [f"{head} proc-exec {quote(item.command or '')}"]
        words += [f"{key} {quote(value)}" for key, value in (("user", item.user), ("group", item.group),
                                                            ("chroot", item.chroot)) if value is not None]
        return " ".join(words)
    if item.kind == "chain":
        return f"{head} chain " + "{ " + ", ".join(quote(member) for member in item.chain) + " }"
    condition = item.conditions[0]
    words = [f"{head} phase {item.phase} match"]
    words.append(("!" if condition.negated else "") + condition.family)
    if condition.regex:
        words.append("regex")
    if condition.table is not None:
        words.append(table_ref(condition.table, config.tables))
    words.append(item.decision or "")
    if item.decision_arg is not None:
        words.append(quote(item.decision_arg))
    return " ".join(words)


def _global_lines(config: Config) -> list[str]:
    lines: list[str] = []
    if config.admd is not None:
        lines.append(f"admd {quote(config.admd)}")
    smtp = config.smtp
    if smtp.max_message_size != DEFAULT_MAX_MESSAGE_SIZE:
        lines.append(f"smtp max-message-size {smtp.max_message_size}")
    if smtp.sub_addr_delim != DEFAULT_SUBADDRESS_DELIMITER:
        lines.append(f"smtp sub-addr-delim {quote(smtp.sub_addr_delim)}")
    if smtp.ciphers != DEFAULT_CIPHERS:
        lines.append(f"smtp ciphers {quote(smtp.ciphers)}")
    limits = []
    if smtp.max_rcpt != DEFAULT_MAX_RCPT:
        limits.append(f"max-rcpt {smtp.max_rcpt}")
    if smtp.max_mails != DEFAULT_MAX_MAILS:
        limits.append(f"max-mails {smtp.max_mails}")
    if limits:
        lines.append("smtp limit " + " ".join(limits))
    queue = config.queue
    if queue.compression:
        lines.append("queue compression")
    if queue.encryption:
        lines.append("queue encryption" + (f" {quote(queue.encryption_key)}" if queue.encryption_key else ""))
    if queue.ttl != DEFAULT_QUEUE_TTL:
        lines.append(f"queue ttl {delay(queue.ttl)}")
    if config.bounce_warn_intervals != DEFAULT_WARN_INTERVALS:
        lines.append("bounce warn-interval " + ", ".join(delay(value) for value in config.bounce_warn_intervals))
    srs = config.srs
    if srs.key is not None:
        lines.append(f"srs key {quote(srs.key)}")
    if srs.backup_key is not None:
        lines.append(f"srs key backup {quote(srs.backup_key)}")
    if srs.ttl != DEFAULT_SRS_TTL:
        lines.append(f"srs ttl {delay(srs.ttl)}")
    if config.mda_limits:
        lines.append("mda limit " + " ".join(f"{key} {value}" for key, value in config.mda_limits))
    if config.mta_max_deferred != 100:
        lines.append(f"mta max-deferred {config.mta_max_deferred}")
    for limit in config.mta_limits:
        words = ["mta limit"]
        if limit.domain is not None:
            words.append(f"for domain {quote(limit.domain)}")
        if limit.family:
            words.append(limit.family)
        words += [f"{key} {value}" for key, value in limit.values]
        lines.append(" ".join(words))
    if config.scheduler_limits:
        lines.append("scheduler limit " + " ".join(f"{key} {value}" for key, value in config.scheduler_limits))
    for name, command in config.mda_wrappers.items():
        lines.append(f"mda wrapper {quote(name)} {quote(command)}")
    return lines


def dump(config: Config) -> str:
    """The whole configuration, one statement per line, in an order that parses (declarations first)."""
    sections: list[list[str]] = []
    sections.append([format_table(decl) for decl in config.tables.values()
                     if not decl.builtin and not is_anonymous(decl.name)])
    pki_lines: list[str] = []
    for pki in config.pkis.values():
        name = quote(pki.name)
        pki_lines += [f"pki {name} cert {quote(pki.cert)}"] if pki.cert is not None else []
        pki_lines += [f"pki {name} key {quote(pki.key)}"] if pki.key is not None else []
        pki_lines += [f"pki {name} dhe {pki.dhe}"] if pki.dhe is not None else []
        if pki.cert is None and pki.key is None and pki.dhe is None:
            pki_lines.append(f"pki {name}")
    pki_lines += [f"ca {quote(ca.name)} cert {quote(ca.cert)}" for ca in config.cas.values()]
    sections.append(pki_lines)
    sections.append(_global_lines(config))
    proc_exec = {item.name for item in config.filters.values() if item.kind == "proc-exec"}
    proc_lines = []
    for proc in config.procs.values():
        if proc.name in proc_exec:
            continue
        words = [f"proc {quote(proc.name)} {quote(proc.command)}"]
        words += [f"{key} {quote(value)}" for key, value in (("user", proc.user), ("group", proc.group),
                                                            ("chroot", proc.chroot)) if value is not None]
        proc_lines.append(" ".join(words))
    filter_lines = [format_filter(item, config) for item in config.filters.values()
                    if not item.name.startswith("<dynchain:")]
    sections.append(proc_lines + filter_lines)
    sections.append([format_listener(listener, config) for listener in config.listeners
                     if listener.location is not None or not listener.is_socket])
    sections.append([format_action(action, config) for action in config.actions.values()])
    sections.append([format_rule(rule, config) for rule in config.rules])
    text = "\n\n".join("\n".join(section) for section in sections if section)
    return text + "\n"


# -- comparing models ------------------------------------------------------------------------------------
def _strip(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for item in fields(value):
            current = getattr(value, item.name)
            if item.name == "location":
                changes[item.name] = None
            else:
                changes[item.name] = _strip(current)
        return replace(value, **changes)  # type: ignore[type-var]
    if isinstance(value, dict):
        return {key: _strip(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_strip(item) for item in value)
    return value


def _content_names(config: Config) -> dict[str, str]:
    renames: dict[str, str] = {}
    for name, decl in config.tables.items():
        if is_anonymous(name):
            renames[name] = f"<dynamic {decl.shape.value} {decl.items!r} {decl.mapping!r}>"
    for name, item in config.filters.items():
        if name.startswith("<dynchain:"):
            renames[name] = f"<dynchain {item.chain!r}>"
    return renames


def _rename(value: object, renames: dict[str, str]) -> object:
    if isinstance(value, str):
        return renames.get(value, value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{item.name: _rename(getattr(value, item.name), renames)  # type: ignore[type-var]
                                 for item in fields(value)})
    if isinstance(value, dict):
        return {_rename(key, renames): _rename(item, renames) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_rename(item, renames) for item in value)
    return value


def comparable(config: Config) -> Config:
    """The model without what legitimately differs between two spellings of one configuration: locations,
    the file path, the legacy flag, and the generated names of anonymous tables and filter chains (replaced
    by names made of their content)."""
    stripped = _strip(replace(config, path="", legacy=False))
    assert isinstance(stripped, Config)
    renamed = _rename(stripped, _content_names(stripped))
    assert isinstance(renamed, Config)
    return renamed
