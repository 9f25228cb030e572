"""Running a delivery as the recipient: a forked child that drops to the user's uid, gid and groups.

Mailbox writes go through ForkServer (the helper process of smtpd/mda/forkserver.py, which forks small
children). ``run_as`` forks the daemon itself and is kept for rare work that needs the daemon's code in the
child (replaying offline sendmail files at start). Either way the child resets signal
handling, starts a new session, sets its groups, gid and uid (in that order, so it cannot get root back),
changes to the user's home and only then touches the mailbox. The parent waits for the child without blocking the
event loop (a pidfd), with the reference's 300 s limit. Commands (mda, |pipes, wrappers) are started with
subprocess's own user/group switch instead.

When the daemon runs unprivileged it cannot switch users: deliveries run as the daemon's own user, in a thread.

Only plain os calls run between fork and the privilege drop: the child never takes a lock that another thread of
the daemon might have held at fork time (logging, imports).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpd import trace
from smtpd.mda.local import EX_CANTCREAT, EX_TEMPFAIL, LocalDeliveryError

CHILD_TIMEOUT = 300.0


@dataclass(frozen=True)
class Identity:
    """Who a delivery runs as, and with which home."""

    username: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...] = field(default=())

    @classmethod
    def for_user(cls, username: str, uid: int, gid: int, home: str) -> Identity:
        return cls(username, uid, gid, home, _groups_of(username, gid))

    @classmethod
    def from_passwd(cls, entry: pwd.struct_passwd) -> Identity:
        return cls.for_user(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @classmethod
    def current(cls) -> Identity:
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, entry.pw_uid, os.getegid(), entry.pw_dir, tuple(os.getgroups()))

    def with_group(self, gid: int | None) -> Identity:
        if gid is None or gid in self.groups:
            return self
        return Identity(self.username, self.uid, self.gid, self.home, (*self.groups, gid))


GROUPS_TTL = 5.0  # seconds a user's group list is reused (reading /etc/group for every message costs)
_groups_cache: dict[tuple[str, int], tuple[float, tuple[int, ...]]] = {}


def _groups_of(username: str, gid: int) -> tuple[int, ...]:
    """The user's supplementary groups; a change to /etc/group applies to deliveries within GROUPS_TTL."""
    now = time.monotonic()
    cached = _groups_cache.get((username, gid))
    if cached is not None and now - cached[0] < GROUPS_TTL:
        return cached[1]
    try:
        groups = tuple(os.getgrouplist(username, gid))
    except (KeyError, OSError):
        groups = (gid,)
    if len(_groups_cache) > 10_000:
        _groups_cache.clear()
    _groups_cache[(username, gid)] = (now, groups)
    return groups


def privileged() -> bool:
    """Whether this process may switch to other users (it runs as root)."""
    return os.geteuid() == 0


@dataclass(frozen=True)
class ChildResult:
    status: int  # the exit status, or -N when killed by signal N
    text: str  # the child's error text ("" on success)
    timed_out: bool = False


def drop_privileges(identity: Identity) -> None:
    os.setgroups(list(identity.groups) or [identity.gid])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if os.getuid() != identity.uid or (identity.uid != 0 and os.geteuid() == 0):
        raise LocalDeliveryError("privilege drop failed")


def _child_main(identity: Identity | None, before_drop: Callable[[], object] | None,
                work: Callable[[object], None], result_fd: int) -> None:
    code, text = 0, ""
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        os.setsid()
        os.umask(0o077)
        prepared = before_drop() if before_drop is not None else None
        if identity is not None:
            drop_privileges(identity)
            try:
                os.chdir(identity.home or "/")
            except OSError:
                os.chdir("/")
        work(prepared)
    except LocalDeliveryError as error:
        code, text = (EX_TEMPFAIL if error.temporary else EX_CANTCREAT), error.text
    except BaseException as error:  # noqa: BLE001 — whatever happens, the child reports and exits
        code, text = EX_TEMPFAIL, f"{type(error).__name__}: {error}"
    try:
        os.write(result_fd, text.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(code)


async def run_as(identity: Identity, work: Callable[[object], None],
                 before_drop: Callable[[], object] | None = None,
                 timeout: float = CHILD_TIMEOUT) -> ChildResult:
    """Run work(before_drop()) as identity: in a forked child when root, else in a thread as ourselves.

    ``before_drop`` runs in the child while still privileged (e.g. opening /var/mail/<user>); its return value
    is passed to ``work``. Errors are LocalDeliveryError (temporary or permanent) or anything else (temporary).
    """
    if not privileged():
        trace.emit("mproc", f"delivery as {identity.username} offloaded to a thread (daemon unprivileged)",
                   uid=os.getuid(), **trace.bound())
        return await asyncio.to_thread(_run_here, work, before_drop)
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only makes syscalls
        pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_main(identity, before_drop, work, write_fd)
    os.close(write_fd)
    trace.emit("mproc", f"forked child {pid} to run as uid {identity.uid}", pid=pid, uid=identity.uid, **trace.bound())
    try:
        try:
            timed_out = not await _wait_exit(pid, timeout)
        except asyncio.CancelledError:
            # The daemon is stopping: end the child rather than leave it behind unreaped.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, wait_status = os.waitpid(pid, 0)
        text = _read_all(read_fd)
    finally:
        os.close(read_fd)
    status = os.waitstatus_to_exitcode(wait_status)
    trace.emit("mproc", f"child {pid} exited with status {status}{' (timed out)' if timed_out else ''}", pid=pid,
               status=status, timed_out=timed_out, **trace.bound())
    return ChildResult(status, text, timed_out)


def _run_here(work: Callable[[object], None], before_drop: Callable[[], object] | None) -> ChildResult:
    try:
        prepared = before_drop() if before_drop is not None else None
        work(prepared)
    except LocalDeliveryError as error:
        return ChildResult(EX_TEMPFAIL if error.temporary else EX_CANTCREAT, error.text)
    except Exception as error:  # noqa: BLE001 — reported as a temporary failure
        return ChildResult(EX_TEMPFAIL, f"{type(error).__name__}: {error}")
    return ChildResult(0, "")


async def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until the child exits (without reaping it). False on timeout."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(True))
    try:
        await asyncio.wait_for(exited, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class ForkServer:
    """The daemon's side of smtpd/mda/forkserver.py: one helper process, requests matched to replies by id."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None
        self.pending: dict[int, asyncio.Future[list[ChildResult]]] = {}
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        # request id -> the fields of its mproc trace events (evpid, uid, method), one per item, until its reply
        self.trace_fields: dict[int, list[dict[str, object]]] = {}

    def _start(self) -> None:
        from smtpd.mda import forkserver

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen([sys.executable, forkserver.__file__, str(child.fileno())],
                                        pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        child.close()
        parent.setblocking(False)
        self.channel = parent
        trace.emit("mproc", f"delivery fork helper started, pid {self.process.pid}", pid=self.process.pid)

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self.channel is None or (self.process is not None and self.process.poll() is not None):
            self._fail_pending("delivery helper exited")
            self._close_channel()
            self._start()
            self._loop = None
        if self._loop is not loop:
            # A new event loop (tests run one per delivery): listen for replies on this one.
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.channel)
            loop.add_reader(self.channel, self._on_readable)
            self._loop = loop

    def _on_readable(self) -> None:
        assert self.channel is not None
        while True:
            try:
                data = self.channel.recv(1 << 18)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._fail_pending("delivery helper exited")
                if self._loop is not None:
                    self._loop.remove_reader(self.channel)
                self._close_channel()
                self._loop = None
                return
            reply = json.loads(data)
            if "forked" in reply:
                if trace.wants("mproc"):
                    for fields in self.trace_fields.get(reply.get("id"), []):
                        trace.emit("mproc", f"fork helper: child {reply['forked']} forked to run as uid "
                                   f"{fields.get('uid')}", pid=reply["forked"], **fields)
                continue
            timed_out = bool(reply.get("timed_out"))
            results = [ChildResult(int(status), str(text), timed_out and status != 0)
                       for status, text in reply.get("results") or []]
            self._trace_exit(reply, results)
            future = self.pending.pop(reply.get("id"), None)
            if future is not None and not future.done():
                future.set_result(results)

    def _trace_exit(self, reply: dict[str, object], results: list[ChildResult]) -> None:
        all_fields = self.trace_fields.pop(reply.get("id"), [])  # type: ignore[arg-type]
        if not trace.wants("mproc"):
            return
        timed_out = " (timed out)" if reply.get("timed_out") else ""
        for fields, result in zip(all_fields, results, strict=False):
            # Each item's own outcome: a batch child exits 0 even when one of its items failed.
            trace.emit("mproc", f"fork helper: child {reply.get('pid')} exited with status {result.status}"
                       f"{timed_out}", pid=reply.get("pid"), status=result.status, **fields)

    def _fail_pending(self, text: str) -> None:
        for request_id, future in self.pending.items():
            if not future.done():
                items = len(self.trace_fields.get(request_id, [])) or 1
                future.set_result([ChildResult(EX_TEMPFAIL, text)] * items)
        self.trace_fields.clear()
        self.pending.clear()

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    async def run(self, request: dict[str, object], message_fd: int) -> ChildResult:
        """One delivery: a batch of one item (the request's own fields)."""
        [result] = await self.run_batch(request, [message_fd], [trace.bound()])
        return result

    async def run_batch(self, request: dict[str, object], message_fds: list[int],
                        trace_fields: list[dict[str, object]]) -> list[ChildResult]:
        """Deliver request["items"] (or the request itself, as one item) in one child: one result per item."""
        self._ensure_reader()
        assert self.channel is not None
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[list[ChildResult]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        identity = request.get("identity")
        common = {"method": request.get("method"), "uid": identity.get("uid") if isinstance(identity, dict) else None}
        self.trace_fields[request_id] = [{**fields, **common} for fields in trace_fields]
        payload = json.dumps({**request, "id": request_id}).encode()
        while True:
            try:
                socket.send_fds(self.channel, [payload], message_fds)
                break
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError as error:
                self.pending.pop(request_id, None)
                self.trace_fields.pop(request_id, None)
                return [ChildResult(EX_TEMPFAIL, f"delivery helper: {error.strerror or error}")] * len(message_fds)
        results = await future
        if len(results) != len(message_fds):
            return [ChildResult(EX_TEMPFAIL, "delivery helper: result count mismatch")] * len(message_fds)
        return results

    async def stop(self) -> None:
        if self._loop is not None and self.channel is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.channel)
        self._close_channel()
        self._fail_pending("daemon stopping")
        if self.process is not None:
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
            self.process = None
