"""`socketmap:` tables: a map server on a unix socket, asked as opensmtpd-extras' table-socketmap asks it.

OpenSMTPD runs `table NAME socketmap:/path/to/socket` through the external program table-socketmap, which connects
to the unix socket named after `socketmap:` (there is no configuration file) and asks it one line per question.
We ask the same server the same way, from the daemon itself. docs/tables.md has the details; in short, as
table-socketmap (checked against it under OpenSMTPD 6.8, tests/test_tables_socketmap.py):

* a question is the line `NAME KEY\\n`: the table's name in smtpd.conf, a space, the key (lowercased by the
  daemon); these are plain lines, not the netstrings of Sendmail's socketmap protocol;
* the answer is one line: `OK VALUE` (found), `NOTFOUND ` (not found), `TEMP reason`, `TIMEOUT reason` or
  `PERM reason` (a temporary failure, the reason logged), the status in any case; a line past 100,000 bytes is
  refused as too large;
* the value answers every service alike (alias, domain, credentials, userinfo, ...), as the table's value in a
  file would.

Where we differ, on purpose (table-socketmap's ways there strand mail or hang the daemon):

* a match question (`for domain <t>`, `from src <t>`, `mail-from <t>`, ...) asks the server as a lookup does
  and holds when it answers OK; table-socketmap answers none, so every such rule is a temporary failure;
* a `senders <t>` (mailaddrmap) question is answered; table-socketmap asks the server, then fails it;
* the connection is made when first needed and made again after the server closed it or misbehaved, so a server
  that starts late or restarts is asked again at once; table-socketmap connects once (OpenSMTPD does not start
  when the socket is not there yet) and fails every question after losing the connection;
* the connection, each question and its answer are bounded in time (CONNECT_TIMEOUT, REPLY_TIMEOUT) where
  table-socketmap waits for ever; a line without its newline when the server closes, bytes past the answer,
  and an answer that is not UTF-8 are temporary failures and drop the connection;
* `NOTFOUND` and `OK` are taken without the space after them (Sendmail's and Postfix's servers may send them
  so), a CR before the newline is dropped, and a value may be longer than the 4,095 bytes table-socketmap can
  hand back.

Relay `src <t>` and relay `host <t>` tables hand out entries in turn, which the protocol cannot ask: every such
question is a temporary failure, as under table-socketmap.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time

from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.settings import bound_seconds

BACKEND = "socketmap"
REPLY_LIMIT = 100_000  # table-socketmap's reply buffer: a longer line (without its newline) is refused
CONNECT_TIMEOUT = bound_seconds(5)  # seconds for the connection to be accepted
REPLY_TIMEOUT = bound_seconds(5)  # seconds for the question to be written and its whole answer read
SUN_PATH_LIMIT = 107  # bytes of a unix socket's path (sockaddr_un's 108, less the NUL)
FAILURES = ("TEMP", "TIMEOUT", "PERM")
STATUSES = frozenset({"OK", "NOTFOUND", *FAILURES})


class _Lost(Exception):
    """The server closed the connection before answering (it restarted, or dropped an idle client)."""


def check_socket_path(name: str, path: str) -> None:
    """Refuse a path that cannot name the server's socket. A path with nothing there yet is accepted: the server
    may start after the daemon (questions are temporary failures until it does)."""
    where = f"socketmap table {name}"
    if not path.startswith("/"):
        raise TableLoadError(f"{where}: {path!r} is not an absolute path (socketmap: takes the server's unix "
                             "socket)")
    if len(os.fsencode(path)) > SUN_PATH_LIMIT:
        raise TableLoadError(f"{where}: the socket path {path} is too long (at most {SUN_PATH_LIMIT} bytes)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise TableLoadError(f"{where}: {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise TableLoadError(f"{where}: {path} is not a unix socket (socketmap: takes the server's socket, not a "
                             "configuration file)")


def parse_reply(line: bytes) -> tuple[str, str]:
    """(STATUS, text) of one answer line, its newline removed. Raises ValueError for a line that is not one."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\0" in line:
        raise ValueError("the answer holds a NUL byte")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the answer is not UTF-8") from None
    word, _, rest = text.partition(" ")
    status = word.upper()
    if status not in STATUSES:
        shown = text if len(text) <= 60 else text[:60] + "..."
        raise ValueError(f"unrecognized answer {shown!r} (OK, NOTFOUND, TEMP, TIMEOUT or PERM expected)")
    return status, rest


class _Connection:
    """One connection to the server, and the questions asked on it, one at a time."""

    def __init__(self, path: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reused = False  # asked before: the server may have closed it since
        self.was_cut = False  # closed by SocketmapTable.close() under a question
        try:
            self.socket.settimeout(CONNECT_TIMEOUT)
            self.socket.connect(path)
        except BaseException:
            self.socket.close()
            raise

    def ask(self, question: bytes) -> bytes:
        """The answer line (without its newline). Raises _Lost, TimeoutError, OSError or ValueError."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        self._wait(deadline)
        try:
            self.socket.sendall(question)
        except (BrokenPipeError, ConnectionResetError):
            raise _Lost from None
        received = bytearray()
        while (end := received.find(b"\n")) < 0:
            if len(received) > REPLY_LIMIT:
                raise ValueError(f"the answer is too large (over {REPLY_LIMIT} bytes)")
            self._wait(deadline)
            try:
                chunk = self.socket.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if received:
                    raise ValueError("the server closed the connection in the middle of its answer")
                raise _Lost
            received += chunk
        if end > REPLY_LIMIT:
            raise ValueError(f"the answer is too large (over {REPLY_LIMIT} bytes)")
        if end + 1 != len(received):
            # More than one answer to one question: the server is out of step with us; what follows is not
            # the answer to our next question.
            raise ValueError("the server sent more than its answer")
        return bytes(received[:end])

    def _wait(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.socket.settimeout(left)

    def close(self) -> None:
        self.socket.close()

    def cut(self) -> None:
        """End the connection under a question another thread is asking on it (its recv returns at once)."""
        self.was_cut = True
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)


class SocketmapTable:
    """`table NAME socketmap:/path/to/socket`."""

    backend_name = BACKEND
    shape = TableShape.ANY  # as every external backend in 6.8: any use is accepted by the parser

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        check_socket_path(name, path)
        # Lookups come from the event loop and from expansion threads; the server gets one question at a time
        # on one connection, as from table-socketmap.
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._renew = False  # set by reload: the next question connects anew

    # -- loading ----------------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Check the path again and let the next question connect anew (`smtpctl update table` after moving the
        server, say). A question in flight is answered on its connection first: cutting it would fail it."""
        check_socket_path(self.name, self.path)
        self._renew = True

    def close(self) -> None:
        """Close the connection. Never waits (a retired snapshot's tables are closed on the event loop): a
        question in flight is cut short, a temporary failure, and the next question connects anew."""
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()
        elif (connection := self._connection) is not None:
            connection.cut()

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- questions ------------------------------------------------------------------------------------------------
    def _ask(self, key: str) -> str | None:
        """The value the server answers for key, or None for NOTFOUND. Raises TableError for anything else."""
        if "\n" in key:
            raise TableError(f"socketmap table {self.name}: a key with a newline cannot be asked")
        # A key that is not UTF-8 (an AUTH user name from a Latin-1 client) goes as the client sent it.
        question = f"{self.name} {key}\n".encode("utf-8", "surrogateescape")
        status, text = self._answer(question)
        if status == "OK":
            return text
        if status == "NOTFOUND":
            return None
        raise TableError(f"socketmap table {self.name}: the server answered {status}{' ' + text if text else ''}")

    def _answer(self, question: bytes) -> tuple[str, str]:
        if not self._lock.acquire(timeout=REPLY_TIMEOUT + CONNECT_TIMEOUT):
            raise TableError(f"socketmap table {self.name}: the server is still busy with an earlier question")
        try:
            if self._renew:
                self._renew = False
                self._drop()
            return parse_reply(self._exchange(question))
        except ValueError as error:
            self._drop()
            raise TableError(f"socketmap table {self.name}: {error}") from None
        finally:
            self._lock.release()

    def _exchange(self, question: bytes) -> bytes:
        """Ask on the open connection, or on a new one; a connection that was closed while idle is made again
        once (the questions are lookups: asking twice is harmless)."""
        for _attempt in range(2):
            connection = self._connect()
            try:
                line = connection.ask(question)
            except _Lost:
                self._drop()
                if connection.reused and not connection.was_cut:
                    continue
                raise TableError(f"socketmap table {self.name}: the server closed the connection without "
                                 "answering") from None
            except TimeoutError:
                self._drop()
                raise TableError(f"socketmap table {self.name}: no answer from {self.path} within "
                                 f"{REPLY_TIMEOUT:g} s") from None
            except OSError as error:
                self._drop()
                raise TableError(f"socketmap table {self.name}: {self.path}: {error.strerror or error}") from None
            except ValueError:
                self._drop()
                raise
            connection.reused = True
            return line
        raise TableError(f"socketmap table {self.name}: the server closed the connection without answering")

    def _connect(self) -> _Connection:
        if self._connection is None:
            try:
                self._connection = _Connection(self.path)
            except TimeoutError:
                raise TableError(f"socketmap table {self.name}: connecting to {self.path} took over "
                                 f"{CONNECT_TIMEOUT:g} s") from None
            except OSError as error:
                raise TableError(f"socketmap table {self.name}: cannot connect to {self.path}: "
                                 f"{error.strerror or error}") from None
        return self._connection

    def lookup(self, service: Service, key: str) -> str | None:
        return self._ask(key)

    def match(self, service: Service, candidate: str) -> bool:
        # The server decides, whatever the service (a domain, an address, a network address, a regex question):
        # OK is a match.
        return self._ask(candidate) is not None

    def fetch(self, service: Service) -> str | None:
        raise TableError(f"socketmap table {self.name}: a socketmap server cannot hand out {service} entries in "
                         "turn (its protocol only looks keys up)")
