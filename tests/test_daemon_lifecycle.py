"""A second daemon on the paths of a running one: it refuses before touching anything (spool, pid file,
listeners), and a daemon killed with SIGKILL leaves nothing that stops the next start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import SmtpdProcess, free_port
from helpers_control import make_workdir
from waiting import wait_until

CONFIG = ("listen on 127.0.0.1 port {port}\n"
          'table users { "@" = "nobody" }\n'
          'action "local" maildir "{dir}/Maildir" virtual <users> user "nobody"\n'
          'match from any for any action "local"\n')


@pytest.fixture()
def workdir() -> Iterator[Path]:
    folder = make_workdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def read_reply(stream) -> bytes:  # noqa: ANN001 — a socket's binary file
    while True:
        line = stream.readline()
        if line[3:4] != b"-":
            return line


def second_daemon(first: SmtpdProcess, folder: Path, **paths: str) -> SmtpdProcess:
    """A daemon on its own config and port, sharing the first one's paths named in ``paths``."""
    env = {"SMTPD_SPOOL": str(first.spool), "SMTPD_PIDFILE": str(first.workdir / "smtpd.pid"), **paths}
    return SmtpdProcess(folder, CONFIG, env=env, control=False)


@pytest.mark.parametrize("share_socket", [True, False], ids=["same-socket", "same-spool-only"])
def test_second_daemon_refuses_before_touching_the_running_ones_spool(workdir: Path, share_socket: bool) -> None:
    first = SmtpdProcess(workdir / "first", CONFIG, args=("-P", "mda")).start()
    try:
        # A message in the middle of its DATA: its file is in the spool's temporary/.
        with socket.create_connection(("127.0.0.1", first.port), timeout=30) as client:
            stream = client.makefile("rb")
            read_reply(stream)
            for command in (b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@localhost>", b"DATA"):
                client.sendall(command + b"\r\n")
                assert read_reply(stream)[:1] in (b"2", b"3")
            client.sendall(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000)

            paths = {"SMTPD_SOCKET": first.socket} if share_socket else {}
            second = second_daemon(first, workdir / "second", **paths)
            try:
                with pytest.raises(RuntimeError, match="smtpd exited at start"):
                    second.start(wait_port=free_port())
            finally:
                second.stop()
            expected = "control socket already listening" if share_socket else "is in use by another smtpd"
            assert expected in second.log()
            assert "queue:" not in second.log()  # it did not load (nor clean) the spool
            assert (first.workdir / "smtpd.pid").read_text().strip() == str(first.process.pid)

            client.sendall(b".\r\n")
            assert read_reply(stream).startswith(b"250 ")
            client.sendall(b"QUIT\r\n")
            read_reply(stream)
        assert first.alive() and first.answers()
        assert first.request("show.queue")["result"], "the accepted message is in the queue"
    finally:
        first.stop()
    assert not (first.workdir / "smtpd.pid").exists()


def test_start_after_sigkill(workdir: Path) -> None:
    daemon = SmtpdProcess(workdir, CONFIG).start()
    daemon.signal(signal.SIGKILL)
    daemon.process.wait(10)
    assert os.path.exists(daemon.socket) and (workdir / "smtpd.pid").exists()  # what the kill left behind
    daemon.start()
    try:
        assert daemon.answers()
        assert (workdir / "smtpd.pid").read_text().strip() == str(daemon.process.pid)
    finally:
        daemon.stop()


def test_second_start_without_d_says_so_before_detaching(workdir: Path) -> None:
    """`smtpd` (detaching) while a daemon runs: the error reaches the caller's terminal and the exit code is 1,
    as smtpd(8)'s control socket check comes before it detaches."""
    first = SmtpdProcess(workdir / "first", CONFIG).start()
    try:
        second = SmtpdProcess(workdir / "second", CONFIG, env={"SMTPD_SOCKET": first.socket})
        result = subprocess.run([sys.executable, "-m", "smtpd", "-f", str(second.config_path)], env=second.env,
                                cwd=str(second.workdir), capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (1, "smtpd: control socket already listening\n")
        assert first.answers()
    finally:
        first.stop()


def test_a_child_forked_by_the_daemon_does_not_hold_the_spool_lock(workdir: Path) -> None:
    """A child the daemon forks (an offline replay run as the file's owner) lives on after a crash of the daemon;
    it must not keep the spool locked, or the restart would be refused as `in use by another smtpd`."""
    spool = workdir / "spool"
    program = ("import os, sys, time\n"
               "from smtpd.daemon import _lock_spool\n"
               "_lock_spool(sys.argv[1])\n"
               "pid = os.fork()\n"
               "if pid == 0:\n"
               "    null = os.open(os.devnull, os.O_WRONLY)\n"
               "    os.dup2(null, 1)\n"
               "    os.dup2(null, 2)\n"
               "    time.sleep(30)\n"
               "    os._exit(0)\n"
               "print(pid, flush=True)\n"
               "os._exit(0)  # the daemon dies; its child lives on\n")
    root = Path(__file__).resolve().parent.parent
    crashed = subprocess.run([sys.executable, "-c", program, str(spool)], capture_output=True, text=True,
                             timeout=30, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    child = int(crashed.stdout.strip())
    try:
        os.kill(child, 0)  # still alive
        import fcntl

        descriptor = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the next start does
        finally:
            os.close(descriptor)
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_pid_file_is_not_writable_by_others_whatever_the_umask(workdir: Path) -> None:
    """Started with umask 0 (a service manager or a shell that set it), the pid file was made 0666: any user
    could write another pid into it for root's `kill $(cat /var/run/smtpd.pid)` to signal."""
    old = os.umask(0)
    try:
        daemon = SmtpdProcess(workdir, CONFIG).start()
    finally:
        os.umask(old)
    try:
        pidfile = workdir / "smtpd.pid"
        assert pidfile.read_text().strip() == str(daemon.process.pid)
        assert pidfile.stat().st_mode & 0o777 == 0o644
    finally:
        daemon.stop()


def test_a_pid_file_that_cannot_be_written_is_named_in_the_log(workdir: Path) -> None:
    """The daemon runs without its pid file (an unwritable /var/run must not stop an unprivileged one), but it
    said nothing: an init script's stop, or `kill $(cat ...)`, then found no daemon, with no line saying why."""
    missing = workdir / "no-such-folder" / "smtpd.pid"
    daemon = SmtpdProcess(workdir, CONFIG, env={"SMTPD_PIDFILE": str(missing)}).start()
    try:
        wait_until(lambda: "pid file" in daemon.log(), explain=daemon.log)
        assert f"warn: pid file {missing} not written: No such file or directory" in daemon.log().splitlines()
    finally:
        daemon.stop()
