"""Expansion items: what an alias value, a virtual value, a `.forward` line or an `:include:` file holds.

A value is a comma-separated list (reference §6.1). Commas inside double or single quotes do not split (the
quotes are kept; a single quote opens only at the start of a word or after `=`: inside a word, as in
`o'brien@example.ie`, it is a letter of an address), and a backslash protects the character after it and is removed, as OpenSMTPD's splitting does:
`\\bob` in a `.forward` is the user bob (the sendmail idiom for "keep a copy here"), and in `"|cmd \\"a b\\""`
the command sees `cmd "a b"`. A trailing backslash or an unclosed quote makes the value invalid. Each item is
classified by the first of these shapes it fits:

1. ``error:CODE TEXT`` / ``:error:CODE TEXT`` (CODE: 3 digits starting with 4 or 5, then a space, then an
   alphanumeric character) — refuse the recipient with that reply;
2. ``:include:/path`` / ``include:/path`` (an absolute path) — the lines of that file are more items;
3. ``|command`` / ``"|command"`` — pipe the message to a command;
4. ``/absolute/path`` — append the message to an mbox file;
5. ``user@domain`` — another address, matched against the rules again;
6. ``[A-Za-z0-9_.+-]+`` — a local user name.

Anything else makes the whole value invalid (``ItemError``); callers turn that into a temporary failure, since
the table holding it is broken, not the recipient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class ItemKind(StrEnum):
    ERROR = "error"
    INCLUDE = "include"
    FILTER = "filter"  # OpenSMTPD's name for a |command item
    FILENAME = "filename"
    ADDRESS = "address"
    USERNAME = "username"


@dataclass(frozen=True)
class Item:
    kind: ItemKind
    value: str  # error: "CODE TEXT"; include/filename: the path; filter: the command without "|"; address; user

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


class ItemError(ValueError):
    """An item that fits none of the shapes."""


_ERROR_RE = re.compile(r"[45][0-9]{2} [A-Za-z0-9]")
_USERNAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")
_ADDRESS_USER_RE = re.compile(r"[A-Za-z0-9!#$%*/?|^{}`~&'+\-=_.]+")
_ADDRESS_DOMAIN_RE = re.compile(r"[A-Za-z0-9.-]+")
MAX_ITEM_LENGTH = 4096


def split_items(text: str, keep_empty: bool = False) -> list[str]:
    """The comma-separated items of a value, trimmed, empty ones dropped (kept, as "", with keep_empty),
    escaping backslashes removed.

    Raises ItemError when the value ends inside a quote or with a lone backslash."""
    items: list[str] = []
    current: list[str] = []
    escaped = in_double = in_single = False
    for char in text:
        if escaped:
            current.append(char)  # the escaped character, literally; it neither splits nor quotes
            escaped = False
            continue
        if char == "\\":
            escaped = True
            continue
        if char == "," and not (in_double or in_single):
            items.append("".join(current))
            current = []
            continue
        if char == '"' and not in_single:
            in_double = not in_double
        elif char == "'" and not in_double:
            # An apostrophe inside a word is a letter of an address (`seamus.o'brien@example.ie`), not a quote:
            # taken for one, it hid the commas after it and made the whole value invalid (424 at every RCPT).
            if in_single or not current or current[-1].isspace() or current[-1] == "=":
                in_single = not in_single
        current.append(char)
    if escaped or in_double or in_single:
        raise ItemError(f"unbalanced quote or trailing backslash in {text.strip()!r}")
    items.append("".join(current))
    return [item.strip() for item in items if keep_empty or item.strip()]


def _as_error(text: str) -> Item | None:
    lowered = text[:7].lower()
    if lowered.startswith(":error:"):
        rest = text[7:]
    elif lowered.startswith("error:"):
        rest = text[6:]
    else:
        return None
    if len(rest) < 5 or not _ERROR_RE.match(rest):
        return None
    return Item(ItemKind.ERROR, rest)


def _as_include(text: str) -> Item | None:
    # The path must be absolute, as OpenSMTPD requires (its makemap calls `:include:lists/staff` an invalid
    # entry): a relative one would be read, as root, from wherever the daemon happened to be started.
    for prefix in (":include:", "include:"):
        if text[: len(prefix)].lower() == prefix:
            path = text[len(prefix):].strip()
            return Item(ItemKind.INCLUDE, path) if path.startswith("/") else None
    return None


def _as_filter(text: str) -> Item | None:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            return None
        text = text[1:-1]
    if not text.startswith("|"):
        return None
    command = text[1:].strip()
    return Item(ItemKind.FILTER, command) if command else None


def _as_filename(text: str) -> Item | None:
    return Item(ItemKind.FILENAME, text) if text.startswith("/") else None


def _as_address(text: str) -> Item | None:
    if len(text) < 3 or "@" not in text or text.startswith("@") or text.endswith("@"):
        return None
    user, _, domain = text.partition("@")
    if not _ADDRESS_USER_RE.fullmatch(user) or not _ADDRESS_DOMAIN_RE.fullmatch(domain):
        return None
    return Item(ItemKind.ADDRESS, text)


def _as_username(text: str) -> Item | None:
    # User names are compared and looked up lowercased (table keys are lowercased on load).
    return Item(ItemKind.USERNAME, text.lower()) if _USERNAME_RE.fullmatch(text) else None


_CLASSIFIERS = (_as_error, _as_include, _as_filter, _as_filename, _as_address, _as_username)


def classify_item(text: str) -> Item | None:
    """The item one trimmed text is, or None when it fits no shape."""
    if not text or len(text) >= MAX_ITEM_LENGTH:
        return None
    for classifier in _CLASSIFIERS:
        item = classifier(text)
        if item is not None:
            return item
    return None


def parse_items(text: str) -> list[Item]:
    """Every item of a value, in order. Raises ItemError naming the first item that fits no shape."""
    items: list[Item] = []
    for piece in split_items(text):
        item = classify_item(piece)
        if item is None:
            raise ItemError(f"invalid expansion item: {piece!r}")
        items.append(item)
    return items


def parse_lines(text: str, *, comments_in_words: bool = True) -> list[str]:
    """Logical lines of a `.forward` or `:include:` file, read the way fparseln(3) does by default.

    A backslash at the end of a line continues it on the next one; an unescaped `#` outside double quotes starts
    a comment that runs to the end of the line; other backslashes are kept. Blank results are dropped.

    ``comments_in_words=False`` (`:include:` files): a `#` starts a comment only at the start of a line or after
    whitespace; inside a word it is data, as `#` may be in an address (`joe#1@partner.example`). Cut there, the
    member would become the local user `joe` and his mail would go into that user's mailbox. OpenSMTPD 6.8 reads
    include lines without comments at all (checked against the real daemon: `joe#1@...` is relayed as it is);
    `.forward` files keep fparseln's comments anywhere, as OpenSMTPD's (where `joe#1@...` is `joe` too).
    """
    logical: list[str] = []
    pending = ""
    for raw_line in text.split("\n"):
        line = pending + raw_line
        pending = ""
        stripped = _strip_comment(line, comments_in_words)
        if stripped.endswith("\\") and not stripped.endswith("\\\\"):
            pending = stripped[:-1]
            continue
        if stripped.strip():
            logical.append(stripped.strip())
    if pending.strip():
        logical.append(pending.strip())
    return logical


def _strip_comment(line: str, in_words: bool = True) -> str:
    # A `#` inside double quotes is part of a quoted |command, never a comment: procmail's documented .forward
    # line, `"|IFS=' ' && exec /usr/bin/procmail -f- || exit 75 #bob"`, ends its command with one. Cut there, the
    # quote was left open and the whole .forward refused (424 at every RCPT, as OpenSMTPD's fparseln reads it).
    escaped = quoted = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "#" and not quoted and (in_words or index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line
