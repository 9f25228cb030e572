"""The running system: built from one config snapshot, in one asyncio event loop.

Subsystems are components with ``start()`` and ``stop()``, started in dependency order (tables, queue,
scheduler, deliveries, SMTP listeners, control socket) and stopped in reverse. A reload parses and validates a
new config; only if it is valid is it swapped in, and each component's ``reconfigure(new_config)`` is called so
new sessions use it while sessions in progress finish on the snapshot they began with.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import importlib
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.paths import MailnameError, Paths, read_mailname
from smtpd import eventloop, log, trace
from smtpd.config.model import Config
from smtpd.stats import STATS, Stats

VERSION = "PySMTPD 0.1.0"
PAUSABLE = ("mda", "mta", "smtp")
# Threads for the work the event loop hands off (asyncio.to_thread): table questions, file reads, waiting for
# delivery processes. Most of it waits rather than computes: a session whose table asks a server that hangs holds
# its thread for that table's bound (5 to 20 s), and with Python's default pool (CPUs + 4 threads: 6 on a 2-CPU
# host) a few such sessions stalled every other session's expansion, AUTH and the deliveries. Threads are made
# only when every one is busy.
WORKER_THREADS = 128


@dataclass(frozen=True)
class DaemonOptions:
    foreground: bool = True
    log_to_syslog: bool = False
    verbose: bool = False
    paused: frozenset[str] = frozenset()  # subsystems started paused (smtpd -P)
    traces: frozenset[str] = frozenset()  # trace keywords enabled at start (smtpd -T)
    macros: dict[str, str] = field(default_factory=dict)  # -D, re-applied at reload
    # Members of this group (name or gid) may run smtpctl's read-only commands; None: SMTPD_CONTROL_GROUP.
    control_group: str | None = None


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ReloadResult:
    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


class Daemon:
    def __init__(self, paths: Paths, config: Config, options: DaemonOptions) -> None:
        self.paths = paths
        self.config = config
        self.options = options
        self.mailname = read_mailname(paths.mailname)
        self.started = time.time()
        self.stats: Stats = STATS
        self.paused: set[str] = set(options.paused) & set(PAUSABLE)
        self.log = log.get()
        # The subsystems, set while building. Typed loosely here so that this module does not import them all.
        self.tables: Any = None
        self.queue: Any = None
        self.scheduler: Any = None
        self.mda: Any = None
        self.mta: Any = None
        self.smtp: Any = None
        self.processors: Any = None  # the filter processes of the running configuration (a ProcessorSet)
        self.control: Any = None
        self.components: list[Component] = []
        self._stopping = asyncio.Event()
        # Set once every component has started: a reload asked for before (SIGHUP while a big queue loads) waits
        # for it, else it would bind the listeners that the SMTP server's own start binds again.
        self._started = asyncio.Event()
        # One reload at a time: two that overlapped (SIGHUP and `smtpctl reload`) would each diff against the
        # same old config, mix their steps, and the one whose parse ended last would win, whatever the file says.
        self._reload_lock = asyncio.Lock()
        # Called with (daemon, subsystem, paused) when pause/resume changes a subsystem's state.
        self.pause_listeners: list[Callable[[Daemon, str, bool], None]] = []

    # -- building -------------------------------------------------------------------------------------
    def build(self) -> None:
        """Create the components in start order. Each subsystem adds itself here with one line."""
        for target in BUILDERS:
            module_name, _, function_name = target.partition(":")
            builder = getattr(importlib.import_module(module_name), function_name)
            component = builder(self)
            if component is not None:
                self.components.append(component)

    async def start(self) -> None:
        for component in self.components:
            await component.start()
        self._started.set()

    async def stop(self) -> None:
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:  # noqa: BLE001 — shutdown goes on whatever one component does
                self.log.exception("error while stopping %r", component)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    # -- pause / resume -------------------------------------------------------------------------------
    def set_paused(self, subsystem: str, paused: bool) -> bool:
        """Pause or resume mda, mta or smtp. False when it already was in that state (command failed)."""
        if subsystem not in PAUSABLE or (subsystem in self.paused) == paused:
            return False
        if paused:
            self.paused.add(subsystem)
        else:
            self.paused.discard(subsystem)
        self.log.info("info: %s %s", subsystem, "paused" if paused else "resumed")
        for listener in list(self.pause_listeners):
            listener(self, subsystem, paused)
        return True

    def is_paused(self, subsystem: str) -> bool:
        return subsystem in self.paused

    # -- reload ---------------------------------------------------------------------------------------
    async def reload(self) -> ReloadResult:
        """Parse and validate the config again; swap it in only if valid. Reloads run one after the other, each
        reading the file when its turn comes, so the last one asked for leaves the newest file in force. One asked
        for while the daemon starts runs once it has started; one asked for while it stops is refused."""
        await self._started.wait()
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> ReloadResult:
        from smtpd import config as config_package

        if self._stopping.is_set():
            self.log.warning("reload refused: smtpd is stopping")
            return ReloadResult(False, ["smtpd is stopping"])
        result = await asyncio.to_thread(config_package.load, self.paths.config, macros=self.options.macros)
        errors = [str(diagnostic) for diagnostic in result.errors]
        warnings = [str(diagnostic) for diagnostic in result.warnings]
        for warning in warnings:  # (a SIGHUP has no caller to tell them: the log says them, as at a start)
            self.log.warning("reload: %s", _WARN_WORD.sub("", warning))
        if errors or result.config is None:
            for error in errors:
                self.log.warning("reload: %s", _WARN_WORD.sub("", error))  # (the log line says warn: once)
            self.log.warning("reload failed, keeping the running configuration")
            return ReloadResult(False, errors, warnings)
        if self._stopping.is_set():  # asked to stop while the file was read: nothing is switched any more
            self.log.warning("reload refused: smtpd is stopping")
            return ReloadResult(False, ["smtpd is stopping"], warnings)
        old, new = self.config, result.config
        from smtpd.control.diff import describe_changes

        changes = describe_changes(old, new)
        done: list[Any] = []
        try:
            for component in self.components:
                reconfigure = getattr(component, "reconfigure", None)
                if reconfigure is not None:
                    changes.extend(await reconfigure(old, new) or [])
                    done.append(component)
        except Exception as error:  # noqa: BLE001 — e.g. a new listener's port is taken: keep the old config
            self.log.warning("reload failed, keeping the running configuration: %s", error)
            for component in reversed(done):  # put back what had already switched
                try:
                    rollback = getattr(component, "rollback", None)
                    if rollback is not None:  # it kept what it replaced: put that back as it was
                        rollback()
                    else:
                        await component.reconfigure(new, old)
                except Exception:  # noqa: BLE001 — best effort; the old config stays in force regardless
                    self.log.exception("could not restore %r", component)
            return ReloadResult(False, _located(error, self.paths.config), warnings)
        for component in done:
            commit = getattr(component, "commit", None)
            if commit is not None:
                commit()
        self.config = new
        for change in changes:
            self.log.info("reload: %s", change)
        self.log.info("configuration reloaded")
        return ReloadResult(True, [], warnings, changes)


def _located(error: Exception, config_path: str) -> list[str]:
    """The messages of a failure while switching, each `FILE:LINE: message` where the failure names its line
    (a listener's port taken), else after the configuration file's name."""
    lines = getattr(error, "lines", None) or [str(error)]  # a table's TableLoadError has its own lines
    return [line if _LOCATED.match(line) else f"{config_path}: {line}" for line in lines]


_LOCATED = re.compile(r"\S+:\d+: ")
_WARN_WORD = re.compile(r"^warn: +")  # a message that says warn: itself (`warn: no rules, nothing to do`)


# The component builders, in start order, as "module:function". A builder takes the Daemon, sets its
# attribute (daemon.tables, daemon.queue, ...) and returns the component to start, or None. Each subsystem adds
# its one line here.
BUILDERS: list[str] = [
    "smtpd.lookup.tables:build",  # first: every other subsystem asks its questions through the tables
    "smtpd.queue:build",
    "smtpd.scheduler:build",
    "smtpd.mda:build",
    "smtpd.mta:build",
    "smtpd.smtp.processes:build",  # the filter processes are ready before the listeners open
    "smtpd.smtp:build",
    "smtpd.control:build",  # last: the control socket opens once everything it controls exists
]


def _install_signal_handlers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop)

    def reload_on_hup() -> None:
        # Unlike OpenSMTPD 6.8 (which dies on SIGHUP), SIGHUP reloads the configuration.
        asyncio.ensure_future(daemon.reload())

    loop.add_signal_handler(signal.SIGHUP, reload_on_hup)

    # Their default action ends a process, and tools send them to daemons by habit (logrotate's postrotate
    # scripts, monitoring): a mail server must not stop for that. OpenSMTPD 6.8 dies of both.
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(signum, _ignored_signal, daemon, signum)


def _ignored_signal(daemon: Daemon, signum: int) -> None:
    daemon.log.warning("%s received and ignored (SIGHUP reloads, SIGTERM stops)",
                       signal.Signals(signum).name)


class StartupFailed(Exception):
    """A subsystem could not start (a port taken, a table unreadable, another daemon on the socket)."""


async def serve(daemon: Daemon) -> None:
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="smtpd-worker"))
    try:
        daemon.build()
    except Exception as error:  # noqa: BLE001 — reported as one `smtpd: ...` line, not a traceback
        raise StartupFailed(str(error)) from error
    _install_signal_handlers(daemon)
    daemon.log.info("info: %s starting", VERSION)
    pid_written = False
    try:
        try:
            await daemon.start()
        except Exception as error:  # noqa: BLE001 — as above; what did start is stopped below
            raise StartupFailed(str(error)) from error
        pid_error = _write_pidfile(daemon.paths.pidfile)
        pid_written = pid_error is None
        if pid_error is not None:  # (what finds the daemon by it, an init script's stop, would find nothing)
            daemon.log.warning("pid file %s not written: %s", daemon.paths.pidfile, pid_error)
        _tune_garbage_collector()
        await daemon.wait_stopped()
        daemon.log.info("Exiting")
    finally:
        await daemon.stop()
        if pid_written:
            _remove_pidfile(daemon.paths.pidfile)


def _tune_garbage_collector() -> None:
    """Once started. What the start built (modules, configuration, tables) lives as long as the daemon: frozen,
    no collection walks it again, and forked delivery children do not touch its pages. And the first
    generation is collected less often: per message the daemon makes a few hundred container objects that
    reference counting frees at once, and a collection every 700 of them cost 2-3% of the receive path."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _control_socket_is_live(path: str) -> bool:
    from smtpd.control.server import _socket_is_live

    return _socket_is_live(path)


def _lock_spool(path: str) -> int:
    """Hold an exclusive lock on the spool folder for the daemon's life: two daemons on one spool would take
    each other's messages in progress for a crash's leftovers. The lock goes with the process (even kill -9)."""
    try:
        os.makedirs(path, mode=0o711, exist_ok=True)
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise StartupFailed(f"spool {path}: {error.strerror}") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupFailed(f"spool {path} is in use by another smtpd") from error
        raise StartupFailed(f"spool {path}: {error.strerror}") from error
    # A child forked from the daemon (an offline replay run as its file's owner) would otherwise share the lock
    # for its life: a daemon restarted after a crash meanwhile would be refused as "in use".
    os.register_at_fork(after_in_child=lambda: _close_quietly(descriptor))
    return descriptor


def _close_quietly(descriptor: int) -> None:
    try:
        os.close(descriptor)
    except OSError:
        pass


def _write_pidfile(path: str) -> str | None:
    """Write the pid file: None when it was written (and so is ours to remove), else why not."""
    try:
        # 0644 whatever the umask the daemon was started with (0 made it writable by everyone: a user could then
        # name any process for a `kill $(cat smtpd.pid)` run as root); never through a symbolic link.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="ascii") as handle:
            os.fchmod(fd, 0o644)
            handle.write(f"{os.getpid()}\n")
    except OSError as error:
        # The pid file is a convenience: an unwritable /var/run must not stop an unprivileged daemon.
        return error.strerror or str(error)
    return None


def _remove_pidfile(path: str) -> None:
    """Remove the pid file if it still names this process."""
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def _detach() -> None:
    """Become a background daemon as smtpd(8) does without -d/-F: fork twice, new session, stdio on /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):
        os.dup2(null, descriptor)
    os.close(null)


def run(paths: Paths, config: Config, options: DaemonOptions) -> int:
    """Run the daemon until SIGTERM/SIGINT or `smtpctl stop`. Returns the exit code.

    Without -d/-F it detaches and logs to syslog, as smtpd(8) does.
    """
    # Before anything starts, and before detaching so that the shell that ran us hears it (as smtpd(8), whose
    # control socket check comes first): a second daemon must not touch the spool of a running one (the queue's
    # start clears temporary/ and incoming/ and replays the journal), nor open its listeners.
    try:
        if _control_socket_is_live(paths.socket):
            raise StartupFailed("control socket already listening")
        # Asked before detaching, as OpenSMTPD asks: the key may come from the terminal or standard input.
        queue_codec = _queue_codec(config)
        spool_lock = _lock_spool(paths.spool)  # (a detached daemon keeps it: the lock goes with the descriptor)
    except StartupFailed as error:
        print(f"smtpd: {error}", file=sys.stderr)
        return 1
    from smtpd.queue import codec

    codec.configure(queue_codec)
    try:
        return _run_locked(paths, config, options)
    finally:
        os.close(spool_lock)


def _queue_codec(config: Config) -> Any:
    """The queue's codec (smtpd/queue/codec.py) for `queue compression` and `queue encryption [KEY|stdin]`."""
    from smtpd.queue import codec

    options = config.queue
    if not (options.compression or options.encryption):
        return codec.PLAIN
    try:
        return codec.codec_for(options.compression, options.encryption, options.encryption_key, _read_queue_key)
    except codec.QueueCodecError as error:
        raise StartupFailed(f"crypto_setup:{error}") from error


def _read_queue_key(setting: str | None) -> str:
    """The key of `queue encryption stdin` (one line of standard input) or of `queue encryption` without a key
    (asked on the terminal, `queue key: `, as OpenSMTPD asks)."""
    if setting == "stdin":
        line = sys.stdin.readline()
        if not line:
            raise StartupFailed("queue encryption: no key on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise StartupFailed("queue encryption: smtpd.conf gives no key and there is no terminal to ask for it "
                            "(write `queue encryption KEY`, or `queue encryption stdin` and pipe the key in)")
    import getpass

    try:
        return getpass.getpass("queue key: ")
    except (EOFError, KeyboardInterrupt):
        raise StartupFailed("queue encryption: no key given") from None


def _raise_open_files_limit() -> None:
    """The soft limit of open files up to the hard one, as a server that holds a descriptor per client should
    (Debian's default soft limit of 1024 is below the 1,000 sessions and their message files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


def _run_locked(paths: Paths, config: Config, options: DaemonOptions) -> int:
    if not options.foreground:
        _detach()
    _raise_open_files_limit()
    to_syslog = options.log_to_syslog or not options.foreground
    log.setup(to_syslog=to_syslog, verbose=options.verbose)
    for keyword in options.traces:
        trace.BUS.enable(keyword)
    # Traces go where the log goes, whether -T asked for them at the start or `smtpctl trace` does later (the
    # console is looked at only for an enabled subsystem: nothing is formatted for the others).
    if to_syslog:
        trace.BUS.set_console(log.TraceToLog())  # type: ignore[arg-type]  # (a text stream as print() uses it)
    else:
        trace.console_to_stderr()
    try:
        daemon = Daemon(paths, config, options)
        asyncio.run(serve(daemon), loop_factory=eventloop.new_event_loop)
    except (StartupFailed, MailnameError) as error:
        if not options.foreground or options.log_to_syslog:
            log.get().critical("%s", error)  # stderr is gone or not the log: say it where the log goes too
        print(f"smtpd: {error}", file=sys.stderr)
        return 1
    return 0
