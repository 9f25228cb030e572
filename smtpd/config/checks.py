"""Checks that look at files outside the config: table sources, pki/ca files, the queue key.

These run during `smtpd -n` (and at start and reload), as OpenSMTPD's do:

* ``probe_table_source`` runs at the `table` statement itself (OpenSMTPD loads the table there), so its
  messages come in file order. It only decides whether the source is usable and whether it is a list or a
  mapping (reference §5.1); reading tables for lookups is the tables subsystem's job (smtpd/lookup/tables/).
* ``validate_tables(config)`` is the hook for whatever the tables subsystem wants to verify once the whole
  config is known (it returns extra diagnostics; nothing yet).
* ``check_pki_and_queue(config)`` is what `smtpd -n` does after parsing: the queue key, then every pki
  certificate and key, then every ca file. Problems there are fatal (``smtpd: ...``).
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass

from smtpd.config.errors import Diagnostic, FatalConfigError
from smtpd.config.model import Config, TableShape

LIBEXEC_TABLES = "/usr/libexec/opensmtpd"
FILE_BACKENDS = ("file", "static")
# Backends we read ourselves. "passwd" is an external program in OpenSMTPD (libexec table-passwd); we read its
# file natively (smtpd/lookup/tables/passwd_file.py), so it exists whether or not that program is installed.
NATIVE_BACKENDS = (*FILE_BACKENDS, "db", "getpwnam", "passwd")
BUILTIN_BACKENDS = (*NATIVE_BACKENDS, "proc")


@dataclass(frozen=True)
class TableProbe:
    ok: bool
    shape: TableShape
    notes: tuple[str, ...] = ()  # lines printed before the `invalid configuration file` error


def backend_exists(backend: str) -> bool:
    """OpenSMTPD knows static/file, db, getpwnam and proc, and runs any other as libexec table-BACKEND (we read
    `passwd` ourselves)."""
    if backend in BUILTIN_BACKENDS:
        return True
    if not backend or "/" in backend:
        return False
    return os.access(os.path.join(LIBEXEC_TABLES, f"table-{backend}"), os.X_OK)


def probe_table_source(backend: str, source: str | None) -> TableProbe:
    if backend in FILE_BACKENDS:
        if source is None:
            return TableProbe(True, TableShape.MAPPING)
        return probe_static_file(source)
    # db, getpwnam and external (proc) backends answer both kinds of question; which lookups they serve is
    # the parser's table_fits (getpwnam: userbase only; db: no string, regex or relay-host lookups).
    if backend == "db":
        return TableProbe(source is not None and _is_readable_file(source), TableShape.ANY)
    if backend == "getpwnam":
        return TableProbe(source is None, TableShape.ANY)
    if backend == "passwd":
        return probe_passwd_file(source)
    return TableProbe(True, TableShape.ANY)


def probe_passwd_file(source: str | None) -> TableProbe:
    """A passwd table is parsed at its `table` statement, so that a broken file is reported there (FILE:LINE).

    OpenSMTPD 6.8 -n does not run table-passwd and so says `configuration OK` for a missing or malformed file,
    which only the daemon's start then reads; we say it at -n. The shape stays ANY either way (every use passes the parser, as in
    6.8; validate.py warns about uses the backend cannot answer)."""
    from smtpd.lookup.tables.base import TableLoadError
    from smtpd.lookup.tables.passwd_file import load_passwd_file

    if source is None:
        return TableProbe(False, TableShape.ANY, ("passwd: a file is needed (table NAME passwd:/path/to/file)",))
    try:
        load_passwd_file(source)
    except TableLoadError as error:
        return TableProbe(False, TableShape.ANY, tuple(error.lines))
    return TableProbe(True, TableShape.ANY)


def _is_readable_file(path: str) -> bool:
    try:
        with open(path, "rb"):
            return os.path.isfile(path)
    except OSError:
        return False


def probe_static_file(path: str) -> TableProbe:
    """Shape detection of a static table file, with OpenSMTPD's error lines (reference §5.1).

    The file is read by the same parser the daemon loads it with, so `smtpd -n` and the running daemon
    cannot disagree on a line (C-locale whitespace only, `# @list` exactly, a lone `:` as a value)."""
    from smtpd.lookup.tables.base import TableLoadError
    from smtpd.lookup.tables.static import InvalidMapEntry, load_table_file

    try:
        content = load_table_file(path)
    except InvalidMapEntry as error:
        return TableProbe(False, TableShape.ANY, (f"{error.path}: invalid map entry line {error.number}",))
    except TableLoadError as error:
        return TableProbe(False, TableShape.ANY, tuple(error.lines))
    return TableProbe(True, content.shape)


def validate_tables(config: Config) -> list[Diagnostic]:
    """Deeper checks of every declared table once the config is complete (`smtpd -n`, start, reload).

    The tables subsystem does them (smtpd.lookup.tables.validate_tables: db files that cannot be opened are
    errors, entries that would fail at lookup time are warnings with the table file's FILE:LINE).
    """
    from smtpd.lookup.tables import validate_tables as tables_validate

    return list(tables_validate(config))


def _valid_queue_key(key: str) -> bool:
    """32 bytes, AES-256's key (smtpd.queue.codec.KEY_BYTES; not imported: -n stays light)."""
    return len(key.encode("utf-8", "surrogateescape")) == 32


# -- pki, ca and queue key (smtpd -n) ---------------------------------------------------------------------
def check_pki_and_queue(config: Config) -> list[str]:
    """Raise FatalConfigError like OpenSMTPD's -n; return warn: lines that do not stop the run."""
    notes: list[str] = []
    key = config.queue.encryption_key
    if config.queue.encryption and key is not None and key != "stdin" and not _valid_queue_key(key):
        raise FatalConfigError("smtpd: crypto_setup:invalid key for queue encryption")
    # OpenSMTPD keeps pkis and cas in dictionaries sorted by name and checks each pki's cert and key are
    # given before it loads the certificate: the same order here, so the first fatal line is the same one.
    pkis = sorted(config.pkis.values(), key=lambda pki: pki.name.encode())
    for pki in pkis:
        if pki.cert is None:
            raise FatalConfigError("smtpd: load_pki_tree: missing certificate file")
        if pki.key is None:
            raise FatalConfigError("smtpd: load_pki_tree: missing key file")
        if not _is_readable_file(pki.cert):
            raise FatalConfigError("smtpd: load_pki_tree: failed to load certificate file")
    for ca in sorted(config.cas.values(), key=lambda ca: ca.name.encode()):
        if not _is_readable_file(ca.cert):
            raise FatalConfigError("smtpd: load_pki_tree: failed to load CA file")
    for pki in pkis:
        assert pki.key is not None and pki.cert is not None
        problem = _key_problem(pki.key)
        if problem is not None:
            lines = [problem] if problem else []
            raise FatalConfigError(*lines, "smtpd: load_pki_keys: failed to load key file")
    return notes


def _key_problem(path: str) -> str | None:
    """None if the key is usable; otherwise a warn: line to print first ("" when there is none)."""
    try:
        info = os.stat(path)
    except OSError:
        return ""
    if info.st_uid not in (0, os.getuid()):
        return f"warn:  {path}: not owned by uid 0 or the current user"
    if info.st_mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
        return f"warn:  {path}: insecure permissions: must be at most rwxr----- "
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("ascii", errors="replace")
    except OSError:
        return ""
    if "-----BEGIN" not in text or "PRIVATE KEY-----" not in text:
        return ""
    return None


def certificate_problem(cert: str, key: str) -> str | None:
    """A warning text when the certificate and key do not load together (OpenSMTPD does not check this)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as error:
        return f"certificate {cert} and key {key} cannot be used together: {error.reason or error}"
    return None
