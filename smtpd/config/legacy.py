"""The legacy (pre-6.4) grammar (reference §4), translated into the same model as its modern equivalent.

Many guides still show configs such as::

    listen on localhost
    accept for local alias <aliases> deliver to mbox
    accept for any relay via "smtp://smtp.foo.bar" as "@foo.bar"

OpenSMTPD 6.8 calls every such line a syntax error. We run them: each legacy line becomes the model the modern
lines would give, and is reported with one ``FILE:LINE: warning: ...`` that shows the modern lines to write.

Semantics kept from the old ruleset: first match wins; `from` and `for` default to local; a rule without a
delivery method expands only; and **legacy `from local` also matched authenticated sessions**, so such a rule
becomes two matches, the second `from any auth`. Dispatcher names are stable: ``local``, ``virtual`` or
``relay`` (then ``local-2``, ...), and identical actions share one name.

The legacy accept/reject rules and the modern action/match statements cannot be mixed in one configuration
(it would be ambiguous which rule order wins); the second kind seen is an error that says so. The legacy
global statements (`expire`, `max-message-size`, ...) are accepted anywhere.
"""

from __future__ import annotations

from dataclasses import replace

from smtpd.config import dump
from smtpd.config.errors import Diagnostic, Severity
from smtpd.config.lexer import Kind, Token
from smtpd.config.model import Action, Condition, Config, Location, MatchRule, Method, Relay, TableShape
from smtpd.config.parser import (
    MDA_LIMITS,
    SCHEDULER_LIMITS,
    SMTP_LIMITS,
    Parser,
    SemanticProblem,
    _ListenOptions,
    _RuleFlags,
    delay_to_seconds,
)

WARNING_PREFIX = "legacy (pre-6.4) syntax; in OpenSMTPD 6.8 write: "

# Legacy relay URL schemes → (modern scheme, needs an auth table, backup relay, tls no-verify).
LEGACY_SCHEMES: dict[str, tuple[str, bool]] = {
    "smtp": ("smtp", False),
    "lmtp": ("lmtp", False),
    "smtp+tls": ("smtp", False),  # legacy: TLS when offered, which modern smtp:// does
    "tls": ("smtp+tls", False),
    "smtps": ("smtps", False),
    "tls+auth": ("smtp+tls", True),
    "smtps+auth": ("smtps", True),
    "secure": ("smtps", False),  # SMTPS falling back to STARTTLS: no exact equivalent, SMTPS is the closest
    "secure+auth": ("smtps", True),
}


def _warn(parser: Parser, location: Location, modern: list[str]) -> None:
    parser.legacy_lines += 1
    # One warning per legacy line: a statement split by `\` continuations is one line for this purpose.
    for diagnostic in parser.diagnostics:
        if diagnostic.severity is Severity.WARNING and diagnostic.location == location \
                and diagnostic.text.startswith(WARNING_PREFIX):
            index = parser.diagnostics.index(diagnostic)
            parser.diagnostics[index] = Diagnostic(diagnostic.text + " ; " + " ; ".join(modern), location,
                                                   Severity.WARNING)
            return
    parser.warning(WARNING_PREFIX + " ; ".join(modern), location)


def note_legacy_word(parser: Parser, modern: str) -> None:
    token = parser.last or parser.peek()
    _statement_warning(parser, parser.location(token), [modern])


def _statement_warning(parser: Parser, location: Location, modern: list[str]) -> None:
    """A legacy statement that is not a rule: its fate depends on the rules of the whole file (see finish)."""
    parser.legacy_statement_lines.append(location)
    _warn(parser, location, modern)


def finish(parser: Parser) -> None:
    """At the end of the file: legacy statements are only legacy next to legacy rules.

    Next to modern rules they are an error that says so; in a file without any rule they are what OpenSMTPD
    calls them, a syntax error (`pki NAME certificate` alone is not a legacy config).
    """
    failed = {d.location for d in parser.diagnostics if d.is_error}
    # A legacy line that failed keeps its error only.
    parser.diagnostics[:] = [d for d in parser.diagnostics
                             if not (d.location in failed and d.is_warning and d.text.startswith(WARNING_PREFIX))]
    if parser.legacy_rule_at is not None or not parser.legacy_statement_lines:
        return
    where = set(parser.legacy_statement_lines)
    kept: list[Diagnostic] = []
    seen_errors: set[Location | None] = set()
    for diagnostic in parser.diagnostics:
        if diagnostic.location not in where or diagnostic.severity is Severity.NOTE:
            kept.append(diagnostic)
            continue
        if diagnostic.is_warning and not diagnostic.text.startswith(WARNING_PREFIX):
            kept.append(diagnostic)
            continue
        if diagnostic.is_warning and parser.modern_rule_at is not None:
            text = (f"legacy and modern grammar cannot be mixed: this line is legacy (pre-6.4) syntax but "
                    f"{parser.modern_rule_at} has a 6.4+ action/match statement; write instead: "
                    + diagnostic.text.removeprefix(WARNING_PREFIX))
        else:
            text = "syntax error"
        if diagnostic.location in seen_errors:
            continue
        seen_errors.add(diagnostic.location)
        kept.append(Diagnostic(text, diagnostic.location))
    parser.diagnostics[:] = kept


def check_mixing(parser: Parser, token: Token, modern: bool) -> None:
    """Refuse a rule of the other grammar than the rules seen so far (recorded by ``record_rule``)."""
    if modern and parser.legacy_rule_at is not None:
        raise SemanticProblem(
            f"legacy and modern grammar cannot be mixed: `{token.text}` is a 6.4+ statement but "
            f"{parser.legacy_rule_at} has a legacy accept/reject rule; use one grammar per configuration",
            token)
    if not modern and parser.modern_rule_at is not None:
        raise SemanticProblem(
            f"legacy and modern grammar cannot be mixed: `{token.text}` is a legacy (pre-6.4) rule but "
            f"{parser.modern_rule_at} has a 6.4+ action/match statement; use one grammar per configuration",
            token)


def record_rule(parser: Parser, token: Token, modern: bool) -> None:
    """A rule statement of one grammar was parsed without error."""
    here = parser.location(token)
    if modern:
        parser.modern_rule_at = parser.modern_rule_at or here
    else:
        parser.legacy_rule_at = parser.legacy_rule_at or here


# -- statements ---------------------------------------------------------------------------------------------
def word_statement(parser: Parser, first: Token) -> None:
    """A statement that starts with a non-keyword word (already read) and is not a macro."""
    word = first.text if not first.quoted else ""
    if word == "accept":
        rule_statement(parser, first, reject=False)
        return
    if word not in ("expire", "bounce-warn", "subaddressing-delimiter", "max-mta-deferred"):
        raise parser.fail()
    # Until the file shows it is a legacy config, a problem in a legacy statement is only a syntax error.
    parser.legacy_statement_lines.append(parser.location(first))
    _global_word_statement(parser, first, word)


def _global_word_statement(parser: Parser, first: Token, word: str) -> None:
    if word == "expire":
        token = parser.expect_string()
        seconds, shown = delay_to_seconds(token.text)
        if seconds is None:
            raise SemanticProblem(f"invalid ttl delay: {shown}", token)
        parser.queue = replace(parser.queue, ttl=seconds)
        _statement_warning(parser, parser.location(first), [f"queue ttl {token.text}"])
    elif word == "bounce-warn":
        parser.bounce_warn = []
        texts = []
        while True:
            token = parser.expect_string()
            seconds, shown = delay_to_seconds(token.text)
            if seconds is None:
                raise SemanticProblem(f"invalid bounce delay: {shown}", token)
            texts.append(token.text)
            if len(parser.bounce_warn) < 4:
                parser.bounce_warn.append(seconds)
            if not parser.at_punct(","):
                break
            parser.advance()
        _statement_warning(parser, parser.location(first), ["bounce warn-interval " + ", ".join(texts)])
    elif word == "subaddressing-delimiter":
        char = parser.sub_addr_delim(parser.expect_string())
        parser.smtp = replace(parser.smtp, sub_addr_delim=char)
        _statement_warning(parser, parser.location(first), [f"smtp sub-addr-delim {dump.quote(char)}"])
    elif word == "max-mta-deferred":
        value = parser.expect_number().number
        parser.mta_max_deferred = value
        _statement_warning(parser, parser.location(first), [f"mta max-deferred {value}"])
    else:
        raise parser.fail()


def keyword_statement(parser: Parser) -> None:
    """A statement that starts with a keyword that the modern grammar does not use there."""
    first = parser.peek()
    if first.kind is not Kind.KEYWORD:
        raise parser.fail()
    if first.text == "reject":
        parser.advance()
        rule_statement(parser, first, reject=True)
        return
    if first.text not in ("max-message-size", "ciphers", "limit"):
        raise parser.fail()
    parser.legacy_statement_lines.append(parser.location(first))
    if first.text == "max-message-size":
        parser.advance()
        size = parser.size()
        parser.smtp = replace(parser.smtp, max_message_size=size)
        _statement_warning(parser, parser.location(first), [f"smtp max-message-size {size}"])
    elif first.text == "ciphers":
        parser.advance()
        ciphers = parser.expect_string().text
        parser.smtp = replace(parser.smtp, ciphers=ciphers)
        _statement_warning(parser, parser.location(first), [f"smtp ciphers {dump.quote(ciphers)}"])
    elif first.text == "limit":
        parser.advance()
        limit_statement(parser, first)
    else:
        raise parser.fail()


def limit_statement(parser: Parser, first: Token) -> None:
    if parser.at_word("session"):
        parser.advance()
        limits: dict[str, int] = {}
        parser._limits(limits, SMTP_LIMITS, "invalid session limit keyword: {}")
        parser.smtp = replace(parser.smtp, max_rcpt=limits.get("max-rcpt", parser.smtp.max_rcpt),
                              max_mails=limits.get("max-mails", parser.smtp.max_mails))
        modern = "smtp limit " + " ".join(f"{k} {v}" for k, v in limits.items())
    elif parser.accept_kw("mda"):
        limits = {}
        parser._limits(limits, MDA_LIMITS, "invalid scheduler limit keyword: {}")
        parser.mda_limits.update(limits)
        modern = "mda limit " + " ".join(f"{k} {v}" for k, v in limits.items())
    elif parser.accept_kw("scheduler"):
        limits = {}
        parser._limits(limits, SCHEDULER_LIMITS, "invalid scheduler limit keyword: {}")
        parser.scheduler_limits.update(limits)
        modern = "scheduler limit " + " ".join(f"{k} {v}" for k, v in limits.items())
    elif parser.accept_kw("mta"):
        domain = None
        if parser.accept_kw("for"):
            parser.expect_kw("domain")
            domain = parser.expect_string().text
        entry = parser.mta_limits.setdefault(domain, {"family": None, "values": {}})
        before = dict(entry["values"])
        parser.mta_limit_options(entry)
        words = ["mta limit"] + ([f"for domain {dump.quote(domain)}"] if domain else [])
        words += [entry["family"]] if entry["family"] else []
        words += [f"{k} {v}" for k, v in entry["values"].items() if before.get(k) != v]
        modern = " ".join(words)
    else:
        raise parser.fail()
    _statement_warning(parser, parser.location(first), [modern])


def listen_word(parser: Parser, options: _ListenOptions) -> None:
    word = parser.advance()
    if word.text == "mask-source":
        parser._once(options, "mask-src", "mask-source already specified")
        options.mask_src = True
    else:  # secure: SMTPS on 465 and STARTTLS on 25 (two listeners)
        parser._once(options, "tls", "TLS mode already specified")
    options.legacy_words.append(word.text)


def warn_listener(parser: Parser, target: Token, listeners: list) -> None:  # noqa: ANN001
    config = Config(path="", tables=parser.tables, filters=parser.filters)
    _statement_warning(parser, parser.location(target), [dump.format_listener(listener, config) for listener in listeners])


# -- accept / reject ----------------------------------------------------------------------------------------
def rule_statement(parser: Parser, first: Token, reject: bool) -> None:  # noqa: C901 - the old grammar is flat
    check_mixing(parser, first, modern=False)
    flags = _RuleFlags()
    action = Action(name="", method=Method.EXPAND_ONLY, location=parser.location(first))
    relay: Relay | None = None
    method_given = False
    forward_only = False
    ttl: int | None = None
    while not parser.at_statement_end():
        negated = parser.negation()
        token = parser.peek()
        if token.is_word("tagged"):
            parser.advance()
            negated = parser.negation() or negated
            table = parser.table_use()
            parser._mark(flags, "tag", token)
            parser.check_table(table, TableShape.LIST, 'table "{name}" may not be used for tag lookups',
                               service="string")
            flags.conditions.append(Condition(family="tag", table=table, negated=negated))
        elif token.is_word("authenticated"):
            parser.advance()
            parser._mark(flags, "auth", token)
            flags.conditions.append(Condition(family="auth", negated=negated))
        elif token.is_word("from"):
            parser.advance()
            flags.conditions.append(_legacy_from(parser, flags, negated or parser.negation(), token))
        elif token.is_word("for"):
            parser.advance()
            flags.conditions.append(_legacy_for(parser, flags, negated or parser.negation(), token))
        elif token.is_word("sender") or token.is_word("recipient"):
            parser.advance()
            negated = parser.negation() or negated
            family = "mail-from" if token.text == "sender" else "rcpt-to"
            table = parser.table_use()
            parser._mark(flags, family, token)
            parser.check_table(table, TableShape.LIST, 'table "{name}" may not be used for ' + family + " lookups")
            flags.conditions.append(Condition(family=family, table=table, negated=negated))
        elif negated:
            raise parser.fail()
        elif token.is_word("alias") or token.is_word("virtual") or token.is_word("userbase"):
            parser.advance()
            table = parser.table_use()
            kind = token.text
            if kind in ("alias", "virtual") and (action.alias_table or action.virtual_table):
                what = "alias" if action.alias_table else "virtual"
                raise SemanticProblem(f"{what} mapping already specified for this dispatcher", parser.last or token)
            if kind == "userbase" and action.userbase_table:
                raise SemanticProblem("userbase mapping already specified for this dispatcher", token)
            parser.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for ' + kind + " lookups",
                               service="userinfo" if kind == "userbase" else kind)
            action = replace(action, **{f"{kind}_table": table})
        elif token.is_word("deliver"):
            parser.advance()
            if method_given:
                raise SemanticProblem("delivery method already specified for this rule", token)
            method_given = True
            action = _deliver(parser, action)
        elif token.is_word("relay"):
            parser.advance()
            if method_given:
                raise SemanticProblem("delivery method already specified for this rule", token)
            method_given = True
            relay = _relay(parser)
        elif token.is_word("forward-only"):
            parser.advance()
            forward_only = True
        elif token.is_word("expire"):
            parser.advance()
            value = parser.expect_string()
            seconds, shown = delay_to_seconds(value.text)
            if seconds is None:
                raise SemanticProblem(f'ttl delay "{shown}" is invalid', value)
            ttl = seconds
        else:
            raise parser.fail()
    if forward_only and method_given:
        raise SemanticProblem("forward-only may not be used with a default action", parser.last or first)
    if relay is not None and (action.alias_table or action.virtual_table):
        raise SemanticProblem("aliases/virtual may not be used with a relay rule", parser.last or first)
    if relay is not None and action.userbase_table:
        raise SemanticProblem("userbase may not be used with a relay rule", parser.last or first)
    if forward_only:
        action = replace(action, method=Method.FORWARD_ONLY)
    if relay is not None:
        action = replace(action, method=Method.RELAY, relay=relay)
    action = replace(action, ttl=ttl)
    _finish_rule(parser, first, flags, None if reject else action)
    record_rule(parser, first, modern=False)


def _legacy_from(parser: Parser, flags: _RuleFlags, negated: bool, start: Token) -> Condition:
    if parser.accept_kw("any"):
        condition = Condition(family="from", variant="any", negated=negated)
    elif parser.accept_kw("local"):
        condition = Condition(family="from", variant="local", negated=negated)
    elif parser.accept_word("source") or parser.accept_kw("src"):
        condition = Condition(family="from", variant="src", table=parser.table_use(), negated=negated)
    elif parser.at_punct("<"):
        condition = Condition(family="from", variant="src", table=parser.table_use(), negated=negated)
    else:
        raise parser.fail()
    parser._mark(flags, "from", parser.last or start)
    if condition.table is not None:
        parser.check_table(condition.table, TableShape.LIST, 'table "{name}" may not be used for from lookups')
    return condition


def _legacy_for(parser: Parser, flags: _RuleFlags, negated: bool, start: Token) -> Condition:
    if parser.accept_kw("any"):
        condition = Condition(family="for", variant="any", negated=negated)
    elif parser.accept_kw("local"):
        condition = Condition(family="for", variant="local", negated=negated)
    elif parser.accept_kw("domain") or parser.at_punct("<"):
        condition = Condition(family="for", variant="domain", table=parser.table_use(), negated=negated)
    else:
        raise parser.fail()
    parser._mark(flags, "for", parser.last or start)
    if condition.table is not None:
        parser.check_table(condition.table, TableShape.LIST, "table \"{name}\" may not be used for 'for' lookups")
    return condition


def _deliver(parser: Parser, action: Action) -> Action:
    if not parser.accept_word("to"):
        raise parser.fail()
    token = parser.peek()
    if parser.accept_kw("mbox"):
        action = replace(action, method=Method.MBOX)
    elif parser.accept_kw("maildir"):
        action = replace(action, method=Method.MAILDIR)
        if parser.peek().kind is Kind.STRING and not parser.at_word("as", "expire"):
            action = replace(action, maildir_path=parser.advance().text)
    elif parser.accept_kw("lmtp"):
        action = replace(action, method=Method.LMTP, lmtp_destination=parser.expect_string().text)
        if parser.accept_kw("rcpt-to"):
            action = replace(action, lmtp_rcpt_to=True)
    elif parser.accept_kw("mda"):
        action = replace(action, method=Method.MDA, mda_command=parser.expect_string().text)
    else:
        raise parser.fail()
    if parser.accept_word("as"):
        user = parser.expect_string()
        if action.method is Method.MBOX:
            raise SemanticProblem("user may not be specified for this dispatcher", user)
        action = replace(action, user=user.text)
    del token
    return action


def _relay(parser: Parser) -> Relay:  # noqa: C901 - one branch per old option
    relay = Relay()
    auth_needed = False
    url_token: Token | None = None
    if parser.accept_kw("backup"):
        mx = parser.advance().text if parser.peek().kind is Kind.STRING and not parser.at_word("as", "source") \
            else None
        relay = replace(relay, backup=True, backup_mx=mx)
    elif parser.accept_word("via"):
        url_token = parser.expect_string()
        relay, auth_needed = _relay_url(parser, relay, url_token)
    while not parser.at_statement_end():
        token = parser.peek()
        if parser.accept_kw("tls"):
            relay = replace(relay, tls="tls" if parser.accept_kw("verify") else "no-verify")
        elif parser.accept_kw("verify"):
            relay = replace(relay, tls="tls")
        elif parser.accept_kw("auth"):
            table = parser.table_use()
            parser.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for auth lookups')
            relay = replace(relay, auth_table=table)
        elif parser.accept_word("as"):
            relay = replace(relay, mail_from=parser.expect_string().text)
        elif parser.accept_word("source") or parser.accept_kw("src"):
            table = parser.table_use()
            parser.check_table(table, TableShape.LIST, 'table "{name}" may not be used for source lookups')
            relay = replace(relay, src_table=table, src=parser._single_item(table))
            parser._src_warnings(table)
        elif parser.accept_kw("hostname"):
            relay = replace(relay, helo=parser.expect_string().text)
        elif parser.accept_kw("hostnames"):
            table = parser.table_use()
            parser.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for helo-source lookups')
            relay = replace(relay, helo_src_table=table)
        elif parser.accept_kw("pki"):
            relay = replace(relay, pki=parser.expect_string().text)
        elif parser.accept_kw("ca"):
            relay = replace(relay, ca=parser.expect_string().text.lower())
        else:
            del token
            break
    if auth_needed and relay.auth_table is None:
        assert url_token is not None
        raise SemanticProblem(f'auth without auth table: relay via "{url_token.text}" needs `auth <table>`',
                              url_token)
    return relay


def _relay_url(parser: Parser, relay: Relay, token: Token) -> tuple[Relay, bool]:
    url = token.text
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "smtp", url
    backup = scheme in ("backup", "tls+backup")
    if backup:
        host = rest.rpartition("@")[2]
        relay = replace(relay, backup=True, backup_mx=host or None)
        if scheme == "tls+backup":
            relay = replace(relay, tls="no-verify")
        return relay, False
    if scheme not in LEGACY_SCHEMES or not rest:
        raise SemanticProblem(f"invalid url: {url}", token)
    modern_scheme, auth_needed = LEGACY_SCHEMES[scheme]
    modern_url = f"{modern_scheme}://{rest}"
    name = parser._new_dynamic(token)
    parser._fill_inline(name, TableShape.LIST, [(modern_url, None)])
    parser._url_warnings(name)
    return replace(relay, host_table=name, host=modern_url), auth_needed


def _action_name(parser: Parser, action: Action) -> str:
    if action.method is Method.RELAY:
        base = "relay"
    elif action.virtual_table is not None:
        base = "virtual"
    else:
        base = "local"
    index = 1
    while True:
        name = base if index == 1 else f"{base}-{index}"
        existing = parser.actions.get(name)
        if existing is None:
            return name
        if replace(existing, location=None) == replace(action, name=name, location=None):
            return name
        index += 1


def _finish_rule(parser: Parser, first: Token, flags: _RuleFlags, action: Action | None) -> None:
    location = parser.location(first)
    action_name: str | None = None
    modern: list[str] = []
    config_view = Config(path="", tables=parser.tables, filters=parser.filters)
    if action is not None:
        action_name = _action_name(parser, action)
        action = replace(action, name=action_name)
        if action_name not in parser.actions:
            parser.actions[action_name] = action
        modern.append(dump.format_action(action, config_view))
    rule = MatchRule(conditions=(), action=action_name, reject=action is None, location=location)
    first_rule = parser.add_rule(rule, flags)
    modern.append(dump.format_rule(first_rule, config_view))
    from_condition = first_rule.condition("from")
    authenticated = "auth" in flags.seen
    if from_condition is not None and from_condition.variant == "local" and not from_condition.negated \
            and not authenticated:
        # Legacy `from local` also matched authenticated sessions.
        conditions = [Condition(family="from", variant="any"), Condition(family="auth")]
        conditions += [c for c in first_rule.conditions if c.family != "from"]
        extra = parser.add_rule(MatchRule(conditions=(), action=action_name, reject=action is None,
                                          location=location), _RuleFlags(conditions=conditions,
                                                                         seen={"from", "for", "auth"}))
        modern.append(dump.format_rule(extra, config_view))
    _warn(parser, location, modern)
