"""`%{...}` format specifiers of maildir paths, mda commands and wrappers (reference §8.6).

    %{token}  %{token[N]}  %{token[N:]}  %{token[:M]}  %{token[N:M]}  %{token:lowercase|uppercase|strip|raw}

Offsets are inclusive and may be negative (from the end). Unless `raw` is given, the characters
``!#$%&'*?`{|}~`` of a value become `:`; unlike OpenSMTPD we also turn `/` into `:` in values that come from
the envelope, so that an address can never add directories to a path. ``user.directory`` and ``mda`` are
never escaped. `%%` is a literal `%`, and a leading `~/` is the user's home directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ESCAPED_CHARACTERS = frozenset("!#$%&'*?`{|}~/")
UNESCAPED_TOKENS = frozenset({"user.directory", "mda"})
MODIFIERS = frozenset({"lowercase", "uppercase", "strip", "raw"})


class VariableError(ValueError):
    """An unknown token, modifier or a bad offset: the delivery fails."""


@dataclass(frozen=True)
class VariableContext:
    sender: str  # "" for the null sender
    rcpt: str
    dest: str
    username: str
    directory: str
    mda: str = ""  # the wrapped command, for wrappers only
    delimiter: str = "+"

    def value(self, token: str) -> str:
        name = token.lower()
        addresses = {"sender": self.sender, "rcpt": self.rcpt, "dest": self.dest}
        if name in addresses:
            return addresses[name]
        family, _, part = name.partition(".")
        if family in addresses and part in ("user", "domain"):
            user, _, domain = addresses[family].rpartition("@")
            return user if part == "user" else domain
        simple = {"user.username": self.username, "user.directory": self.directory,
                  "mbox.from": self.sender or "MAILER-DAEMON"}
        if name in simple:
            return simple[name]
        if name == "mda" and self.mda:
            return self.mda
        raise VariableError(f"unknown format specifier: {token}")


_SPECIFIER_RE = re.compile(r"%%|%\{([^}]*)\}")
_TOKEN_RE = re.compile(r"([A-Za-z.]+)(?:\[(-?\d*)(?:(:)(-?\d*))?\])?(?::([A-Za-z|]+))?")


def expand(template: str, context: VariableContext) -> str:
    """The template with every specifier replaced. Raises VariableError."""
    if template.startswith("~/"):
        template = context.directory.rstrip("/") + "/" + template[2:]
    elif template == "~":
        template = context.directory

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        return _expand_specifier(match.group(1), context)

    # Only the template can hold an unterminated specifier: `%%{` is a literal `%{`, and a value (a sender's
    # `a%{b@example.org` under `raw`) may hold one too; neither is a specifier.
    if "%{" in _SPECIFIER_RE.sub("", template):
        raise VariableError(f"unterminated format specifier in {template!r}")
    return _SPECIFIER_RE.sub(replace, template)


def _expand_specifier(inner: str, context: VariableContext) -> str:
    match = _TOKEN_RE.fullmatch(inner)
    if match is None:
        raise VariableError(f"invalid format specifier: %{{{inner}}}")
    token, begin_text, colon, end_text, modifier_text = match.groups()
    modifiers = modifier_text.lower().split("|") if modifier_text else []
    unknown = [modifier for modifier in modifiers if modifier not in MODIFIERS]
    if unknown:
        raise VariableError(f"unknown modifier {unknown[0]!r} in %{{{inner}}}")
    value = context.value(token)
    if begin_text is not None:
        value = _substring(value, begin_text, colon is not None, end_text or "", inner)
    for modifier in modifiers:
        if modifier == "lowercase":
            value = value.lower()
        elif modifier == "uppercase":
            value = value.upper()
        elif modifier == "strip":
            value = _strip_subaddress(value, context.delimiter)
    if "raw" not in modifiers and token.lower() not in UNESCAPED_TOKENS:
        value = "".join(":" if char in ESCAPED_CHARACTERS else char for char in value)
    return value


def _substring(value: str, begin_text: str, has_range: bool, end_text: str, inner: str) -> str:
    length = len(value)
    try:
        begin = int(begin_text) if begin_text else 0
        end = (int(end_text) if end_text else length - 1) if has_range else begin
    except ValueError:
        raise VariableError(f"bad offset in %{{{inner}}}") from None
    if begin < 0:
        begin += length
    if end < 0:
        end += length
    if begin < 0 or end < 0:
        raise VariableError(f"bad offset in %{{{inner}}}")
    end = min(end, length - 1)
    return value[begin:end + 1] if begin <= end else ""


def _strip_subaddress(value: str, delimiter: str) -> str:
    user, at, domain = value.partition("@")
    return user.split(delimiter, 1)[0] + at + domain
