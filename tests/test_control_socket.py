"""The control socket as a hostile or unprivileged client sees it: bad input ends only that connection, peer
credentials decide who may do what, and the daemon stays up throughout."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import select
import shutil
import socket
import stat
import time
from collections.abc import Iterator

import pytest
from daemon import full_unix_backlog
from helpers_control import DaemonProcess, make_workdir, read_line, smtpctl_as


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    workdir = make_workdir()
    running = DaemonProcess(workdir, env={"SMTPD_CONTROL_GROUP": "mail", "SMTPD_CONTROL_TIMEOUT": "2"}).start()
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def connect(daemon: DaemonProcess) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(30)
    connection.connect(daemon.socket)
    return connection


def reply_to(connection: socket.socket, data: bytes) -> dict:
    connection.sendall(data)
    return json.loads(read_line(connection))


def assert_still_serving(daemon: DaemonProcess) -> None:
    assert daemon.alive()
    assert daemon.request("show.status")["result"] == {"mda": "running", "mta": "running", "smtp": "running"}


def test_socket_is_world_writable_like_opensmtpd(daemon: DaemonProcess) -> None:
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o666


def test_reply_carries_version_and_id(daemon: DaemonProcess) -> None:
    with connect(daemon) as connection:
        reply = reply_to(connection, b'{"v": 1, "id": "abc", "cmd": "show.status", "args": {}}\n')
        assert reply == {"v": 1, "id": "abc", "ok": True,
                         "result": {"mda": "running", "mta": "running", "smtp": "running"}}
        # The connection stays open for the next request.
        second = reply_to(connection, b'{"v": 1, "id": 2, "cmd": "show.stats"}\n')
        assert second["id"] == 2 and "uptime" in second["result"]["stats"]


@pytest.mark.parametrize(("line", "code"), [
    (b"this is not json\n", "bad-request"),
    (b"[1, 2, 3]\n", "bad-request"),
    (b'{"v": 99, "id": 1, "cmd": "show.status"}\n', "version-mismatch"),
    (b'{"v": true, "id": 1, "cmd": "show.status"}\n', "version-mismatch"),  # (true == 1 in Python)
    (b'{"v": 1.0, "id": 1, "cmd": "show.status"}\n', "version-mismatch"),
    (b'{"v": 1, "id": 1, "cmd": "rm -rf /"}\n', "unknown-command"),
    (b'{"v": 1, "id": 1, "cmd": "show.status", "args": [1]}\n', "bad-request"),
    (b"\xff\xfe\x00garbage\n", "bad-request"),
    (b"[" * 30000 + b"]" * 30000 + b"\n", "bad-request"),  # nested deeper than the parser recurses
    # Not JSON, although Python's parser takes them: a NaN interval reached asyncio's timer heap and stalled the
    # daemon's other timers (request timeouts, retries) for as long as the stream lasted.
    (b'{"v": 1, "id": 1, "cmd": "monitor", "args": {"interval": NaN}}\n', "bad-request"),
    (b'{"v": 1, "id": 1, "cmd": "monitor", "args": {"interval": -Infinity}}\n', "bad-request"),
    (b'{"v": 1, "id": 1, "cmd": "trace.follow", "args": {"keywords": ["all"], "capacity": 1e999}}\n',
     "bad-request"),
    # Lone surrogates are valid JSON escapes but no UTF-8 text: the reply echoing them could not be written.
    (b'{"v": 1, "id": "\\ud800", "cmd": "show.status"}\n', "bad-request"),
    (b'{"v": 1, "id": 1, "cmd": "explain", "args": {"rcpt": "\\udc80@example.org"}}\n', "bad-request"),
])
def test_malformed_request_gets_error_and_close(daemon: DaemonProcess, line: bytes, code: str) -> None:
    with connect(daemon) as connection:
        reply = reply_to(connection, line)
        assert reply["ok"] is False and reply["error"]["code"] == code
        assert connection.recv(10) == b""  # only this connection is closed
    assert_still_serving(daemon)


def test_oversized_request_gets_error_and_close(daemon: DaemonProcess) -> None:
    with connect(daemon) as connection:
        payload = b'{"v": 1, "id": 1, "cmd": "show.status", "args": {"x": "' + b"A" * 200_000 + b'"}}\n'
        try:
            connection.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close before we finish writing
        reply = json.loads(read_line(connection))
        assert reply["error"]["code"] == "too-large"
    assert_still_serving(daemon)


def test_endless_line_without_newline_does_not_grow_the_daemon(daemon: DaemonProcess) -> None:
    with connect(daemon) as connection:
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 50_000_000:
                connection.sendall(b"x" * 65536)
                sent += 65536
        assert sent < 50_000_000
    assert_still_serving(daemon)


def test_slow_request_is_cut_off_while_others_are_served(daemon: DaemonProcess) -> None:
    with connect(daemon) as slow:
        slow.sendall(b'{"v": 1, "id": 1, ')
        # Meanwhile the daemon answers everyone else.
        for _ in range(5):
            assert_still_serving(daemon)
        reply = json.loads(read_line(slow))
        assert reply["error"]["code"] == "timeout"
        assert slow.recv(10) == b""


def test_truncated_request_at_eof(daemon: DaemonProcess) -> None:
    with connect(daemon) as connection:
        connection.sendall(b'{"v": 1, "id": 1, "cmd": "show.status"}')
        connection.shutdown(socket.SHUT_WR)
        reply = json.loads(read_line(connection))
        assert reply["error"]["code"] == "bad-request"
    assert_still_serving(daemon)


def test_per_uid_connection_cap(daemon: DaemonProcess) -> None:
    from smtpd.control.server import MAX_CONNECTIONS_PER_UID

    held = [connect(daemon) for _ in range(MAX_CONNECTIONS_PER_UID)]
    try:
        for connection in held:  # make sure each is accepted and counted
            assert reply_to(connection, b'{"v": 1, "id": 1, "cmd": "hello"}\n')["ok"]
        with connect(daemon) as extra:
            reply = json.loads(read_line(extra))
            assert reply["error"]["code"] == "busy"
    finally:
        for connection in held:
            connection.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not daemon.answers():
        time.sleep(0.05)
    assert_still_serving(daemon)


def test_nobody_is_refused_state_changes(daemon: DaemonProcess) -> None:
    result = smtpctl_as("nobody", daemon.socket, "pause", "smtp")
    assert result.returncode == 1
    assert result.stderr == "smtpctl: need root privileges for pause\n"
    assert daemon.request("show.status")["result"]["smtp"] == "running"
    assert "refused pause" in daemon.log()


def test_nobody_is_refused_reads(daemon: DaemonProcess) -> None:
    result = smtpctl_as("nobody", daemon.socket, "show", "status")
    assert result.returncode == 1
    assert "need root privileges or membership of group mail" in result.stderr
    assert result.stdout == ""


def test_mailq_refused_to_nobody_says_mailq(daemon: DaemonProcess) -> None:
    """A user who typed `mailq` was told `smtpctl: need root privileges for show.queue`, the name of a program
    they did not run (OpenSMTPD 6.8: `mailq: need root privileges`). The message names mailq now."""
    result = smtpctl_as("nobody", daemon.socket, prog="mailq")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("mailq: need root privileges"), result.stderr


def test_control_group_member_may_read_but_not_write(daemon: DaemonProcess) -> None:
    mail_gid = grp.getgrnam("mail").gr_gid
    status = smtpctl_as("nobody", daemon.socket, "show", "status", extra_groups=(mail_gid,))
    assert (status.returncode, status.stdout) == (0, "MDA running\nMTA running\nSMTP running\n")
    stats = smtpctl_as("nobody", daemon.socket, "show", "stats", extra_groups=(mail_gid,))
    assert stats.returncode == 0 and "uptime=" in stats.stdout
    paused = smtpctl_as("nobody", daemon.socket, "pause", "mda", extra_groups=(mail_gid,))
    assert paused.returncode == 1 and "need root privileges" in paused.stderr
    assert daemon.request("show.status")["result"]["mda"] == "running"


def test_state_changes_are_logged_with_who(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("log", "verbose").stdout == "command succeeded\n"
    assert daemon.smtpctl("log", "brief").stdout == "command succeeded\n"
    log = daemon.log()
    assert "control: uid=0 (root)" in log and "ran log.verbose" in log and "ran log.brief" in log


def test_client_that_never_reads_replies_is_dropped(daemon: DaemonProcess) -> None:
    with connect(daemon) as greedy:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b'{"v": 1, "id": 1, "cmd": "show.stats"}\n'
        sent = 0
        try:
            while sent < 200_000:  # far more answers than any buffer holds; we read none of them
                greedy.sendall(request * 100)
                sent += 100
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        assert_still_serving(daemon)


def test_unprivileged_client_that_never_reads_refusals_is_dropped(daemon: DaemonProcess) -> None:
    """Refusals are replies too: the request timeout bounds how long one may wait for a client that does not
    read (docs/control-api.md), or a user could hold the daemon's connection tasks open forever."""
    account = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # the child: become nobody, flood refused requests, report whether the daemon hung up
        status = 3
        try:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            greedy.connect(daemon.socket)
            greedy.settimeout(1)
            with contextlib.suppress(OSError):
                for _ in range(20_000):  # far more refusals than any buffer holds; the daemon stops reading
                    greedy.sendall(b'{"v": 1, "id": 1, "cmd": "show.stats"}\n')
            # Without reading a byte (reading would let the daemon go on): has it hung up? (the module's daemon
            # times out after 2 s)
            poller = select.poll()
            poller.register(greedy, select.POLLHUP | select.POLLRDHUP)
            status = 0 if poller.poll(20_000) else 1
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert_still_serving(daemon)


def test_second_daemon_on_the_same_socket_fails_and_leaves_the_first_alone(daemon: DaemonProcess) -> None:
    workdir = make_workdir()
    try:
        second = DaemonProcess(workdir, env={"SMTPD_SOCKET": daemon.socket})
        with pytest.raises(RuntimeError, match="smtpd exited at start"):
            second.start()
        second.stop()
        assert "control socket already listening" in second.log()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert os.path.exists(daemon.socket)
    assert_still_serving(daemon)


@pytest.mark.parametrize("identifier", [b"NaN", b"-Infinity", b"[1, Infinity]"])
def test_error_reply_to_a_request_with_a_non_json_id_is_json(daemon: DaemonProcess, identifier: bytes) -> None:
    """The id is echoed when it can be read; one that is no JSON value must not make the reply invalid JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    with connect(daemon) as connection:
        connection.sendall(b'{"v": 1, "id": ' + identifier + b', "cmd": "hello"}\n')
        reply = json.loads(read_line(connection), parse_constant=refuse)
        assert (reply["id"], reply["error"]["code"]) == (None, "bad-request")
    assert_still_serving(daemon)


def test_start_on_a_socket_whose_owner_does_not_accept_fails_at_once() -> None:
    """A daemon that still owns the socket but is hung (stopped, swamped: its backlog full) is a live owner: the
    new one must say so and exit, not wait for that connect forever."""
    workdir = make_workdir()
    try:
        path = str(workdir / "busy.sock")
        with full_unix_backlog(path):
            second = DaemonProcess(workdir, env={"SMTPD_SOCKET": path})
            try:
                # (a start that hung in the probe would fail the wait with "smtpd did not ...", not this)
                with pytest.raises(RuntimeError, match="smtpd exited at start"):
                    second.start()
            finally:
                second.stop()
            assert "control socket already listening" in second.log()
            assert stat.S_ISSOCK(os.stat(path).st_mode)  # the owner's socket is left alone
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("client", ["idle", "monitor", "enqueue"])
def test_stop_with_a_control_client_connected_logs_no_traceback(client: str) -> None:
    """The daemon's stop ends every control connection; asyncio logged each one it found (an idle client, a
    `smtpctl monitor`, a sendmail's session) as an unhandled CancelledError with a traceback."""
    workdir = make_workdir()
    try:
        running = DaemonProcess(workdir).start()
        try:
            with connect(running) as connection:
                if client == "monitor":
                    connection.sendall(b'{"v": 1, "id": 1, "cmd": "monitor", "args": {"interval": 0.1}}\n')
                    assert json.loads(read_line(connection))["event"]["type"] == "stats"
                elif client == "enqueue":
                    assert reply_to(connection, b'{"v": 1, "id": 1, "cmd": "enqueue"}\n')["ok"]
                    assert read_line(connection).startswith(b"220 ")
                else:
                    assert reply_to(connection, b'{"v": 1, "id": 1, "cmd": "hello"}\n')["ok"]
                running.stop()
            assert running.process is not None and running.process.returncode == 0
        finally:
            running.stop()
        log = running.log()
        assert "Traceback" not in log and "Exception in callback" not in log, log
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _ask(connection: socket.socket, command: str) -> dict:
    connection.sendall(json.dumps({"v": 1, "id": 1, "cmd": command}).encode() + b"\n")
    return json.loads(read_line(connection))


def test_groups_are_the_peers_at_connect_time(daemon: DaemonProcess) -> None:
    """Read access comes from the groups the peer had when it connected (as the uid does), not from whatever
    the process with its pid has later: a pid is reused once its process ends, and another user's process
    (a member of the control group) must not lend its groups to a connection it never made."""
    nobody = pwd.getpwnam("nobody")
    mail_gid = grp.getgrnam("mail").gr_gid
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: connect as nobody without groups, then let the same pid gain the control group
        answers: list[bool] = []
        try:
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, 0)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, 0)
            connection = connect(daemon)
            answers.append(_ask(connection, "show.status")["ok"])
            os.setresuid(-1, 0, -1)
            os.setgroups([mail_gid])
            os.setresuid(-1, nobody.pw_uid, -1)
            answers.append(_ask(connection, "show.status")["ok"])
        finally:
            os.write(report_write, json.dumps(answers).encode())
            os._exit(0)
    os.close(report_write)
    with os.fdopen(report_read, "rb") as report:
        answers = json.loads(report.read())
    os.waitpid(pid, 0)
    assert answers == [False, False]
    assert_still_serving(daemon)


def test_groups_of_a_pid_that_now_runs_as_another_user_are_not_the_peers() -> None:
    """Without the kernel's record (SO_PEERGROUPS), /proc/PID is asked only while that pid runs as the peer's
    uid; otherwise the group file decides."""
    from smtpd.control.server import Peer

    nobody = pwd.getpwnam("nobody")
    other = pwd.getpwnam("daemon")
    mail_gid = grp.getgrnam("mail").gr_gid
    assert "nobody" not in grp.getgrgid(mail_gid).gr_mem
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a process of another user, in the control group, that holds the pid the peer had
        try:
            os.setgroups([mail_gid])
            os.setgid(other.pw_gid)
            os.setuid(other.pw_uid)
            os.write(ready_write, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.read(ready_read, 1)
        peer = Peer(pid=pid, uid=nobody.pw_uid, gid=nobody.pw_gid)
        assert mail_gid not in peer.groups()
        assert mail_gid in Peer(pid=pid, uid=other.pw_uid, gid=other.pw_gid).groups()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready_read)
        os.close(ready_write)
