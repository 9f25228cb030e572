"""Replaying the messages sendmail kept in `<spool>/offline/` while the daemon was down (reference §2.6).

Each file holds, on its first line, sendmail's arguments joined with `|`, then the message as sendmail read it.
At start, once the control socket answers, every file is submitted again by running sendmail's code with `-S`
(never offline again) as the file's owner — so the daemon sees the same local user submitting as the one who
ran sendmail. A file that went through is deleted; an empty one too; one that failed for now stays, is logged,
and is tried again after RETRY_SECONDS, at `smtpctl resume smtp` or at the next start. While the daemon runs, the folder is looked at again every RESCAN_SECONDS for files that came
since (a sendmail that could not reach the daemon: its socket not there yet during a start, say).

As root the submission runs in a forked child that drops to the owner's uid before doing anything (the
interpreter itself may not be readable by that user, so nothing is exec'd). An unprivileged daemon can only
replay its own files; other users' files are left alone, with a warning.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pwd
import stat
import sys
import time

from smtpd import log
from smtpd.mda.local import EX_CANTCREAT, LocalDeliveryError
from smtpd.mda.privilege import Identity, privileged, run_as

EX_NOUSER = 67  # sendmail -S: the daemon refused the message for good (smtpctl.commands.sendmail.EX_NOUSER)

OFFLINE_DIRECTORY = "offline"
CONCURRENCY = 5
READY_TIMEOUT = 60.0
# Seconds between looks at offline/ while the daemon runs: a sendmail that found no daemon to talk to (its
# socket not yet there during a start, a burst that found it unreachable) left a file that would otherwise wait
# for the next start. OpenSMTPD looks only at start.
RESCAN_SECONDS = float(os.environ.get("SMTPD_OFFLINE_RESCAN_SECONDS", "60"))
# Seconds before files that failed for now (a 4xx: a table the daemon cannot read, say) are tried again: not at
# every rescan (a line in the log each minute), but not only at the next start either.
RETRY_SECONDS = float(os.environ.get("SMTPD_OFFLINE_RETRY_SECONDS", "900"))
ABANDONED_AFTER = 86400.0  # seconds: a hidden file this old in offline/ was left by a crash (see _remove_abandoned)
LINK_GRACE = 60.0  # seconds a file in offline/ may have a second name (sendmail's hidden one, about to go)

_log = log.get("offline")


def offline_directory(spool: str) -> str:
    return os.path.join(spool, OFFLINE_DIRECTORY)


def ensure_offline_directory(spool: str) -> str:
    """Create <spool>/offline. Mode 1733: any local user may drop a file there but not list or remove others'
    (smtpctl is not setgid, unlike OpenSMTPD's, so the directory cannot rely on a shared group)."""
    directory = offline_directory(spool)
    try:
        os.makedirs(directory, exist_ok=True)
        if privileged():
            os.chmod(directory, 0o1733)
    except OSError as error:
        _log.warning("offline: %s: %s", directory, error.strerror)
    return directory


async def wait_for_socket(socket_path: str, timeout: float = READY_TIMEOUT) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return True
    return False


async def replay_offline(spool: str, socket_path: str, mailname_path: str | None = None,
                         failed: set[str] | None = None) -> int:
    """Submit every offline file again. Returns how many went through. Files named in ``failed`` are left alone
    (they failed for now before: kept for a later try); the names of those that fail now are added to it."""
    directory = offline_directory(spool)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return 0
    _remove_abandoned(directory, [name for name in names if name.startswith(".")])
    names = [name for name in names if not name.startswith(".") and name not in (failed or ())]
    if not names:
        return 0  # (the usual rescan)
    # Imported here, before any fork: a forked child must not need the import machinery.
    importlib.import_module("smtpctl.commands.sendmail")
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(name: str) -> bool:
        async with gate:
            done = await _replay_file(os.path.join(directory, name), socket_path, mailname_path)
        if done is False and failed is not None and os.path.lexists(os.path.join(directory, name)):
            failed.add(name)
        return bool(done)

    results = await asyncio.gather(*(one(name) for name in names))
    replayed = sum(results)
    if names:
        _log.info("offline: %d of %d offline messages submitted", replayed, len(names))
    return replayed


def _remove_abandoned(directory: str, hidden: list[str]) -> None:
    """A hidden file is one that sendmail is still writing, or one a crash cut short (sendmail links a file to
    its real name only once it is whole): those a day old are the latter."""
    now = time.time()
    for name in hidden:
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and now - info.st_mtime > ABANDONED_AFTER:
            _log.info("offline: %s: removed, a submission cut short", path)
            _unlink(path)


async def _replay_file(path: str, socket_path: str, mailname_path: str | None) -> bool | None:
    """Submit one file: True when it went through, False when it failed (kept for a later try), None when it
    is not ready (looked at again at the next rescan)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        _log.warning("offline: %s: not a regular file, skipped", path)
        return False
    if info.st_size == 0:
        _unlink(path)
        return False
    if info.st_nlink != 1:
        # sendmail links its file to the real name, then removes the hidden one: two links for a moment. Later,
        # a second name is no doing of sendmail's (a hard link to someone else's file): never replayed.
        if time.time() - info.st_mtime > LINK_GRACE:
            _log.warning("offline: %s has %d links, skipped", path, info.st_nlink)
        return None
    if not privileged() and info.st_uid != os.geteuid():
        _log.warning("offline: %s belongs to uid %d; an unprivileged daemon cannot submit it", path, info.st_uid)
        return False
    if privileged():
        identity = _owner_identity(info.st_uid, info.st_gid)
        result = await run_as(identity, _submit_work(path, socket_path, mailname_path, identity.home),
                              before_drop=_opener(path, info.st_uid))
        status, text = result.status, result.text
        refused = status == EX_CANTCREAT  # (the child's code for a permanent LocalDeliveryError)
    else:
        status, text = await _submit_in_subprocess(path, socket_path, mailname_path)
        refused = status == EX_NOUSER
    if status == 0:
        _unlink(path)
        return True
    if refused:
        # The daemon refused it for good (say, every recipient unknown): sendmail saved it in its owner's
        # dead.letter, as it does for a refusal at the terminal; offering it again at every start would not help.
        _log.warning("offline: %s refused (%s); saved in its owner's dead.letter and removed", path,
                     text or f"status {status}")
        _unlink(path)
        return False
    _log.warning("offline: %s could not be submitted (%s); kept for a later try", path,
                 text or f"status {status}")
    return False


async def _submit_in_subprocess(path: str, socket_path: str, mailname_path: str | None) -> tuple[int, str]:
    """Unprivileged: run sendmail -S as ourselves in a separate interpreter (no shared stdin or environment)."""
    with open(path, "rb") as handle:
        arguments = handle.readline().rstrip(b"\n").decode("utf-8", "surrogateescape")
        data = handle.read()
        written = os.fstat(handle.fileno()).st_mtime
    environment = dict(os.environ, SMTPD_SOCKET=socket_path, SMTPD_OFFLINE_WRITTEN=str(written))
    if mailname_path:
        environment["SMTPD_MAILNAME"] = mailname_path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment["PYTHONPATH"] = root + (os.pathsep + environment["PYTHONPATH"] if "PYTHONPATH" in environment else "")
    program = "import sys; from smtpctl.commands.sendmail import sendmail_main; sys.exit(sendmail_main(sys.argv[1:]))"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, "-S", *(arguments.split("|") if arguments else []),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=environment)
    _, errors = await process.communicate(data)
    lines = errors.decode("utf-8", "replace").strip().splitlines()
    return process.returncode or 0, lines[-1] if lines else ""


def _owner_identity(uid: int, gid: int) -> Identity:
    try:
        return Identity.from_passwd(pwd.getpwuid(uid))
    except KeyError:
        return Identity(str(uid), uid, gid, "/", (gid,))


def _opener(path: str, owner: int):  # noqa: ANN202 — a closure for run_as
    """Open the file (as root, before the drop) only if it is still what was looked at: a regular file of
    ``owner`` with one link. offline/ is writable by everyone: between the look and the open, a user could
    put a FIFO there (the open would block), or a hard link to a file of someone else's."""

    def open_file() -> int:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_nlink != 1:
            os.close(fd)
            raise LocalDeliveryError(f"{path}: changed since it was looked at; skipped")
        return fd

    return open_file


def _submit_work(path: str, socket_path: str, mailname_path: str | None, home: str):  # noqa: ANN202
    def work(fd: object) -> None:
        assert isinstance(fd, int)
        import io

        from smtpctl.commands import sendmail

        with os.fdopen(fd, "rb") as handle:
            arguments = handle.readline().rstrip(b"\n").decode("utf-8", "surrogateescape")
            data = handle.read()
            os.environ["SMTPD_OFFLINE_WRITTEN"] = str(os.fstat(handle.fileno()).st_mtime)
        argv = ["-S", *(arguments.split("|") if arguments else [])]
        os.environ["SMTPD_SOCKET"] = socket_path
        os.environ["HOME"] = home or "/"  # (the owner's: dead.letter goes there, not to the daemon's home)
        if mailname_path:
            os.environ["SMTPD_MAILNAME"] = mailname_path
        stdin, stdout, stderr = sys.stdin, sys.stdout, sys.stderr
        sys.stdin = io.TextIOWrapper(io.BytesIO(data))
        sys.stdout = io.StringIO()  # (the dialogue of a `sendmail -v` kept offline: nobody to show it to)
        sys.stderr = io.StringIO()
        try:
            status = sendmail.sendmail_main(argv, "sendmail")
        finally:
            messages = sys.stderr.getvalue() if isinstance(sys.stderr, io.StringIO) else ""
            sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
        if status != 0:
            raise LocalDeliveryError(messages.strip().splitlines()[-1] if messages.strip() else f"exit {status}",
                                     temporary=status != EX_NOUSER)

    return work


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
