"""smtpd.conf, modern 6.8 grammar (reference §3), into the frozen model of smtpd/config/model.py.

A recursive-descent parser over the tokens of lexer.py that reproduces OpenSMTPD's yacc behaviour where a user
can see it: the same error texts at the same lines, many errors in one run (after an error the rest of the line
is skipped), yacc's quiet period after a syntax error (no new syntax error is reported until three tokens have
been read), and the fatal stops (``smtpd: ...``) that end the run at once. The legacy (pre-6.4) statements
are handled by legacy.py on top of the same primitives.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, replace

from shared.numbers import ascii_digits
from smtpd.config import checks, interfaces
from smtpd.config.errors import Diagnostic, FatalConfigError, Severity
from smtpd.config.lexer import UNTERMINATED, Kind, Lexer, Token
from smtpd.config.model import (
    BUILTIN_TABLES,
    DEFAULT_WARN_INTERVALS,
    SOCKET,
    Action,
    AuthMode,
    Ca,
    Condition,
    Config,
    Filter,
    Location,
    MatchRule,
    Method,
    MtaLimit,
    Pki,
    Proc,
    QueueOptions,
    Relay,
    SmtpOptions,
    SrsOptions,
    TableDecl,
    TableShape,
    TlsMode,
)

MAX_BOUNCE_WARN = 4
TAG_SIZE = 32
MDA_LIMITS = ("max-session", "max-session-per-user", "task-lowat", "task-hiwat", "task-release")
SCHEDULER_LIMITS = ("max-inflight", "max-evp-batch-size", "max-msg-batch-size", "max-schedule")
SMTP_LIMITS = ("max-rcpt", "max-mails")
MTA_LIMITS = tuple(
    [f"max-conn-per-{k}" for k in ("host", "route", "source", "connector", "relay", "domain")]
    + [f"conn-delay-{k}" for k in ("host", "route", "source", "connector", "relay", "domain")]
    + ["reconn-delay-route", "session-mail-max", "session-transaction-delay", "session-keepalive",
       "max-failures-per-session", "task-hiwat", "task-lowat", "task-release"]
)
FILTER_PHASES = ("connect", "helo", "ehlo", "auth", "mail-from", "rcpt-to", "data", "commit")
# Which conditions each filter phase accepts (a phase accepts those of the earlier phases).
_GLOBAL_FILTER_CHECKS = ("fcrdns", "rdns", "src")
FILTER_CHECKS: dict[str, tuple[str, ...]] = {
    "connect": _GLOBAL_FILTER_CHECKS,
    "helo": (*_GLOBAL_FILTER_CHECKS, "helo"),
    "ehlo": (*_GLOBAL_FILTER_CHECKS, "helo"),
    "auth": (*_GLOBAL_FILTER_CHECKS, "helo", "auth"),
    "mail-from": (*_GLOBAL_FILTER_CHECKS, "helo", "auth", "mail-from"),
    "rcpt-to": (*_GLOBAL_FILTER_CHECKS, "helo", "auth", "mail-from", "rcpt-to"),
    "data": (*_GLOBAL_FILTER_CHECKS, "helo", "auth", "mail-from"),
    "commit": (*_GLOBAL_FILTER_CHECKS, "helo", "auth", "mail-from"),
}
DB_REFUSES = ("string", "regex", "relayhost")
CONDITION_ORDER = ("from", "for", "tag", "helo", "auth", "tls", "mail-from", "rcpt-to")
LISTEN_OPTIONS = frozenset((
    "inet4", "inet6", "port", "filter", "smtps", "tls", "tls-require", "pki", "ca", "auth", "auth-optional", "tag",
    "hostname", "hostnames", "mask-src", "received-auth", "no-dsn", "proxy-v2", "senders",
))
FILTER_DECISIONS_WITH_ARG = ("reject", "disconnect", "rewrite", "report")
RELAY_SCHEMES = ("smtp", "smtp+tls", "smtp+notls", "lmtp", "smtps")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")
ASCII_DIGITS = "0123456789"
C_SPACE = " \t\n\v\f\r"  # C's isspace
LLONG_MAX = 2**63 - 1
_SCALES = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


class SyntaxProblem(Exception):
    def __init__(self, token: Token) -> None:
        super().__init__("syntax error")
        self.token = token


class SemanticProblem(Exception):
    """A yacc action's yyerror + YYERROR: the message, then the rest of the statement is skipped."""

    def __init__(self, text: str, token: Token) -> None:
        super().__init__(text)
        self.text = text
        self.token = token


def delay_to_seconds(text: str) -> tuple[int | None, str]:
    """OpenSMTPD's delaytonum: (seconds or None, the text as its error message shows it)."""
    factors = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in factors:
        return None, text
    factor = factors[text[-1]]
    digits = text[:-1]
    # strtonum: leading white space and a sign, then ASCII digits only (not \d: int() reads "\u0665" as 5)
    if not re.fullmatch(r"[ \t\n\v\f\r]*[+-]?[0-9]+", digits):
        return None, digits
    value = int(digits.lstrip(C_SPACE))
    if value < 1 or value > (2**31 - 1) // factor:
        return None, digits
    return value * factor, digits


def scan_scaled(text: str) -> int | None:
    """A size as OpenSMTPD's scan_scaled reads it (None when invalid or too big): leading white space, one
    optional sign, ASCII digits with at most one dot, then either nothing (the fraction is dropped) or one unit
    letter B K M G T P E (either case) that no ASCII letter or digit follows (`1M`, `1.M`, `+1.5m`, `1M.`)."""
    position, end = 0, len(text)
    while position < end and text[position] in C_SPACE:
        position += 1
    sign = 1
    if position < end and text[position] in "+-":
        sign = -1 if text[position] == "-" else 1
        position += 1
    whole, fraction, fraction_digits, dot = 0, 0, 0, False
    while position < end and (text[position] in ASCII_DIGITS or text[position] == "."):
        char = text[position]
        position += 1
        if char == ".":
            if dot:
                return None
            dot = True
        elif dot:
            if fraction_digits < 19:  # further fraction digits are ignored
                fraction, fraction_digits = fraction * 10 + int(char), fraction_digits + 1
        else:
            whole = whole * 10 + int(char)
            if whole > LLONG_MAX:
                return None
    if position == end:
        return sign * whole
    unit = text[position].upper()
    after = text[position + 1:position + 2]
    if unit not in _SCALES or not unit or (after and after.isascii() and after.isalnum()):
        return None
    scale = _SCALES[unit]
    if whole > LLONG_MAX // scale:
        return None
    return sign * (whole * scale + fraction * scale // 10**fraction_digits)


def is_valid_hostname(name: str) -> bool:
    return bool(_HOSTNAME_RE.match(name)) and len(name) <= 255


def relay_url_problem(url: str) -> str | None:
    """What is wrong with a relay URL `[scheme://][label@]host[:port]` (None when it is usable)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "smtp", url
    if scheme not in RELAY_SCHEMES:
        return f'relay URL "{url}": unknown scheme "{scheme}" (use {", ".join(s + "://" for s in RELAY_SCHEMES)})'
    label, at, hostport = rest.rpartition("@")
    if at and scheme not in ("smtp+tls", "smtps"):
        return f'relay URL "{url}": a label ("{label}@") needs smtp+tls:// or smtps://'
    if at and not label:
        return f'relay URL "{url}": empty label'
    if "/" in hostport:
        return f'relay URL "{url}": a relay URL has no path'
    host, port = hostport, ""
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket:
            return f'relay URL "{url}": unclosed [ in host'
        try:
            ipaddress.ip_address(host.removeprefix("IPv6:").removeprefix("ipv6:"))
        except ValueError:
            return f'relay URL "{url}": [{host}] is not an IP address'
        if after:
            if not after.startswith(":"):
                return f'relay URL "{url}": junk after ]'
            port = after[1:]
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    if not host:
        return f'relay URL "{url}": no host'
    if port and not (ascii_digits(port) and 1 <= int(port) <= 65535):
        return f'relay URL "{url}": invalid port "{port}"'
    if scheme == "lmtp" and not port:
        return f'relay URL "{url}": lmtp:// needs a port'
    return None


@dataclass
class _ListenOptions:
    family: str | None = None
    port: int | None = None
    tls: TlsMode = TlsMode.NONE
    verify: bool = False
    pki: list[str] = field(default_factory=list)
    ca: str | None = None
    auth: AuthMode = AuthMode.NONE
    auth_table: str | None = None
    tag: str | None = None
    hostname: str | None = None
    hostnames_table: str | None = None
    mask_src: bool = False
    no_dsn: bool = False
    received_auth: bool = False
    senders_table: str | None = None
    masquerade: bool = False
    proxy_v2: bool = False
    filter: str | None = None
    seen: set[str] = field(default_factory=set)
    legacy_words: list[str] = field(default_factory=list)  # legacy spellings used (mask-source, secure)


@dataclass
class _RuleFlags:
    conditions: list[Condition] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


class Parser:
    """One parse of one config file (with its includes). Use ``parse()``, then read ``config``/``diagnostics``."""

    def __init__(self, lexer: Lexer, path: str, mailname: str | None = None) -> None:
        self.lexer = lexer
        self.path = path
        self.mailname = mailname
        self.diagnostics: list[Diagnostic] = []
        self.lookahead: Token | None = None
        self.last: Token | None = None
        self.errflag = 0
        lexer.report = self._lexer_report
        # The configuration being built.
        self.tables: dict[str, TableDecl] = {
            name: TableDecl(name=name, backend="builtin", builtin=True,
                            shape=TableShape.LIST if name != "<getpwnam>" else TableShape.ANY)
            for name in BUILTIN_TABLES
        }
        self.broken_tables: set[str] = set()
        self.dynamic_count = 0
        self.dynchain_count = 1
        self.pkis: dict[str, Pki] = {}
        self.cas: dict[str, Ca] = {}
        self.listeners: list = []
        self.socket_listener_seen = False
        self.actions: dict[str, Action] = {}
        self.rules: list[MatchRule] = []
        self.smtp = SmtpOptions()
        self.queue = QueueOptions()
        self.srs = SrsOptions()
        self.bounce_warn: list[int] | None = None
        self.mda_wrappers: dict[str, str] = {}
        self.mda_limits: dict[str, int] = {}
        self.mta_limits: dict[str | None, dict] = {}
        self.mta_max_deferred = 100
        self.scheduler_limits: dict[str, int] = {}
        self.filters: dict[str, Filter] = {}
        self.procs: dict[str, Proc] = {}
        self.admd: str | None = None
        # Grammar bookkeeping: where the first rule of each grammar was seen (mixing both is an error).
        self.modern_rule_at: Location | None = None
        self.legacy_rule_at: Location | None = None
        self.legacy_lines = 0
        # Lines with legacy statements other than rules: fine in a legacy config, an error next to modern rules.
        self.legacy_statement_lines: list[Location] = []
        self.bound: dict[tuple[str, int], Location | None] = {}

    # -- diagnostics ------------------------------------------------------------------------------------
    def _lexer_report(self, text: str, file: str, line: int, kind: str) -> None:
        self.diagnostics.append(Diagnostic(text, Location(file, line)))

    def error(self, text: str, token: Token | None = None) -> None:
        token = token or self.last or self.peek()
        self.diagnostics.append(Diagnostic(text, Location(token.file, token.line)))

    def warning(self, text: str, location: Location | None) -> None:
        self.diagnostics.append(Diagnostic(text, location, Severity.WARNING))

    def note(self, text: str) -> None:
        self.diagnostics.append(Diagnostic(text, None, Severity.NOTE))

    def location(self, token: Token) -> Location:
        return Location(token.file, token.line)

    # -- token primitives ---------------------------------------------------------------------------------
    def peek(self) -> Token:
        if self.lookahead is None:
            self.lookahead = self.lexer.next()
        return self.lookahead

    def advance(self) -> Token:
        token = self.peek()
        self.lookahead = None
        self.last = token
        if self.errflag > 0:
            self.errflag -= 1
        return token

    def fail(self) -> SyntaxProblem:
        return SyntaxProblem(self.peek())

    def at_kw(self, *words: str) -> bool:
        token = self.peek()
        return token.kind is Kind.KEYWORD and token.text in words

    def at_word(self, *words: str) -> bool:
        """An unquoted non-keyword word (the legacy grammar's vocabulary)."""
        token = self.peek()
        return token.kind is Kind.STRING and not token.quoted and token.text in words

    def at_punct(self, char: str) -> bool:
        return self.peek().is_punct(char)

    def accept_kw(self, word: str) -> Token | None:
        return self.advance() if self.at_kw(word) else None

    def accept_word(self, word: str) -> Token | None:
        return self.advance() if self.at_word(word) else None

    def expect_kw(self, word: str) -> Token:
        if not self.at_kw(word):
            raise self.fail()
        return self.advance()

    def expect_string(self) -> Token:
        if self.peek().kind is not Kind.STRING:
            raise self.fail()
        return self.advance()

    def expect_number(self) -> Token:
        if self.peek().kind is not Kind.NUMBER:
            raise self.fail()
        return self.advance()

    def expect_punct(self, char: str) -> Token:
        if not self.at_punct(char):
            raise self.fail()
        return self.advance()

    def negation(self) -> bool:
        if self.at_punct("!"):
            self.advance()
            return True
        return False

    def at_statement_end(self) -> bool:
        return self.peek().kind in (Kind.NL, Kind.EOF)

    def expect_end(self) -> None:
        token = self.peek()
        if token.kind is Kind.NL:
            self.advance()
        elif token.kind is not Kind.EOF or token.text == UNTERMINATED:
            raise self.fail()

    # -- driver -------------------------------------------------------------------------------------------
    def parse(self) -> None:
        while True:
            token = self.peek()
            if token.kind is Kind.EOF:
                self.finish()
                return
            if token.kind is Kind.NL:
                self.advance()
                continue
            try:
                self.statement()
                self.expect_end()
            except SyntaxProblem as problem:
                if self.errflag == 0:
                    self.error("syntax error", problem.token)
                self.recover()
            except SemanticProblem as problem:
                self.error(problem.text, problem.token)
                self.recover()

    def finish(self) -> None:
        from smtpd.config import legacy

        self._pki_warnings()
        legacy.finish(self)

    def _pki_warnings(self) -> None:
        """TLS listeners without `pki` whose certificate cannot be found, once every pki of the file is known
        (smtpd.smtp.tls.listener_pkis: the pki named after the listener's hostname or the mailname, else `*`,
        else the only one declared)."""
        if len(self.pkis) == 1:
            return
        for listener in self.listeners:
            if listener.tls is TlsMode.NONE or listener.pki:
                continue
            if not {"*", (listener.hostname or self.mailname or "").lower()} & set(self.pkis):
                self.warning(f"{listener.tls.value} listener on {listener.interface} has no pki: TLS cannot "
                             f"start (add `pki NAME` and declare that pki)", listener.location)

    def recover(self) -> None:
        """Skip to the end of the statement's line, like yacc's `error '\\n'` rule."""
        self.errflag = 3
        while True:
            token = self.peek()
            if token.kind is Kind.EOF:
                return
            self.lookahead = None
            if token.kind is Kind.NL:
                self.errflag = 2
                return

    def statement(self) -> None:
        token = self.peek()
        if token.kind is Kind.KEYWORD:
            handler = getattr(self, "stmt_" + token.text.replace("-", "_"), None)
            if handler is not None:
                handler()
                return
        from smtpd.config import legacy

        if token.kind is Kind.STRING:
            first = self.advance()
            if self.at_punct("="):
                self.stmt_macro(first)
                return
            legacy.word_statement(self, first)
            return
        legacy.keyword_statement(self)

    # -- include and macros -------------------------------------------------------------------------------
    def stmt_include(self) -> None:
        self.advance()
        path_token = self.expect_string()
        # OpenSMTPD opens the file before it looks at what follows (junk there is reported after the file).
        failure = self.lexer.push_file(path_token.text)
        if failure is not None:
            self.note(failure)
            raise SemanticProblem(f"failed to include file {path_token.text}", path_token)

    def stmt_macro(self, name: Token) -> None:
        self.expect_punct("=")
        value = self.expect_string()
        if any(char.isspace() for char in name.text[1:]):
            raise SemanticProblem("macro name cannot contain whitespace", value)
        self.lexer.define(name.text, value.text)

    # -- tables -------------------------------------------------------------------------------------------
    def stmt_table(self) -> None:
        self.advance()
        name = self.expect_string()
        if self.peek().kind is Kind.STRING:
            self.declare_table(name, self.advance())
            return
        # OpenSMTPD creates the (still empty, so unusable) table before it looks for the `{`.
        self._create_table(name.text, "file", None, name)
        self.broken_tables.add(name.text)
        self.expect_punct("{")
        self.table_values(name.text)
        self.expect_punct("}")

    def declare_table(self, name: Token, value: Token) -> TableDecl:
        text = value.text
        source: str | None
        if text.startswith("/"):
            backend, source = "file", text
        else:
            backend, colon, rest = text.partition(":")
            source = rest if colon else None
        if source is not None and not source.startswith("/"):
            raise SemanticProblem(f"invalid backend parameter for table: {name.text}", value)
        if backend == "static":
            backend = "file"
        decl = self._create_table(name.text, backend, source, name)
        probe = checks.probe_table_source(backend, source)
        for line in probe.notes:
            self.note(line)
        self.tables[name.text] = replace(decl, shape=probe.shape)
        if not probe.ok:
            if backend in checks.FILE_BACKENDS:
                # A static table that did not load has no type; other backends keep theirs.
                self.broken_tables.add(name.text)
            # C's printf shows a missing path as (null) (e.g. `table t db`); so do we, never Python's None.
            shown = "(null)" if source is None else source
            raise SemanticProblem(f"invalid configuration file {shown} for table {name.text}", value)
        if backend in checks.FILE_BACKENDS and source is None:
            # `table t file` (the path forgotten): OpenSMTPD makes an empty table without a type, which every
            # typed use then refuses (`may not be used for alias lookups`, ...); never a silently empty table.
            self.broken_tables.add(name.text)
        decl = replace(decl, shape=probe.shape)
        self.tables[name.text] = decl
        return decl

    def _create_table(self, name: str, backend: str, source: str | None, token: Token) -> TableDecl:
        if name in self.tables:
            raise FatalConfigError(f'smtpd: table_create: table "{name}" already defined')
        if not checks.backend_exists(backend):
            raise FatalConfigError(f'smtpd: table_create: backend "{backend}" does not exist')
        decl = TableDecl(name=name, backend=backend, source=source, location=self.location(token))
        self.tables[name] = decl
        return decl

    def table_values(self, name: str) -> None:
        """`{ a, b }` or `{ k = v, k2 => v2 }` after the `{`: entries separated by `,`, newlines or nothing.

        Entries are added as they are read (a table cut short by an error keeps what came before it)."""
        items: list[tuple[str, str | None]] = []
        shape: TableShape | None = None
        while True:
            key = self.expect_string()
            if shape is None:
                shape = TableShape.MAPPING if self.at_punct("=") or self.peek().kind is Kind.ARROW else TableShape.LIST
            if shape is TableShape.MAPPING:
                if not (self.at_punct("=") or self.peek().kind is Kind.ARROW):
                    raise self.fail()
                self.advance()
                items.append((key.text, self.expect_string().text))
            else:
                items.append((key.text, None))
            self._fill_inline(name, shape, items)
            if self.at_punct("}"):
                return
            if self.at_punct(","):
                self.advance()
            elif self.peek().kind is Kind.NL:
                while self.peek().kind is Kind.NL:
                    self.advance()

    def _fill_inline(self, name: str, shape: TableShape, items: list[tuple[str, str | None]]) -> TableDecl:
        self.broken_tables.discard(name)
        decl = self.tables[name]
        if shape is TableShape.LIST:
            decl = replace(decl, shape=shape, items=tuple(key for key, _ in items), inline=True)
        else:
            mapping: dict[str, str] = {}
            for key, value in items:
                mapping[key.lower()] = value or ""
            decl = replace(decl, shape=shape, mapping=tuple(mapping.items()), inline=True)
        self.tables[name] = decl
        return decl

    def _new_dynamic(self, token: Token) -> str:
        name = f"<dynamic:{self.dynamic_count}>"
        self.dynamic_count += 1
        self.tables[name] = TableDecl(name=name, backend="file", inline=True, location=self.location(token))
        return name

    def table_use(self) -> str:
        """A use site's table: `<NAME>`, a bare word or a `{..}` list/map (an anonymous `<dynamic:N>`)."""
        token = self.peek()
        if token.is_punct("<"):
            self.advance()
            name = self.expect_string()
            self.expect_punct(">")
            if name.text not in self.tables or self.tables[name.text].builtin:
                raise SemanticProblem(f"no such table: {name.text}", name)
            return name.text
        if token.kind is Kind.STRING:
            self.advance()
            name = self._new_dynamic(token)
            self._fill_inline(name, TableShape.LIST, [(token.text, None)])
            return name
        if token.is_punct("{"):
            self.advance()
            name = self._new_dynamic(token)
            self.table_values(name)
            self.expect_punct("}")
            return name
        raise self.fail()

    def at_table_use(self) -> bool:
        token = self.peek()
        return token.kind is Kind.STRING or token.is_punct("<") or token.is_punct("{")

    def table_fits(self, name: str, shape: TableShape, service: str = "") -> bool:
        """OpenSMTPD's table_check_use: the table's type (list/mapping) and the lookup service must fit.

        Services matter for two backends (verified with 6.8): getpwnam answers userbase lookups only, and db
        does not answer string (tag), regex or relay-host lookups.
        """
        if name in self.broken_tables:
            return False
        decl = self.tables[name]
        if decl.backend == "getpwnam":
            return service == "userinfo"
        if decl.backend == "db":
            return service not in DB_REFUSES
        return decl.shape in (shape, TableShape.ANY)

    def check_table(self, name: str, shape: TableShape, message: str, token: Token | None = None,
                    service: str = "") -> None:
        if not self.table_fits(name, shape, service):
            raise SemanticProblem(message.format(name=name), token or self.last or self.peek())

    # -- global statements -------------------------------------------------------------------------------
    def stmt_admd(self) -> None:
        self.advance()
        value = self.expect_string()
        if not all(" " <= char <= "~" for char in value.text):
            raise SemanticProblem("not a valid admd", value)
        self.admd = value.text

    def stmt_bounce(self) -> None:
        self.advance()
        self.expect_kw("warn-interval")
        self.bounce_warn = []
        while True:
            token = self.expect_string()
            seconds, shown = delay_to_seconds(token.text)
            if seconds is None:
                raise SemanticProblem(f"invalid bounce delay: {shown}", token)
            if len(self.bounce_warn) < MAX_BOUNCE_WARN:
                self.bounce_warn.append(seconds)
            if not self.at_punct(","):
                return
            self.advance()

    def _pki_or_ca_name(self) -> Token:
        name = self.expect_string()
        if name.text != "*" and not is_valid_hostname(name.text):
            raise SemanticProblem(f"not a valid domain name: {name.text}", name)
        return name

    def stmt_ca(self) -> None:
        self.advance()
        name = self._pki_or_ca_name()
        key = name.text.lower()
        # Declared as soon as it is named (OpenSMTPD does the same), its file comes next.
        self.cas.setdefault(key, Ca(name=key, cert="", location=self.location(name)))
        if self.at_word("certificate"):
            from smtpd.config import legacy

            legacy.note_legacy_word(self, f'ca {name.text} cert "..."')
            self.advance()
        else:
            self.expect_kw("cert")
        path = self.expect_string()
        self.cas[key] = Ca(name=key, cert=path.text, location=self.location(name))

    def stmt_pki(self) -> None:
        self.advance()
        name = self._pki_or_ca_name()
        key = name.text.lower()
        pki = self.pkis.get(key) or Pki(name=key, location=self.location(name))
        self.pkis[key] = pki
        while not self.at_statement_end():
            if self.at_word("certificate"):
                from smtpd.config import legacy

                self.advance()
                path = self.expect_string()
                legacy.note_legacy_word(self, f'pki {name.text} cert "{path.text}"')
                pki = replace(pki, cert=path.text)
            elif self.accept_kw("cert"):
                pki = replace(pki, cert=self.expect_string().text)
            elif self.accept_kw("key"):
                pki = replace(pki, key=self.expect_string().text)
            elif self.accept_kw("dhe"):
                value = self.expect_string()
                if value.text.lower() not in ("none", "auto", "legacy"):
                    raise SemanticProblem(f"invalid DHE keyword: {value.text}", value)
                pki = replace(pki, dhe=value.text.lower())
                # (Python's ssl offers no built-in DH groups to switch on: an administrator must not believe it does)
                self.warning(f"pki {name.text} dhe: not used: key exchange is ECDHE (or TLS 1.3's)", self.location(value))
            else:
                raise self.fail()
            self.pkis[key] = pki

    def stmt_mda(self) -> None:
        self.advance()
        if self.accept_kw("limit"):
            where = self.location(self.peek())
            before = set(self.mda_limits)
            self._limits(self.mda_limits, MDA_LIMITS, "invalid scheduler limit keyword: {}")
            unused = sorted(set(self.mda_limits) - before - {"max-session"})
            if unused:
                self.warning(f"mda limit {', '.join(unused)}: not used (of the mda limits, only max-session is)", where)
            return
        self.expect_kw("wrapper")
        name = self.expect_string()
        command = self.expect_string()
        if name.text in self.mda_wrappers:
            raise SemanticProblem(f"mda wrapper already declared with that name: {name.text}", command)
        self.mda_wrappers[name.text] = command.text

    def _limits(self, target: dict[str, int], allowed: tuple[str, ...], message: str) -> None:
        while self.peek().kind is Kind.STRING:
            key = self.advance()
            value = self.expect_number()
            if key.text not in allowed:
                raise SemanticProblem(message.format(key.text), value)
            target[key.text] = value.number

    def stmt_mta(self) -> None:
        self.advance()
        if self.accept_kw("max-deferred"):
            self.mta_max_deferred = self.expect_number().number
            return
        self.expect_kw("limit")
        domain: str | None = None
        if self.accept_kw("for"):
            self.expect_kw("domain")
            domain = self.expect_string().text
        entry = self.mta_limits.setdefault(domain, {"family": None, "values": {}})
        self.mta_limit_options(entry)

    def mta_limit_options(self, entry: dict) -> None:
        while True:
            if self.accept_kw("inet4"):
                entry["family"] = "inet4"
            elif self.accept_kw("inet6"):
                entry["family"] = "inet6"
            elif self.peek().kind is Kind.STRING:
                key = self.advance()
                value = self.expect_number()
                if key.text not in MTA_LIMITS:
                    raise SemanticProblem(f"invalid mta limit keyword: {key.text}", value)
                entry["values"][key.text] = value.number
            else:
                return

    def stmt_proc(self) -> None:
        self.advance()
        name = self.expect_string()
        command = self.expect_string()
        if name.text in self.procs:
            raise SemanticProblem(f"processor already exists with that name: {name.text}", command)
        options = self._proc_params("processor")
        self.procs[name.text] = Proc(name=name.text, command=command.text, location=self.location(name),
                                     **options)

    def _proc_params(self, what: str) -> dict[str, str]:
        options: dict[str, str] = {}
        while self.at_kw("user", "group", "chroot"):
            keyword = self.advance().text
            value = self.expect_string()
            if keyword in options:
                raise SemanticProblem(f"{keyword} already specified for this {what}", value)
            options[keyword] = value.text
        return options

    def stmt_queue(self) -> None:
        self.advance()
        if self.accept_kw("compression"):
            self.queue = replace(self.queue, compression=True)
        elif self.accept_kw("encryption"):
            key: str | None = None
            if self.at_kw("key"):
                from smtpd.config import legacy

                self.advance()
                key_token = self.expect_string()
                legacy.note_legacy_word(self, f'queue encryption "{key_token.text}"')
                key = key_token.text
            elif self.peek().kind is Kind.STRING:
                key = self.advance().text
            if key is not None and key.lower() in ("stdin", "-"):
                key = "stdin"
            self.queue = replace(self.queue, encryption=True, encryption_key=key)
        elif self.accept_kw("ttl"):
            token = self.expect_string()
            seconds, shown = delay_to_seconds(token.text)
            if seconds is None:
                raise SemanticProblem(f"invalid ttl delay: {shown}", token)
            self.queue = replace(self.queue, ttl=seconds)
        else:
            raise self.fail()

    def stmt_scheduler(self) -> None:
        self.advance()
        self.expect_kw("limit")
        where = self.location(self.peek())
        self._limits(self.scheduler_limits, SCHEDULER_LIMITS, "invalid scheduler limit keyword: {}")
        self.warning("scheduler limit: not used (our scheduler sizes its own batches, docs/queue.md)", where)

    def stmt_smtp(self) -> None:
        self.advance()
        if self.accept_kw("limit"):
            limits: dict[str, int] = {}
            self._limits(limits, SMTP_LIMITS, "invalid session limit keyword: {}")
            self.smtp = replace(self.smtp, max_rcpt=limits.get("max-rcpt", self.smtp.max_rcpt),
                                max_mails=limits.get("max-mails", self.smtp.max_mails))
        elif self.accept_kw("ciphers"):
            self.smtp = replace(self.smtp, ciphers=self.expect_string().text)
        elif self.accept_kw("max-message-size"):
            self.smtp = replace(self.smtp, max_message_size=self.size())
        elif self.accept_kw("sub-addr-delim"):
            self.smtp = replace(self.smtp, sub_addr_delim=self.sub_addr_delim(self.expect_string()))
        else:
            raise self.fail()

    def size(self) -> int:
        token = self.peek()
        if token.kind is Kind.NUMBER:
            self.advance()
            if token.number < 0:
                raise SemanticProblem(f"invalid size: {token.number}", token)
            return token.number
        token = self.expect_string()
        value = scan_scaled(token.text)
        if value is None or value < 0:
            raise SemanticProblem(f"invalid size: {token.text}", token)
        return value

    def sub_addr_delim(self, token: Token) -> str:
        if len(token.text) != 1:
            raise SemanticProblem("subaddressing-delimiter must be one character", token)
        char = token.text
        if char.isspace() or not (" " <= char <= "~") or char == "@":
            raise SemanticProblem("sub-addr-delim uses invalid character", token)
        return char

    def stmt_srs(self) -> None:
        self.advance()
        if self.accept_kw("key"):
            if self.accept_kw("backup"):
                self.srs = replace(self.srs, backup_key=self.expect_string().text)
            else:
                self.srs = replace(self.srs, key=self.expect_string().text)
        elif self.accept_kw("ttl"):
            token = self.expect_string()
            seconds, shown = delay_to_seconds(token.text)
            if seconds is None:
                raise SemanticProblem(f'ttl delay "{shown}" is invalid', token)
            if seconds // 86400 == 0:
                raise SemanticProblem(f'ttl delay "{shown}" is too short', token)
            self.srs = replace(self.srs, ttl=(seconds // 86400) * 86400)
        else:
            raise self.fail()

    # -- filters ------------------------------------------------------------------------------------------
    def stmt_filter(self) -> None:
        self.advance()
        name = self.expect_string()
        location = self.location(name)
        if self.accept_kw("proc"):
            proc = self.expect_string()
            self._filter_unique(name, proc)
            if proc.text not in self.procs:
                raise SemanticProblem(f"no processor exist with that name: {proc.text}", proc)
            self.filters[name.text] = Filter(name=name.text, kind="proc", proc=proc.text, location=location)
        elif self.accept_kw("proc-exec"):
            command = self.expect_string()
            self._filter_unique(name, command)
            self.filters[name.text] = Filter(name=name.text, kind="proc-exec", command=command.text,
                                             proc=name.text, location=location)
            options = self._proc_params("processor")
            self.filters[name.text] = replace(self.filters[name.text], **options)
            self.procs[name.text] = Proc(name=name.text, command=command.text, location=location, **options)
        elif self.accept_kw("phase"):
            self._filter_unique(name, name)
            self.filters[name.text] = Filter(name=name.text, kind="phase", location=location)
            self.filters[name.text] = self.filter_phase(name.text, location)
        elif self.accept_kw("chain"):
            self._filter_unique(name, name)
            chain = self.filter_list()
            self.filters[name.text] = Filter(name=name.text, kind="chain", chain=tuple(chain), location=location)
        else:
            raise self.fail()

    def _filter_unique(self, name: Token, token: Token) -> None:
        if name.text in self.filters:
            raise SemanticProblem(f"filter already exists with that name: {name.text}", token)

    def filter_phase(self, name: str, location: Location) -> Filter:
        phase_token = self.peek()
        if phase_token.kind is not Kind.KEYWORD or phase_token.text not in FILTER_PHASES:
            raise self.fail()
        phase = self.advance().text
        self.expect_kw("match")
        negated = self.negation()
        token = self.peek()
        if token.kind is not Kind.KEYWORD or token.text not in FILTER_CHECKS[phase]:
            raise self.fail()
        check = self.advance().text
        condition = Condition(family=check, negated=negated)
        if check == "fcrdns":
            pass
        elif check in ("rdns", "auth"):
            if self.accept_kw("regex"):
                condition = replace(condition, regex=True, table=self.table_use())
            elif self.at_table_use():
                condition = replace(condition, table=self.table_use())
        else:
            regex = self.accept_kw("regex") is not None
            condition = replace(condition, regex=regex, table=self.table_use())
        decisions = ("reject", "disconnect", "rewrite", "report") + (("junk", "bypass") if phase != "commit" else ())
        token = self.peek()
        if token.kind is not Kind.KEYWORD or token.text not in decisions:
            raise self.fail()
        decision = self.advance().text
        argument = self.expect_string().text if decision in FILTER_DECISIONS_WITH_ARG else None
        return Filter(name=name, kind="phase", phase=phase, conditions=(condition,), decision=decision,
                      decision_arg=argument, location=location)

    def filter_list(self) -> list[str]:
        """`{ a, b }` of filter names for a chain (after the keyword)."""
        self.expect_punct("{")
        chain: list[str] = []
        procs: set[str] = set()
        while True:
            element = self.expect_string()
            existing = self.filters.get(element.text)
            if existing is None:
                raise SemanticProblem(f"no filter exist with that name: {element.text}", element)
            if existing.kind == "chain":
                raise SemanticProblem(f"no filter chain allowed within a filter chain: {element.text}", element)
            if element.text in chain:
                raise SemanticProblem(f"no filter allowed twice within a filter chain: {element.text}", element)
            if existing.proc is not None:
                if existing.proc in procs:
                    raise SemanticProblem(f"no proc allowed twice within a filter chain: {existing.proc}", element)
                procs.add(existing.proc)
            chain.append(element.text)
            if self.at_punct("}"):
                self.advance()
                return chain
            if self.at_punct(","):
                self.advance()
            elif self.peek().kind is Kind.NL:
                while self.peek().kind is Kind.NL:
                    self.advance()

    def filter_option(self) -> str:
        """`filter NAME` or `filter { a, b }` on a listener or relay action (after the keyword)."""
        if self.at_punct("{"):
            name = f"<dynchain:{self.dynchain_count:08x}>"
            self.dynchain_count += 1
            token = self.peek()
            chain = self.filter_list()
            self.filters[name] = Filter(name=name, kind="chain", chain=tuple(chain), location=self.location(token))
            return name
        return self.filter_name(self.expect_string())

    def runs_processes(self, name: str | None) -> bool:
        """Whether the filter (or chain) ``name`` runs a filter process."""
        item = self.filters.get(name) if name else None
        members = [self.filters.get(member) for member in item.chain] if item is not None and item.kind == "chain" \
            else [item]
        return any(member is not None and member.kind in ("proc", "proc-exec") for member in members)

    def filter_name(self, name: Token) -> str:
        if name.text not in self.filters:
            raise SemanticProblem(f"no filter exist with that name: {name.text}", name)
        return name.text

    # -- listen -------------------------------------------------------------------------------------------
    def stmt_listen(self) -> None:
        start = self.advance()
        self.expect_kw("on")
        if self.accept_kw("socket"):
            self.socket_listener(start)
            return
        target = self.expect_string()
        options = _ListenOptions()
        # Like OpenSMTPD's parser, the listener is made as soon as no option follows; junk after the options
        # is a syntax error only then (so `listen on X junk` still reports a bad X first).
        while self.at_listen_option():
            self.listen_option(options)
        self.create_listener(target, options)

    def at_listen_option(self) -> bool:
        token = self.peek()
        if token.kind is Kind.STRING and not token.quoted and token.text in ("mask-source", "secure"):
            return True
        return token.kind is Kind.KEYWORD and token.text in LISTEN_OPTIONS

    def socket_listener(self, start: Token) -> None:
        options = _ListenOptions()
        while self.at_kw("filter", "mask-src", "tag"):
            if self.accept_kw("filter"):
                if self.at_punct("{"):
                    self._once(options, "filter", "filter already specified")
                    options.filter = self.filter_option()
                else:
                    name = self.expect_string()
                    self._once(options, "filter", "filter already specified")
                    options.filter = self.filter_name(name)
            elif self.accept_kw("mask-src"):
                self._once(options, "mask-src", "mask-source already specified")
                options.mask_src = True
            elif self.accept_kw("tag"):
                options.tag = self._tag(options)
        if self.socket_listener_seen:
            raise SemanticProblem("socket listener already configured", self.last or start)
        self.socket_listener_seen = True
        from smtpd.config.model import Listener

        self.listeners.append(Listener(interface=SOCKET, location=self.location(start), tag=options.tag,
                                       mask_src=options.mask_src, filter=options.filter))

    def _once(self, options: _ListenOptions, key: str, message: str) -> None:
        if key in options.seen:
            raise SemanticProblem(message, self.last or self.peek())
        options.seen.add(key)

    def _tag(self, options: _ListenOptions) -> str:
        value = self.expect_string()
        self._once(options, "tag", "tag already specified")
        if len(value.text.encode()) > TAG_SIZE:
            raise SemanticProblem("tag name too long", value)
        return value.text

    def listen_option(self, options: _ListenOptions) -> None:  # noqa: C901 - one branch per option, as the grammar
        token = self.peek()
        if token.kind is Kind.STRING and not token.quoted and token.text in ("mask-source", "secure"):
            from smtpd.config import legacy

            legacy.listen_word(self, options)
            return
        if token.kind is not Kind.KEYWORD or token.text not in LISTEN_OPTIONS:
            raise self.fail()
        word = self.advance().text
        # As in OpenSMTPD, an option's argument is read before the "already specified" check.
        if word in ("inet4", "inet6"):
            self._once(options, "family", "address family already specified")
            options.family = word
        elif word == "port":
            token = self.port_token()
            self._once(options, "port", "port already specified")
            options.port = self.port_value(token)
        elif word == "filter":
            if self.at_punct("{"):
                self._once(options, "filter", "filter already specified")
                options.filter = self.filter_option()
            else:
                name = self.expect_string()
                self._once(options, "filter", "filter already specified")
                options.filter = self.filter_name(name)
        elif word in ("smtps", "tls", "tls-require"):
            verify = word != "tls" and self.accept_kw("verify") is not None
            self._once(options, "tls", "TLS mode already specified")
            options.tls, options.verify = TlsMode(word), verify
        elif word == "pki":
            value = self.expect_string()
            self._once(options, "pki", "pki already specified")
            options.pki.append(value.text)
        elif word == "ca":
            value = self.expect_string()
            self._once(options, "ca", "ca already specified")
            options.ca = value.text
        elif word in ("auth", "auth-optional"):
            table = None
            if self.at_table_use() and not self.at_word("mask-source", "secure"):
                table = self.table_use()
            self._once(options, "auth", "auth already specified")
            options.auth, options.auth_table = AuthMode(word), table
        elif word == "tag":
            options.tag = self._tag(options)
        elif word == "hostname":
            value = self.expect_string()
            self._once(options, "hostname", "hostname already specified")
            options.hostname = value.text
        elif word == "hostnames":
            table = self.table_use()
            self._once(options, "hostnames", "hostnames already specified")
            self.check_table(table, TableShape.MAPPING, 'invalid use of table "{name}" as HOSTNAMES parameter')
            options.hostnames_table = table
        elif word == "mask-src":
            self._once(options, "mask-src", "mask-source already specified")
            options.mask_src = True
        elif word == "received-auth":
            self._once(options, "received-auth", "received-auth already specified")
            options.received_auth = True
        elif word == "no-dsn":
            self._once(options, "no-dsn", "no-dsn already specified")
            options.no_dsn = True
        elif word == "proxy-v2":
            self._once(options, "proxy-v2", "proxy-v2 already specified")
            options.proxy_v2 = True
        elif word == "senders":
            table = self.table_use()
            masquerade = self.accept_kw("masquerade") is not None
            self._once(options, "senders", "senders already specified")
            self.check_table(table, TableShape.MAPPING, 'invalid use of table "{name}" as SENDERS parameter')
            options.senders_table, options.masquerade = table, masquerade

    def port_token(self) -> Token:
        if self.peek().kind is Kind.NUMBER or self.at_kw("smtp", "smtps"):
            return self.advance()
        return self.expect_string()

    def port_value(self, token: Token) -> int:
        if token.kind is Kind.NUMBER:
            if not 0 < token.number <= 65535:
                raise SemanticProblem(f"invalid port: {token.number}", token)
            return token.number
        try:
            return socket.getservbyname(token.text, "tcp")
        except OSError:
            raise SemanticProblem(f"invalid port: {token.text}", token) from None

    def create_listener(self, target: Token, options: _ListenOptions) -> None:
        from smtpd.config.model import Listener

        secure_both = "secure" in options.legacy_words
        if options.auth is not AuthMode.NONE and options.tls is TlsMode.NONE and not secure_both:
            raise FatalConfigError("smtpd: invalid listen option: auth requires tls/smtps")
        if options.pki and options.tls is TlsMode.NONE and not secure_both:
            raise FatalConfigError("smtpd: invalid listen option: pki requires tls/smtps")
        if secure_both and options.port is not None:
            raise FatalConfigError("smtpd: invalid listen option: tls/smtps on same port")
        addresses, refused = interfaces.resolve_listen_target_checked(target.text, options.family)
        if refused is not None:
            self.note(refused)  # OpenSMTPD makes no listener then, and goes on
            return
        if not addresses:
            raise FatalConfigError(f"smtpd: invalid virtual ip or interface: {target.text}")
        for name in options.pki:
            if name.lower() not in self.pkis:
                raise FatalConfigError(f"pki name not found: {name}", "smtpd")
        if options.ca is not None and options.ca.lower() not in self.cas:
            raise FatalConfigError(f"ca name not found: {options.ca}", "smtpd")
        location = self.location(target)
        modes = [TlsMode.SMTPS, TlsMode.STARTTLS] if secure_both else [options.tls]
        for mode in modes:
            default_port = 465 if mode is TlsMode.SMTPS else 25
            listener = Listener(
                interface=target.text, location=location, addresses=tuple(addresses), family=options.family,
                port=options.port or default_port, port_explicit=options.port is not None, tls=mode,
                verify=options.verify, pki=tuple(name.lower() for name in options.pki),
                ca=options.ca.lower() if options.ca else None,
                auth=options.auth, auth_table=options.auth_table, tag=options.tag, hostname=options.hostname,
                hostnames_table=options.hostnames_table, mask_src=options.mask_src, no_dsn=options.no_dsn,
                received_auth=options.received_auth, senders_table=options.senders_table,
                masquerade=options.masquerade, proxy_v2=options.proxy_v2, filter=options.filter,
            )
            self.listeners.append(listener)
            self._listener_warnings(listener)
        if options.legacy_words:
            from smtpd.config import legacy

            legacy.warn_listener(self, target, self.listeners[-len(modes):])

    def _listener_warnings(self, listener) -> None:  # noqa: ANN001 - a model Listener
        location = listener.location
        for address in listener.addresses:
            key = (address, listener.port)
            if key in self.bound:
                earlier = self.bound[key]
                self.warning(f"listener on {address} port {listener.port} duplicates the one at {earlier}: "
                             f"only one can bind", location)
            else:
                self.bound[key] = location

    # -- action -------------------------------------------------------------------------------------------
    def stmt_action(self) -> None:
        start = self.advance()
        name = self.expect_string()
        self.note_modern_rule(start)
        if name.text in self.actions:
            raise SemanticProblem(f"dispatcher already declared with that name: {name.text}", name)
        action = self.dispatcher(name.text, self.location(start))
        self.actions[name.text] = action
        self.record_modern_rule(start)

    def dispatcher(self, name: str, location: Location) -> Action:
        token = self.peek()
        if token.kind is not Kind.KEYWORD:
            raise self.fail()
        if token.text == "relay":
            self.advance()
            action = Action(name=name, method=Method.RELAY, location=location)
            action = replace(action, relay=self.relay_options(Relay()))
        else:
            action = self.local_method(name, location)
            action = self.local_options(action)
        return self.ttl_options(action)

    def local_method(self, name: str, location: Location) -> Action:
        word = self.peek().text
        if word not in ("mbox", "maildir", "lmtp", "mda", "forward-only", "expand-only"):
            raise self.fail()
        self.advance()
        action = Action(name=name, method=Method(word), location=location)
        if word == "maildir":
            if self.accept_kw("junk"):
                action = replace(action, junk=True)
            elif self.peek().kind is Kind.STRING:
                action = replace(action, maildir_path=self.advance().text)
                if self.accept_kw("junk"):
                    action = replace(action, junk=True)
        elif word == "lmtp":
            action = replace(action, lmtp_destination=self.expect_string().text)
            if self.accept_kw("rcpt-to"):
                action = replace(action, lmtp_rcpt_to=True)
        elif word == "mda":
            action = replace(action, mda_command=self.expect_string().text)
        return action

    def local_options(self, action: Action) -> Action:
        while True:
            if self.accept_kw("user"):
                value = self.expect_string()
                if action.method is Method.MBOX:
                    raise SemanticProblem("user may not be specified for this dispatcher", value)
                if action.method is Method.FORWARD_ONLY:
                    raise SemanticProblem("user may not be specified for forward-only", value)
                if action.method is Method.EXPAND_ONLY:
                    raise SemanticProblem("user may not be specified for expand-only", value)
                if action.user is not None:
                    raise SemanticProblem("user already specified for this dispatcher", value)
                action = replace(action, user=value.text)
            elif self.at_kw("alias", "virtual"):
                word = self.advance().text
                table = self.table_use()
                if action.alias_table is not None:
                    raise SemanticProblem("alias mapping already specified for this dispatcher", self.last)
                if action.virtual_table is not None:
                    raise SemanticProblem("virtual mapping already specified for this dispatcher", self.last)
                self.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for ' + word + " lookups")
                action = replace(action, **{f"{word}_table": table})
            elif self.accept_kw("userbase"):
                table = self.table_use()
                if action.userbase_table is not None:
                    raise SemanticProblem("userbase mapping already specified for this dispatcher", self.last)
                self.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for userbase lookups',
                                 service="userinfo")
                action = replace(action, userbase_table=table)
            elif self.accept_kw("wrapper"):
                value = self.expect_string()
                if value.text not in self.mda_wrappers:
                    raise SemanticProblem(f"no mda wrapper with that name: {value.text}", value)
                action = replace(action, wrapper=value.text)
            else:
                return action

    def relay_options(self, relay: Relay) -> Relay:  # noqa: C901 - one branch per option, as the grammar
        while True:
            token = self.peek()
            if token.kind is not Kind.KEYWORD:
                return relay
            word = token.text
            if word == "helo":
                self.advance()
                value = self.expect_string()
                if relay.helo is not None:
                    raise SemanticProblem("helo already specified for this dispatcher", value)
                relay = replace(relay, helo=value.text)
            elif word == "helo-src":
                self.advance()
                table = self.table_use()
                if relay.helo_src_table is not None:
                    raise SemanticProblem("helo-source mapping already specified for this dispatcher", self.last)
                self.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for helo-source lookups')
                relay = replace(relay, helo_src_table=table)
            elif word in ("pki", "ca", "mail-from"):
                self.advance()
                value = self.expect_string()
                attribute = word.replace("-", "_")
                if getattr(relay, attribute) is not None:
                    raise SemanticProblem(f"{word} already specified for this dispatcher", value)
                relay = replace(relay, **{attribute: value.text.lower() if word == "ca" else value.text})
            elif word == "src":
                self.advance()
                table = self.table_use()
                if relay.src_table is not None:
                    raise SemanticProblem("source mapping already specified for this dispatcher", self.last)
                self.check_table(table, TableShape.LIST, 'table "{name}" may not be used for source lookups')
                relay = replace(relay, src_table=table, src=self._single_item(table))
                self._src_warnings(table)
            elif word == "backup":
                self.advance()
                mx = self.expect_string().text if self.accept_kw("mx") else None
                if relay.backup:
                    raise SemanticProblem("backup already specified for this dispatcher", self.last)
                if relay.host_table is not None or relay.domain_table is not None:
                    raise SemanticProblem("backup and host are mutually exclusive", self.last)
                relay = replace(relay, backup=True, backup_mx=mx)
            elif word in ("host", "domain"):
                self.advance()
                table = self.table_use()
                if relay.host_table is not None or relay.domain_table is not None:
                    raise SemanticProblem("host mapping already specified for this dispatcher", self.last)
                if relay.backup:
                    raise SemanticProblem(f"backup and {word} are mutually exclusive", self.last)
                shape = TableShape.LIST if word == "host" else TableShape.MAPPING
                self.check_table(table, shape, 'table "{name}" may not be used for host lookups', service="relayhost")
                if word == "host":
                    relay = replace(relay, host_table=table, host=self._single_item(table))
                    self._url_warnings(table)
                else:
                    relay = replace(relay, domain_table=table)
            elif word == "tls":
                self.advance()
                verify = "no-verify" if self.accept_kw("no-verify") else "tls"
                if relay.tls is not None:
                    raise SemanticProblem("tls already specified for this dispatcher", self.last)
                relay = replace(relay, tls=verify)
            elif word == "auth":
                self.advance()
                table = self.table_use()
                if relay.host_table is None and relay.domain_table is None:
                    raise SemanticProblem("auth may not be specified without host on a dispatcher", self.last)
                if relay.auth_table is not None:
                    raise SemanticProblem("auth mapping already specified for this dispatcher", self.last)
                self.check_table(table, TableShape.MAPPING, 'table "{name}" may not be used for auth lookups')
                relay = replace(relay, auth_table=table)
            elif word == "filter":
                self.advance()
                name = None if self.at_punct("{") else self.expect_string()
                if relay.filter is not None:
                    raise SemanticProblem("filter already specified for this dispatcher", self.last)
                relay = replace(relay, filter=self.filter_option() if name is None else self.filter_name(name))
                if not self.runs_processes(relay.filter):
                    self.warning("relay filter: not used (a relay action's filter only reports the relay sessions "
                                 "to its filter processes, and this one runs none, docs/filters.md)",
                                 self.location(token))
            elif word == "srs":
                self.advance()
                if self.srs.key is None:
                    raise SemanticProblem("an srs key is required for srs to be specified in an action", token)
                if relay.srs:
                    raise SemanticProblem("srs already specified for this dispatcher", token)
                relay = replace(relay, srs=True)
            else:
                return relay

    def _single_item(self, table: str) -> str | None:
        decl = self.tables[table]
        if decl.name.startswith("<dynamic:") and decl.shape is TableShape.LIST and len(decl.items) == 1:
            return decl.items[0]
        return None

    def _url_warnings(self, table: str) -> None:
        decl = self.tables[table]
        for url in decl.items if decl.inline else ():
            problem = relay_url_problem(url)
            if problem is not None:
                self.warning(problem + " (OpenSMTPD only finds out when it delivers)", self._here())

    def _src_warnings(self, table: str) -> None:
        decl = self.tables[table]
        for item in decl.items if decl.inline else ():
            try:
                ipaddress.ip_address(item)
            except ValueError:
                self.warning(f'relay src "{item}" is not an IP address: the relay cannot bind to it',
                             self._here())

    def _here(self) -> Location:
        token = self.last or self.peek()
        return self.location(token)

    def ttl_options(self, action: Action) -> Action:
        while self.accept_kw("ttl"):
            value = self.expect_string()
            if action.ttl is not None:
                raise SemanticProblem("ttl already specified for this dispatcher", value)
            seconds, shown = delay_to_seconds(value.text)
            if seconds is None:
                raise SemanticProblem(f'ttl delay "{shown}" is invalid', value)
            action = replace(action, ttl=seconds)
        return action

    def finish_relay_checks(self, action: Action) -> None:
        """A relay URL with a label needs an auth table; warn about it like a nonsense URL."""
        relay = action.relay
        if relay is None or relay.host_table is None:
            return
        decl = self.tables[relay.host_table]
        for url in decl.items if decl.inline else ():
            if "@" in url.partition("://")[2] and relay.auth_table is None and relay_url_problem(url) is None:
                self.warning(f'relay URL "{url}" has a label but the action has no auth table', action.location)

    # -- match --------------------------------------------------------------------------------------------
    def note_modern_rule(self, token: Token) -> None:
        from smtpd.config import legacy

        legacy.check_mixing(self, token, modern=True)

    def record_modern_rule(self, token: Token) -> None:
        from smtpd.config import legacy

        legacy.record_rule(self, token, modern=True)

    def stmt_match(self) -> None:
        start = self.advance()
        self.note_modern_rule(start)
        flags = _RuleFlags()
        while not self.at_kw("reject", "action"):
            self.match_option(flags)
        if self.accept_kw("reject"):
            rule = MatchRule(conditions=(), action=None, reject=True, location=self.location(start))
        else:
            self.advance()
            name = self.expect_string()
            if name.text not in self.actions:
                raise SemanticProblem(f"no such dispatcher: {name.text}", name)
            rule = MatchRule(conditions=(), action=name.text, location=self.location(start))
        self.add_rule(rule, flags)
        self.record_modern_rule(start)

    def add_rule(self, rule: MatchRule, flags: _RuleFlags) -> MatchRule:
        conditions = list(flags.conditions)
        if "from" not in flags.seen:
            conditions.append(Condition(family="from", variant="local"))
        if "for" not in flags.seen:
            conditions.append(Condition(family="for", variant="local"))
        # A canonical order (from, for, then the others), so that two spellings of a rule are one model;
        # the order has no meaning: every test of a rule must hold.
        conditions.sort(key=lambda condition: CONDITION_ORDER.index(condition.family))
        rule = replace(rule, conditions=tuple(conditions), number=len(self.rules) + 1)
        self.rules.append(rule)
        return rule

    def _mark(self, flags: _RuleFlags, family: str, token: Token) -> None:
        if family in flags.seen:
            raise SemanticProblem(f"{family} already specified for this rule", token)
        flags.seen.add(family)

    def _regex_table(self) -> tuple[bool, str]:
        regex = self.accept_kw("regex") is not None
        return regex, self.table_use()

    def match_option(self, flags: _RuleFlags) -> None:  # noqa: C901 - one branch per option, as the grammar
        negated = self.negation()
        token = self.peek()
        if token.kind is not Kind.KEYWORD:
            raise self.fail()
        word = token.text
        if word in ("tag", "helo", "mail-from", "rcpt-to"):
            self.advance()
            regex, table = self._regex_table()
            self._mark(flags, word, self.last or token)
            kinds = {"tag": "tag", "helo": "helo", "mail-from": "mail-from", "rcpt-to": "rcpt-to"}
            service = "regex" if regex else ("string" if word == "tag" else word)
            self.check_table(table, TableShape.LIST, 'table "{name}" may not be used for ' + kinds[word] + " lookups",
                             service=service)
            flags.conditions.append(Condition(family=word, table=table, regex=regex, negated=negated))
        elif word == "tls":
            self.advance()
            self._mark(flags, "tls", token)
            flags.conditions.append(Condition(family="tls", negated=negated))
        elif word == "auth":
            self.advance()
            condition = Condition(family="auth", negated=negated)
            if self.at_kw("regex") or self.at_table_use():
                regex, table = self._regex_table()
                self._mark(flags, "auth", self.last or token)
                self.check_table(table, TableShape.LIST, 'table "{name}" may not be used for auth lookups',
                                 service="regex" if regex else "credentials")
                condition = replace(condition, table=table, regex=regex)
            else:
                self._mark(flags, "auth", token)
            flags.conditions.append(condition)
        elif word == "from":
            self.advance()
            flags.conditions.append(self.match_from(flags, negated, token))
        elif word == "for":
            self.advance()
            flags.conditions.append(self.match_for(flags, negated, token))
        else:
            raise self.fail()

    def match_from(self, flags: _RuleFlags, negated: bool, start: Token) -> Condition:
        token = self.peek()
        if token.kind is not Kind.KEYWORD or token.text not in ("socket", "local", "any", "src", "rdns", "auth",
                                                                "mail-from"):
            raise self.fail()
        variant = self.advance().text
        condition = Condition(family="from", variant=variant, negated=negated)
        if variant in ("src", "mail-from"):
            regex, table = self._regex_table()
            condition = replace(condition, regex=regex, table=table)
        elif variant in ("rdns", "auth") and (self.at_kw("regex") or self.at_table_use()):
            regex, table = self._regex_table()
            condition = replace(condition, regex=regex, table=table)
        self._mark(flags, "from", self.last or start)
        if variant == "auth":
            flags.seen.add("auth")
        if variant == "mail-from":
            flags.seen.add("mail-from")
        if condition.table is not None:
            service = "regex" if condition.regex and variant != "rdns" else variant
            self.check_table(condition.table, TableShape.LIST, 'table "{name}" may not be used for '
                             + ("rdns" if variant == "rdns" else "from") + " lookups", service=service)
        return condition

    def match_for(self, flags: _RuleFlags, negated: bool, start: Token) -> Condition:
        token = self.peek()
        if token.kind is not Kind.KEYWORD or token.text not in ("local", "any", "domain", "rcpt-to"):
            raise self.fail()
        variant = self.advance().text
        condition = Condition(family="for", variant=variant, negated=negated)
        if variant in ("domain", "rcpt-to"):
            regex, table = self._regex_table()
            condition = replace(condition, regex=regex, table=table)
        self._mark(flags, "for", self.last or start)
        if variant == "rcpt-to":
            flags.seen.add("rcpt-to")
        if condition.table is not None:
            what = "'for'" if variant == "domain" else "for"
            self.check_table(condition.table, TableShape.LIST, 'table "{name}" may not be used for ' + what + " lookups",
                             service="regex" if condition.regex else variant)
        return condition

    # -- result -------------------------------------------------------------------------------------------
    def build(self) -> Config:
        from smtpd.config.model import Listener

        listeners = list(self.listeners)
        if not any(listener.is_socket for listener in listeners):
            listeners.append(Listener(interface=SOCKET))
        mta_limits = tuple(
            MtaLimit(domain=domain, family=entry["family"], values=tuple(entry["values"].items()))
            for domain, entry in self.mta_limits.items()
        )
        for action in self.actions.values():
            self.finish_relay_checks(action)
        return Config(
            path=self.path,
            listeners=tuple(listeners),
            tables=dict(self.tables),
            pkis=dict(self.pkis),
            cas=dict(self.cas),
            actions=dict(self.actions),
            rules=tuple(self.rules),
            smtp=self.smtp,
            queue=self.queue,
            srs=self.srs,
            bounce_warn_intervals=tuple(self.bounce_warn) if self.bounce_warn is not None else DEFAULT_WARN_INTERVALS,
            mda_wrappers=dict(self.mda_wrappers),
            mda_limits=tuple(self.mda_limits.items()),
            mta_limits=mta_limits,
            mta_max_deferred=self.mta_max_deferred,
            scheduler_limits=tuple(self.scheduler_limits.items()),
            filters=dict(self.filters),
            procs=dict(self.procs),
            admd=self.admd,
            legacy=self.legacy_rule_at is not None or self.legacy_lines > 0,
        )
