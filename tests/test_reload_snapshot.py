"""A reload against the real daemon: a session that began before it keeps its whole snapshot (rules, actions,
tables, limits, host name) for its life, including the tables; new sessions get the new configuration."""

from __future__ import annotations

import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_control import DaemonProcess, free_port, make_workdir

from smtpctl.commands.maps import makemap_main


def relay_config(port: int, host: str, table: str, action: str, size: int) -> str:
    return (f"listen on 127.0.0.1 port {port} hostname {host}\n"
            f"{table}\n"
            f"smtp max-message-size {size}\n"
            f'action "{action}" relay host smtp://127.0.0.1:9\n'
            f'match from any for rcpt-to <users> action "{action}"\n')


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = make_workdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def rcpt(session: smtplib.SMTP, address: str) -> int:
    return session.rcpt(address)[0]


def test_a_session_keeps_its_tables_rules_and_limits_across_a_reload(workdir: Path) -> None:
    port = free_port()
    old = relay_config(port, "old.example", 'table users { "alice@example.org" }', "a", 100000)
    new = relay_config(port, "new.example", 'table users { "bob@example.org" }', "b", 200000)
    with DaemonProcess(workdir, old, paused=("mta",)) as daemon:
        before = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            assert before.ehlo()[0] == 250
            daemon.config_path.write_text(new)
            assert daemon.smtpctl("reload").returncode == 0
            assert before.mail("x@example.com")[0] == 250
            assert rcpt(before, "alice@example.org") == 250  # the old table's content, for the old rule
            assert rcpt(before, "bob@example.org") == 550
            assert before.rset()[0] == 250
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as after:
                code, text = after.ehlo()
                assert code == 250 and text.startswith(b"new.example") and b"SIZE 200000" in text
                assert after.mail("x@example.com")[0] == 250
                assert rcpt(after, "alice@example.org") == 550
                assert rcpt(after, "bob@example.org") == 250
        finally:
            before.quit()


def test_a_session_keeps_its_db_table_open_across_a_reload(workdir: Path) -> None:
    port = free_port()
    source = workdir / "users"
    source.write_text("carol@example.org\n")
    assert makemap_main(["-t", "set", str(source)], "makemap") == 0
    table = f"table users db:{source}.db"
    with DaemonProcess(workdir, relay_config(port, "old.example", table, "a", 100000), paused=("mta",)) as daemon:
        before = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            assert before.ehlo()[0] == 250
            daemon.config_path.write_text(relay_config(port, "new.example", table, "b", 100000))
            assert daemon.smtpctl("reload").returncode == 0
            assert before.mail("x@example.com")[0] == 250
            # The tables of the old snapshot are still open for this session (not closed by the reload).
            assert rcpt(before, "carol@example.org") == 250
        finally:
            before.quit()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as after:
            assert after.ehlo()[0] == 250
            assert after.mail("x@example.com")[0] == 250
            assert rcpt(after, "carol@example.org") == 250
        assert "Traceback" not in daemon.log()


def hostname_config(port: int, host: str, big_table: Path | None) -> str:
    return (f"listen on 127.0.0.1 port {port} hostname {host}\n"
            + (f"table big file:{big_table}\n" if big_table else "")
            + 'action "a" relay host smtp://127.0.0.1:9\n'
            + ('match from any for rcpt-to <big> action "a"\n' if big_table else "")
            + 'match from any for domain "example.org" action "a"\n')


def test_overlapping_reloads_leave_the_newest_file_in_force(workdir: Path) -> None:
    """A slow reload (a big table) overlapped by a second one, for a file edited meanwhile: the second must not
    be undone by the first finishing after it."""
    import socket
    import threading

    from waiting import wait_until

    port = free_port()
    big = workdir / "big"
    big.write_text("".join(f"user{number}@example.org\n" for number in range(500_000)))
    with DaemonProcess(workdir, hostname_config(port, "start.example", None), paused=("mta",)) as daemon:
        replies: dict[str, dict] = {}
        daemon.config_path.write_text(hostname_config(port, "first.example", big))
        first = threading.Thread(target=lambda: replies.__setitem__("first", daemon.request("reload")))
        first.start()
        wait_until(lambda: "ran reload" in daemon.log(), 10)
        daemon.config_path.write_text(hostname_config(port, "second.example", None))
        second = threading.Thread(target=lambda: replies.__setitem__("second", daemon.request("reload")))
        second.start()
        first.join(60)
        second.join(60)
        assert replies["first"]["ok"] and replies["second"]["ok"], replies
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            assert connection.recv(100).startswith(b"220 second.example ")


def test_a_reload_that_fails_late_keeps_the_old_tables_as_they_were(workdir: Path) -> None:
    """The new config parses, its tables load, then a new listener's port is taken: the old configuration stays,
    with its own tables (not read again: the admin moved the old table's file as part of the change)."""
    import socket

    port = free_port()
    old_table, new_table = workdir / "users1", workdir / "users2"
    old_table.write_text("alice@example.org\n")
    new_table.write_text("alice@example.org\n")
    old = (f"listen on 127.0.0.1 port {port}\ntable users file:{old_table}\n"
           'action "a" relay host smtp://127.0.0.1:9\nmatch from any for rcpt-to <users> action "a"\n')
    with socket.socket() as busy, DaemonProcess(workdir, old, paused=("mta",)) as daemon:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        old_table.rename(workdir / "users1.old")
        daemon.config_path.write_text(
            f"listen on 127.0.0.1 port {port}\nlisten on 127.0.0.1 port {taken}\ntable users2 file:{new_table}\n"
            'action "a" relay host smtp://127.0.0.1:9\nmatch from any for rcpt-to <users2> action "a"\n')
        result = daemon.smtpctl("reload")
        assert result.returncode == 78, result
        # The line of the new file that asks for it, once (it was "FILE: FILE:2: cannot listen ...").
        assert result.stderr.splitlines()[0] == \
            f"{daemon.config_path}:2: cannot listen on 127.0.0.1 port {taken}: Address already in use"
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as session:
            assert session.ehlo()[0] == 250
            assert session.mail("x@example.com")[0] == 250
            assert rcpt(session, "alice@example.org") == 250
        assert "could not restore" not in daemon.log()


def test_a_reload_does_not_wait_for_idle_relay_sessions_to_quit(workdir: Path) -> None:
    """The relay agent keeps sessions idle for reuse; a reload closes them, but a server slow to answer QUIT
    must not hold the reload (and with it the new config) for seconds per session. The server here never
    answers QUIT, so our client gives up on it after its own QUIT timeout: the reload must have answered before
    that, with the relay session still open (before, the reload waited for it to close)."""
    import socket
    import socketserver
    import threading

    from waiting import wait_until

    quits = threading.Event()
    closed = threading.Event()  # our client closed the relay session that got QUIT

    class Silent(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 slow.test ESMTP\r\n")
            in_data = False
            for line in self.rfile:
                if in_data:
                    if line.rstrip(b"\r\n") == b".":
                        in_data = False
                        self.wfile.write(b"250 queued\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"QUIT":  # never answered while the test runs: wait until the client hangs up
                    self.request.settimeout(0.2)
                    while not quits.is_set():
                        try:
                            if not self.request.recv(100):
                                closed.set()
                                return
                        except TimeoutError:
                            continue
                        except OSError:
                            closed.set()
                            return
                    return
                if verb == b"DATA":
                    in_data = True
                self.wfile.write({b"EHLO": b"250 slow.test\r\n", b"DATA": b"354 go\r\n"}.get(verb, b"250 ok\r\n"))

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    port, relay_port = free_port(), free_port()
    config = (f"listen on 127.0.0.1 port {port} hostname {{host}}\n"
              f'action "a" relay host smtp://127.0.0.1:{relay_port}\n'
              'match from any for domain "example.org" action "a"\n')
    with Server(("127.0.0.1", relay_port), Silent) as relay:
        threading.Thread(target=relay.serve_forever, daemon=True).start()
        try:
            with DaemonProcess(workdir, config.format(host="old.example")) as daemon:
                for number in range(3):
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                        client.sendmail("x@example.com", [f"u{number}@example.org"], "Subject: t\n\nbody\n")
                wait_until(lambda: daemon.smtpctl("show", "queue").stdout == "", 20)
                daemon.config_path.write_text(config.format(host="new.example"))
                assert daemon.smtpctl("reload").returncode == 0
                assert not closed.is_set(), "the reload answered only once the idle relay session had closed"
                with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                    assert connection.recv(100).startswith(b"220 new.example ")
        finally:
            quits.set()
            relay.shutdown()


def test_update_table_logs_opensmtpd_lines(workdir: Path) -> None:
    port = free_port()
    source = workdir / "users"
    source.write_text("alice@example.org\n")
    config = relay_config(port, "mx.example", f"table users file:{source}", "a", 100000)
    with DaemonProcess(workdir, config, paused=("mta",)) as daemon:
        assert daemon.smtpctl("update", "table", "users").returncode == 0
        assert 'info: Table "users" successfully updated' in daemon.log()
        source.unlink()
        assert daemon.smtpctl("update", "table", "users").returncode == 1
        assert 'info: Failed to update table "users"' in daemon.log()


def test_reload_output_names_each_change_once_and_warnings_as_smtpd_n(workdir: Path) -> None:
    port = free_port()
    users = workdir / "passwd"
    users.write_text("alice:$6$x$y:1000:1000::/home/alice:/bin/sh\n")
    base = (f"listen on 127.0.0.1 port {port}\n"
            'action "a" relay host smtp://127.0.0.1:9\n'
            'match from any for domain "example.org" action "a"\n')
    with DaemonProcess(workdir, base, paused=("mta",)) as daemon:
        daemon.config_path.write_text(base + f"table users passwd:{users}\n"
                                      'action "v" maildir alias <users>\n'
                                      'match from any for domain "x.org" action "v"\n')
        result = daemon.smtpctl("reload")
        assert result.returncode == 0, result
        assert result.stdout.splitlines() == [
            f'table added: table users "passwd:{users}"',
            'action added: action "v" maildir alias <users>',
            'rule added: match from any for domain "x.org" action "v"',
            "configuration reloaded",
        ]
        [warning] = result.stderr.splitlines()
        assert warning.startswith(f"{daemon.config_path}:4: warning: table \"users\" (passwd)"), warning


def test_a_reload_applies_the_new_mda_max_session(workdir: Path) -> None:
    """`mda limit max-session` was read once, at start: a reload said "mda limits changed" and the deliveries
    went on one at a time. Each delivery here waits (at most 10 s) until three are running together, and fails
    for now if they do not come: one at a time, none would ever be delivered."""
    import os

    from waiting import wait_until

    port = free_port()
    running = workdir / "running"
    running.mkdir()
    os.chmod(running, 0o777)
    script = workdir / "meet.sh"
    script.write_text("#!/bin/sh\ncat > /dev/null\n"
                      f'touch "{running}/$$"\n'
                      f'for i in $(seq 100); do [ "$(ls {running} | wc -l)" -ge 3 ] && exit 0; sleep 0.1; done\n'
                      f'rm -f "{running}/$$"\n'  # (alone: gone, so that a later try alone does not count it)
                      "exit 75\n")
    script.chmod(0o755)

    def config(sessions: int) -> str:
        return (f"mda limit max-session {sessions}\n"
                f"listen on 127.0.0.1 port {port}\n"
                f'action "cmd" mda "{script}" user nobody\n'
                'match from any for domain "cmd.test" action "cmd"\n')

    with DaemonProcess(workdir, config(1), paused=("mda",)) as daemon:
        daemon.config_path.write_text(config(3))
        result = daemon.smtpctl("reload")
        assert result.stdout == "mda limits changed\nconfiguration reloaded\n", result
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for _ in range(3):
                assert client.sendmail("a@example.com", ["root@cmd.test"], b"Subject: t\r\n\r\nb\r\n") == {}
        assert daemon.smtpctl("resume", "mda").returncode == 0
        wait_until(lambda: daemon.smtpctl("show", "queue").stdout == "", 60, interval=0.2)
        assert daemon.log().count("result=Ok stat=Delivered") == 3
        assert "result=TempFail" not in daemon.log(), "the deliveries did not run three at a time"
