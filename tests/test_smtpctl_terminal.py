"""What a person at a terminal sees: `trace --follow` and `monitor` update live (pexpect drives a real pty)."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator

import pexpect
import pytest
from daemon import accepts
from helpers_control import ROOT, DaemonProcess, free_port, minimal_config, running_daemon
from waiting import wait_until


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as running:
        yield running


def spawn(daemon: DaemonProcess, *args: str) -> pexpect.spawn:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "120"}
    environment.pop("NO_COLOR", None)
    return pexpect.spawn(sys.executable, ["-m", "smtpctl", "--socket", daemon.socket, *args], env=environment,
                         cwd=str(ROOT), encoding="utf-8", timeout=30, dimensions=(40, 120))


def test_trace_follow_updates_live(daemon: DaemonProcess) -> None:
    terminal = spawn(daemon, "trace", "stat", "--follow")
    try:
        terminal.expect("following stat; Ctrl-C to stop")
        for round_number in range(3):
            daemon.request("hello")  # each control connection is a stat event
            terminal.expect(r"stat .*control\.session \+= 1 ")
            assert "\x1b[" in terminal.before + terminal.after  # coloured by rich
            del round_number
        terminal.sendintr()
        terminal.expect(pexpect.EOF)
    finally:
        terminal.close(force=True)
    assert terminal.exitstatus == 0
    assert "stat" not in daemon.request("hello")["result"]["traces"]


def test_monitor_updates_live(daemon: DaemonProcess) -> None:
    terminal = spawn(daemon, "monitor", "--interval", "0.3")
    try:
        terminal.expect("curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce")
        rows = 0
        while rows < 3:
            terminal.expect(r"\r\n +\d+ +\d+ +\d+  +\d+")
            rows += 1
        terminal.sendintr()
        terminal.expect(pexpect.EOF)
    finally:
        terminal.close(force=True)
    assert terminal.exitstatus == 0


def test_show_status_is_a_coloured_table_on_a_terminal(daemon: DaemonProcess) -> None:
    daemon.smtpctl("pause", "mda")
    try:
        terminal = spawn(daemon, "show", "status")
        terminal.expect(pexpect.EOF)
        terminal.close()
    finally:
        daemon.smtpctl("resume", "mda")
    screen = terminal.before
    assert terminal.exitstatus == 0
    assert "subsystem" in screen and "state" in screen  # the table's header
    assert "\x1b[" in screen  # styled
    plain = re.sub(r"\x1b\[[0-9;]*m", "", screen)
    assert re.search(r"MDA\s+\S*\s*paused", plain) and re.search(r"SMTP\s+\S*\s*running", plain)
    # The same command in a pipe prints OpenSMTPD's stable text.
    assert daemon.smtpctl("show", "status").stdout == "MDA running\nMTA running\nSMTP running\n"


def test_trace_follow_does_not_pass_a_clients_control_characters_to_the_terminal() -> None:
    """`smtp: ... <<< LINE` quotes what a client sent; on a terminal its ESC sequences (colours, the window
    title, worse) were printed raw. They are shown as vis(3) writes them."""
    port = free_port()
    with running_daemon(minimal_config(port)) as daemon:
        wait_until(lambda: accepts(port), 20, explain=daemon.log)
        terminal = spawn(daemon, "trace", "smtp", "--follow")
        try:
            terminal.expect("following smtp; Ctrl-C to stop")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                client.recv(1000)
                client.sendall(b"EHLO \x1b[31mred\x1b]0;title\x07 caf\xc3\xa9\r\nQUIT\r\n")
                terminal.expect(r">>> 221 ")
            screen = terminal.before
            terminal.sendintr()
            terminal.expect(pexpect.EOF)
        finally:
            terminal.close(force=True)
    assert "<<< EHLO \\^[[31mred\\^[]0;title\\^G café" in screen
    assert "\x1b[31mred" not in screen and "\x1b]0;" not in screen and "\x07" not in screen


@pytest.mark.parametrize("plain", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_show_queue_on_a_terminal_that_wants_no_styles_prints_the_lines(daemon: DaemonProcess, plain) -> None:
    """NO_COLOR or TERM=dumb turn the rich output off (docs/control-api.md), as `show status` does: `show queue`
    and mailq drew their boxed table anyway, the evpid folded over lines, with bold escapes on a dumb terminal."""
    import subprocess

    daemon.smtpctl("pause", "mda")
    try:
        sent = subprocess.run([str(ROOT / ".venv" / "bin" / "sendmail"), "root"], input="Subject: q\n\nqueued\n",
                              capture_output=True, text=True, timeout=60, env=daemon.env)
        assert sent.returncode == 0, sent.stderr
        lines = daemon.smtpctl("show", "queue").stdout  # (in a pipe: OpenSMTPD's lines)
        assert lines.count("\n") == 1 and "|root@mx.control.test|" in lines
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", **plain}
        terminal = pexpect.spawn(sys.executable, ["-m", "smtpctl", "--socket", daemon.socket, "show", "queue"],
                                 env=environment, cwd=str(ROOT), encoding="utf-8", timeout=30, dimensions=(40, 80))
        terminal.expect(pexpect.EOF)
        terminal.close()
        assert terminal.exitstatus == 0
        shown = terminal.before.replace("\r\n", "\n")
        # (field 13, the seconds to the next try, may have moved on between the two runs)
        assert [line.split("|")[:12] for line in shown.splitlines()] == [
            line.split("|")[:12] for line in lines.splitlines()], shown
    finally:
        daemon.smtpctl("remove", "all")
        daemon.smtpctl("resume", "mda")


def test_show_queue_table_keeps_each_evpid_whole_on_an_80_column_terminal(daemon: DaemonProcess) -> None:
    """The table folded every column to fit 80 columns, the envelope id too (`9bb4e` / `75e37` / `64a60` / `5`
    on four lines): it could not be copied into `smtpctl remove` or `show envelope`. The id now stays whole; the
    other columns fold around it."""
    import subprocess

    daemon.smtpctl("pause", "mda")
    try:
        sent = subprocess.run([str(ROOT / ".venv" / "bin" / "sendmail"), "root"], input="Subject: q\n\nqueued\n",
                              capture_output=True, text=True, timeout=60, env=daemon.env)
        assert sent.returncode == 0, sent.stderr
        evpid = daemon.smtpctl("show", "queue").stdout.split("|")[0]
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "80"}
        environment.pop("NO_COLOR", None)
        terminal = pexpect.spawn(sys.executable, ["-m", "smtpctl", "--socket", daemon.socket, "show", "queue"],
                                 env=environment, cwd=str(ROOT), encoding="utf-8", timeout=30, dimensions=(40, 80))
        terminal.expect(pexpect.EOF)
        terminal.close()
        assert terminal.exitstatus == 0
        assert evpid in re.sub(r"\x1b\[[0-9;]*m", "", terminal.before), terminal.before
    finally:
        daemon.smtpctl("remove", "all")
        daemon.smtpctl("resume", "mda")
