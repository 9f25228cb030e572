"""`smtp-out` reports where a remote, a filter process or an administrator misbehaves: a remote that hangs up
after refusing DATA, a PTR name that is no host name, a reload while a relay session opens or is kept for reuse.
Ours only (6.8's side-by-side comparison is tests/test_filter_reports_smtp_out.py). Each remote listens on a
loopback address of its own, the relay's filter is tests/filters/scripted_filter.py writing what it is told.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import dns.message
from daemon import SmtpdProcess, free_port
from helpers_filters import filter_command, lines_of, open_folder
from helpers_mta import CLOSE, DnsServer, RawRemote, Remote, standard_script, wait_until
from test_filter_processes_opensmtpd import converse


def relay_config(folder: Path, port: int, remote: str, *, log: str = "out.log", keepalive: int = 0) -> str:
    """One relay action to ``remote`` (`127.0.0.2:PORT`) for `t.test`, its filter `out` told every smtp-out event."""
    return (f"mta limit session-keepalive {keepalive}\n"
            f'filter "out" proc-exec {filter_command(folder, log, "reports=", "phases=", "out=all")}\n'
            f"listen on 127.0.0.1 port {port}\n"
            f'action "r" relay host "smtp://{remote}" filter "out"\n'
            'match from any for domain "t.test" action "r"\n')


def send(port: int, subject: str = "hunt", rcpt: str = "bob@t.test") -> None:
    transcript = converse(port, ["EHLO client.test", "MAIL FROM:<alice@example.com>", f"RCPT TO:<{rcpt}>",
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


class SlowPtrDns(DnsServer):
    """Answers the PTR question about 127.0.0.2 after ``delay`` seconds, every other one at once."""

    def __init__(self, delay: float) -> None:
        super().__init__({})
        self.delay = delay

    def _reply(self, query: dns.message.Message, peer: object) -> None:
        slow = query.question[0].name.to_text().startswith("2.0.0.127.")
        timer = threading.Timer(self.delay if slow else 0, self._send, (self._answer(query).to_wire(), peer))
        timer.daemon = True
        timer.start()

    def _send(self, answer: bytes, peer: object) -> None:
        with contextlib.suppress(OSError):  # (the server may be gone by then)
            self.sock.sendto(answer, peer)


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


def test_a_ptr_name_that_is_no_host_name_is_not_reported_as_the_remote_s_name() -> None:
    """link-connect's first field is the remote's PTR name, which its owner writes as it likes: a name with `|`
    shifted the fields after it (`a|fail|...|pass|LOCAL|REMOTE`: a filter read fcrdns `fail`). Only a host name
    is told; otherwise the address, as for a remote without a PTR record."""
    records = {"2.0.0.127.in-addr.arpa": [("PTR", "mx.remote.test.")],
               "3.0.0.127.in-addr.arpa": [("PTR", "a|fail|9.9.9.9:25|x.evil.test.")]}
    with open_folder("out-hunt") as folder, DnsServer(records) as dns, Remote(host="127.0.0.2") as named, \
            Remote(host="127.0.0.3") as forged:
        port = free_port()
        text = (relay_config(folder, port, f"127.0.0.2:{named.port}") +
                f'action "e" relay host "smtp://127.0.0.3:{forged.port}" filter "out"\n'
                'match from any for domain "e.test" action "e"\n')
        with SmtpdProcess(folder / "daemon", text, port=port, env={"SMTPD_RESOLVER": dns.setting}):
            send(port)
            send(port, rcpt="eve@e.test")
            assert wait_until(lambda: ended(folder) >= 2, 10)
        connects = sorted(events[0].split("|") for events in sessions(folder).values())
    assert [fields[:3] for fields in connects] == [["link-connect", "127.0.0.3", "pass"],
                                                   ["link-connect", "mx.remote.test", "pass"]], connects
    assert all(len(fields) == 5 for fields in connects), connects


def test_a_reload_while_a_relay_session_waits_for_the_ptr_lookup_leaves_it_reported() -> None:
    """A session reported waits for the remote's PTR name before it connects. A reload meanwhile replacing the
    relay filter's process stopped the old one (no session held it yet) while the session, once connected,
    reported to it: neither process heard of the session. Its reports go to the processes of the configuration
    it connects under."""
    with open_folder("out-hunt") as folder, SlowPtrDns(3.0) as dns_server, Remote(host="127.0.0.2") as remote:
        port = free_port()
        where = f"127.0.0.2:{remote.port}"
        with SmtpdProcess(folder / "daemon", relay_config(folder, port, where, log="old.log"), port=port,
                          env={"SMTPD_RESOLVER": dns_server.setting}) as daemon:
            send(port)
            daemon.config_path.write_text(relay_config(folder, port, where, log="new.log"))
            assert daemon.smtpctl("reload").returncode == 0
            assert not remote.received  # (the reload came during the PTR wait)
            assert wait_until(lambda: ended(folder, "new.log") >= 1, 10), lines_of(folder, "old.log")
        assert len(remote.received) == 1
        assert not sessions(folder, "old.log")
        (events,) = sessions(folder, "new.log").values()
    assert events[0].startswith("link-connect|127.0.0.2|pass|") and events[-1] == "link-disconnect"
    assert [event.split("|")[0] for event in events].count("tx-commit") == 1


def test_a_session_kept_for_reuse_across_a_reload_that_replaced_its_filter_process_is_not_reused() -> None:
    """A session busy with a message during a reload that replaces the relay filter's process was kept for reuse
    after it (the reload closes only the sessions idle then), and the next message went over it: reported to the
    old process, kept running for it, while the new one heard nothing. The next message has a session of its own,
    told to the new process."""
    with open_folder("out-hunt") as folder, RawRemote(standard_script(), host="127.0.0.2", eom_delay=1.5) as remote:
        port = free_port()
        where = f"127.0.0.2:{remote.port}"
        with SmtpdProcess(folder / "daemon", relay_config(folder, port, where, log="old.log", keepalive=30),
                          port=port) as daemon:
            send(port, "first")
            assert wait_until(lambda: "<EOM>" in remote.commands, 10)
            daemon.config_path.write_text(relay_config(folder, port, where, log="new.log", keepalive=30))
            assert daemon.smtpctl("reload").returncode == 0
            assert wait_until(lambda: "mta delivery" in daemon.log(), 10)
            send(port, "second")
            assert wait_until(lambda: daemon.log().count("mta delivery") == 2, 10)
            assert wait_until(lambda: ended(folder, "old.log") == 1, 10)  # (the old session, closed)
        assert remote.connections == 2
        old = [event.split("|")[0] for events in sessions(folder, "old.log").values() for event in events]
        new = [event.split("|")[0] for events in sessions(folder, "new.log").values() for event in events]
    assert old.count("tx-commit") == 1 and old[-1] == "link-disconnect"
    assert new[0] == "link-connect" and new.count("tx-commit") == 1


def test_a_remote_that_stops_answering_is_reported_timed_out_then_disconnected() -> None:
    """The `timeout` event (docs/filters.md): a remote silent after MAIL FROM, with the relay's reply timeout
    cut to 1 s (SMTPD_MTA_TIMEOUT; 300 s by default)."""
    script = standard_script({"MAIL": b""})  # (nothing sent back: the remote waits for another line)
    with open_folder("out-hunt") as folder, RawRemote(script, host="127.0.0.2") as remote:
        port = free_port()
        with SmtpdProcess(folder / "daemon", relay_config(folder, port, f"127.0.0.2:{remote.port}"), port=port,
                          env={"SMTPD_MTA_TIMEOUT": "1"}) as daemon:
            send(port)
            assert wait_until(lambda: ended(folder) >= 1, 10), daemon.log()
            assert "Connection timeout" in daemon.log()
        first = next(iter(sessions(folder).values()))
    assert [event.split("|")[0] for event in first[-3:]] == ["protocol-client", "timeout", "link-disconnect"], first
    assert first[-3].startswith("protocol-client|MAIL FROM:<alice@example.com>"), first
