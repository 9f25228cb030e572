"""Real servers on loopback for the relay tests: a DNS server (dnspython), SMTP remotes (aiosmtpd) that answer
what a test scripts, a raw line-level remote for replies no SMTP library would send, and TLS certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from typing import IO, Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword
from daemon import SmtpdProcess, free_port

from smtpd.config.model import Action, Ca, Config, Method, Pki, Relay
from smtpd.lookup.tables.base import Service, TableError


# -- DNS ----------------------------------------------------------------------------------------------------
class DnsServer:
    """An authoritative DNS server on 127.0.0.1 (UDP) answering from ``records``.

    records: {name: [(type, rdata text), ...]}, e.g. {"example.test": [("MX", "10 mx1.example.test.")]}.
    A name absent from records is NXDOMAIN; a present name without the asked type is an empty answer.
    ("SERVFAIL", "") makes every question about the name fail; ("SERVFAIL", "AAAA") only the AAAA questions.
    """

    def __init__(self, records: dict[str, list[tuple[str, str]]], host: str = "127.0.0.1", port: int = 0) -> None:
        self.records = {name.rstrip(".").lower(): list(values) for name, values in records.items()}
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))  # port 53: for programs that read resolv.conf, which names no port
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def setting(self) -> str:
        """The SMTPD_RESOLVER value pointing at this server."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 — a broken packet gets no answer
                continue
            self._reply(query, peer)

    def _reply(self, query: dns.message.Message, peer: Any) -> None:
        """Send the answer (a subclass may send it later, or not at all)."""
        self.sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        if any(kind == "SERVFAIL" and text in ("", rdtype) for kind, text in self.records[name]):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        texts = [text for kind, text in self.records[name] if kind == rdtype]
        if texts:
            rrset = dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, question.rdtype, texts)
            response.answer.append(rrset)
        return response


# -- TLS ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    cert: str
    key: str


def make_certificate(directory: str, name: str, ip: str = "127.0.0.1", ecdsa: bool = False) -> Certificate:
    """A self-signed certificate for name (and the IP address) made with the openssl command.

    ecdsa: a P-256 key (OpenSMTPD 6.8's privilege-separated RSA signing fails with OpenSSL 3: "EVP lib")."""
    cert = os.path.join(directory, f"{name}.crt")
    key = os.path.join(directory, f"{name}.key")
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if ecdsa else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", *key_options, "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:{ip}"],
                   check=True, capture_output=True)
    return Certificate(cert, key)


def server_context(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.cert, certificate.key)
    return context


# -- scripted SMTP remotes (aiosmtpd) ---------------------------------------------------------------------------
@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    peer: Any
    tls: bool
    auth_user: str | None

    @property
    def message(self) -> Any:
        return message_from_bytes(self.data)


@dataclass
class ScriptedHandler:
    """aiosmtpd handler. ``rcpt_replies``: {address: reply} refusals (a reply may be several lines joined by
    CRLF, or garbage); ``mail_reply``/``data_reply``: a reply for every MAIL / end of DATA instead of 250."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    received: list[Received] = field(default_factory=list)
    sessions: set[int] = field(default_factory=set)
    mail_commands: int = 0

    async def handle_MAIL(self, server: SMTP, session: Any, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.mail_commands += 1
        self.sessions.add(id(session))
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        auth_user = None
        if session.auth_data is not None:
            auth_user = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) \
                else str(session.auth_data)
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or
                                      envelope.content, list(envelope.mail_options), session.peer,
                                      session.ssl is not None, auth_user))
        return "250 2.0.0 Ok: queued"


class Remote:
    """An aiosmtpd server on 127.0.0.1 with an ephemeral port, in its own thread."""

    def __init__(self, handler: ScriptedHandler | None = None, *, hostname: str = "remote.test",
                 tls: Certificate | None = None, require_starttls: bool = False, smtps: bool = False,
                 credentials: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 smtputf8: bool = True) -> None:
        self.handler = handler or ScriptedHandler()
        self.host = host
        self.port = port or free_port(host)
        context = server_context(tls) if tls is not None else None
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8, "server_hostname": hostname,
                                  "decode_data": False}
        if context is not None and not smtps:
            kwargs.update(tls_context=context, require_starttls=require_starttls)
        if credentials is not None:
            # aiosmtpd does not see TLS-on-connect as TLS: with smtps it offers AUTH without the STARTTLS check
            # (and then cannot insist on it: the test checks that the client authenticated).
            kwargs.update(authenticator=_authenticator(credentials), auth_required=not smtps,
                          auth_require_tls=not smtps)
        self.controller = Controller(self.handler, hostname=host, port=self.port,
                                     ssl_context=context if smtps else None, **kwargs)

    def __enter__(self) -> Remote:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[Received]:
        return self.handler.received


def _authenticator(credentials: dict[str, str]) -> Callable[..., AuthResult]:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        return AuthResult(success=credentials.get(user) == password, handled=False, auth_data=auth_data)
    return check


# -- a raw line-level remote ----------------------------------------------------------------------------------
CLOSE = b"\0close"  # a script answer ending with this makes the RawRemote hang up after sending the rest


class RawRemote:
    """A TCP server whose every reply a test chooses: ``script(command_line) -> bytes to send`` (the greeting is
    asked for with the command None). For replies an SMTP library would never produce."""

    def __init__(self, script: Callable[[str | None], bytes], host: str = "127.0.0.1", port: int = 0,
                 eom_delay: float = 0.0, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls  # a STARTTLS answered 220 starts the handshake after the answer is sent
        self.host = host
        self.port = port or free_port(host)
        self.eom_delay = eom_delay  # hold the end-of-data reply so that sessions overlap
        self.commands: list[str] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> RawRemote:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, self.port), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            writer.write(self.script(None))
            in_data = False
            while line := await reader.readline():
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if in_data:
                    if text != ".":
                        continue
                    in_data = False
                    text = "<EOM>"
                self.commands.append(text)
                answer = self.script(text)
                if text == "<EOM>" and self.eom_delay:
                    await asyncio.sleep(self.eom_delay)
                if text.upper() == "DATA" and answer.startswith(b"354"):
                    in_data = True
                hang_up = answer.endswith(CLOSE)
                writer.write(answer.removesuffix(CLOSE))
                await writer.drain()
                if self.tls is not None and text.upper() == "STARTTLS" and answer.startswith(b"220"):
                    await writer.start_tls(self.tls)
                if text.upper() == "QUIT" or hang_up:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self.active -= 1
            with contextlib.suppress(Exception):
                writer.close()


def standard_script(overrides: dict[str, bytes] | None = None) -> Callable[[str | None], bytes]:
    """A well-behaved server except for the commands in overrides (keyed by verb: GREETING, EHLO, MAIL, RCPT,
    DATA, EOM)."""
    overrides = overrides or {}

    def script(line: str | None) -> bytes:
        verb = "GREETING" if line is None else "EOM" if line == "<EOM>" else line.split(" ", 1)[0].split(":")[0].upper()
        if verb in overrides:
            return overrides[verb]
        return {"GREETING": b"220 raw.test ESMTP\r\n", "EHLO": b"250-raw.test\r\n250 8BITMIME\r\n",
                "HELO": b"250 raw.test\r\n", "DATA": b"354 go ahead\r\n", "QUIT": b"221 bye\r\n"}.get(verb, b"250 ok\r\n")
    return script


# -- configs and tables built in code --------------------------------------------------------------------------
@dataclass
class MemoryTables:
    """Inline tables by name, answering the contract's lookup() and fetch() (round-robin)."""

    maps: dict[str, dict[str, str]] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    _cursor: dict[str, int] = field(default_factory=dict)

    def lookup(self, name: str, service: Service, key: str) -> str | None:
        if name in self.broken:
            raise TableError(f"table {name} is broken")
        return self.maps.get(name, {}).get(key.lower())

    def match(self, name: str, service: Service, candidate: str) -> bool:
        return candidate in self.lists.get(name, [])

    def fetch(self, name: str, service: Service) -> str | None:
        if name in self.broken:
            raise TableError(f"table {name} is broken")
        items = self.lists.get(name, [])
        if not items:
            return None
        index = self._cursor.get(name, 0)
        self._cursor[name] = index + 1
        return items[index % len(items)]


def relay_config(relay: Relay, *, pkis: dict[str, Pki] | None = None, cas: dict[str, Ca] | None = None,
                 name: str = "relay") -> Config:
    return Config(path="<test>", actions={name: Action(name, Method.RELAY, relay=relay)},
                  pkis=pkis or {}, cas=cas or {})


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- real OpenSMTPD as a receiver --------------------------------------------------------------------------------
OPENSMTPD = "/usr/sbin/smtpd"
OPENSMTPD_LOCK = "/run/lock/pysmtpd-tests-opensmtpd.lock"  # held by the test whose OpenSMTPD runs (see OpenSmtpd)


# OpenSMTPD looks up every client's reverse name before its banner, through the servers of /etc/resolv.conf (it
# has no resolver setting of its own). It runs in a mount namespace of its own, where /etc/resolv.conf reads
# /etc/hosts first and names only loopback: no query leaves the machine. On the CI VM the machine's resolver
# dropped some queries, and each drop held a client's banner for 5 s.
LOCAL_RESOLV_CONF = "lookup file bind\nnameserver 127.0.0.1\n"


def opensmtpd_command(arguments: list[str], workdir: str) -> list[str]:
    """The command line running OpenSMTPD with ``arguments`` and the loopback-only resolv.conf (written into
    ``workdir``). unshare and sh each exec the next program: the process started is OpenSMTPD itself."""
    resolv_conf = os.path.join(workdir, "resolv.conf")
    with open(resolv_conf, "w", encoding="utf-8") as handle:
        handle.write(LOCAL_RESOLV_CONF)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf, OPENSMTPD, *arguments]


class OpenSmtpd:
    """The installed OpenSMTPD on a loopback port with the given config text (it uses the system spool and control
    socket, so only one can run at a time: start() waits while another one holds them)."""

    def __init__(self, workdir: str, config_text: str, port: int, args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.args = args
        self.port = port
        self.config_path = os.path.join(workdir, "opensmtpd.conf")
        self.log_path = os.path.join(workdir, "opensmtpd.log")
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    def __enter__(self) -> OpenSmtpd:
        self._take_the_machines_opensmtpd()
        try:
            return self._start()
        except BaseException:
            self._release()
            raise

    def _take_the_machines_opensmtpd(self) -> None:
        """Wait for the other tests' OpenSMTPD to end, across pytest-xdist's worker processes: two started in the
        same instant could both find the control socket free and share the spool."""
        import fcntl
        import time
        self._lock = open(OPENSMTPD_LOCK, "a")  # noqa: SIM115 — held until __exit__
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    raise RuntimeError("another test held OpenSMTPD for over 600 s") from None
                time.sleep(0.1)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # (closing releases the flock)
            self._lock = None

    def _start(self) -> OpenSmtpd:
        import time
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            log = open(self.log_path, "wb")  # noqa: SIM115 — handed to the child
            self.process = subprocess.Popen(opensmtpd_command(["-d", *self.args, "-f", self.config_path],
                                                              self.workdir), stdout=log, stderr=subprocess.STDOUT)
            log.close()
            while self.process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
                time.sleep(0.1)
            if self.process.poll() is None:  # (running, but not on self.port: a config naming another port)
                self.__exit__()
                break
            if "control socket already listening" not in self.log():
                break
            # Another OpenSMTPD (someone else's run) holds /var/run/smtpd.sock: wait for it to finish.
            time.sleep(1)
        raise RuntimeError(f"OpenSMTPD did not start:\n{self.log()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                os.kill(self.process.pid, 15)
                try:
                    self.process.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(self.process.pid, 9)
                    self.process.wait(5)
        finally:
            self._release()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


def maildir_messages(maildir: str) -> list[Any]:
    folder = os.path.join(maildir, "new")
    if not os.path.isdir(folder):
        return []
    messages = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            messages.append(message_from_bytes(handle.read()))
    return messages


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- our daemon as a process ------------------------------------------------------------------------------------
class Daemon(SmtpdProcess):
    """`python -m smtpd -d` on a private spool, socket and mailname under workdir, ready when its control socket
    answers and smtp_port accepts; stopped by pid (tests/daemon.py's SmtpdProcess, called as the relay tests do)."""

    def __init__(self, workdir: str, config_text: str, mailname: str, smtp_port: int,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, config_text, mailname=mailname, env=env, args=args, port=smtp_port)
        self.smtp_port = smtp_port
