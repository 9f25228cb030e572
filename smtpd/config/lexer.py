"""Tokens of smtpd.conf (reference §3.1), with macros and include files.

The rules are OpenSMTPD's, so that a config means the same thing to both programs:

* a statement ends at a newline; ``\\`` + newline continues it; ``#`` at the start of a token begins a comment;
* ``"..."`` / ``'...'`` are strings: ``\\"``, ``\\ ``, ``\\TAB`` are escapes, a newline inside is dropped;
* an unquoted word starts with a letter, digit, ``:`` or ``_`` and runs over letters, digits and punctuation
  except ``( ) { } < > ! = # ,``; a reserved keyword is a keyword only when it is not quoted;
* ``-?[0-9]+`` followed by whitespace, ``) , / } =`` or the end is a NUMBER, anything else is re-read as a word;
* ``$name`` outside quotes is replaced by the macro's value, which is then lexed again.

One deliberate difference: CRLF line endings are read as LF (OpenSMTPD fails every line of such a file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

# Reserved words of the 6.8 grammar (reference §3.9).
KEYWORDS: frozenset[str] = frozenset("""
action admd alias any auth auth-optional backup bounce bypass ca cert chain chroot ciphers commit compression connect
data data-line dhe disconnect domain ehlo encryption expand-only fcrdns filter for forward-only from group helo helo-src
host hostname hostnames include inet4 inet6 junk key limit listen lmtp local mail-from maildir mask-src masquerade match
max-deferred max-message-size mbox mda mta mx no-dsn no-verify noop on phase pki port proc proc-exec proxy-v2 queue quit
rcpt-to rdns received-auth recipient regex reject relay report rewrite rset scheduler senders smtp smtp-in smtp-out smtps
socket src srs sub-addr-delim table tag tagged tls tls-require ttl user userbase verify virtual warn-interval wrapper
""".split())

MAX_TOKEN = 8095
# The text of the end-of-file token that ends an unterminated string: unlike a normal end of file it does
# not complete the statement (OpenSMTPD gives no fake newline there), so the statement is a syntax error.
UNTERMINATED = "unterminated string"
_NOT_IN_WORD = set("(){}<>!=#,")
_NUMBER_ENDS = set(" \t\n\r\f\v),/}=")
_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


class Kind(StrEnum):
    STRING = "string"
    NUMBER = "number"
    KEYWORD = "keyword"
    PUNCT = "punct"  # one character: { } < > ! , = and anything else the grammar has no use for
    ARROW = "=>"
    NL = "newline"
    EOF = "end of file"
    ERROR = "error"  # a lexical error was reported; the parser skips the rest of the statement


@dataclass(frozen=True)
class Token:
    kind: Kind
    text: str
    file: str
    line: int
    quoted: bool = False
    number: int = 0

    def is_word(self, word: str) -> bool:
        """The unquoted word (keyword or not) ``word``."""
        return self.kind in (Kind.KEYWORD, Kind.STRING) and not self.quoted and self.text == word

    def is_punct(self, char: str) -> bool:
        return self.kind is Kind.PUNCT and self.text == char

    @property
    def is_string(self) -> bool:
        return self.kind is Kind.STRING


class _Marker(StrEnum):
    START_EXPAND = "start"
    DONE_EXPAND = "done"


EOF = None


@dataclass
class _Source:
    name: str
    text: str
    pos: int = 0
    line: int = 1
    eof_reached: bool = False


def _isalnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


def _allowed_in_word(char: str) -> bool:
    return _isalnum(char) or (char in _PUNCT and char not in _NOT_IN_WORD)


def read_config_text(path: str) -> str:
    """A config file's text: bytes decoded leniently (bad bytes never crash the parser), CRLF read as LF."""
    with open(path, "rb") as handle:
        data = handle.read()
    return normalize_text(data.decode("utf-8", errors="replace"))


def normalize_text(text: str) -> str:
    return text.replace("\r\n", "\n")


# report(text, file, line, kind): kind is "error" (the only kind so far).
Reporter = Callable[[str, str, int, str], None]


class Lexer:
    """Pulls tokens from a stack of files (the config and its includes)."""

    def __init__(self, report: Reporter, macros: dict[str, str] | None = None) -> None:
        self.report = report
        self.files: list[_Source] = []
        self.unget: list[str | _Marker] = []
        self.expanding = False
        # Macros from the command line (-D) are "persistent": the file cannot redefine them.
        self.persistent: dict[str, str] = dict(macros or {})
        self.macros: dict[str, str] = {}
        self.used: set[str] = set()

    # -- files ----------------------------------------------------------------------------------------
    def push_text(self, name: str, text: str) -> None:
        self.files.append(_Source(name, normalize_text(text)))

    def push_file(self, path: str) -> str | None:
        """Open an include (or the main) file; on failure return OpenSMTPD's `pushfile: PATH: error` text."""
        if any(source.name == path for source in self.files):
            # OpenSMTPD would include the file again until it runs out of file descriptors.
            return f"pushfile: {path}: include loop (the file is already being read)"
        try:
            text = read_config_text(path)
        except OSError as error:
            return f"pushfile: {path}: {os.strerror(error.errno) if error.errno else error}"
        if self.files:
            # OpenSMTPD feeds the include statement's newline to the new file first.
            source = _Source(path, text, line=0)
            self.files.append(source)
            self.unget.append("\n")
        else:
            self.files.append(_Source(path, text))
        return None

    @property
    def current(self) -> _Source:
        return self.files[-1]

    def _pop_file(self) -> bool:
        if len(self.files) <= 1:
            return False
        self.files.pop()
        return True

    # -- macros ---------------------------------------------------------------------------------------
    def define(self, name: str, value: str) -> None:
        if name in self.persistent:
            return
        self.macros[name] = value

    def lookup_macro(self, name: str) -> str | None:
        if name in self.persistent:
            self.used.add(name)
            return self.persistent[name]
        if name in self.macros:
            self.used.add(name)
            return self.macros[name]
        return None

    # -- characters -----------------------------------------------------------------------------------
    def _igetc(self) -> str | None:
        while True:
            if self.unget:
                char = self.unget.pop()
            else:
                source = self.current
                if source.pos >= len(source.text):
                    return EOF
                char = source.text[source.pos]
                source.pos += 1
            if char is _Marker.START_EXPAND:
                self.expanding = True
            elif char is _Marker.DONE_EXPAND:
                self.expanding = False
            else:
                return char

    def _getc_quoted(self, quote: str, line: int) -> str | None:
        char = self._igetc()
        if char is EOF:
            self.report("reached end of file while parsing quoted string", self.current.name, line, "error")
            if not self._pop_file():
                return EOF
            return quote
        return char

    def _getc(self) -> str | None:
        char = self._igetc()
        while char == "\\":
            following = self._igetc()
            if following != "\n":
                char = following
                break
            self.current.line += 1
            char = self._igetc()
        if char is EOF:
            source = self.current
            if not source.eof_reached:
                # A fake end of line at the first end of file, so a last line without newline is complete.
                source.eof_reached = True
                return "\n"
            while char is EOF:
                if not self._pop_file():
                    return EOF
                char = self._igetc()
        return char

    def _ungetc(self, char: str | None) -> None:
        if char is not EOF:
            self.unget.append(char)

    def _skip_to_eol(self) -> None:
        """OpenSMTPD's findeol: the rest of the line goes, its newline too (so the parser's recovery then
        also skips the next line, as OpenSMTPD's does)."""
        while True:
            char = self._getc()
            if char == "\n":
                self.current.line += 1
                return
            if char is EOF:
                return

    # -- tokens ---------------------------------------------------------------------------------------
    def next(self) -> Token:
        while True:
            token = self._lex()
            if token is not None:
                return token

    def _token(self, kind: Kind, text: str, line: int, **extra: object) -> Token:
        return Token(kind, text, self.current.name, line, **extra)  # type: ignore[arg-type]

    def _error(self, text: str, line: int) -> Token:
        self.report(text, self.current.name, line, "error")
        self._skip_to_eol()
        return self._token(Kind.ERROR, text, line)

    def _lex(self) -> Token | None:
        char = self._getc()
        while char in (" ", "\t"):
            char = self._getc()
        line = self.current.line
        if char == "#":
            while char != "\n" and char is not EOF:
                char = self._getc()
        if char == "$" and not self.expanding:
            return self._expand_macro(line)
        if char is EOF:
            return self._token(Kind.EOF, "", line)
        if char in ("'", '"'):
            return self._quoted(char, line)
        if char == "-" or (char.isascii() and char.isdigit()):
            token = self._number(char, line)
            if token is not None:
                return token
            char = self._getc()  # the first character again, to be read as a word
            if char == "-":
                return self._token(Kind.PUNCT, "-", line)
        if char == "=":
            following = self._getc()
            if following == ">":
                return self._token(Kind.ARROW, "=>", line)
            self._ungetc(following)
        if _isalnum(char) or char in (":", "_"):
            return self._word(char, line)
        if char == "\n":
            line = self.current.line
            self.current.line += 1
            return self._token(Kind.NL, "\n", line)
        return self._token(Kind.PUNCT, char, line)

    def _expand_macro(self, line: int) -> Token | None:
        name_chars: list[str] = []
        while True:
            char = self._getc()
            if char is EOF:
                return self._token(Kind.EOF, "", line)
            if _isalnum(char) or char == "_":
                name_chars.append(char)
                continue
            self._ungetc(char)
            break
        name = "".join(name_chars)
        value = self.lookup_macro(name)
        if value is None:
            return self._error(f"macro '{name}' not defined", line)
        self.unget.append(_Marker.DONE_EXPAND)
        self.unget.extend(reversed(value))
        self.unget.append(_Marker.START_EXPAND)
        return None

    def _quoted(self, quote: str, line: int) -> Token:
        chars: list[str] = []
        while True:
            char = self._getc_quoted(quote, line)
            if char is EOF:
                return self._token(Kind.EOF, UNTERMINATED, line)
            if char == "\n":
                self.current.line += 1
                continue
            if char == "\\":
                following = self._getc_quoted(quote, line)
                if following is EOF:
                    return self._token(Kind.EOF, UNTERMINATED, line)
                if following in (quote, " ", "\t"):
                    char = following
                elif following == "\n":
                    self.current.line += 1
                    continue
                else:
                    self._ungetc(following)
            elif char == quote:
                break
            elif char == "\0":
                return self._error("syntax error", line)
            if len(chars) >= MAX_TOKEN - 1:
                return self._error("string too long", line)
            chars.append(char)
        return self._token(Kind.STRING, "".join(chars), line, quoted=True)

    def _number(self, first: str, line: int) -> Token | None:
        chars = [first]
        char = self._getc()
        while char is not EOF and char.isascii() and char.isdigit():
            chars.append(char)
            if len(chars) > MAX_TOKEN:
                return self._error("string too long", line)
            char = self._getc()
        self._ungetc(char)
        if chars != ["-"] and (char is EOF or char in _NUMBER_ENDS):
            text = "".join(chars)
            value = int(text)
            if not -(2**63) <= value < 2**63:
                return self._error(f'"{text}" invalid number: {"too large" if value > 0 else "too small"}', line)
            return self._token(Kind.NUMBER, text, line, number=value)
        # Not a number: give back everything, the caller re-reads the first character.
        for char in reversed(chars):
            self.unget.append(char)
        return None

    def _word(self, first: str, line: int) -> Token:
        chars = [first]
        char = self._getc()
        while char is not EOF and _allowed_in_word(char):
            chars.append(char)
            if len(chars) >= MAX_TOKEN:
                return self._error("string too long", line)
            char = self._getc()
        self._ungetc(char)
        text = "".join(chars)
        kind = Kind.KEYWORD if text in KEYWORDS else Kind.STRING
        return self._token(kind, text, line)
