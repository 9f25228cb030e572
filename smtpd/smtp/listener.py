"""The SMTP server component: listening sockets, the accept loops, pause and resume, local enqueue.

Every `listen on` becomes one bound socket per address (interface names, literals and host names resolved as
the reference orders them). Accepting runs as one task per socket; pausing (`smtpctl pause smtp`, `smtpd -P
smtp`) cancels those tasks and keeps the sockets bound and listening, so clients wait in the kernel backlog
until resume, as OpenSMTPD does. Sessions in progress are not touched by pause, resume or reload.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import resource
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.paths import parse_resolver_setting
from smtpd import log, trace
from smtpd.config.model import Config, Listener, TlsMode, without_locations
from smtpd.lookup.tables import asked_off_the_loop
from smtpd.lookup.tables.base import Service, TableError
from smtpd.smtp import proxy_header, replies, tls
from smtpd.smtp.address import valid_domain
from smtpd.smtp.connection import SocketConnection, StreamConnection
from smtpd.smtp.session import Session, SessionLimits, local_user_name, sessions_open_files_allow

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

# The accept queue (the kernel caps it at net.core.somaxconn). With 128, a burst of 1,200 connections overflowed it
# while the accept loop started sessions: the kernel then dropped the clients' final ACKs (with SYN cookies the
# clients believed themselves connected) and ~700 of them waited for a banner that never came.
BACKLOG = 4096
_log = log.get("smtp")


class ListenError(Exception):
    pass


@dataclass
class Endpoint:
    """One bound address of one listener, with what its sessions need."""

    listener: Listener
    address: str  # the bound address, or "local" for the socket listener
    port: int
    ssl_context: ssl.SSLContext | None
    smtpname: str

    @property
    def token(self) -> str:
        return f"{id(self):x}"


@dataclass
class _Bound:
    sock: socket.socket
    endpoint: Endpoint
    task: asyncio.Task[None] | None = None
    waiting: asyncio.Future[None] | None = None  # the accept loop's wait for readability (its reader's owner)


async def _accept(loop: asyncio.AbstractEventLoop, bound: _Bound) -> socket.socket:
    """The next connection of bound's socket. Unlike loop.sock_accept, whose reader callback accepts even when
    the waiting task was cancelled meanwhile (the connection is then closed unseen), a cancellation here
    leaves the connection in the backlog for the next accept loop."""
    while True:
        try:
            connection, _ = bound.sock.accept()
        except (BlockingIOError, InterruptedError):
            pass
        else:
            connection.setblocking(False)
            return connection
        ready: asyncio.Future[None] = loop.create_future()
        descriptor = bound.sock.fileno()
        bound.waiting = ready
        loop.add_reader(descriptor, _wake, ready)
        try:
            await ready
        finally:
            if bound.waiting is ready:  # (a newer loop on the same socket may own the reader by now)
                bound.waiting = None
                loop.remove_reader(descriptor)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class SmtpServer:
    """daemon.smtp."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.limits = SessionLimits.from_environment()
        if self.limits.max_sessions == sessions_open_files_allow():  # (the open-files limit is what bounds it)
            _log.info("smtp: at most %d sessions at once, as the open-files limit (%d) allows",
                      self.limits.max_sessions, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.bound: list[_Bound] = []
        self.sessions: set[asyncio.Task[None]] = set()
        self.active = 0
        self._config: Config | None = None
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._config = self.daemon.config
        self.bound = await self._bound_for(self.daemon.config)
        self.daemon.pause_listeners.append(self._on_pause)
        if not self.daemon.is_paused("smtp"):
            self._start_accepting()

    async def stop(self) -> None:
        self._stopped = True
        self._stop_accepting()
        for bound in self.bound:
            bound.sock.close()
        self.bound = []
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=10)

    async def reconfigure(self, old: Config, new: Config) -> list[str]:
        """New sessions use the new config; listeners are rebound only when they changed.

        The TLS contexts are built again at every reload, even when the config text is the same: a renewed
        certificate is usually written over the old file (certbot, acme.sh), and the reload that follows must
        make new sessions present it. A certificate or key that does not load fails the reload (the old
        contexts stay in use).
        """
        fresh = await self._bound_for(new, reuse=self.bound)
        if self._stopped:  # (the daemon stopped while the tables were asked: nothing to listen on any more)
            for bound in fresh:
                bound.sock.close()
            return []
        # Compared without their places in the file: a line added above a listener does not change it.
        unchanged = all(without_locations(getattr(old, part)) == without_locations(getattr(new, part))
                        for part in ("listeners", "pkis", "cas"))
        if unchanged and [bound.sock for bound in fresh] == [bound.sock for bound in self.bound]:
            # The same sockets: the accept loops stay, their endpoints (contexts, host names) are replaced.
            for bound, refreshed in zip(self.bound, fresh, strict=True):
                bound.endpoint = refreshed.endpoint
            return []
        kept = {id(bound.sock) for bound in fresh}
        paused = self.daemon.is_paused("smtp")
        self._stop_accepting()
        for bound in self.bound:
            if id(bound.sock) not in kept:
                bound.sock.close()
        self.bound = fresh
        if not paused:
            self._start_accepting()
        return [f"smtp: listening on {len(fresh)} address(es)"]

    # -- binding --------------------------------------------------------------------------------------------
    async def _bound_for(self, config: Config, reuse: list[_Bound] | None = None) -> list[_Bound]:
        # A `hostnames <t>` table is asked for each address (_smtpname): off the event loop when its lookups may
        # wait for a server (a socketmap, redis or ldap server that hangs kept the daemon from greeting anyone for
        # that table's timeout).
        return await asked_off_the_loop(self.daemon.tables, self._bind_all, config, reuse)

    def _bind_all(self, config: Config, reuse: list[_Bound] | None = None) -> list[_Bound]:
        previous = {(bound.endpoint.address, bound.endpoint.port): bound for bound in reuse or []}
        result: list[_Bound] = []
        try:
            for listener in config.listeners:
                if not listener.is_socket:
                    self._bind_listener(config, listener, previous, result)
        except BaseException:
            for bound in result:
                if all(bound.sock is not old.sock for old in reuse or []):
                    bound.sock.close()
            raise
        return result

    def _bind_listener(self, config: Config, listener: Listener, previous: dict[tuple[str, int], _Bound],
                       result: list[_Bound]) -> None:
        """Add the sockets of one `listen on` line to ``result`` (kept ones taken out of ``previous``). An error
        names the line: at a reload, the port taken or the pki file unreadable is in the new file."""
        try:
            context = self._context(config, listener)
            addresses = _resolve(listener)
            if not addresses:
                raise ListenError(f"invalid virtual ip or interface: {listener.interface}")
            for address in addresses:
                endpoint = Endpoint(listener, address, listener.port, context, self._smtpname(listener, address))
                old = previous.pop((address, listener.port), None)
                sock = old.sock if old is not None else _listening_socket(address, listener.port)
                result.append(_Bound(sock, endpoint))
        except ListenError as error:
            if listener.location is None:
                raise
            raise ListenError(f"{listener.location}: {error}") from None

    def _context(self, config: Config, listener: Listener) -> ssl.SSLContext | None:
        try:
            return tls.server_context(config, listener, self.daemon.mailname)
        except tls.TlsSetupError as error:
            raise ListenError(str(error)) from None

    def _smtpname(self, listener: Listener, address: str) -> str:
        # A `hostnames` entry for the address comes first, then `hostname`, then the mailname: as OpenSMTPD, where
        # the entry replaces the listener's name (it was the other way round, and `hostname` hid the table).
        if listener.hostnames_table and self.daemon.tables is not None:
            try:
                name = self.daemon.tables.lookup(listener.hostnames_table, Service.ADDRNAME, address.split("%")[0])
            except TableError:
                name = None
            if name:
                return name
        return listener.hostname or self.daemon.mailname

    # -- accepting ------------------------------------------------------------------------------------------
    def _start_accepting(self) -> None:
        for bound in self.bound:
            if bound.task is None:
                bound.task = asyncio.create_task(self._accept_loop(bound), name=f"smtp-accept-{bound.endpoint.port}")

    def _stop_accepting(self) -> None:
        for bound in self.bound:
            if bound.task is not None:
                bound.task.cancel()
                bound.task = None
            if bound.waiting is not None:  # no reader left behind on a socket that may be closed right after
                asyncio.get_running_loop().remove_reader(bound.sock.fileno())
                bound.waiting = None

    def _on_pause(self, daemon: Any, subsystem: str, paused: bool) -> None:
        if subsystem != "smtp":
            return
        if paused:
            self._stop_accepting()
        else:
            self._start_accepting()

    async def _accept_loop(self, bound: _Bound) -> None:
        """Accept until cancelled (pause, reload, stop). A cancellation may come at any moment: it must never
        fall between the accept and the session's start, or the client is taken from the backlog and dropped
        without a word. So the accept is made only once the task runs again after the socket is readable, and
        the hand-off of an accepted connection is shielded."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection = await _accept(loop, bound)
            except OSError as error:  # EMFILE and friends: wait a little rather than spin
                _log.warning("smtp: accept failed: %s", error)
                await asyncio.sleep(1)
                continue
            if bound.endpoint.listener.proxy_v2:
                if self.active >= self.limits.max_sessions:
                    # Refused before its header is waited for: connections that never send one would otherwise
                    # each hold a descriptor for the whole timeout, past the limit that keeps descriptors free.
                    _refuse_proxied(connection, bound.endpoint)
                    continue
                # The header is read in the connection's own task (a slow client must not stop accepting);
                # it counts as a session from now on, so that header-less floods meet the session limit.
                self._track(self._serve_proxied(connection, bound.endpoint))
                continue
            await asyncio.shield(self._hand_off(connection, bound.endpoint))

    async def _hand_off(self, connection: socket.socket, endpoint: Endpoint) -> None:
        try:
            await self._serve_connection(connection, endpoint)
        except OSError:
            connection.close()

    async def _serve_connection(self, connection: socket.socket, endpoint: Endpoint,
                                proxy: Any = None) -> Session:
        loop = asyncio.get_running_loop()
        smtps = endpoint.listener.tls is TlsMode.SMTPS
        sessions: list[Session] = []
        # Replies must leave at once: with Nagle's algorithm a reply written while the previous one is not yet
        # acknowledged waits for that ACK, which a client waiting for replies delays (40 ms on Linux): before
        # replies to pipelined commands were sent together, a pipelining client met that wait at every
        # transaction; a group that comes in two segments still gets its replies in two. (asyncio sets this
        # only on sockets made with proto IPPROTO_TCP; ours are made with proto 0.)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def connected(pipe: SocketConnection) -> None:
            if smtps:
                # Called before the transport starts reading: the client's handshake stays in the socket for
                # the TLS layer (bytes read into our buffer would be lost to it).
                pipe.pause_reading()
            session = Session(self, endpoint, pipe)
            sessions.append(session)
            if proxy is None:
                self._track(session.run(smtps=smtps))

        await loop.connect_accepted_socket(lambda: SocketConnection(connected), connection)
        return sessions[0]

    async def _serve_proxied(self, connection: socket.socket, endpoint: Endpoint) -> None:
        """A proxy-v2 listener's connection: the PROXY header is read from the socket to its last byte and no
        further, so what follows it (an SMTPS client's TLS handshake, often in the same packet) is left for
        the session."""
        try:  # who sends it (the proxy, or whoever else reaches the listener): named when the header is bad
            sender = _address_text(connection.getpeername()[0])
        except OSError:  # (gone already)
            connection.close()
            return
        try:
            async with asyncio.timeout(self.limits.timeout):
                proxy = await proxy_header.read(connection)
        except (OSError, TimeoutError, proxy_header.ProxyHeaderError) as error:
            why = f"bad PROXY header from {sender}: {error or 'timeout'}"
            trace.emit("smtp", f"connection dropped: {why}")
            _log.info("smtp: connection dropped: %s", why)
            connection.close()
            return
        try:
            session = await self._serve_connection(connection, endpoint, proxy)
        except OSError:
            connection.close()
            return
        await session.run(proxy=proxy, smtps=endpoint.listener.tls is TlsMode.SMTPS)

    def _track(self, coroutine: Any) -> None:
        self.active += 1
        task = asyncio.get_running_loop().create_task(coroutine)
        self.sessions.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self.sessions.discard(finished)
            self.active -= 1

        task.add_done_callback(done)

    # -- local enqueue ----------------------------------------------------------------------------------------
    async def serve_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, uid: int) -> None:
        """One SMTP session over an existing stream (sendmail through the control socket)."""
        listener = next((item for item in self.daemon.config.listeners if item.is_socket), Listener("socket"))
        name = listener.hostname or self.daemon.mailname
        if self.daemon.is_paused("smtp"):
            writer.write(replies.local_enqueue_paused().wire())
            await writer.drain()
            return
        endpoint = Endpoint(listener, "local", 0, None, name)
        session = Session(self, endpoint, StreamConnection(reader, writer), local_user=local_user_name(uid))
        self.active += 1
        try:
            await session.run()
        finally:
            self.active -= 1

    # -- reverse DNS -------------------------------------------------------------------------------------------
    async def reverse_name(self, ip: str) -> str | None:
        name, _ = await self._reverse(ip)
        return name

    async def client_names(self, ip: str) -> tuple[str | None, str]:
        """The client's reverse name and its FCrDNS status: "pass" when the name resolves back to ``ip``,
        "fail" when there is no name or it does not, "error" when a lookup failed temporarily (OpenSMTPD's
        report values)."""
        name, reverse_status = await self._reverse(ip)
        if name is None:
            status = reverse_status
        else:
            status = await self._forward_confirm(name, ip)
        return name, status

    async def _reverse(self, ip: str) -> tuple[str | None, str]:
        resolver_address = os.environ.get("SMTPD_RESOLVER")
        try:
            if resolver_address:
                name = await asyncio.wait_for(_reverse_with_dnspython(ip, resolver_address), 10)
            else:
                loop = asyncio.get_running_loop()
                host, _ = await asyncio.wait_for(loop.getnameinfo((ip, 0), socket.NI_NAMEREQD), 10)
                name = str(host)
        except Exception as error:  # noqa: BLE001 — OSError, timeouts, dnspython's NXDOMAIN/NoAnswer/...
            trace.emit("smtp", f"no reverse name for {ip}: {error}", address=ip)
            return None, "error" if _temporary_dns_error(error) else "fail"
        if name is not None and (name.startswith("[") or not valid_domain(name)):
            # The PTR record is the client's owner's to write: a name that is no host name (a `|` would shift a
            # filter report's fields, a space or parenthesis the Received line's) is no name, as libc's resolver
            # refuses it (res_hnok) when the system resolver is asked.
            trace.emit("smtp", f"no reverse name for {ip}: {name!r} is not a host name", address=ip)
            return None, "fail"
        if name is not None and _reads_as_address(name):
            # A PTR record saying "10.0.0.8" names no host: it would put a made-up address in the Received line
            # beside the real one and satisfy `rdns` checks. Postfix counts it as unknown ("numeric hostname"),
            # and OpenSMTPD's filters' rdns check does too.
            trace.emit("smtp", f"no reverse name for {ip}: {name!r} is an address", address=ip)
            return None, "fail"
        return name, "fail"

    async def _forward_confirm(self, name: str, ip: str) -> str:
        """Whether ``name`` resolves to ``ip``. Only the client's own family is asked (A for an IPv4 client, AAAA
        for IPv6), as OpenSMTPD 6.8 does: a name server that fails AAAA questions (still common) must not turn an
        IPv4 client's confirmed name into "error", nor is the other family's answer of any use."""
        resolver_address = os.environ.get("SMTPD_RESOLVER")
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            if resolver_address:
                addresses = await asyncio.wait_for(
                    _addresses_with_dnspython(name, "AAAA" if family == socket.AF_INET6 else "A", resolver_address),
                    10)
            else:
                loop = asyncio.get_running_loop()
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM), 10)
                addresses = [str(info[4][0]) for info in infos]
        except Exception as error:  # noqa: BLE001 — as in _reverse
            trace.emit("smtp", f"no address for {name}: {error}", address=ip)
            return "error" if _temporary_dns_error(error) else "fail"
        return "pass" if any(_same_address(found, ip) for found in addresses) else "fail"


def _refuse_proxied(connection: socket.socket, endpoint: Endpoint) -> None:
    """A proxy-v2 connection beyond the session limit: the client behind the proxy is told, as a direct one is (an
    SMTPS one cannot read plaintext), without waiting for the header, then the connection is closed."""
    try:
        sender = _address_text(connection.getpeername()[0])
    except OSError:
        sender = "a client gone already"
    _log.info("smtp: connection from %s refused before its PROXY header: too many sessions", sender)
    try:
        connection.recv(65536)  # what came already (the header): unread input would make close() a reset
    except OSError:
        pass
    if endpoint.listener.tls is not TlsMode.SMTPS:
        try:
            connection.send(replies.too_many_sessions(endpoint.smtpname).wire())
        except OSError:
            pass
    connection.close()


def _address_text(address: str) -> str:
    """An address as the session lines write it: `127.0.0.1`, `[::1]` (without a link-local zone)."""
    address = str(address).split("%")[0]
    return f"[{address}]" if ":" in address else address


def _resolve(listener: Listener) -> list[str]:
    """The addresses the parser resolved, else resolve now (configs built by hand)."""
    resolved = getattr(listener, "addresses", ())
    if resolved:
        return list(resolved)
    from smtpd.config.interfaces import resolve_listen_target

    return resolve_listen_target(listener.interface, listener.family)


def _listening_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # getaddrinfo turns a link-local `fe80::1%eth0` into the scope id the kernel needs to bind it.
            sock.bind(socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4])
        else:
            sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {address} port {port}: {error.strerror}") from None
    return sock


def _resolver(resolver_address: str) -> Any:
    import dns.asyncresolver

    host, port = parse_resolver_setting(resolver_address)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    return resolver


async def _reverse_with_dnspython(ip: str, resolver_address: str) -> str | None:
    import dns.reversename

    answer = await _resolver(resolver_address).resolve(dns.reversename.from_address(ip), "PTR", lifetime=5)
    for record in answer:
        return str(record.target).rstrip(".")
    return None


async def _addresses_with_dnspython(name: str, rdtype: str, resolver_address: str) -> list[str]:
    answer = await _resolver(resolver_address).resolve(name, rdtype, lifetime=5)
    return [record.to_text() for record in answer]


def _reads_as_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_address(found: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(found.split("%")[0]) == ipaddress.ip_address(ip)
    except ValueError:
        return False


def _temporary_dns_error(error: BaseException) -> bool:
    """A lookup that may succeed later (timeout, SERVFAIL, EAI_AGAIN), as opposed to "there is no such name"."""
    if isinstance(error, TimeoutError):
        return True
    if isinstance(error, socket.gaierror):
        return error.errno == socket.EAI_AGAIN
    try:
        import dns.resolver
    except ImportError:  # pragma: no cover — dnspython is a dependency
        return False
    return isinstance(error, (dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout))
