"""Private PostgreSQL and MariaDB servers for the `postgres:` and `mysql:` tables' tests, and what their tests share.

Each server is made by the test in a folder of its own (initdb / mariadb-install-db), runs as an unprivileged user
(`postgres`, `mysql`) when the tests run as root, listens on 127.0.0.1 on a free port and on a unix socket in its
folder, and is stopped by its pid; the folder is removed at the end. Both hold the virtual-domain example of the
tables' manuals (domains, virtual users, aliases of several rows, credentials, senders), and let the tables in as a
user with a password and no more than SELECT.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import psycopg
import pymysql
from daemon import SmtpdProcess, free_port
from helpers_mta import OpenSmtpd, maildir_messages, wait_until
from helpers_tables import shared_folder as shared_table_folder
from helpers_tables import starttls_client
from waiting import wait_until as wait_bounded

from shared.passwords import hash_password

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
START_BOUND = 30.0  # seconds a server may take to answer (a liveness bound only)
STOP_BOUND = 15.0
DATABASE = "mail"
TABLE_USER, TABLE_PASSWORD = "smtpd", "db-secret"  # what the tables' configuration files log in as
AUTH_USER, AUTH_PASSWORD = "bob@example.com", "secret"  # a mail user whose hash is in the credentials table

# The example, in SQL both servers take.
SCHEMA = [
    "CREATE TABLE virtuals (email VARCHAR(255) NOT NULL, destination VARCHAR(255) NOT NULL)",
    "CREATE TABLE credentials (email VARCHAR(255) NOT NULL, password VARCHAR(255) NOT NULL)",
    "CREATE TABLE domains (domain VARCHAR(255) NOT NULL)",
    "CREATE TABLE senders (login VARCHAR(255), address VARCHAR(255))",
    "CREATE TABLE users (name VARCHAR(255), uid INTEGER, gid INTEGER, home VARCHAR(255))",
    "CREATE TABLE sources (address VARCHAR(64))",
    "INSERT INTO domains (domain) VALUES ('example.com'), ('example.net')",
    "INSERT INTO virtuals (email, destination) VALUES ('abuse@example.com', 'bob@example.com'), "
    "('postmaster@example.com', 'bob@example.com'), ('bob@example.com', 'nobody'), ('alice@example.net', 'nobody'), "
    "('team@example.com', 'bob@example.com'), ('team@example.com', 'alice@example.net')",
    "INSERT INTO senders VALUES ('bob@example.com', 'bob@example.com'), ('bob@example.com', 'team@example.com')",
    "INSERT INTO users VALUES ('bob', 65534, 65534, '/nonexistent')",
    "INSERT INTO sources VALUES ('127.0.0.3'), ('127.0.0.2'), ('127.0.0.3')",
]
TABLES = ("virtuals", "credentials", "domains", "senders", "users", "sources")


def _as_user(name: str) -> list[str]:
    """The command prefix running a server as an unprivileged user (servers refuse to run as root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={name}", f"--regid={name}", "--clear-groups", "--"]


def _run(command: Sequence[str], what: str) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


class SqlServer:
    """A server of our own in a temp folder. Subclasses: how to make its data, run it, and ask it."""

    user = ""  # the unprivileged account it runs as when we are root
    stop_signal = signal.SIGTERM
    prefix = "pysmtpd-sql-"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=self.prefix))
        os.chmod(self.folder, 0o755)  # (the server's user, and the socket's clients, need to get in)
        if os.geteuid() == 0:
            shutil.chown(self.folder, self.user)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    # -- what a server provides --------------------------------------------------------------------------
    def make_data(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    # -- life ----------------------------------------------------------------------------------------------
    def start(self) -> Self:
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        wait_bounded(self._up, START_BOUND, interval=0.1, explain=self.log)
        return self

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
        return self.answers()

    def stop(self) -> None:
        """End the server by its pid (SIGKILL if it does not end within the bound)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, self.stop_signal)
        try:
            self.process.wait(STOP_BOUND)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def processes(self) -> list[int]:
        """The server's pid and its children's (PostgreSQL's backends, one a connection)."""
        assert self.process is not None
        found = [self.process.pid]
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
            except OSError:  # (not a process, or one that ended meanwhile)
                continue
            if re.search(rf"^PPid:\s+{self.process.pid}$", status, re.MULTILINE):
                found.append(int(entry.name))
        return found

    def freeze(self) -> None:
        """Stop the server's processes (SIGSTOP): connections stay open and nothing answers, as when its host
        hangs or the network drops its packets."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # (a backend that ended since it was listed)
                pass

    def log(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        try:
            self.make_data()
            self.start()
            self.load_example()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- the data ---------------------------------------------------------------------------------------
    def execute(self, statements: Sequence[str], parameters: Sequence[Sequence[Any]] = ()) -> None:
        raise NotImplementedError

    def load_example(self) -> None:
        raise NotImplementedError

    def example_statements(self) -> list[str]:
        return [*SCHEMA, f"INSERT INTO credentials (email, password) VALUES ('{AUTH_USER}', "
                         f"'{hash_password(AUTH_PASSWORD, 'bcrypt')}')"]


class PostgresServer(SqlServer):
    """PostgreSQL 15: `admin` is the superuser (a password, scram-sha-256 everywhere, as pg_hba says)."""

    user = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown: SIGTERM would wait for every client to leave
    prefix = "pysmtpd-pg-"
    admin, admin_password = "admin", "admin-secret"

    def make_data(self) -> None:
        password_file = self.folder / "admin-password"
        password_file.write_text(self.admin_password + "\n")
        if os.geteuid() == 0:
            shutil.chown(password_file, self.user)
        _run([*_as_user(self.user), str(POSTGRES_BIN / "initdb"), "-D", str(self.folder / "data"), "-U", self.admin,
              "--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
             "initdb")

    def command(self) -> list[str]:
        return [*_as_user(self.user), str(POSTGRES_BIN / "postgres"), "-D", str(self.folder / "data"),
                "-k", str(self.folder), "-h", "127.0.0.1", "-p", str(self.port), "-c", "fsync=off",
                "-c", "full_page_writes=off", "-c", "synchronous_commit=off", "-c", "shared_buffers=16MB"]

    def connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.admin, password=self.admin_password,
                               dbname=database, autocommit=True, connect_timeout=5)

    def answers(self) -> bool:
        try:
            self.connect().close()
        except psycopg.OperationalError:
            return False
        return True

    def execute(self, statements: Sequence[str], parameters: Sequence[Sequence[Any]] = (),
                database: str = DATABASE) -> None:
        with self.connect(database) as connection:
            for index, statement in enumerate(statements):
                connection.execute(statement.encode(), parameters[index] if index < len(parameters) else None)

    def load_example(self) -> None:
        with self.connect() as connection:
            connection.execute(f"CREATE ROLE {TABLE_USER} LOGIN PASSWORD '{TABLE_PASSWORD}'".encode())
            connection.execute(f"CREATE DATABASE {DATABASE}".encode())
        self.execute([*self.example_statements(), *(f"GRANT SELECT ON {name} TO {TABLE_USER}" for name in TABLES)])

    def conninfo(self, password: str = TABLE_PASSWORD) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={TABLE_USER} password={password}"


class MariadbServer(SqlServer):
    """MariaDB: root logs in over the unix socket of the folder; the tables log in over TCP with a password."""

    user = "mysql"
    prefix = "pysmtpd-mariadb-"

    @property
    def socket(self) -> str:
        return str(self.folder / "mysqld.sock")

    def make_data(self) -> None:
        _run(["mariadb-install-db", "--no-defaults", f"--datadir={self.folder / 'data'}",
              *([f"--user={self.user}"] if os.geteuid() == 0 else []), "--auth-root-authentication-method=normal",
              "--skip-test-db", "--skip-name-resolve"], "mariadb-install-db")

    def command(self) -> list[str]:
        return ["mariadbd", "--no-defaults", f"--datadir={self.folder / 'data'}", f"--socket={self.socket}",
                f"--port={self.port}", "--bind-address=127.0.0.1", f"--pid-file={self.folder / 'mysqld.pid'}",
                *([f"--user={self.user}"] if os.geteuid() == 0 else []), "--skip-name-resolve", "--skip-log-bin",
                "--innodb-buffer-pool-size=16M", "--innodb-flush-log-at-trx-commit=0",
                f"--log-error={self.folder / 'server.log'}"]

    def connect(self, database: str | None = None) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(unix_socket=self.socket, user="root", password="", database=database,
                               autocommit=True, connect_timeout=5)

    def answers(self) -> bool:
        try:
            self.connect().close()
        except pymysql.MySQLError:
            return False
        return True

    def execute(self, statements: Sequence[str], parameters: Sequence[Sequence[Any]] = (),
                database: str = DATABASE) -> None:
        with self.connect(database) as connection, connection.cursor() as cursor:
            for index, statement in enumerate(statements):
                cursor.execute(statement, parameters[index] if index < len(parameters) else None)

    def load_example(self) -> None:
        with self.connect() as connection, connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
            for host in ("127.0.0.1", "localhost"):
                cursor.execute(f"CREATE USER '{TABLE_USER}'@'{host}' IDENTIFIED BY '{TABLE_PASSWORD}'")
                cursor.execute(f"GRANT SELECT ON {DATABASE}.* TO '{TABLE_USER}'@'{host}'")
        self.execute(self.example_statements())

    def settings(self, password: str = TABLE_PASSWORD, host: str = "127.0.0.1") -> str:
        """table-mysql's keys for the example (it has none for a port: MYSQL_TCP_PORT says it, as to libmariadb)."""
        return f"host {host}\nusername {TABLE_USER}\npassword {password}\ndatabase {DATABASE}\n"


# -- what the two tests do alike ---------------------------------------------------------------------------------
RECIPIENTS = ["abuse@example.com", "bob@example.com", "alice@example.net", "team@example.com",
              "nobody@example.com", "someone@example.org", "postmaster@example.com"]


def shared_folder() -> Path:
    return shared_table_folder("pysmtpd-sqltable-")


def virtual_domains_config(table: str, folder: Path, side: str, port: int) -> str:
    """The virtual-domain setup of the tables' manuals: `table` (`postgres:/...conf`) answers both roles."""
    return (f"table domains {table}\ntable virtuals {table}\n"
            f"listen on 127.0.0.1 port {port}\n"
            f'action "vmail{port}" maildir "{folder}/{side}" virtual <virtuals>\n'
            f'match from any for domain <domains> action "vmail{port}"\n')


def rcpt_replies(port: int, recipients: Sequence[str] = RECIPIENTS, data: bool = True,
                 within: float = 30) -> list[tuple[int, bytes]]:
    """The RCPT replies; a reply that takes over ``within`` seconds fails the test (the client gives up)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=within) as client:
        client.ehlo("client.test")
        client.mail("sender@example.org")
        replies = [client.rcpt(rcpt) for rcpt in recipients]
        if data and any(code == 250 for code, _ in replies):
            client.data(b"Subject: through SQL tables\r\n\r\nhello\r\n")
    return replies


def side_by_side(table: str, folder: Path) -> dict[str, tuple[list[tuple[int, bytes]], list[str], list[str]]]:
    """The example under ours and under OpenSMTPD 6.8 (its table program on the same file and server): for each
    side, the RCPT replies, the Delivered-To of each message delivered, and the lookups traced."""
    results = {}
    for side in ("ours", "theirs"):
        port = free_port()
        text = virtual_domains_config(table, folder, side, port)
        if side == "ours":
            daemon: SmtpdProcess | OpenSmtpd = SmtpdProcess(folder / "daemon", text, port=port, traces=("lookup",))
        else:
            daemon = OpenSmtpd(str(folder), text, port, args=("-T", "lookup"))
        with daemon:
            replies = rcpt_replies(port)
            # (6.8 delivers team@'s two copies to the one user: all its deliveries are awaited, none left queued)
            expected = 5 if side == "ours" else 6
            wait_until(lambda: len(maildir_messages(f"{folder}/{side}")) >= expected, 20)  # noqa: B023 — at once
        lookups = [re.sub(r" in table \w+:", " in table sql:", line[line.index("lookup: "):])
                   for line in daemon.log().splitlines()
                   if re.search(r"lookup: .* in table (proc|sqlite|postgres|mysql):(domains|virtuals)", line)]
        delivered = [message["Delivered-To"] for message in maildir_messages(f"{folder}/{side}")]
        results[side] = (replies, delivered, lookups)
    return results


class BannerWatch:
    """How long the daemon keeps a new client waiting for its banner, sampled while the ``with`` block runs: the
    longest wait says how long its event loop was held (the banner is written by the loop, nothing else)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.longest = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set():
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as client:
                client.recv(512)
            self.longest = max(self.longest, time.monotonic() - started)
            self._done.wait(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(70)


def assert_answered_as_the_program(results: dict[str, tuple[list[tuple[int, bytes]], list[str], list[str]]]) -> None:
    """What side_by_side gave, checked: the same RCPT replies, the same mailboxes (6.8 delivers team@'s two
    members' copies to the one user twice, we once: docs/delivery.md, "Duplicates"), and every question we asked
    got the table program's answer (6.8 asks more: `nobody@` before `nobody`)."""
    ours, theirs = results["ours"], results["theirs"]
    assert ours[0] == theirs[0]
    assert ours[0][:4] == [(250, b"2.1.5 Destination address valid: Recipient ok")] * 4
    assert ours[0][5] == (550, b"Invalid recipient: <someone@example.org>")
    assert sorted(set(ours[1])) == sorted(set(theirs[1])) != []
    assert ours[2] and set(ours[2]) <= set(theirs[2])
    assert 'lookup: lookup "team@example.com" as ALIAS in table sql:virtuals -> ' \
           '"bob@example.com, alice@example.net"' in ours[2]


def assert_credentials_and_senders(port: int) -> None:
    """AUTH against query_credentials (a wrong password refused, the right one taken), then `senders` against
    query_mailaddrmap: both of the user's rows allowed, another address refused."""
    with starttls_client(port) as client:
        try:
            client.login(AUTH_USER, "wrong")
        except smtplib.SMTPAuthenticationError as error:
            assert error.smtp_code == 535
        else:
            raise AssertionError("a wrong password was taken")
    with starttls_client(port) as client:
        assert client.login(AUTH_USER, AUTH_PASSWORD)[0] == 235
        assert client.mail("bob@example.com")[0] == 250
        client.rset()
        assert client.mail("team@example.com")[0] == 250  # the second row of the senders query
        client.rset()
        assert client.mail("alice@example.net") == (530, b"Sender rejected")


def accepted(port: int, rcpt: str, within: float = 30) -> int:
    return rcpt_replies(port, [rcpt], data=False, within=within)[0][0]


def check_frozen_server_is_a_bounded_4xx(port: int, server: SqlServer, reply_timeout: float) -> None:
    """``server`` frozen: the question fails (451) within the table's answer bound, not for ever; thawed, the
    daemon answers from it again (a domain in it 250, one not in it 550), and its log said why it gave up."""
    server.freeze()
    try:
        assert accepted(port, "x@example.com", within=reply_timeout + 3) == 451  # (a bound, not for ever)
    finally:
        server.thaw()
    assert accepted(port, "x@example.com") == 250
    assert accepted(port, "x@example.org") == 550


TEMPORARY_FAILURE = (451, b"Temporary failure: <x@example.com>")  # OpenSMTPD 6.8's, with its table program


def check_server_down_and_back(server: SqlServer, conf: Path, folder: Path, warning: str) -> None:
    """The daemon starts while ``server`` is down (``warning`` in its log), answers 4xx meanwhile, and accepts as
    soon as the server is back; a server restarted under an open connection answers the very next question.
    ``conf`` is the table's `BACKEND:/path` source."""
    text = (f"table domains {conf}\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    server.stop()
    try:
        with SmtpdProcess(folder / "daemon", text) as daemon:
            assert warning in daemon.log()
            assert rcpt_replies(daemon.port, ["x@example.com"], data=False) == [TEMPORARY_FAILURE]
            server.start()
            assert accepted(daemon.port, "x@example.com") == 250
            server.stop()
            assert rcpt_replies(daemon.port, ["x@example.com"], data=False) == [TEMPORARY_FAILURE]
            update = daemon.smtpctl("update", "table", "domains")
            assert update.returncode != 0
            assert "cannot reach the database" in update.stderr and "the table is kept as it was" in update.stderr
            assert accepted(daemon.port, "x@example.org") == 451  # (never a permanent refusal while it is down)
            server.start()
            assert accepted(daemon.port, "x@example.com") == 250
            server.stop()
            server.start()
            assert accepted(daemon.port, "x@example.com") == 250  # reconnected under the question
            assert accepted(daemon.port, "x@example.org") == 550
            assert "connection lost" in daemon.log()
    finally:
        if server.process is None or server.process.poll() is not None:
            server.start()  # (for the module's other tests)
