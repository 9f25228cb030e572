"""`makemap` and `newaliases` (reference §5.6): table files -> the indexed db format of db tables.

    makemap [-U] [-d dbtype] [-o dbfile] [-t type] file
    newaliases [-f file]

The source is read the way fparseln(3) reads it: `#` starts a comment anywhere (`\\#` is a literal `#`), a
backslash at the end of a line continues it; so does an indented line after a value ending with a comma (the
aliases files of Sendmail and Postfix; the daemon's file tables read it so). A map line is a key up to the first space, TAB or `:`, then,
after any run of `:` and whitespace, the value (kept as written, to the end of the line, less the blanks there
and a CR before the LF, as the daemon's file tables read it; OpenSMTPD's makemap keeps them). Keys are lowercased.
A duplicate key, a key without a value, or (in aliases mode) a value with an item that is not an expansion
item (§6.1) stops everything with `PROG: FILE:LINE: ...` and no output file. The output is built under a
temporary name beside the target, synced, given the source's mode and owner, and renamed into place.

The db format is ours (SQLite; smtpd/lookup/tables/db.py, docs/tables.md), not Berkeley DB: `-d hash` and
`-d btree` are accepted and make the same file.

Unlike OpenSMTPD, newaliases does not require root: it works for whoever can write the aliases file's folder.
"""

from __future__ import annotations

import contextlib
import getopt
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from smtpd.lookup.items import ItemError, classify_item, split_items
from smtpd.lookup.tables.base import TableLoadError
from smtpd.lookup.tables.db import SET_VALUE, dump_db, write_db
from smtpd.lookup.tables.static import continues_value, decode_table_text

DEFAULT_ALIASES = "/etc/aliases"
MAKEMAP_USAGE = "usage: makemap [-U] [-d dbtype] [-o dbfile] [-t type] file"
NEWALIASES_USAGE = "usage: newaliases [-f file]"
DB_TYPES = ("hash", "btree")
_WHITESPACE = " \t\n\v\f\r"
_KEY_END = re.compile(r"[ \t:]")


class MapError(Exception):
    """A message to print after `PROG: `, then exit 1."""


@dataclass
class Options:
    mode: str = "makemap"  # or "newaliases"
    map_type: str = "map"  # "map", "aliases" or "set"
    db_type: str = "hash"
    output: str | None = None
    dump: bool = False
    config: str | None = None
    source: str | None = None


# -- reading sources ---------------------------------------------------------------------------------------
def _escaped(text: str, index: int) -> bool:
    """Whether the character at index is preceded by an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(number of the last physical line, logical line), as fparseln(3) with comment unescaping gives them."""
    physical = text.split("\n")
    if physical and physical[-1] == "":
        physical.pop()
    number = 0
    index = 0
    while index < len(physical):
        pieces: list[str] = []
        continued = True
        while continued and index < len(physical):
            raw = physical[index].removesuffix("\r")  # (a file edited on Windows reads as its LF version)
            index += 1
            number += 1
            hash_at = raw.find("#")
            while hash_at != -1 and _escaped(raw, hash_at):
                hash_at = raw.find("#", hash_at + 1)
            if hash_at != -1:
                raw = raw[:hash_at]
            continued = raw.endswith("\\") and not _escaped(raw, len(raw) - 1)
            if continued:
                raw = raw[:-1]
            pieces.append(raw)
        yield number, "".join(pieces).replace("\\#", "#")


def _map_entry(line: str) -> tuple[str, str] | None | bool:
    """(key, value), None for a line to skip, False for an invalid entry."""
    keyp = line.lstrip(_WHITESPACE)
    if not keyp or keyp[0] == "#":
        return None
    separator = _KEY_END.search(keyp)
    if separator is None:
        return False
    value = keyp[separator.end():].lstrip(":" + _WHITESPACE)
    if not value:
        return False
    return keyp[:separator.start()].lower(), value


def _valid_aliases(value: str) -> bool:
    """makemap's check: every comma-separated item, split as the daemon splits a value (commas in quotes or
    after a backslash do not split; `\\root` is root), is an expansion item, and none is empty (`bob,` is refused,
    as OpenSMTPD's makemap refuses it). OpenSMTPD's makemap cuts at every comma and keeps the backslash: it
    refused `root: \\root, admin@example.org` and `"|/usr/bin/filter a,b"`, which its daemon reads."""
    try:
        pieces = split_items(value, keep_empty=True)
    except ItemError:
        return False
    return all(piece and classify_item(piece) is not None for piece in pieces)


def parse_source(text: str, source: str, map_type: str) -> list[tuple[str, str]]:
    """The entries of a source. Raises MapError(`FILE:LINE: ...`)."""
    entries: dict[str, str] = {}
    numbers: dict[str, int] = {}  # the line where each entry's value ends (aliases errors name it)
    previous: str | None = None  # the last entry's key, while its value ends with a comma
    for number, line in logical_lines(text):
        # Blanks at the end of a line are no part of a key or value, as the daemon's file tables read a line:
        # a db made from a file must answer what the file answers (`example.org ` matched nothing in the db).
        line = line.rstrip(_WHITESPACE)
        if previous is not None and not line.strip(_WHITESPACE):
            continue
        if previous is not None and continues_value(line):
            # `staff: alice,` then `  bob`: one value, as the daemon's file tables and other MTAs' aliases read it
            entries[previous] += " " + line.lstrip(_WHITESPACE)
            numbers[previous] = number
            previous = previous if line.endswith(",") else None
            continue
        _check_aliases(entries, numbers, previous, source, map_type)
        previous = None
        if map_type == "set":
            key = line.lstrip(_WHITESPACE)
            if not key or key[0] == "#":
                continue
            key, value = key.lower(), SET_VALUE
        else:
            entry = _map_entry(line)
            if entry is None:
                continue
            if entry is False:
                raise MapError(f"{source}:{number}: invalid entry")
            key, value = entry  # type: ignore[misc]
        if key in entries:
            raise MapError(f"{source}:{number}: duplicate entry for {key}")
        entries[key] = value
        numbers[key] = number
        previous = key if map_type != "set" and value.endswith(",") else None
        if previous is None:
            _check_aliases(entries, numbers, key, source, map_type)
    _check_aliases(entries, numbers, previous, source, map_type)
    return list(entries.items())


def _check_aliases(entries: dict[str, str], numbers: dict[str, int], key: str | None, source: str,
                   map_type: str) -> None:
    """In aliases mode, an entry's value (once whole) must be all expansion items."""
    if key is not None and map_type == "aliases" and not _valid_aliases(entries[key]):
        raise MapError(f"{source}:{numbers[key]}: invalid entry")


def _read_source(source: str) -> tuple[str, os.stat_result | None]:
    try:
        if source == "-":
            return decode_table_text(sys.stdin.buffer.read()), None
        status = os.stat(source)
        with open(source, "rb") as handle:
            return decode_table_text(handle.read()), status
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise MapError(f"stat: {source}: {reason}") from None


# -- writing ---------------------------------------------------------------------------------------------
def write_atomically(output: str, entries: list[tuple[str, str]], map_type: str, source: str,
                     status: os.stat_result | None) -> int:
    """Build the database beside output and rename it into place, with the source's mode and owner."""
    directory = os.path.dirname(os.path.abspath(output))
    try:
        handle, temporary = tempfile.mkstemp(prefix=os.path.basename(output) + ".", dir=directory)
    except OSError as error:
        raise MapError(f"mkstemp: {os.strerror(error.errno) if error.errno else error}") from None
    os.close(handle)
    try:
        count = write_db(temporary, entries, map_type, source)
        if status is not None:
            os.chmod(temporary, status.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):  # only root may give files away
                os.chown(temporary, status.st_uid, status.st_gid)
        os.replace(temporary, output)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise MapError(f"{output}: {os.strerror(error.errno) if error.errno else error}") from None
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return count


def build(source: str, output: str, map_type: str) -> int:
    text, status = _read_source(source)
    entries = parse_source(text, source, map_type)
    return write_atomically(output, entries, map_type, source, status)


def dump(path: str) -> None:
    try:
        for key, value in dump_db(path):
            sys.stdout.write(f"{key}\t{value}\n")
    except TableLoadError as error:
        raise MapError(str(error).replace(f"{path}: dbopen: ", f"dbopen: {path}: ", 1)) from None


# -- command lines ---------------------------------------------------------------------------------------
def _parse_makemap(argv: list[str], options: Options) -> list[str]:
    try:
        pairs, rest = getopt.getopt(argv, "b:C:d:ho:O:t:U")
    except getopt.GetoptError as error:
        raise _Usage(f"invalid option -- '{error.opt}'") from None
    for flag, value in pairs:
        if flag == "-b":
            if value == "i":
                options.mode = "newaliases"
        elif flag == "-d":
            if value not in DB_TYPES:
                raise MapError(f"unsupported DB type '{value}'")
            options.db_type = value
        elif flag == "-o":
            options.output = value
        elif flag == "-O":
            if value.startswith("AliasFile="):
                options.map_type = "aliases"
                options.source = value.partition("=")[2]
        elif flag == "-t":
            if value not in ("aliases", "set"):
                raise MapError(f"unsupported type '{value}'")
            options.map_type = value
        elif flag == "-U":
            options.dump = True
        elif flag == "-h":
            raise _Usage(None)
        # -C FILE: accepted for compatibility, ignored
    return rest


class _Usage(Exception):
    def __init__(self, message: str | None) -> None:
        super().__init__(message or "")
        self.message = message


def makemap_main(argv: list[str], prog: str = "makemap") -> int:
    options = Options()
    try:
        rest = _parse_makemap(argv, options)
        if options.mode == "newaliases":
            return _newaliases(rest, options, prog)
        if len(rest) == 2:
            # sendmail style: `makemap hash FILE` reads the map from stdin and writes FILE.db
            if rest[0] not in DB_TYPES:
                raise MapError(f"unsupported DB type '{rest[0]}'")
            return makemap_main(["-d", rest[0], "-o", f"{rest[1]}.db", "-"], prog)
        if len(rest) != 1:
            raise _Usage(None)
        source = rest[0]
        if options.dump:
            dump(source)
            return 0
        output = options.output or f"{source}.db"
        count = build(source, output, options.map_type)
        if count == 0:
            print(f"{prog}: warning: empty map created: {output}", file=sys.stderr)
        return 0
    except _Usage as usage:
        if usage.message:
            print(f"{prog}: {usage.message}", file=sys.stderr)
        print(MAKEMAP_USAGE if options.mode == "makemap" else NEWALIASES_USAGE, file=sys.stderr)
        return 1
    except MapError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1


def aliases_source(config_path: str | None) -> str:
    """The file the `aliases` table of the configuration reads (without `.db`), else /etc/aliases."""
    from shared.paths import Paths

    path = config_path or Paths.from_environment().config
    try:
        import smtpd.config as config_package

        load = config_package.load  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return DEFAULT_ALIASES
    result = load(path, check_files=False)
    config = result.config
    if config is None:
        for line in result.lines():
            print(line, file=sys.stderr)
        raise MapError(f"{path}: invalid configuration")
    decl = config.tables.get("aliases")
    if decl is None:
        return DEFAULT_ALIASES
    if not decl.source or decl.backend not in ("file", "static", "db"):
        # Rebuilding /etc/aliases.db then would change nothing the daemon reads (OpenSMTPD fails here too,
        # with `stat: : No such file or directory`).
        where = "inline in the configuration" if not decl.source else f"a {decl.backend} table"
        raise MapError(f"table aliases is {where}: there is no aliases file to build")
    source = decl.source
    return source[:-3] if source.endswith(".db") else source


def _newaliases(rest: list[str], options: Options, prog: str) -> int:
    if rest:
        raise _Usage(None)
    source = aliases_source(options.config)
    count = build(source, f"{source}.db", "aliases")
    print(f"{source}: {count} aliases")
    _tell_daemon()
    return 0


def _tell_daemon() -> None:
    """Ask a running daemon to reload table `aliases` (as OpenSMTPD's newaliases does); quiet if none runs."""
    try:
        from shared.paths import Paths
        from smtpctl.client import Client
    except ImportError:
        return
    socket_path = Paths.from_environment().socket
    if not os.path.exists(socket_path):
        return
    with contextlib.suppress(Exception), Client(socket_path, timeout=5) as client:
        client.call("update.table", table="aliases")


def newaliases_main(argv: list[str], prog: str = "newaliases") -> int:
    options = Options(mode="newaliases", map_type="aliases")
    # `sendmail -bi` arrives here with its own arguments: drop the -bi switch.
    argv = [arg for arg in argv if not arg.startswith("-bi")]
    try:
        try:
            pairs, rest = getopt.getopt(argv, "f:h")
        except getopt.GetoptError as error:
            raise _Usage(f"invalid option -- '{error.opt}'") from None
        for flag, value in pairs:
            if flag == "-f":
                options.config = value
            else:
                raise _Usage(None)
        return _newaliases(rest, options, prog)
    except _Usage as usage:
        if usage.message:
            print(f"{prog}: {usage.message}", file=sys.stderr)
        print(NEWALIASES_USAGE, file=sys.stderr)
        return 1
    except MapError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
