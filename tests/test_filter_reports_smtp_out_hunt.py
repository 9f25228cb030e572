"""`smtp-out` reports where a remote, a filter process or an administrator misbehaves: a remote that hangs up
after refusing DATA, a PTR name that is no host name, a reload while a relay session opens or is kept for reuse.
Ours only (6.8's side-by-side comparison is tests/test_filter_reports_smtp_out.py). Each remote listens on a
loopback address of its own, the relay's filter is tests/filters/scripted_filter.py writing what it is told.
"""

from __future__ import annotations

from pathlib import Path

from daemon import SmtpdProcess, free_port
from helpers_filters import filter_command, lines_of, open_folder
from helpers_mta import CLOSE, RawRemote, standard_script, wait_until
from test_filter_processes_opensmtpd import converse


def relay_config(folder: Path, port: int, remote: str, *, log: str = "out.log", keepalive: int = 0) -> str:
    """One relay action to ``remote`` (`127.0.0.2:PORT`) for `t.test`, its filter `out` told every smtp-out event."""
    return (f"mta limit session-keepalive {keepalive}\n"
            f'filter "out" proc-exec {filter_command(folder, log, "reports=", "phases=", "out=all")}\n'
            f"listen on 127.0.0.1 port {port}\n"
            f'action "r" relay host "smtp://{remote}" filter "out"\n'
            'match from any for domain "t.test" action "r"\n')


def send(port: int, subject: str = "hunt") -> None:
    transcript = converse(port, ["EHLO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@t.test>",
                                 "DATA", f"Subject: {subject}\r\n\r\nbody\r\n.", "QUIT"])
    assert transcript[-2].startswith("250 "), transcript


def sessions(folder: Path, log: str = "out.log") -> dict[str, list[str]]:
    """The smtp-out lines of each session, as `EVENT|FIELDS`, in the order told."""
    found: dict[str, list[str]] = {}
    for line in lines_of(folder, log):
        fields = line.split("|")
        if fields[:2] == ["report", "0.6"] and fields[3] == "smtp-out":
            found.setdefault(fields[5], []).append("|".join([fields[4], *fields[6:]]))
    return found


def ended(folder: Path, log: str = "out.log") -> int:
    return sum("link-disconnect" in events for events in sessions(folder, log).values())


def test_nothing_is_reported_after_link_disconnect_when_the_remote_hangs_up_after_refusing_data() -> None:
    """A remote answering DATA with 421 and hanging up: the RSET after the refusal finds the connection closed
    and ends the session (link-disconnect); the QUIT tried on it afterwards must not be told after its end."""
    script = standard_script({"DATA": b"421 4.3.2 shutting down\r\n" + CLOSE})
    with open_folder("out-hunt") as folder, RawRemote(script, host="127.0.0.2") as remote:
        port = free_port()
        with SmtpdProcess(folder / "daemon", relay_config(folder, port, f"127.0.0.2:{remote.port}"), port=port) \
                as daemon:
            send(port)
            assert wait_until(lambda: ended(folder) >= 1 and "mta disconnected" in daemon.log(), 10)
        (events,) = sessions(folder).values()
    assert [event.split("|")[0] for event in events[-7:]] == [
        "protocol-client", "protocol-server", "tx-data", "tx-rollback", "tx-reset", "protocol-client",
        "link-disconnect"], events
    assert events[-7:-5] == ["protocol-client|DATA", "protocol-server|421 4.3.2 shutting down"]
    assert events[-2] == "protocol-client|RSET"
