"""`redis:` tables, the configuration files of table-redis (opensmtpd-extras): side by side with OpenSMTPD 6.8
running the packaged table-redis on the same file and data (virtual domains, virtual users, an alias with several
targets), then ours alone for what the packaged program cannot do: it reads nothing of its file (its read loop
ends at the first line) and always asks 127.0.0.1:6379 with no password, so the side-by-side run happens in a
network namespace of its own where that address is the test's server; AUTH needs TLS, which the Debian build of
6.8 cannot do. The servers are redis-server processes the tests start on loopback (`--save ''`, a temporary
folder, a password) and stop by pid."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from daemon import ROOT, SmtpdProcess, free_port
from helpers_mta import OpenSmtpd, maildir_messages, wait_until
from helpers_smtp import SmtpDaemon, make_certificate
from helpers_tables import (
    auth_listener_config,
    check_non_utf8_login,
    checked_domains_table,
    shared_folder,
    starttls_client,
)

from shared.passwords import hash_password

REDIS_SERVER = "/usr/bin/redis-server"
PASSWORD = "redis secret"
DATABASE = 3
# The one address the packaged table-redis (opensmtpd-extras 6.7.1) asks, whatever its file says.
PACKAGED_ADDRESS = ("127.0.0.1", 6379)


class RedisServer:
    """redis-server on 127.0.0.1:port, its files in folder, no snapshots; stopped by its pid."""

    def __init__(self, folder: Path, port: int, password: str | None = PASSWORD) -> None:
        self.folder = folder
        self.port = port
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def start(self) -> RedisServer:
        command = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly",
                   "no", "--dir", str(self.folder), "--daemonize", "no", "--logfile", "",
                   *(["--requirepass", self.password] if self.password else [])]
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if not wait_until(self.answers, 15):
            self.stop()
            raise RuntimeError(f"redis-server did not answer:\n{(self.folder / 'redis.log').read_text()}")
        return self

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{(self.folder / 'redis.log').read_text()}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def client(self, database: int = DATABASE) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, db=database,
                           socket_timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    folder = Path(tempfile.mkdtemp(prefix="pysmtpd-redis-server-"))
    try:
        with RedisServer(folder, free_port()) as running:
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def folder() -> Iterator[Path]:
    made = shared_folder("pysmtpd-redis-")
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


# -- side by side with OpenSMTPD 6.8 and the packaged table-redis -------------------------------------------------
def in_private_network[T](function: Callable[[], T]) -> T:
    """function() in a thread of a network namespace of its own, its loopback up: the processes it starts and the
    sockets it opens see a 127.0.0.1 of their own, where port 6379 is free whatever runs on this machine's."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            os.unshare(os.CLONE_NEWNET)  # (this thread only: the test's other threads keep the machine's network)
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            outcome.append((True, function()))
        except BaseException as error:  # noqa: BLE001 — raised again in the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    succeeded, value = outcome[0]
    if not succeeded:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]


# table-redis's own queries (those it asks whatever its file says), written out, and its data as strings: an
# alias with several targets is one string, as GET answers it.
COMPARED_CONF = """# read by us; the packaged table-redis reads none of it and asks 127.0.0.1:6379, database 0, no password,
# with these very queries (its defaults)
master 127.0.0.1
master_port 6379
database 0
query_domain GET domain:%s
query_alias GET alias:%s
"""
COMPARED_DATA = {
    "domain:example.com": "example.com", "domain:example.net": "example.net",
    "alias:abuse@example.com": "bob@example.com", "alias:postmaster@example.com": "bob@example.com",
    "alias:bob@example.com": "nobody", "alias:alice@example.net": "nobody",
    "alias:team@example.com": "bob@example.com, alice@example.net",
    # 6.8 asks `nobody@` for the user `nobody` a virtual user ends at, and table-redis takes the missing key for a
    # failure (424): this entry, which we never ask, lets 6.8 deliver at all.
    "alias:nobody@": "nobody",
}
RECIPIENTS = ["abuse@example.com", "bob@example.com", "alice@example.net", "team@example.com",
              "postmaster@example.com", "someone@example.org", "someone@example.com"]
ACCEPTED = (250, b"2.1.5 Destination address valid: Recipient ok")


def compared_config(folder: Path, side: str, port: int) -> str:
    return (f"table domains redis:{folder}/redis.conf\ntable virtuals redis:{folder}/redis.conf\n"
            f"listen on 127.0.0.1 port {port}\n"
            f'action "vmail{port}" maildir "{folder}/{side}" virtual <virtuals>\n'
            f'match from any for domain <domains> action "vmail{port}"\n')


def rcpt_replies(port: int) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@example.org")
        replies = [client.rcpt(rcpt) for rcpt in RECIPIENTS]
        client.data(b"Subject: through redis tables\r\n\r\nhello\r\n")
    return replies


def found_lookups(log: str) -> list[str]:
    """The table answers a daemon traced (`-T lookup`) that found something, named alike on both sides."""
    return [re.sub(r" in table (proc|redis):", " in table redis:", line[line.index("lookup: "):])
            for line in log.splitlines() if re.search(r"lookup: .* in table (proc|redis):.* -> (true|\")", line)]


def test_virtual_domains_in_redis_answer_as_under_opensmtpd(folder: Path) -> None:
    (folder / "redis.conf").write_text(COMPARED_CONF)

    def both_sides() -> dict[str, tuple[list[tuple[int, bytes]], list[str], list[str]]]:
        results = {}
        with RedisServer(folder / "redis-6379", PACKAGED_ADDRESS[1], password=None) as packaged:
            with packaged.client(0) as client:
                client.mset(COMPARED_DATA)
            for side in ("ours", "theirs"):
                port = free_port()
                text = compared_config(folder, side, port)
                daemon: SmtpdProcess | OpenSmtpd = (
                    SmtpdProcess(folder / "daemon", text, port=port, traces=("lookup",)) if side == "ours"
                    else OpenSmtpd(str(folder), text, port, args=("-T", "lookup")))
                with daemon:
                    replies = rcpt_replies(port)
                    # (6.8 delivers team@'s two copies to the one user: all its deliveries are awaited)
                    expected = 5 if side == "ours" else 6
                    wait_until(lambda: len(maildir_messages(f"{folder}/{side}")) >= expected, 20)  # noqa: B023
                results[side] = (replies, [message["Delivered-To"] for message in
                                           maildir_messages(f"{folder}/{side}")], found_lookups(daemon.log()))
        return results

    results = in_private_network(both_sides)
    ours, theirs = results["ours"], results["theirs"]
    assert ours[0][:5] == theirs[0][:5] == [ACCEPTED] * 5
    assert ours[0][5] == theirs[0][5] == (550, b"Invalid recipient: <someone@example.org>")
    # An unknown virtual user: table-redis takes the missing key for a failure, we for "no such user", as
    # 6.8 answers when a table finds nothing (its file and sqlite tables).
    assert theirs[0][6] == (424, b"4.2.4 Mailing list expansion problem: <someone@example.com>")
    assert ours[0][6] == (524, b"5.2.4 Mailing list expansion problem: <someone@example.com>")
    # The same mailboxes (6.8 delivers team@'s two targets' copies to the one user twice, we once).
    assert sorted(set(ours[1])) == sorted(set(theirs[1])) == sorted(RECIPIENTS[:5])
    assert ours[2] and set(ours[2]) <= set(theirs[2])
    assert 'lookup: lookup "team@example.com" as ALIAS in table redis:virtuals -> ' \
           '"bob@example.com, alice@example.net"' in ours[2]


# -- ours alone: table-redis(5)'s own schema, with a password and a database -----------------------------------------
def manual_conf(server: RedisServer, more: str = "") -> str:
    """table-redis(5)'s examples: domains in a set, users in hashes, aliases in lists."""
    return (f"master 127.0.0.1\nmaster_port {server.port}\npassword {server.password}\ndatabase {DATABASE}\n"
            "query_domain SISMEMBER domains %s\n"
            "query_alias LRANGE aliases:%s 0 -1\n"
            "query_credentials HMGET user:%s login passwd\n"
            "query_userinfo HMGET user:%s uid gid maildir\n"
            "query_mailaddrmap SMEMBERS senders:%s\n" + more)


def load_manual_data(server: RedisServer) -> None:
    with server.client() as client:
        client.flushdb()
        client.sadd("domains", "example.com", "example.net")
        for alias, targets in {"abuse@example.com": ["bob@example.com"], "bob@example.com": ["vmail"],
                               "alice@example.net": ["vmail"],
                               "team@example.com": ["bob@example.com", "alice@example.net"]}.items():
            client.rpush(f"aliases:{alias}", *targets)
        client.hset("user:vmail", mapping={"uid": 65534, "gid": 65534, "maildir": "/nonexistent"})
        client.hset("user:bob@example.com", mapping={"login": "bob@example.com",
                                                     "passwd": hash_password("secret", "bcrypt")})
        client.sadd("senders:bob@example.com", "bob@example.com", "team@example.com")


def test_the_manuals_schema_answers_virtual_users_from_lists_and_hashes(server: RedisServer, folder: Path) -> None:
    load_manual_data(server)
    (folder / "redis.conf").write_text(manual_conf(server))
    text = (f"table domains redis:{folder}/redis.conf\ntable virtuals redis:{folder}/redis.conf\n"
            f"table users redis:{folder}/redis.conf\nlisten on 127.0.0.1 port {{port}}\n"
            f'action "vmail" maildir "{folder}/ours" virtual <virtuals> userbase <users>\n'
            'match from any for domain <domains> action "vmail"\n')
    with SmtpdProcess(folder / "daemon", text, traces=("lookup",)) as daemon:
        replies = rcpt_replies(daemon.port)
        assert wait_until(lambda: len(maildir_messages(f"{folder}/ours")) >= 4, 20)
    assert replies[:4] == [ACCEPTED] * 4
    # postmaster@ has no list here: unknown, as someone@example.com; example.org is no domain of ours
    assert [code for code, _ in replies[4:]] == [524, 550, 524]
    assert sorted(message["Delivered-To"] for message in maildir_messages(f"{folder}/ours")) == \
        sorted(RECIPIENTS[:4])  # (team@'s two targets end at the one user vmail: one copy)
    lookups = found_lookups(daemon.log())
    assert 'lookup: lookup "team@example.com" as ALIAS in table redis:virtuals -> ' \
           '"bob@example.com, alice@example.net"' in lookups  # LRANGE's elements, joined as table-redis does
    assert 'lookup: lookup "vmail" as USERINFO in table redis:users -> "65534:65534:/nonexistent"' in lookups


def test_credentials_and_senders_from_redis(server: RedisServer, folder: Path, tmp_path: Path) -> None:
    """AUTH against `HMGET user:%s login passwd` and `senders` against SMEMBERS (6.8 cannot be asked: its
    STARTTLS fails on Debian 12, and the packaged table-redis answers no mailaddrmap question)."""
    load_manual_data(server)
    (folder / "redis.conf").write_text(manual_conf(server))
    make_certificate(tmp_path)
    text = auth_listener_config(f"redis:{folder}/redis.conf", tmp_path)
    with SmtpDaemon(tmp_path / "daemon", text) as daemon:
        for user, password in (("bob@example.com", "wrong"), ("carol@example.com", "secret")):
            with starttls_client(daemon.port) as client:
                # (an unknown user is refused, not a temporary failure as under table-redis: HMGET's nils)
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    client.login(user, password)
                assert refused.value.smtp_code == 535
        with starttls_client(daemon.port) as client:
            assert client.login("bob@example.com", "secret")[0] == 235
            assert client.mail("team@example.com")[0] == 250  # a second member of the senders set
            client.rset()
            assert client.mail("alice@example.net") == (530, b"Sender rejected")


@pytest.mark.parametrize(("line", "message"), [
    ("query_addrname LRANGE names:%s\n", "{conf}:11: query_addrname: LRANGE takes 3 arguments, the query gives 1"),
    ("query_netaddr SISMEMBR netaddrs %s\n", "{conf}:11: query_netaddr: the server knows no command 'SISMEMBR'"),
    ("query_source GET source:%d\n", "{conf}:11: query_source: '%d': a query has `%s` for the key"),
    ("query_aliases LRANGE x 0 -1\n", "{conf}:11: unknown key 'query_aliases'"),
    ("password other\n", "{conf}:11: password given twice (first on line 3)"),
])
def test_mistakes_in_the_file_are_said_with_their_line(server: RedisServer, folder: Path, line: str,
                                                       message: str) -> None:
    conf = folder / "broken.conf"
    conf.write_text(manual_conf(server, "# below, the mistake\n" + line))
    result = checked_domains_table(folder, f"redis:{conf}")
    assert result.returncode != 0
    assert message.format(conf=conf) in result.stderr + result.stdout


def test_a_wrong_password_is_said_with_its_line(server: RedisServer, folder: Path) -> None:
    conf = folder / "redis.conf"
    conf.write_text(manual_conf(server).replace(f"password {PASSWORD}", "password guessed"))
    result = checked_domains_table(folder, f"redis:{conf}")
    assert result.returncode != 0
    assert f"{conf}:3: master 127.0.0.1:{server.port} refused the password" in result.stderr + result.stdout


def accepted_by(port: int) -> Callable[[str], int]:
    def rcpt_code(rcpt: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("sender@example.org")
            return client.rcpt(rcpt)[0]
    return rcpt_code


def test_a_server_down_is_a_temporary_failure_the_slave_answers_meanwhile(folder: Path) -> None:
    """The master stops: the slave answers. Both stop: 4xx at RCPT, and the daemon lives. The master starts
    again (empty: no snapshots): answers again once its data is back, on a new connection."""
    master = RedisServer(folder / "master", free_port())
    slave = RedisServer(folder / "slave", free_port())
    (folder / "redis.conf").write_text(f"master 127.0.0.1\nmaster_port {master.port}\nslave 127.0.0.1\n"
                                       f"slave_port {slave.port}\npassword {PASSWORD}\n"
                                       "query_domain SISMEMBER domains %s\n")
    text = (f"table domains redis:{folder}/redis.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    try:
        for running in (master.start(), slave.start()):
            with running.client(0) as client:
                client.sadd("domains", "example.com")
        with SmtpdProcess(folder / "daemon", text) as daemon:
            rcpt_code = accepted_by(daemon.port)
            assert rcpt_code("x@example.com") == 250
            master.stop()
            assert rcpt_code("x@example.com") == 250
            slave.stop()
            assert rcpt_code("x@example.com") == rcpt_code("x@example.com") == 451  # (asked twice: no crash)
            master.start()
            with master.client(0) as client:
                client.sadd("domains", "example.com")
            assert rcpt_code("x@example.com") == 250
            assert daemon.alive()
    finally:
        master.stop()
        slave.stop()


def test_update_table_reads_the_file_again_and_keeps_the_table_on_a_mistake(server: RedisServer,
                                                                            folder: Path) -> None:
    load_manual_data(server)
    with server.client() as client:
        client.sadd("more-domains", "example.org")
    conf = folder / "redis.conf"
    conf.write_text(manual_conf(server))
    text = (f"table domains redis:{conf}\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with SmtpdProcess(folder / "daemon", text) as daemon:
        rcpt_code = accepted_by(daemon.port)
        assert (rcpt_code("x@example.com"), rcpt_code("x@example.org")) == (250, 550)
        conf.write_text(manual_conf(server).replace("SISMEMBER domains %s", "SISMEMBER domains"))
        result = daemon.smtpctl("update", "table", "domains")
        assert result.returncode != 0
        assert f"{conf}:5: query_domain: SISMEMBER takes 2 arguments, the query gives 1" in result.stderr
        assert rcpt_code("x@example.com") == 250  # the table as it was
        conf.write_text(manual_conf(server).replace("SISMEMBER domains %s", "SISMEMBER more-domains %s"))
        assert daemon.smtpctl("update", "table", "domains").returncode == 0
        assert (rcpt_code("x@example.com"), rcpt_code("x@example.org")) == (550, 250)


def test_replies_table_redis_answers_and_those_it_refuses(server: RedisServer, folder: Path) -> None:
    """What each kind of reply means (the manual's schema and its odd cases), asked of the table itself."""
    from smtpd.lookup.tables.base import Service, TableError
    from smtpd.lookup.tables.redis import RedisTable

    load_manual_data(server)
    with server.client() as client:
        client.hset("user:half", mapping={"login": "half"})
        client.set("aliases:string@example.com", "bob@example.com, alice@example.net")
        client.set("count", 3)
        client.set("spaced key", "found")
    (folder / "redis.conf").write_text(manual_conf(server, "query_addrname GET %s\nquery_mailaddr GET %s\n"
                                                           "query_netaddr SCARD netaddr:%s\n"))
    table = RedisTable("t", str(folder / "redis.conf"))
    try:
        assert table.lookup(Service.CREDENTIALS, "nobody@example.com") is None  # HMGET's nils: not found
        assert table.lookup(Service.ALIAS, "nobody@example.com") is None  # an empty list
        with pytest.raises(TableError, match="WRONGTYPE"):  # a string where LRANGE wants a list
            table.lookup(Service.ALIAS, "string@example.com")
        with pytest.raises(TableError, match="not a string"):  # a hash with a field missing: broken, not absent
            table.lookup(Service.CREDENTIALS, "half")
        assert table.lookup(Service.ADDRNAME, "spaced key") == "found"  # the key is one argument
        assert table.match(Service.MAILADDR, "spaced key") and not table.match(Service.MAILADDR, "spaced")
        assert not table.match(Service.NETADDR, "none")  # an integer: 0
        with pytest.raises(TableError, match="hands out no"):
            table.fetch(Service.SOURCE)
    finally:
        table.close()
    with pytest.raises(TableError, match="closed"):
        table.match(Service.DOMAIN, "example.com")


def test_a_server_that_stops_answering_fails_the_question_within_the_documented_time(folder: Path) -> None:
    """A server that takes the connection and then answers nothing (hung, swapping, stopped here with SIGSTOP):
    the question is a 451 once the reply's time is up (COMMAND_TIMEOUT, docs/tables.md's 10 s), not asked once
    more for as long again; the daemon answers as soon as the server does."""
    from smtpd.lookup.tables.redis import COMMAND_TIMEOUT

    server = RedisServer(folder / "master", free_port())
    (folder / "redis.conf").write_text(f"master 127.0.0.1\nmaster_port {server.port}\npassword {PASSWORD}\n"
                                       "query_domain SISMEMBER domains %s\n")
    text = (f"table domains redis:{folder}/redis.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with server:
        with server.client(0) as client:
            client.sadd("domains", "example.com")
        with SmtpdProcess(folder / "daemon", text) as daemon:
            rcpt_code = accepted_by(daemon.port)
            assert rcpt_code("x@example.com") == 250
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert rcpt_code("x@example.com") == 451
                took = time.monotonic() - started
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert COMMAND_TIMEOUT - 0.5 <= took < COMMAND_TIMEOUT + 3
            assert rcpt_code("x@example.com") == 250


class BannerServer:
    """What `master_port 25` (a slip of the finger) reaches: a server that greets in SMTP, not in Redis's protocol.
    The test's own, on loopback, in a thread; every client gets the banner and is then left waiting."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.clients.append(client)
            with contextlib.suppress(OSError):
                client.sendall(b"220 mail.example.com ESMTP\r\n")

    def close(self) -> None:
        self.listener.close()
        for client in self.clients:
            client.close()


def test_a_master_that_is_no_redis_server_is_said_with_its_line(folder: Path) -> None:
    """smtpd -n names the line of the port that reaches something else than Redis, and the daemon started on such a
    file says so in one line (a traceback both times, before)."""
    banner = BannerServer()
    conf = folder / "redis.conf"
    conf.write_text(f"master 127.0.0.1\nmaster_port {banner.port}\nquery_domain SISMEMBER domains %s\n")
    smtpd_conf = folder / "smtpd.conf"
    smtpd_conf.write_text(f'table domains redis:{conf}\naction "out" relay\n'
                          'match from any for domain <domains> action "out"\n')
    try:
        result = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(smtpd_conf)], capture_output=True,
                                text=True, cwd=ROOT, timeout=60, check=False)
        daemon = SmtpdProcess(folder / "daemon", smtpd_conf.read_text())
        with pytest.raises(RuntimeError, match="smtpd exited at start"):
            daemon.start()
    finally:
        banner.close()
    message = f"{conf}:2: master 127.0.0.1:{banner.port} does not answer as a Redis server"
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert message in daemon.log()
    assert "Traceback" not in daemon.log()


def test_a_master_that_becomes_another_service_is_a_temporary_failure(folder: Path) -> None:
    """Nothing on the port when the daemon starts (no check then); later another service takes the port: the
    question is a 451, said in one line of the log, as for a server that does not answer."""
    port = free_port()
    (folder / "redis.conf").write_text(f"master 127.0.0.1\nmaster_port {port}\nquery_domain SISMEMBER domains %s\n")
    text = (f"table domains redis:{folder}/redis.conf\nlisten on 127.0.0.1 port {{port}}\n"
            'action "out" relay\nmatch from any for domain <domains> action "out"\n')
    with SmtpdProcess(folder / "daemon", text) as daemon:
        banner = BannerServer(port)
        try:
            assert accepted_by(daemon.port)("x@example.com") == 451
        finally:
            banner.close()
        assert f"master 127.0.0.1:{port} does not answer as a Redis server" in daemon.log()
        assert "Traceback" not in daemon.log()


def test_a_user_name_that_is_not_utf8_is_asked_as_the_client_sent_it(server: RedisServer, folder: Path,
                                                                    tmp_path: Path) -> None:
    """An AUTH user name in Latin-1 (an old client's `jörg`): the key holds those bytes, as table-redis sends
    them, and the user can log in (the session was dropped with `421 Internal server error`)."""
    load_manual_data(server)
    latin1 = "jörg".encode("latin-1")
    with server.client() as client:
        client.hset(b"user:" + latin1, mapping={"login": latin1, "passwd": hash_password("secret", "bcrypt")})
    (folder / "redis.conf").write_text(manual_conf(server))
    check_non_utf8_login(f"redis:{folder}/redis.conf", tmp_path, latin1)


def test_smtpd_n_warns_about_a_server_that_cannot_be_reached(folder: Path) -> None:
    """The file is fine, the server is not running: the configuration is accepted (the server may come up later)
    and smtpd -n says why nothing could be checked, as for an SQL table (it said only `configuration OK`)."""
    port = free_port()
    conf = folder / "redis.conf"
    conf.write_text(f"master 127.0.0.1\nmaster_port {port}\nquery_domain SISMEMBER domains %s\n")
    result = checked_domains_table(folder, f"redis:{conf}")
    assert result.returncode == 0, result.stderr
    assert f"{conf}:2: warning: master 127.0.0.1:{port} does not answer (" in result.stderr
