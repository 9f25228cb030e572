"""smtpctl's queue commands run as programs: mailq / show queue reading the spool with the daemon down (runstate
offline), the 14-field line, JSON Lines, filters; commands that need the daemon say it is not running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers_queue import Harness, run

from smtpd.queue.envelope import DsnNotify

ROOT = Path(__file__).resolve().parent.parent


def smtpctl(tmp_path: Path, *args: str, prog: str = "smtpctl") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SMTPD_SPOOL=str(tmp_path / "spool"), SMTPD_SOCKET=str(tmp_path / "smtpd.sock"),
               PYTHONPATH=str(ROOT))
    code = f"from smtpctl.cli import main; main(prog={prog!r})"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def fill_spool(tmp_path: Path) -> dict[str, list[int]]:
    async def scenario() -> dict[str, list[int]]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            _, first = await harness.submit(recipients=("bob@example.org", "carol@other.test"),
                                            flags={"authenticated"})
            _, second = await harness.submit(sender="", recipients=("dave@example.org",),
                                             dsn_notify=DsnNotify.NEVER, errorline="421 busy|try\x01later")
            return {"first": first, "second": second}

    return run(scenario())


def test_mailq_with_the_daemon_down_prints_offline_lines(tmp_path: Path) -> None:
    ids = fill_spool(tmp_path)
    result = smtpctl(tmp_path, prog="mailq")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    by_evpid = {line.split("|")[0]: line.split("|") for line in lines}
    fields = by_evpid[f"{ids['first'][0]:016x}"]
    assert len(fields) == 14
    assert fields[1:7] == ["inet4", "mda", "auth", "alice@example.com", "bob@example.org", "bob@example.org"]
    assert int(fields[8]) == int(fields[7]) + 4 * 86400  # expire = ctime + ttl
    assert fields[9:] == ["0", "0", "offline", "", ""]
    null_sender = next(line for line in lines if line.startswith(f"{ids['second'][0]:016x}|"))
    assert null_sender.split("|")[4] == "@"
    # vis(3) encodes the control character; like OpenSMTPD, a `|` in the error line is printed as is
    assert null_sender.endswith("|offline||421 busy|try\\^Alater")


def test_domain_filter_takes_an_idn_in_either_form(tmp_path: Path) -> None:
    """An IDN is stored as the client wrote it (UTF-8 in SMTPUTF8 mail, A-labels otherwise): `--domain` in either
    form selects both, as an administrator means the one domain (it found only the form written the same way)."""
    async def scenario() -> None:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            await harness.submit(recipients=("anna@bücher.example",))
            await harness.submit(recipients=("otto@xn--bcher-kva.example",))
            await harness.submit(recipients=("eve@example.org",))

    run(scenario())
    for domain in ("BÜCHER.example", "xn--bcher-kva.example"):
        result = smtpctl(tmp_path, "--json", "--domain", domain, prog="mailq")
        assert result.returncode == 0, result.stderr
        assert sorted(json.loads(line)["rcpt"] for line in result.stdout.splitlines()) == [
            "anna@bücher.example", "otto@xn--bcher-kva.example"]


def test_show_queue_json_lines_and_filters_offline(tmp_path: Path) -> None:
    ids = fill_spool(tmp_path)
    result = smtpctl(tmp_path, "--json", "--domain", "example.org", prog="mailq")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(record["rcpt"] for record in records) == ["bob@example.org", "dave@example.org"]
    bob = next(record for record in records if record["rcpt"] == "bob@example.org")
    assert bob["evpid"] == f"{ids['first'][0]:016x}"
    assert bob["msgid"] == f"{ids['first'][0] >> 32:08x}"
    assert bob["flags"] == ["auth"]
    assert bob["runstate"] == "offline" and bob["runvalue"] is None
    assert bob["expire"] - bob["ctime"] == 345600
    dave = next(record for record in records if record["rcpt"] == "dave@example.org")
    assert dave["sender"] == ""
    assert dave["errorline"] == "421 busy|try\x01later"

    by_sender = smtpctl(tmp_path, "--sender", "ALICE@", prog="mailq")
    assert len(by_sender.stdout.splitlines()) == 2
    too_young = smtpctl(tmp_path, "--older", "1h", prog="mailq")
    assert too_young.returncode == 0 and too_young.stdout == ""


def test_mailq_of_one_message_offline(tmp_path: Path) -> None:
    ids = fill_spool(tmp_path)
    result = smtpctl(tmp_path, f"{ids['first'][0] >> 32:08x}", prog="mailq")
    assert sorted(line.split("|")[5] for line in result.stdout.splitlines()) == ["bob@example.org",
                                                                               "carol@other.test"]


def test_corrupt_files_are_reported_by_mailq_and_the_rest_listed(tmp_path: Path) -> None:
    ids = fill_spool(tmp_path)
    evpid = ids["first"][1]
    msgid = evpid >> 32
    path = tmp_path / "spool" / "queue" / f"{msgid >> 24:02x}" / f"{msgid:08x}" / f"{evpid:016x}"
    path.write_bytes(b"\x00\x01 garbage")
    result = smtpctl(tmp_path, prog="mailq")
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 2
    assert f"corrupt queue file queue/{msgid >> 24:02x}/{msgid:08x}.{evpid:016x}" in result.stderr
    assert path.exists()  # smtpctl only reads; the daemon moves files aside


def test_bad_arguments_and_commands_needing_the_daemon(tmp_path: Path) -> None:
    fill_spool(tmp_path)
    bad = smtpctl(tmp_path, "12345", prog="mailq")
    assert bad.returncode != 0 and "not a <msgid>" in bad.stderr
    bad_age = smtpctl(tmp_path, "--older", "soon", prog="mailq")
    assert bad_age.returncode == 255 and "invalid age" in bad_age.stderr
    wide_digit = smtpctl(tmp_path, "--older", "\uff19h", prog="mailq")  # a full-width 9 is not an age
    assert wide_digit.returncode == 255 and "invalid age" in wide_digit.stderr
    unknown = smtpctl(tmp_path, "--frobnicate", prog="mailq")
    assert unknown.returncode == 255 and "--frobnicate" in unknown.stderr
    for command in (["remove", "all"], ["schedule", "all"], ["discover", "0123456789abcdef"]):
        result = smtpctl(tmp_path, *command)
        assert result.returncode == 1
        assert result.stderr.strip() == "smtpctl: smtpd doesn't seem to be running"
    invalid_target = smtpctl(tmp_path, "remove", "xyz")
    assert invalid_target.returncode == 255 and invalid_target.stderr.startswith("possibilities are:\nremove <evpid>")


def test_mailq_ignores_the_flags_sendmail_and_postfix_users_type(tmp_path: Path) -> None:
    """OpenSMTPD's mailq ignores its arguments; `mailq -v` and `mailq -Ac` from other MTAs' habits list the queue."""
    fill_spool(tmp_path)
    plain = smtpctl(tmp_path, prog="mailq")
    for habit in (["-v"], ["-Ac"], ["-bp"], ["-v", "--domain", "example.org"]):
        result = smtpctl(tmp_path, *habit, prog="mailq")
        assert result.returncode == 0, (habit, result.stderr)
        expected = plain.stdout if "--domain" not in habit else smtpctl(tmp_path, "--domain", "example.org",
                                                                          prog="mailq").stdout
        assert result.stdout == expected and result.stdout


def test_on_a_terminal_mailq_prints_a_table_with_relative_ages(tmp_path: Path) -> None:
    fill_spool(tmp_path)
    env = dict(os.environ, SMTPD_SPOOL=str(tmp_path / "spool"), SMTPD_SOCKET=str(tmp_path / "smtpd.sock"),
               PYTHONPATH=str(ROOT), COLUMNS="200", LINES="50")
    # The pty is made by a fresh interpreter: a forkpty() in this one warns whenever a thread of some other
    # test is still alive (a joined thread may linger in the kernel for a moment, a blocked one for good).
    driver = ("import pexpect, sys\n"
              "child = pexpect.spawn(sys.executable, ['-c', 'from smtpctl.cli import main; main(prog=\"mailq\")'],"
              " dimensions=(50, 200), encoding='utf-8', timeout=60)\n"
              "sys.stdout.write(child.read()); child.close(); sys.exit(child.exitstatus)\n")
    result = subprocess.run([sys.executable, "-c", driver], env=env, cwd=str(ROOT), capture_output=True, text=True,
                            timeout=120)
    output = result.stdout
    assert result.returncode == 0, (output, result.stderr)
    assert "envelope" in output and "state" in output and "expires in" in output  # the table's header
    assert "alice@example.com" in output and "offline" in output
    assert "3 envelopes" in output
    assert "|inet4|" not in output  # not the piped format
    assert "\x01" not in output and "try\\^Alater" in output  # no control character reaches the terminal


def test_show_queue_when_the_daemon_dies_before_answering_prints_an_error_line(tmp_path: Path) -> None:
    """A daemon killed (kill -9) while `show queue` waits for its answer: the request it never read makes the kernel
    reset the connection. smtpctl said so with a ConnectionResetError traceback; now one `smtpctl:` line, exit 1."""
    import socket
    import threading

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "smtpd.sock"))
    server.listen(4)

    def die_unread() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed at the end of the test
            time.sleep(0.3)  # the request arrives and is left unread
            connection.close()

    thread = threading.Thread(target=die_unread, daemon=True)
    thread.start()
    try:
        for args in (("show", "queue"), ("show", "queue", "--json")):
            result = smtpctl(tmp_path, *args)
            assert "Traceback" not in result.stderr, result.stderr
            assert result.returncode == 1
            assert result.stderr.startswith("smtpctl: ")
    finally:
        # close() alone does not wake a thread blocked in accept(); shutdown() does. A thread left behind would
        # make later tests' fork() warn that the process is multi-threaded.
        try:
            server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.close()
        thread.join(10)


def test_mailq_with_the_daemon_down_lists_the_oldest_first_as_with_it_running(tmp_path: Path) -> None:
    """With the daemon running `show queue` lists the oldest envelope first; with it down the order was that of
    the message ids (random), so the list came out shuffled."""
    now = int(time.time())
    ages = [50, 400, 10, 300, 200, 100, 30, 250]

    async def scenario() -> None:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            for age in ages:
                await harness.submit(recipients=(f"r{age}@example.org",), ctime=now - age)

    run(scenario())
    result = smtpctl(tmp_path, "show", "queue")
    assert result.returncode == 0, result.stderr
    listed = [line.split("|")[5] for line in result.stdout.splitlines()]
    assert listed == [f"r{age}@example.org" for age in sorted(ages, reverse=True)]
