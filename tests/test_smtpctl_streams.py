"""Streams: `smtpctl trace ... --follow` and `smtpctl monitor`, including a follower too slow to keep up."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers_control import ROOT, DaemonProcess, read_line, running_daemon

ROW = re.compile(r"^ {0,3}\d+ {1,4}\d+ {1,4}\d+  {1,4}\d+ {1,4}\d+ {1,4}\d+ {1,4}\d+ {4,7}\d+ {4,7}\d+ {1,4}\d+"
                 r" {3,6}\d+ {3,6}\d+ {3,6}\d+$")
HEADER = ["--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------",
          "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as running:
        yield running


def spawn_smtpctl(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "smtpctl", "--socket", daemon.socket, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def enabled_traces(daemon: DaemonProcess) -> list[str]:
    return daemon.request("hello")["result"]["traces"]


def make_stat_events(daemon: DaemonProcess, connections: int) -> None:
    """Each control connection counts control.session up and down: two `stat` trace events."""
    for _ in range(connections):
        daemon.request("hello")


def read_while_provoking(daemon: DaemonProcess, process: subprocess.Popen[str]) -> str:
    """Make events until the follower (which subscribes at some point after it starts) prints a line."""
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        make_stat_events(daemon, 1)
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            return process.stdout.readline()
    raise AssertionError("the follower printed nothing")


def test_trace_on_returns_at_once_and_stays_on(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("trace", "expand").stdout == "command succeeded\n"
    assert daemon.smtpctl("trace", "lookup").stdout == "command succeeded\n"
    assert {"expand", "lookup"} <= set(enabled_traces(daemon))
    daemon.smtpctl("untrace", "expand")
    daemon.smtpctl("untrace", "lookup")
    assert not {"expand", "lookup"} & set(enabled_traces(daemon))


def test_follow_streams_events_and_turns_off_what_it_turned_on(daemon: DaemonProcess) -> None:
    follower = spawn_smtpctl(daemon, "trace", "stat", "--follow", "--json")
    assert follower.stdout is not None
    try:
        deadline = time.monotonic() + 20
        while "stat" not in enabled_traces(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        make_stat_events(daemon, 3)
        events = [json.loads(follower.stdout.readline()) for _ in range(4)]
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(15)
    assert follower.returncode == 0
    assert all(event["type"] == "trace" and event["subsystem"] == "stat" for event in events)
    assert any(event.get("key") == "control.session" for event in events)
    deadline = time.monotonic() + 10
    while "stat" in enabled_traces(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stat" not in enabled_traces(daemon)


def test_follow_keeps_traces_that_were_already_on(daemon: DaemonProcess) -> None:
    daemon.smtpctl("trace", "stat")
    follower = spawn_smtpctl(daemon, "trace", "stat", "--follow")
    assert follower.stdout is not None
    line = read_while_provoking(daemon, follower)
    follower.send_signal(signal.SIGINT)
    follower.wait(15)
    assert line.startswith("stat: ")
    assert "stat" in enabled_traces(daemon)
    daemon.smtpctl("untrace", "stat")


def test_follow_filter_by_text(daemon: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as follower:
        follower.settimeout(20)
        follower.connect(daemon.socket)
        follower.sendall(json.dumps({"v": 1, "id": 9, "cmd": "trace.follow",
                                     "args": {"keywords": ["stat"], "address": "no-such-thing"}}).encode() + b"\n")
        start = json.loads(read_line(follower))
        assert start["event"]["type"] == "start"
        make_stat_events(daemon, 3)
        follower.settimeout(1.0)
        with pytest.raises(TimeoutError):
            follower.recv(100)  # every event was filtered out


def test_slow_follower_loses_events_and_is_told_while_daemon_serves_others(daemon: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(30)
        slow.connect(daemon.socket)
        slow.sendall(json.dumps({"v": 1, "id": 5, "cmd": "trace.follow",
                                 "args": {"keywords": ["stat"], "capacity": 5}}).encode() + b"\n")
        assert json.loads(read_line(slow))["event"]["type"] == "start"
        # We do not read. The daemon must go on serving everybody else all the same.
        make_stat_events(daemon, 1500)
        assert daemon.request("show.status")["ok"]
        # Now read: somewhere in the stream the daemon reports how many events we lost.
        dropped = 0
        received = 0
        buffer = b""
        deadline = time.monotonic() + 30
        while not dropped and time.monotonic() < deadline:
            try:
                chunk = slow.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)["event"]
                if event["type"] == "dropped":
                    dropped += event["count"]
                else:
                    received += 1
            if not dropped:
                make_stat_events(daemon, 1)
    assert dropped > 0
    assert received + dropped >= 3000


def test_monitor_rows(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("monitor", "--count", "3", "--interval", "0.2")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[:2] == HEADER
    assert len(lines) == 5
    assert all(ROW.match(line) for line in lines[2:]), lines


@pytest.mark.parametrize("interval", ["nan", "inf", "0.01"])
def test_monitor_refuses_intervals_that_are_not_seconds(daemon: DaemonProcess, interval: str) -> None:
    result = daemon.smtpctl("monitor", "--count", "1", "--interval", interval)
    assert result.returncode == 255
    assert "Invalid value for '-i' / '--interval'" in result.stderr
    assert result.stdout == ""


def test_monitor_counts_connections(daemon: DaemonProcess) -> None:
    monitor = spawn_smtpctl(daemon, "monitor", "--json", "--interval", "0.5")
    assert monitor.stdout is not None
    try:
        first = json.loads(monitor.stdout.readline())
        assert set(first) >= {"client_curr", "client_conn", "envelope_curr", "ok", "bounce"}
        monitor.stdout.readline()
        rows = [json.loads(monitor.stdout.readline()) for _ in range(2)]
    finally:
        monitor.send_signal(signal.SIGINT)
        monitor.wait(15)
    assert monitor.returncode == 0
    assert all(row["client_conn"] == 0 for row in rows)  # control connections are not SMTP clients


def test_slow_terminal_is_told_how_many_events_it_lost(daemon: DaemonProcess) -> None:
    """A real `smtpctl trace --follow` whose output nobody reads for a while (a stuck terminal)."""
    import threading

    follower = spawn_smtpctl(daemon, "trace", "stat", "--follow", "--buffer", "5")
    assert follower.stdout is not None and follower.stderr is not None
    try:
        deadline = time.monotonic() + 20
        while "stat" not in enabled_traces(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        make_stat_events(daemon, 2000)  # its stdout pipe fills, it stops reading, the daemon drops
        assert daemon.request("show.status")["ok"]
        # The terminal wakes up: read everything it prints from now on.
        printed: list[str] = []
        reader = threading.Thread(target=lambda: printed.extend(follower.stdout), daemon=True)
        reader.start()
        complaint = ""
        deadline = time.monotonic() + 30
        while "dropped" not in complaint and time.monotonic() < deadline:
            make_stat_events(daemon, 1)
            ready, _, _ = select.select([follower.stderr], [], [], 0.1)
            if ready:
                complaint += os.read(follower.stderr.fileno(), 4096).decode()
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(15)
    assert re.search(r"smtpctl: \d+ trace events dropped \(reading too slowly\)", complaint), complaint
    assert follower.returncode == 0


@pytest.mark.parametrize("words", [("monitor", "--interval", "0.1"), ("trace", "stat", "--follow")])
def test_a_reader_that_leaves_ends_the_stream_with_success(daemon: DaemonProcess, words: tuple[str, ...]) -> None:
    """`smtpctl monitor | head -3`: head leaving is how the pipe ends, so smtpctl exits 0, silently."""
    command = " ".join([sys.executable, "-m", "smtpctl", "--socket", daemon.socket, *words])
    shell = subprocess.Popen(["/bin/sh", "-c", f"{command} | head -1; echo status=${{PIPESTATUS:-x}}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, executable="/bin/bash")
    try:
        deadline = time.monotonic() + 30
        while shell.poll() is None and time.monotonic() < deadline:
            make_stat_events(daemon, 5)
            time.sleep(0.1)
        out, err = shell.communicate(timeout=15)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    assert err == ""
    assert out.splitlines()[-1] == "status=0"


def follow(daemon: DaemonProcess, keyword: str) -> tuple[socket.socket, dict[str, object]]:
    """A `trace.follow` connection of our own, once the daemon has subscribed it: (socket, its start event)."""
    follower = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    follower.settimeout(20)
    follower.connect(daemon.socket)
    follower.sendall(json.dumps({"v": 1, "id": 1, "cmd": "trace.follow", "args": {"keywords": [keyword]}}).encode()
                     + b"\n")
    start = json.loads(read_line(follower))["event"]
    assert start["type"] == "start"
    return follower, start


def leave(daemon: DaemonProcess, follower: socket.socket, still_following: int = 0) -> None:
    """Close a follower and wait until the daemon has let it go: the control connections left are the other
    followers' and the one asking."""
    follower.close()

    def sessions() -> int:
        return daemon.request("show.stats")["result"]["stats"]["control.session"]

    deadline = time.monotonic() + 20
    while sessions() != 1 + still_following and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == 1 + still_following


def test_a_leaving_follower_keeps_a_trace_the_administrator_turned_on_meanwhile(daemon: DaemonProcess) -> None:
    """`smtpctl trace rules` while a colleague's `trace rules --follow` runs: when the follower left, it switched
    off the trace the administrator had just asked for, and the log went quiet."""
    follower, start = follow(daemon, "rules")
    assert start["enabled"] == ["rules"]
    assert daemon.smtpctl("trace", "rules").stdout == "command succeeded\n"
    leave(daemon, follower)
    assert "rules" in enabled_traces(daemon)
    daemon.smtpctl("untrace", "rules")
    assert "rules" not in enabled_traces(daemon)


def test_a_trace_stays_on_while_another_follower_follows_it(daemon: DaemonProcess) -> None:
    first, _ = follow(daemon, "rules")
    second, start = follow(daemon, "rules")
    assert start["enabled"] == []  # already on: the first follower's
    leave(daemon, first, still_following=1)
    assert "rules" in enabled_traces(daemon)  # the second one still follows it
    leave(daemon, second)
    assert "rules" not in enabled_traces(daemon)
