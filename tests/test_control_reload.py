"""`smtpctl reload` and SIGHUP against the real daemon: a broken config leaves the old one serving; a changed
listener is swapped while a session on the old one goes on."""

from __future__ import annotations

import shutil
import signal
import smtplib
import socket
import time
from collections.abc import Iterator

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir


def config(port: int, extra: str = "") -> str:
    return (f"listen on 127.0.0.1 port {port}\n"
            'action "local" mbox\n'
            f"{extra}"
            'match from local for local action "local"\n'
            'match from any for domain "example.org" action "local"\n')


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    workdir = make_workdir()
    port = free_port()
    running = DaemonProcess(workdir, config(port)).start()
    running.port = port  # type: ignore[attr-defined]
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        return connection.recv(1024)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_reload_without_changes(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("reload")
    assert (result.returncode, result.stdout) == (0, "no changes\nconfiguration reloaded\n")


def test_reload_names_changed_filters_and_inline_tables(daemon: DaemonProcess) -> None:
    # A filter's decision or a named inline table's contents were not compared: "no changes", while new
    # sessions ran the new filter. An inline table is named only (its values may be credentials).
    port = daemon.port  # type: ignore[attr-defined]
    filters = 'table spam {{ "{0}" }}\nfilter "f" phase mail-from match mail-from regex <spam> reject "550 {1}"\n'
    daemon.config_path.write_text(config(port, filters.format("^spam@", "no")))
    assert daemon.smtpctl("reload").stdout == (
        "table added: spam\n"
        'filter added: filter "f" phase mail-from match mail-from regex <spam> reject "550 no"\n'
        "configuration reloaded\n")
    daemon.config_path.write_text(config(port, filters.format("^bulk@", "go away")))
    assert daemon.smtpctl("reload").stdout == (
        "table changed: spam\n"
        'filter changed: filter "f" phase mail-from match mail-from regex <spam> reject "550 go away"\n'
        "configuration reloaded\n")


def test_broken_config_keeps_old_one_serving(daemon: DaemonProcess) -> None:
    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text(config(port) + "match from any for nowhere action\n")
    result = daemon.smtpctl("reload")
    assert result.returncode == 78
    assert result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{daemon.config_path}:5: "), result.stderr
    assert "configuration invalid, smtpd keeps running with the previous one" in result.stderr
    assert banner(port).startswith(b"220 mx.control.test ESMTP PySMTPD")
    assert daemon.smtpctl("show", "status").returncode == 0
    assert "reload failed, keeping the running configuration" in daemon.log()


def test_sighup_reloads_and_reports_in_the_log(daemon: DaemonProcess) -> None:
    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text(config(port, 'action "other" maildir\n'))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "configuration reloaded" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'reload: action added: action "other" maildir' in daemon.log()
    assert daemon.alive()
    daemon.config_path.write_text("this is not a config\n")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "reload failed" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.alive() and banner(port).startswith(b"220 ")


def test_sigusr1_and_sigusr2_are_logged_and_change_nothing(daemon: DaemonProcess) -> None:
    port = daemon.port  # type: ignore[attr-defined]
    for signum, name in ((signal.SIGUSR1, "SIGUSR1"), (signal.SIGUSR2, "SIGUSR2")):
        daemon.signal(signum)
        deadline = time.monotonic() + 15
        while f"{name} received and ignored" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        # the whole line (it said `warn: warn: SIGUSR1 ...`, which a substring check let through)
        assert f"warn: {name} received and ignored (SIGHUP reloads, SIGTERM stops)" in daemon.log().splitlines()
    assert daemon.alive() and banner(port).startswith(b"220 ")
    assert "configuration reloaded" not in daemon.log()


def test_listener_swapped_while_a_session_is_open(daemon: DaemonProcess) -> None:
    old_port = daemon.port  # type: ignore[attr-defined]
    new_port = free_port()
    session = smtplib.SMTP("127.0.0.1", old_port, timeout=10)
    try:
        assert session.ehlo()[0] == 250
        daemon.config_path.write_text(config(new_port))
        result = daemon.smtpctl("reload")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert f'listener removed: listen on "127.0.0.1" port {old_port}' in lines
        assert f'listener added: listen on "127.0.0.1" port {new_port}' in lines
        assert lines[-1] == "configuration reloaded"
        # The session that began on the old listener goes on.
        assert session.mail("alice@example.org")[0] == 250
        assert session.noop()[0] == 250
        assert session.rset()[0] == 250
    finally:
        session.quit()
    assert refused(old_port)
    assert banner(new_port).startswith(b"220 mx.control.test ESMTP PySMTPD")


def test_reload_json(daemon: DaemonProcess) -> None:
    import json

    result = daemon.smtpctl("reload", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"ok": True, "errors": [], "warnings": [], "changes": []}


@pytest.mark.parametrize(("statement", "change"), [
    ("mta max-deferred 5\n", "mta max-deferred changed"),
    ('mda wrapper "w" "/usr/bin/env %{mda}"\n', 'mda wrapper added: mda wrapper "w" "/usr/bin/env %{mda}"'),
    ('admd "mx.example"\n', "admd changed"),
    ("scheduler limit max-inflight 10\n", "scheduler limits changed"),
    ('proc "p" "echo \'register|ready\'; exec cat >/dev/null"\n',
     'proc added: proc "p" "echo \'register|ready\'; exec cat >/dev/null"'),
])
def test_reload_names_every_changed_statement(daemon: DaemonProcess, statement: str, change: str) -> None:
    # These statements were not compared: the daemon took them and smtpctl said "no changes".
    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text(config(port) + statement)
    result = daemon.smtpctl("reload")
    assert (result.returncode, result.stdout) == (0, f"{change}\nconfiguration reloaded\n"), result


def test_sighup_while_the_daemon_starts_waits_for_the_start() -> None:
    """A SIGHUP while the daemon starts (its components still starting): the reload ran at once, bound the
    changed listener, and the SMTP server's own start then found its port taken: the daemon exited. The reload
    must wait for the start, then read the edited file."""
    from daemon import accepts
    from waiting import wait_until

    workdir = make_workdir()
    port = free_port()
    daemon = DaemonProcess(workdir, config(port))
    daemon.control = daemon.listens = False  # start() returns at once: the signal must come during the start
    try:
        daemon.start()
        wait_until(lambda: "starting" in daemon.log(), 30, interval=0.001)
        daemon.config_path.write_text(config(port).replace(f"port {port}", f"port {port} hostname new.example"))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: not daemon.alive() or ("configuration reloaded" in daemon.log() and accepts(port)), 30)
        assert daemon.alive(), daemon.log()
        assert banner(port).startswith(b"220 new.example ESMTP PySMTPD")
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_comment_above_the_listener_is_no_change(daemon: DaemonProcess) -> None:
    # The listener was compared with its line number: "smtp: listening on 1 address(es)" for a comment.
    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text("# the relay of example.org\n" + config(port))
    result = daemon.smtpctl("reload")
    assert (result.returncode, result.stdout) == (0, "no changes\nconfiguration reloaded\n"), result


def test_reload_names_an_added_ca(daemon: DaemonProcess, tmp_path) -> None:  # noqa: ANN001
    from helpers_smtp import make_certificate

    certificate, _ = make_certificate(tmp_path)
    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text(f'ca "x" cert "{certificate}"\n' + config(port))
    result = daemon.smtpctl("reload")
    assert result.returncode == 0, result
    assert f'ca added: ca "x" cert "{certificate}"' in result.stdout.splitlines()


def test_a_sighup_with_no_rules_left_says_why_once(daemon: DaemonProcess) -> None:
    """A config without match rules: the log said `warn: reload: warn: no rules, nothing to do`."""
    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text(f"listen on 127.0.0.1 port {port}\naction \"local\" mbox\n")
    daemon.signal(signal.SIGHUP)
    from waiting import wait_until

    wait_until(lambda: "reload failed" in daemon.log(), 30)
    assert "warn: reload: no rules, nothing to do" in daemon.log().splitlines()
    assert daemon.alive() and banner(port).startswith(b"220 ")


def test_a_sighup_logs_the_warnings_of_the_new_config(daemon: DaemonProcess) -> None:
    """The warnings of a reloaded file (a legacy statement, a listener that can never bind) went to `smtpctl
    reload`'s caller alone: after a SIGHUP nobody saw them (here the one that tells why the reload then fails)."""
    from waiting import wait_until

    port = daemon.port  # type: ignore[attr-defined]
    daemon.config_path.write_text(config(port).replace("\n", f"\nlisten on 127.0.0.1 port {port}\n", 1))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in daemon.log(), 30, explain=daemon.log)
    assert (f"warn: reload: {daemon.config_path}:2: warning: listener on 127.0.0.1 port {port} duplicates the one "
            f"at {daemon.config_path}:1: only one can bind") in daemon.log().splitlines(), daemon.log()
