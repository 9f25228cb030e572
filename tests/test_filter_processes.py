"""Filter processes where we go beyond OpenSMTPD 6.8 (which exits when a filter does, and waits forever for one
that does not answer) and where 6.8 could not be compared (BDAT, bare line endings, reloads). The filter is
tests/filters/scripted_filter.py; the side-by-side comparison with 6.8 is tests/test_filter_processes_opensmtpd.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import ROOT, SmtpdProcess, free_port
from helpers_filters import filter_command, lines_of, open_folder
from helpers_mta import wait_until
from helpers_smtp import LineClient, SmtpDaemon, make_certificate

MESSAGE = b"From: alice@example.com\r\nSubject: filtered\r\n\r\nbody\r\n..a dot line\r\n"


HOLDING_FILTER = '''import sys, time
held = {}
for raw in sys.stdin:
    line = raw.rstrip("\\n")
    if line == "config|ready":
        print("register|filter|smtp-in|data-line\\nregister|ready", flush=True)
    fields = line.split("|", 7)
    if fields[0] == "filter" and fields[4] == "data-line":
        held.setdefault(fields[5], []).append((fields[6], fields[7]))
        if fields[7] == ".":
            lines = held.pop(fields[5])
            if any("SLOW" in text for _, text in lines):
                time.sleep(3)
            print("".join(f"filter-dataline|{fields[5]}|{token}|{text}\\n" for token, text in lines), end="",
                  flush=True)
'''


DEAF_FILTER = '''import sys, time
for raw in iter(sys.stdin.readline, ""):
    if raw == "config|ready\\n":
        print("register|filter|smtp-in|data-line\\nregister|ready", flush=True)
        break
time.sleep(3600)  # reads nothing more
'''


@pytest.fixture()
def folder() -> Iterator[Path]:
    with open_folder("filter-processes") as made:
        yield made


def config(folder: Path, *arguments: str, log: str = "filter.log", extra: str = "") -> str:
    return (f'filter "rec" proc-exec {filter_command(folder, log, *arguments)}\n'
            'listen on 127.0.0.1 port {port} filter "rec"\n' + extra +
            'action "relay" relay\nmatch from any for any action "relay"\n')


def program_config(folder: Path, name: str, source: str) -> str:
    """A configuration whose listener runs the filter program ``source`` (written into the folder) as ``name``."""
    (folder / f"{name}.py").write_text(source)
    return (f'filter "{name}" proc-exec "/usr/bin/python3 {folder}/{name}.py"\n'
            f'listen on 127.0.0.1 port {{port}} filter "{name}"\naction "relay" relay\n'
            'match from any for any action "relay"\n')


def in_transaction(port: int, timeout: float = 30) -> LineClient:
    """A raw client past the greeting, EHLO, MAIL FROM and RCPT TO, each answered 250."""
    client = LineClient(port, timeout=timeout)
    try:
        client.reply()
        for command in (b"EHLO client.test", b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@remote.test>"):
            client.send(command + b"\r\n")
            assert client.reply()[-1].startswith("250")
    except BaseException:
        client.close()
        raise
    return client


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@example.com")
        client.rcpt("bob@remote.test")
        return client.data(MESSAGE)


def test_a_filter_that_exits_fails_what_waits_for_it_and_is_started_again(folder: Path) -> None:
    with SmtpDaemon(folder / "daemon", config(folder, "exit=mail-from@crash")) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.test")
            # Nothing passes a filter that did not judge: a temporary failure, and the session goes on.
            assert client.mail("crash@example.com") == (451, b"4.3.0 Temporary failure")
            assert client.noop()[0] == 250
        assert "filter process rec exited (status 3)" in daemon.log()
        assert wait_until(lambda: "filter process rec started again" in daemon.log(), 15), daemon.log()
        code, text = send(daemon.port)
        assert code == 250, text
        assert lines_of(folder, "filter.log").count("config|ready") == 2
        assert daemon.alive()


def test_a_request_left_unanswered_fails_after_the_session_timeout(folder: Path) -> None:
    daemon = SmtpDaemon(folder / "daemon", config(folder, "hang=rcpt-to"), env={"SMTPD_SMTP_TIMEOUT": "2"})
    with daemon, smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail("alice@example.com")[0] == 250
        assert client.rcpt("bob@remote.test") == (451, b"4.3.0 Temporary failure")
        assert client.rset()[0] == 250
        assert "filter process rec did not answer within 2 seconds" in daemon.log()


def test_a_message_the_data_line_filter_never_ends_is_not_accepted(folder: Path) -> None:
    daemon = SmtpDaemon(folder / "daemon", config(folder, "hang=data-line"), env={"SMTPD_SMTP_TIMEOUT": "2"})
    with daemon, smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@example.com")
        client.rcpt("bob@remote.test")
        assert client.data(MESSAGE) == (451, b"4.3.0 Temporary failure")
        assert client.noop()[0] == 250
    assert not list((folder / "daemon" / "spool" / "queue").rglob("message"))


@pytest.mark.parametrize(("command", "error"), [
    ("exit 3", "filter process rec exited before `register|ready`"),
    ("echo 'register|report|smtp-in|bogus'; cat", "filter process rec: unknown report event in registration: "
                                                  "'register|report|smtp-in|bogus'"),
    ("echo 'register|what'; cat", "filter process rec: invalid registration: 'register|what'"),
])
def test_a_filter_that_cannot_start_stops_the_start_with_its_reason(tmp_path: Path, command: str,
                                                                     error: str) -> None:
    text = (f'filter "rec" proc-exec "{command}"\nlisten on 127.0.0.1 port {free_port()} filter "rec"\n'
            'action "relay" relay\nmatch from any for any action "relay"\n')
    daemon = SmtpdProcess(tmp_path, text, listens=False, control=False)
    daemon.start()
    assert daemon.process is not None
    daemon.process.wait(30)
    assert daemon.process.returncode != 0
    assert f"smtpd: {error}" in daemon.log()


def test_reload_keeps_an_unchanged_process_and_replaces_a_changed_one(folder: Path) -> None:
    with SmtpdProcess(folder / "daemon", config(folder, "dataline=prepend:X-Version: 1")) as daemon:
        daemon.config_path.write_text(daemon.config_path.read_text() + "# the filter unchanged\n")
        assert daemon.smtpctl("reload").returncode == 0
        assert lines_of(folder, "filter.log").count("config|ready") == 1
        code, text = send(daemon.port)
        assert code == 250
        assert b"X-Version: 1\n" in daemon.message(text.split()[1].decode())
        # A changed filter: a new process (its own log), and the old one ends (its input closed).
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as held:  # a session on the old snapshot
            held.ehlo("client.test")
            daemon.config_path.write_text(config(folder, "dataline=prepend:X-Version: 2", log="new.log").replace(
                "{port}", str(daemon.port)))
            reloaded = daemon.smtpctl("reload")
            assert reloaded.returncode == 0
            # (said once, as the filter the administrator wrote: not also as a `proc` never written)
            assert [line.split(":")[0] for line in reloaded.stdout.splitlines()] == ["filter changed",
                                                                                    "configuration reloaded"]
            assert "config|ready" in lines_of(folder, "new.log")
            held.mail("alice@example.com")
            held.rcpt("bob@remote.test")
            code, text = held.data(MESSAGE)
            assert b"X-Version: 1\n" in daemon.message(text.split()[1].decode())
        assert wait_until(lambda: lines_of(folder, "filter.log")[-1:] != [] and
                          lines_of(folder, "filter.log")[-1].startswith("# end of input"), 15)
        code, text = send(daemon.port)
        assert b"X-Version: 2\n" in daemon.message(text.split()[1].decode())


def test_a_message_in_bdat_chunks_goes_through_the_data_line_filters(folder: Path) -> None:
    # (6.8 offers no CHUNKING: a filter sees BDAT's text in lines, dot-stuffed, as it sees DATA's)
    with SmtpDaemon(folder / "daemon", config(folder, "dataline=prepend:X-Filtered: yes")) as daemon:
        first, second = b"Subject: chunks\r\n\r\n.dot at the start\r\nsplit li", b"ne\r\n"
        client = in_transaction(daemon.port)
        try:
            client.send(b"BDAT %d\r\n" % len(first) + first)
            assert client.reply() == [f"250 2.0.0 {len(first)} octets received"]
            client.send(b"BDAT %d LAST\r\n" % len(second) + second)
            reply = client.reply()[-1]
        finally:
            client.close()
        assert reply.startswith("250 2.0.0 ")
        message = daemon.message(reply.split()[2])
        assert message.startswith(b"X-Filtered: yes\nReceived: from client.test")
        assert b"\nSubject: chunks\n" in message
        assert message.endswith(b"\n\n.dot at the start\nsplit line\n")
        assert "filter|0.6|" in "\n".join(lines_of(folder, "filter.log"))
        assert any(line.endswith("|..dot at the start") for line in lines_of(folder, "filter.log"))


def test_a_bare_line_feed_is_refused_before_the_data_line_filters(folder: Path) -> None:
    with SmtpDaemon(folder / "daemon", config(folder)) as daemon:
        client = LineClient(daemon.port)
        try:
            client.reply()
            for command in (b"EHLO client.test", b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@remote.test>",
                            b"DATA"):
                client.send(command + b"\r\n")
                client.reply()
            client.send(b"Subject: smuggled\r\n\r\nline\nMAIL FROM:<x@y>\r\n.\r\n")
            # as without filters (docs/smtp.md): the filter would never see the bare LF, split into two lines
            assert client.reply()[-1].startswith("550 5.6.0 Message refused: it contains a bare CR or LF")
        finally:
            client.close()


def test_local_submissions_go_through_the_socket_listeners_filter(folder: Path) -> None:
    text = (f'filter "rec" proc-exec {filter_command(folder, "filter.log", "dataline=prepend:X-Filtered: yes")}\n'
            'listen on socket filter "rec"\nlisten on 127.0.0.1 port {port}\n'
            'action "relay" relay\nmatch from any for any action "relay"\n')
    with SmtpDaemon(folder / "daemon", text) as daemon:
        sent = subprocess.run([str(ROOT / ".venv" / "bin" / "sendmail"), "-f", "alice@example.com",
                               "bob@remote.test"], input=b"Subject: local\n\nbody\n", env=daemon.env, cwd="/",
                              timeout=60, check=False)
        assert sent.returncode == 0
        assert wait_until(lambda: "|tx-commit|" in "\n".join(lines_of(folder, "filter.log")), 15)
        lines = lines_of(folder, "filter.log")
        where = f"unix:{daemon.socket}"
        assert any(line.endswith(f"|link-connect|{line.split('|')[5]}|mx.test.example|pass|{where}|{where}")
                   for line in lines if "|link-connect|" in line)
        assert any(line.endswith("|mx.test.example|local") for line in lines if "|connect|" in line)


def recorded_tls_listener(folder: Path, mode: str, *filter_options: str) -> tuple[str, ssl.SSLContext]:
    """A config whose `tls` or `smtps` listener has the recording filter (its options, no phases), and a client
    context trusting the listener's new certificate."""
    make_certificate(folder)
    options = [*filter_options, "phases="]
    text = (f'pki mx.test.example cert "{folder}/mx.test.example.crt"\n'
            f'pki mx.test.example key "{folder}/mx.test.example.key"\n'
            f'filter "rec" proc-exec {filter_command(folder, "filter.log", *options)}\n'
            f'listen on 127.0.0.1 port {{port}} {mode} pki mx.test.example filter "rec"\n'
            'action "relay" relay\nmatch from any for any action "relay"\n')
    context = ssl.create_default_context(cafile=str(folder / "mx.test.example.crt"))
    context.check_hostname = False  # (reached at 127.0.0.1: the certificate's issuer is what is checked)
    return text, context


def test_link_tls_reports_what_the_tls_log_line_says(folder: Path) -> None:
    """6.8 reports link-tls with the text of its `smtp tls ciphers=` line, `TLSv1.3:TLS_AES_256_GCM_SHA384:256`;
    we sent OpenSMTPD 7's `version=TLSv1.3, cipher=..., bits=256`, which a filter written for 6.8 cannot read."""
    text, context = recorded_tls_listener(folder, "tls", "reports=link-tls")
    with SmtpDaemon(folder / "daemon", text) as daemon, smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        assert wait_until(lambda: "|link-tls|" in "\n".join(lines_of(folder, "filter.log")), 15)
        reported = next(line for line in lines_of(folder, "filter.log") if "|link-tls|" in line).split("|")[6:]
        logged = re.search(r"smtp tls ciphers=(\S+)", daemon.log())
    assert logged is not None and reported == [logged.group(1)]
    assert re.fullmatch(r"TLSv1\.[23]:[A-Z0-9_-]+:\d+", reported[0])


def test_an_smtps_session_is_reported_connected_before_secured(folder: Path) -> None:
    """As 6.8 reports an SMTPS session: link-connect first (a filter makes its session's state there), then link-tls;
    link-tls came first, for a session the filter did not know yet, and a failed handshake was a link-disconnect
    of a session never connected."""
    text, context = recorded_tls_listener(folder, "smtps")

    def link_events() -> dict[str, list[str]]:
        """Each session's link-* report events, in order."""
        sessions: dict[str, list[str]] = {}
        for line in lines_of(folder, "filter.log"):
            fields = line.split("|")
            if line.startswith("report|") and fields[4].startswith("link-"):
                sessions.setdefault(fields[5], []).append(fields[4])
        return sessions

    with SmtpDaemon(folder / "daemon", text) as daemon:
        with smtplib.SMTP_SSL("127.0.0.1", daemon.port, timeout=30, context=context) as client:
            client.ehlo("client.test")
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as plain:  # no TLS: it fails
            plain.sendall(b"EHLO plaintext.test\r\n")
            with contextlib.suppress(ConnectionResetError):
                plain.recv(1024)
        assert wait_until(lambda: len([events for events in link_events().values()
                                       if events[-1:] == ["link-disconnect"]]) == 3, 15)
    sessions = list(link_events().values())  # in the order they began: the start-up probe's, then these two
    assert all(events[0] == "link-connect" and events[-1] == "link-disconnect" for events in sessions)
    assert sessions[-2][:4] == ["link-connect", "link-tls", "link-greeting", "link-identify"]
    assert sessions[-1] == ["link-connect", "link-disconnect"]


def test_a_filter_runs_inside_its_chroot_as_its_user(folder: Path) -> None:
    """`chroot` and `user`: the filter below registers only where /inside exists, which is in its root alone
    (the daemon would not start otherwise), and runs as nobody."""
    root = folder / "root"
    for path in ("/bin/sh", *libraries_of("/bin/sh")):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(path), target)
    (root / "inside").write_text("")
    nobody = pwd.getpwnam("nobody").pw_uid
    script = "[ -e /inside ] && while read line; do [ \\\"$line\\\" = config\\|ready ] && echo 'register|ready'; done"
    text = (f'filter "jailed" proc-exec "{script}" user nobody chroot "{root}"\n'
            'listen on 127.0.0.1 port {port} filter "jailed"\naction "relay" relay\n'
            'match from any for any action "relay"\n')
    with SmtpDaemon(folder / "daemon", text) as daemon:
        assert send(daemon.port)[0] == 250
        status = Path(f"/proc/{filter_pid(daemon)}/status").read_text()
        assert f"\nUid:\t{nobody}\t" in status
        assert os.readlink(f"/proc/{filter_pid(daemon)}/root") == str(root)


def libraries_of(program: str) -> list[str]:
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [word for line in listing.splitlines() for word in line.split() if word.startswith("/")]


def filter_pid(daemon: SmtpdProcess) -> int:
    assert daemon.process is not None
    children = Path(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children").read_text().split()
    for child in children:
        if Path(f"/proc/{child}/root").resolve() != Path("/"):
            return int(child)
    raise AssertionError(f"no chrooted child among {children}")


def test_explain_says_it_does_not_ask_filter_processes(folder: Path) -> None:
    with SmtpdProcess(folder / "daemon", config(folder)) as daemon:
        result = daemon.smtpctl("explain", "--src", "127.0.0.1", "--listener", f"127.0.0.1:{daemon.port}",
                                "--from", "alice@example.com", "--to", "bob@remote.test")
        assert "  filter processes not consulted: rec" in result.stdout.splitlines(), result.stdout


def test_an_answer_that_is_no_decision_fails_its_request_and_the_process_stays(folder: Path) -> None:
    # (6.8 exits on `bypass`, a builtin filter's word, as on any unknown one)
    with SmtpDaemon(folder / "daemon", config(folder, "mail-from@typo=bypass")) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.mail("typo@example.com") == (451, b"4.3.0 Temporary failure")
            assert client.mail("alice@example.com")[0] == 250
        assert "filter process rec answered 'bypass', which is no filter result" in daemon.log()
        assert lines_of(folder, "filter.log").count("config|ready") == 1


def test_a_client_gone_in_the_middle_of_a_message_leaves_the_filters_ready(folder: Path) -> None:
    with SmtpDaemon(folder / "daemon", config(folder, "dataline=prepend:X-Filtered: yes")) as daemon:
        client = LineClient(daemon.port)
        client.reply()
        for command in (b"EHLO client.test", b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@remote.test>",
                        b"DATA"):
            client.send(command + b"\r\n")
            client.reply()
        client.send(b"Subject: cut\r\n\r\n" + b"a line of a message never ended\r\n" * 200)
        client.close()

        def last_reports() -> list[str]:
            return [line.split("|")[4] for line in lines_of(folder, "filter.log") if line.startswith("report|")][-3:]

        assert wait_until(lambda: last_reports() == ["tx-rollback", "tx-reset", "link-disconnect"], 15), \
            last_reports()
        code, text = send(daemon.port)
        assert code == 250
        assert daemon.message(text.split()[1].decode()).startswith(b"X-Filtered: yes\nReceived: ")


def test_a_message_over_the_size_limit_is_not_sent_whole_to_the_data_line_filters(folder: Path) -> None:
    # A filter that keeps a message until its end (filter-dkimsign, filter-rspamd) would keep all a client sends.
    text = "smtp max-message-size 100K\n" + config(folder, "reports=", "phases=data-line")
    with SmtpDaemon(folder / "daemon", text) as daemon:
        client = in_transaction(daemon.port)
        try:
            chunk = b"Subject: big\r\n\r\n" + b"a line of a message far too big\r\n" * 60_000
            client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
            assert client.reply()[-1].startswith("554 5.3.4 Message too big")
        finally:
            client.close()
        sent = [line for line in lines_of(folder, "filter.log") if "|data-line|" in line]
        assert sent[-1].endswith("|.")
        assert sum(len(line) for line in sent) < 300_000, len(sent)


def test_the_late_lines_of_a_message_given_up_do_not_go_into_the_next_one(folder: Path) -> None:
    # The filter answers the first message after the session timeout: that message fails (451), and its lines,
    # when they come (with that message's token), must not be taken for the second message's.
    text = program_config(folder, "hold", HOLDING_FILTER)
    with SmtpDaemon(folder / "daemon", text, env={"SMTPD_SMTP_TIMEOUT": "2"}) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("alice@example.com")
            client.rcpt("bob@remote.test")
            assert client.data(b"Subject: first SLOW\r\n\r\nfor bob\r\n") == (451, b"4.3.0 Temporary failure")
            client.mail("alice@example.com")
            client.rcpt("carol@remote.test")
            code, reply = client.data(b"Subject: second\r\n\r\nfor carol\r\n")
        assert code == 250, reply
        message = daemon.message(reply.split()[1].decode())
        assert b"for bob" not in message
        assert b"\nSubject: second\n" in message and message.endswith(b"\n\nfor carol\n")


def test_a_bdat_line_too_long_for_the_filters_refuses_the_message_and_leaves_the_process(folder: Path) -> None:
    # DATA refuses a line of 64 KiB; BDAT has no lines and could bring one, which the filter would send back
    # longer than the protocol's lines may be (a misbehaving process, started again: every session's loss).
    with SmtpDaemon(folder / "daemon", config(folder, "reports=", "phases=data-line")) as daemon:
        client = in_transaction(daemon.port)
        try:
            chunk = b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\nafter\r\n"
            client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
            assert client.reply() == ["500 5.0.0 Line too long"]
            client.send(b"NOOP\r\n")
            assert client.reply()[-1].startswith("250")
        finally:
            client.close()
        code, text = send(daemon.port)
        assert code == 250, text
        assert "filter process rec" not in daemon.log().replace("filter process rec ready", "")
        assert lines_of(folder, "filter.log").count("config|ready") == 1


def test_a_data_line_filter_that_reads_nothing_fails_the_message_after_the_session_timeout(folder: Path) -> None:
    text = program_config(folder, "deaf", DEAF_FILTER)
    with SmtpDaemon(folder / "daemon", text, env={"SMTPD_SMTP_TIMEOUT": "2"}) as daemon:
        client = in_transaction(daemon.port, timeout=20)
        try:
            chunk = b"Subject: unread\r\n\r\n" + b"a line nobody reads\r\n" * 100_000  # more than the pipe holds
            client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
            assert client.reply() == ["451 4.3.0 Temporary failure"]
        finally:
            client.close()
        assert "filter process deaf read none of the message within 2 seconds" in daemon.log()


def test_a_large_message_waits_for_a_slow_data_line_filter_and_is_accepted_whole(folder: Path) -> None:
    # While the session waits for the filter to read its lines, the client's next lines pile up in the input
    # buffer, far past one line's limit: that is no line too long.
    body = b"".join(b"line %07d of a message of short lines\r\n" % number for number in range(60000))
    with SmtpDaemon(folder / "daemon", config(folder, "slow=1", "reports=", "phases=data-line")) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as client:
            client.ehlo("client.test")
            client.mail("alice@example.com")
            client.rcpt("bob@remote.test")
            code, text = client.data(b"Subject: big\r\n\r\n" + body)
        assert code == 250, text
        assert daemon.message(text.split()[1].decode()).endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))



def test_a_process_two_reloads_share_ends_when_the_last_session_using_it_does(folder: Path) -> None:
    """Reloaded twice: the filter kept by the second configuration and dropped by the third serves the sessions
    begun under the second even after those begun under the first have ended."""
    def write(arguments: tuple[str, ...], log: str, extra: str = "") -> None:
        daemon.config_path.write_text(config(folder, *arguments, log=log).replace("{port}", str(daemon.port))
                                      + extra)
        assert daemon.smtpctl("reload").returncode == 0

    with SmtpdProcess(folder / "daemon", config(folder, "dataline=prepend:X-Version: 1")) as daemon:
        first = smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
        first.ehlo("first.test")
        write(("dataline=prepend:X-Version: 1",), "filter.log", "# the same filter\n")
        second = smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
        second.ehlo("second.test")
        write(("dataline=prepend:X-Version: 3",), "third.log")
        first.quit()  # the first configuration's last session: its filter is the second's too
        second.mail("alice@example.com")
        second.rcpt("bob@remote.test")
        code, text = second.data(MESSAGE)
        assert code == 250, text
        assert daemon.message(text.split()[1].decode()).startswith(b"X-Version: 1\n")
        second.quit()
        assert wait_until(lambda: lines_of(folder, "filter.log")[-1].startswith("# end of input"), 15)
