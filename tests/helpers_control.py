"""Helpers for the control-plane tests: the real daemon (`python -m smtpd -d -f CONF`) in its own process on a
private spool and socket, and smtpctl run as a user runs it.

smtpctl runs as `python -m smtpctl --socket SOCK ...`. To run it as another user (nobody) the test forks, drops
its uid and calls smtpctl's main in the child: the interpreter lives under /root, which nobody cannot exec.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pwd
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from daemon import ROOT, Result, SmtpdProcess, free_port, read_line, smtpctl

__all__ = ["ROOT", "DaemonProcess", "Result", "free_port", "make_workdir", "minimal_config", "read_line",
           "running_daemon", "smtpctl", "smtpctl_as"]


def minimal_config(port: int | None = None, extra: str = "") -> str:
    listen = f"listen on 127.0.0.1 port {port}\n" if port else ""
    return (f"{listen}{extra}"
            'action "local" mbox\n'
            'match from local for local action "local"\n')


def make_workdir() -> Path:
    """A folder every user can traverse (nobody must reach the socket), removed by the caller."""
    workdir = Path(tempfile.mkdtemp(prefix="ctltest-", dir="/tmp"))
    workdir.chmod(0o755)
    return workdir


class DaemonProcess(SmtpdProcess):
    """A running daemon on a private spool and socket, ready when its control socket answers."""

    real = True  # always the real `python -m smtpd` (tests/test_queue_crash_smtp.py checks it)

    def __init__(self, workdir: Path, config_text: str | None = None, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), paused: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, config_text if config_text is not None else minimal_config(),
                         mailname="mx.control.test", env=env, paused=paused, args=args, listens=False)


@contextlib.contextmanager
def running_daemon(config_text: str | None = None) -> Iterator[DaemonProcess]:
    """A started DaemonProcess in a fresh make_workdir() folder; stopped, and the folder removed, afterwards."""
    workdir = make_workdir()
    try:
        with DaemonProcess(workdir, config_text) as running:
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def smtpctl_as(user: str, socket_path: str, *args: str, extra_groups: tuple[int, ...] = (),
               prog: str = "smtpctl") -> Result:
    """Run smtpctl's main as ``user`` in a forked child (so it runs with that uid, as a user would); ``prog``
    another personality (`mailq`), which is given the socket in SMTPD_SOCKET."""
    # Import everything the child needs while we can still read /root's interpreter files.
    for module in ("smtpctl.cli", "smtpctl.words", "smtpctl.fast", "smtpctl.showtext", "smtpctl.commands.show",
                   "smtpctl.commands.control", "smtpctl.commands.trace", "smtpctl.commands.monitor",
                   "smtpctl.commands.explain", "smtpctl.commands.queue", "json", "encodings.idna"):
        importlib.import_module(module)
    account = pwd.getpwnam(user)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, run smtpctl, exit with its status
        status = 1
        try:
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            os.setgroups(list(extra_groups))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            from smtpctl.cli import main

            if prog == "smtpctl":
                main(["--socket", socket_path, *args], prog=prog)
            else:
                os.environ["SMTPD_SOCKET"] = socket_path
                main(list(args), prog=prog)
            status = 0
        except SystemExit as leaving:
            status = leaving.code if isinstance(leaving.code, int) else 1
        except BaseException as error:  # noqa: BLE001 — report anything to the parent, never return into pytest
            with contextlib.suppress(Exception):
                sys.stderr.write(f"child error: {error!r}\n")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(out_write)
    os.close(err_write)
    with os.fdopen(out_read, "rb") as out_file, os.fdopen(err_read, "rb") as err_file:
        stdout = out_file.read().decode()
        stderr = err_file.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    return Result(os.waitstatus_to_exitcode(wait_status), stdout, stderr)
