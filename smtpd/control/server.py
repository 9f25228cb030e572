"""The control socket: newline-delimited JSON requests from smtpctl, answered by the registered handlers.

Authorisation is by the peer's credentials (SO_PEERCRED), not by the socket's mode, which is 0666 as in
OpenSMTPD so that sendmail can enqueue as any user. Each connection is served by its own task; a request line
that is malformed, longer than MAX_REQUEST_BYTES or slower than REQUEST_TIMEOUT gets an error reply and ends
that connection only. Reading is bounded by the stream's limit, so no client can make the daemon buffer more
than one request's worth of bytes or block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.numbers import ascii_digits
from shared.protocol import (
    COMMANDS,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    CommandSpec,
    ErrorCode,
    Privilege,
    ProtocolError,
    decode_request,
    encode,
    error_reply,
    event_message,
    ok_reply,
)
from smtpd import log, trace
from smtpd.control.registry import HANDLERS, STREAM_HANDLERS, ControlFailure
from smtpd.stats import STATS

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

LOG = log.get("control")

ENV_CONTROL_GROUP = "SMTPD_CONTROL_GROUP"
ENV_CONTROL_TIMEOUT = "SMTPD_CONTROL_TIMEOUT"
# A client has this long to send one complete request line; a slower one is cut off (slowloris).
REQUEST_TIMEOUT = 10.0
# Connections one uid may hold open at once (root included: a runaway script must not exhaust the daemon).
MAX_CONNECTIONS_PER_UID = 32
SOCKET_MODE = 0o666
STREAM_SEND_BUFFER = 16384  # bytes queued towards a streaming client (trace.follow, monitor) before waiting
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # (Linux's number; Python does not name it)
_MAX_PEER_GROUPS = 256  # (getsockopt takes at most 1024 bytes: a peer in more groups falls back to /proc)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    # The supplementary groups the kernel recorded when the peer connected (SO_PEERGROUPS), None if unknown.
    connect_groups: frozenset[int] | None = None

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def describe(self) -> str:
        return f"uid={self.uid} ({self.user}) pid={self.pid}"

    def groups(self) -> set[int]:
        """The peer's primary and supplementary groups: the kernel's record of them at connect time; without
        one, those of the process with the peer's pid if it still runs as the peer's uid (a pid is reused once
        its process ends: another user's process must not lend its groups), else the group file's."""
        groups = {self.gid}
        if self.connect_groups is not None:
            return groups | self.connect_groups
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            if int(fields["Uid"].split()[1]) == self.uid:  # the effective uid, as SO_PEERCRED's
                groups.update(int(gid) for gid in fields["Groups"].split())
                return groups
        except (OSError, ValueError, KeyError, IndexError):
            pass
        user = self.user
        groups.update(entry.gr_gid for entry in grp.getgrall() if user in entry.gr_mem)
        return groups


def peer_credentials(sock: socket.socket) -> Peer:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return Peer(*_PEERCRED.unpack(data), connect_groups=_peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """SO_PEERGROUPS (Linux 4.13): the groups the peer had when it connected, None where there is no such option."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_PEER_GROUPS * 4)
    except OSError:
        return None
    return frozenset(struct.unpack(f"{len(data) // 4}I", data[:len(data) // 4 * 4]))


def control_group_id(name: str | None) -> int | None:
    """The gid of the configured read-only group (a name or a number), None when unset or unknown."""
    if not name:
        return None
    if ascii_digits(name):
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        LOG.warning("control group %r does not exist; read-only access stays with root", name)
        return None


class Authoriser:
    """Who may run what: WRITE needs root or the daemon's uid; READ also the control group; OPEN anyone."""

    def __init__(self, group: str | None) -> None:
        self.group_name = group
        self.group_id = control_group_id(group)
        self.own_uid = os.geteuid()

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in (0, self.own_uid)

    def refusal(self, peer: Peer, spec: CommandSpec) -> str | None:
        """None when allowed, else the message telling the peer why not."""
        if spec.privilege is Privilege.OPEN or self.is_admin(peer):
            return None
        if spec.privilege is Privilege.READ and self.group_id is not None and self.group_id in peer.groups():
            return None
        if spec.privilege is Privilege.READ and self.group_name:
            return f"need root privileges or membership of group {self.group_name} for {spec.name}"
        return f"need root privileges for {spec.name}"


class ControlServer:
    def __init__(self, daemon: Daemon, socket_path: str, group: str | None = None) -> None:
        self.daemon = daemon
        self.socket_path = socket_path
        self.authoriser = Authoriser(group)
        self.server: asyncio.AbstractServer | None = None
        self.socket_inode: int | None = None  # of the socket file we created, once listening
        self.connections_by_uid: Counter[int] = Counter()
        self.tasks: set[asyncio.Task[Any]] = set()
        # SMTPD_CONTROL_TIMEOUT overrides the request timeout (tests shorten it; see docs/control-api.md).
        self.request_timeout = _timeout_from_environment()

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        if _socket_is_live(self.socket_path):
            raise RuntimeError("control socket already listening")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            self.server = await asyncio.start_unix_server(
                self._accept, path=self.socket_path, limit=MAX_REQUEST_BYTES + 1)
            os.chmod(self.socket_path, SOCKET_MODE)
        except OSError as error:  # the start fails with one line that names the path (not a bare errno)
            raise RuntimeError(f"control socket {self.socket_path}: {error.strerror or error}") from error
        self.socket_inode = os.stat(self.socket_path).st_ino
        LOG.debug("control socket listening on %s", self.socket_path)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        # Remove the socket only if it is still ours: a daemon that failed to start (e.g. another one is
        # running) must not delete the running daemon's socket.
        with contextlib.suppress(OSError):
            if self.socket_inode is not None and os.stat(self.socket_path).st_ino == self.socket_inode:
                os.unlink(self.socket_path)
        self.socket_inode = None

    # -- connections ----------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's task for one connection. It never ends cancelled: start_unix_server asks the finished task
        for its exception(), which (Python 3.12.1) raises for a cancelled task, and asyncio logged that with a
        traceback at every stop that found a client connected (a `smtpctl monitor`, a `trace --follow`)."""
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:  # stop() cancels the connections: the daemon is going, end quietly
            writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        if self.connections_by_uid[peer.uid] >= MAX_CONNECTIONS_PER_UID:
            await self._send_quietly(writer, error_reply(
                None, ErrorCode.BUSY, f"too many control connections for uid {peer.uid}"))
            await _close(writer)
            if task is not None:
                self.tasks.discard(task)
            return
        self.connections_by_uid[peer.uid] += 1
        STATS.increment("control.session")
        _trace_io(writer, f"control connection opened by {peer.describe()}", uid=peer.uid, pid=peer.pid)
        handed_off = False
        try:
            handed_off = await self._serve(peer, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 — a bug in one handler must not take the daemon down
            LOG.exception("control connection of %s failed", peer.describe())
        finally:
            STATS.decrement("control.session")
            self.connections_by_uid[peer.uid] -= 1
            if self.connections_by_uid[peer.uid] <= 0:
                del self.connections_by_uid[peer.uid]
            if not handed_off:
                await _close(writer)
            _trace_io(writer, "control connection " + ("handed to SMTP" if handed_off else "closed"), uid=peer.uid)
            if task is not None:
                self.tasks.discard(task)

    async def _serve(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer requests until the client leaves or errs. True when the stream was handed to SMTP."""
        while True:
            line = await self._read_request(reader, writer)
            if line is None:
                _trace_io(writer, "EOF or bad request", uid=peer.uid)
                return False
            _trace_io(writer, f"read {len(line)} bytes", uid=peer.uid, size=len(line))
            try:
                request_id, spec, args = decode_request(line)
            except ProtocolError as error:
                await self._send_quietly(writer, error_reply(_guess_id(line), error.code, error.message))
                return False
            trace.emit("imsg", f"control -> daemon: {spec.name} from uid {peer.uid}", command=spec.name,
                       uid=peer.uid, pid=peer.pid, connection=_connection_token(writer))
            refusal = self.authoriser.refusal(peer, spec)
            if refusal is not None:
                LOG.warning("control: %s refused %s: %s", peer.describe(), spec.name, refusal)
                try:
                    # As for any reply: a client that sends refused requests and never reads is not kept forever.
                    await asyncio.wait_for(self._send(writer, error_reply(request_id, ErrorCode.FORBIDDEN, refusal)),
                                           self.request_timeout)
                except TimeoutError:
                    return False
                continue
            if spec.name == "enqueue":
                return await self._enqueue(peer, request_id, reader, writer)
            if spec.streams:
                await self._stream(peer, spec, request_id, args, reader, writer)
                return False
            reply = await self._call(peer, spec, request_id, args)
            if trace.wants("io"):
                with contextlib.suppress(TypeError, ValueError):  # _send reports what cannot be encoded
                    size = len(encode(reply))
                    _trace_io(writer, f"write {size} bytes", uid=peer.uid, size=size)
            try:
                # A client that sends requests but never reads the answers must not hold its task forever.
                await asyncio.wait_for(self._send(writer, reply), self.request_timeout)
            except TimeoutError:
                return False
            if spec.name == "stop":
                return False

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        try:
            return await asyncio.wait_for(reader.readuntil(b"\n"), self.request_timeout)
        except asyncio.IncompleteReadError as error:
            if error.partial.strip():
                await self._send_quietly(writer, error_reply(None, ErrorCode.BAD_REQUEST,
                                                             "request not terminated by a newline"))
            return None
        except asyncio.LimitOverrunError:
            await self._send_quietly(writer, error_reply(
                None, ErrorCode.TOO_LARGE, f"request longer than {MAX_REQUEST_BYTES} bytes"))
            return None
        except TimeoutError:
            await self._send_quietly(writer, error_reply(
                None, ErrorCode.TIMEOUT, f"no complete request within {self.request_timeout:g} seconds"))
            return None

    async def _call(self, peer: Peer, spec: CommandSpec, request_id: Any, args: dict[str, Any]) -> dict[str, Any]:
        if spec.changes_state:
            LOG.info("control: %s ran %s%s", peer.describe(), spec.name, _describe_args(args))
        if spec.name == "hello":
            return ok_reply(request_id, self.hello(peer))
        handler = HANDLERS.get(spec.name)
        if handler is None:
            return error_reply(request_id, ErrorCode.UNKNOWN_COMMAND, f"{spec.name} is not available")
        try:
            result = await handler(self.daemon, {**args, "_peer": peer})
        except ControlFailure as failure:
            return error_reply(request_id, failure.code, failure.message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — reported to the client, logged for the operator
            LOG.exception("control command %s failed", spec.name)
            return error_reply(request_id, ErrorCode.FAILED, f"internal error: {error}")
        return ok_reply(request_id, result)

    def hello(self, peer: Peer) -> dict[str, Any]:
        from smtpd.daemon import VERSION

        allowed = [name for name, spec in COMMANDS.items() if self.authoriser.refusal(peer, spec) is None]
        return {"version": VERSION, "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "uid": peer.uid,
                "commands": allowed, "traces": sorted(trace.BUS.enabled)}

    async def _stream(self, peer: Peer, spec: CommandSpec, request_id: Any, args: dict[str, Any],
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run a streaming handler until it ends or the client goes away (EOF or any further byte)."""
        handler = STREAM_HANDLERS.get(spec.name)
        if handler is None:
            await self._send(writer, error_reply(request_id, ErrorCode.UNKNOWN_COMMAND,
                                                 f"{spec.name} is not available"))
            return
        if spec.changes_state:
            LOG.info("control: %s ran %s%s", peer.describe(), spec.name, _describe_args(args))

        _limit_buffering(writer)

        async def send(event: dict[str, Any]) -> None:
            writer.write(encode(event_message(request_id, event)))
            await writer.drain()

        work = asyncio.ensure_future(handler(self.daemon, {**args, "_peer": peer}, send))
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not work.done():
                work.cancel()
            results = await asyncio.gather(work, hangup, return_exceptions=True)
        outcome = results[0]
        if isinstance(outcome, asyncio.CancelledError):
            return  # the client left; nobody to answer
        if isinstance(outcome, ControlFailure):
            reply = error_reply(request_id, outcome.code, outcome.message)
        elif isinstance(outcome, BaseException):
            LOG.error("control stream %s failed: %s", spec.name, outcome)
            reply = error_reply(request_id, ErrorCode.FAILED, f"internal error: {outcome}")
        else:
            reply = ok_reply(request_id, outcome)
        await self._send_quietly(writer, reply)

    async def _enqueue(self, peer: Peer, request_id: Any, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        smtp = self.daemon.smtp
        if smtp is None or not hasattr(smtp, "serve_local"):
            await self._send(writer, error_reply(request_id, ErrorCode.FAILED, "the SMTP server is not running"))
            return False
        if self.daemon.is_paused("smtp"):
            await self._send(writer, error_reply(request_id, ErrorCode.FAILED,
                                                 "server disallowed submission request"))
            return False
        await self._send(writer, ok_reply(request_id, {"uid": peer.uid}))
        await smtp.serve_local(reader, writer, peer.uid)
        return True

    # -- writing --------------------------------------------------------------------------------------
    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        try:
            data = encode(message)
        except (TypeError, ValueError) as error:  # a handler returned something JSON cannot carry
            LOG.error("control: cannot encode a reply: %s", error)
            data = encode(error_reply(message.get("id"), ErrorCode.FAILED, f"internal error: {error}"))
        writer.write(data)
        await writer.drain()

    async def _send_quietly(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(self._send(writer, message), self.request_timeout)


def _connection_token(writer: asyncio.StreamWriter) -> str:
    return f"control-{id(writer):x}"


def _trace_io(writer: asyncio.StreamWriter, text: str, **fields: Any) -> None:
    # Only request/reply traffic: the events a follower's own stream carries are never traced (no feedback loop).
    if trace.wants("io"):
        token = _connection_token(writer)
        trace.emit("io", f"{token}: {text}", connection=token, **fields)


def _timeout_from_environment() -> float:
    try:
        value = float(os.environ.get(ENV_CONTROL_TIMEOUT, REQUEST_TIMEOUT))
    except ValueError:
        return REQUEST_TIMEOUT
    return value if value > 0 else REQUEST_TIMEOUT


def _limit_buffering(writer: asyncio.StreamWriter) -> None:
    """Keep little in flight to a stream's reader, so a slow one is noticed (and loses events, counted) soon
    rather than after megabytes of kernel and transport buffers."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
    with contextlib.suppress(AttributeError):
        writer.transport.set_write_buffer_limits(high=STREAM_SEND_BUFFER)


def _describe_args(args: dict[str, Any]) -> str:
    shown = {key: value for key, value in args.items() if not key.startswith("_")}
    if not shown:
        return ""
    def text(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    return " " + " ".join(f"{key}={text(value)}" for key, value in sorted(shown.items()))


def _guess_id(line: bytes) -> Any:
    """The id of a request that failed validation, when it can be read, so the client can match the reply."""
    import json

    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    try:
        encode({"id": request_id})
        json.dumps(request_id, allow_nan=False)  # NaN or Infinity (the request's own fault) is no JSON to echo
    except (TypeError, ValueError):  # e.g. a lone surrogate: the reply could not carry it
        return None
    return request_id


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except TimeoutError:
        # close() waits for unsent data; a client that does not read would keep the socket open forever.
        writer.transport.abort()
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass


def _socket_is_live(path: str) -> bool:
    """True when a daemon already listens on this socket (a stale file is not live)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # With a timeout the connect does not wait when the listener's backlog is full (a hung or swamped daemon):
    # it fails at once with EAGAIN, and that listener is alive. A blocking connect waited for it forever.
    probe.settimeout(5)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return True
