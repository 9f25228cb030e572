"""Running a delivery as the recipient: a forked child that drops to the user's uid, gid and groups.

When the daemon runs as root, every local write happens in a child process forked for it, which resets signal
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
import os
import pwd
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

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
        try:
            groups = tuple(os.getgrouplist(username, gid))
        except (KeyError, OSError):
            groups = (gid,)
        return cls(username, uid, gid, home, groups)

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
        return await asyncio.to_thread(_run_here, work, before_drop)
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only makes syscalls
        pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_main(identity, before_drop, work, write_fd)
    os.close(write_fd)
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
