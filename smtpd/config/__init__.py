"""smtpd.conf → the frozen model (smtpd/config/model.py). The API the rest of the daemon uses:

    result = smtpd.config.load("/etc/smtpd.conf", macros={"iface": "lo"})
    if result.ok:
        config = result.config
    for line in result.lines():      # what `smtpd -n` prints, in order
        print(line, file=sys.stderr)

``parse_text(text, path)`` does the same for a string (tests). ``result.errors`` and ``result.warnings`` are
``Diagnostic`` objects whose ``str()`` is the ``FILE:LINE: message`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpd.config import checks
from smtpd.config.errors import Diagnostic, FatalConfigError, Severity
from smtpd.config.lexer import Lexer
from smtpd.config.model import Config
from smtpd.config.parser import Parser

NO_RULES = "warn: no rules, nothing to do"

__all__ = ["Diagnostic", "ParseResult", "Severity", "load", "parse_text"]


@dataclass
class ParseResult:
    config: Config | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    unused_macros: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.config is not None and not any(d.is_error for d in self.diagnostics)

    @property
    def errors(self) -> list[Diagnostic]:
        """Error lines, with the lines that explain them (e.g. `PATH: fopen: ...`)."""
        return [d for d in self.diagnostics if not d.is_warning]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_warning]

    def lines(self) -> list[str]:
        return [str(d) for d in self.diagnostics]


def _report_ignored(text: str, file: str, line: int, kind: str) -> None:
    """Placeholder until the parser installs its own reporter."""


def _run(lexer: Lexer, path: str, check_files: bool, mailname: str | None) -> ParseResult:
    parser = Parser(lexer, path, mailname=mailname)
    try:
        parser.parse()
    except FatalConfigError as fatal:
        return ParseResult(None, parser.diagnostics + [Diagnostic(line) for line in fatal.lines])
    diagnostics = parser.diagnostics
    unused = [name for name in [*lexer.persistent, *lexer.macros] if name not in lexer.used]
    if not parser.rules:
        diagnostics.append(Diagnostic(NO_RULES))
    if any(d.is_error for d in diagnostics):
        return ParseResult(None, diagnostics, unused)
    config = parser.build()
    if check_files:
        diagnostics.extend(checks.validate_tables(config))
        try:
            checks.check_pki_and_queue(config)
        except FatalConfigError as fatal:
            return ParseResult(None, diagnostics + [Diagnostic(line) for line in fatal.lines], unused)
        for pki in config.pkis.values():
            if pki.cert and pki.key:
                problem = checks.certificate_problem(pki.cert, pki.key)
                if problem is not None:
                    diagnostics.append(Diagnostic(problem, pki.location, Severity.WARNING))
    if any(d.is_error for d in diagnostics):
        return ParseResult(None, diagnostics, unused)
    return ParseResult(config, diagnostics, unused)


def load(path: str, macros: dict[str, str] | None = None, check_files: bool = True,
         mailname: str | None = None) -> ParseResult:
    """Parse a config file (and its includes). ``macros`` are -D definitions, which the file cannot override.

    With ``check_files`` (the default, as `smtpd -n` and a start do) the tables are loaded and checked
    against their uses, and the pki certificates and keys and the queue key are checked too.
    """
    lexer = Lexer(_report_ignored, macros)
    failure = lexer.push_file(path)
    if failure is not None:
        return ParseResult(None, [Diagnostic(failure)])
    return _run(lexer, path, check_files, mailname if mailname is not None else _system_mailname())


def _system_mailname() -> str | None:
    """The server name, for checks that depend on it (a tls listener finds its pki by that name)."""
    from shared.paths import MailnameError, Paths, read_mailname

    try:
        return read_mailname(Paths.from_environment().mailname)
    except (MailnameError, OSError):
        return None


def parse_text(text: str, path: str = "smtpd.conf", macros: dict[str, str] | None = None,
               check_files: bool = False, mailname: str | None = None) -> ParseResult:
    """Parse config text as if it were the file ``path`` (includes are still read from disk)."""
    lexer = Lexer(_report_ignored, macros)
    lexer.push_text(path, text)
    return _run(lexer, path, check_files, mailname)
