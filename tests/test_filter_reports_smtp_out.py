"""`smtp-out` reports: what filter processes are told of the relay client's sessions, side by side with the real
OpenSMTPD 6.8. The same filter program (tests/filters/scripted_filter.py, registered for every smtp-out event)
and the same relay scenarios run under both daemons; the report lines must be the same once ids, times, ports
and sizes are put aside, and once 6.8's two mistakes we do not copy are put right (docs/filters.md).

Each remote listens on a loopback address of its own: 6.8 disables the route to an address after a failure, and
one scenario's failure must not stop the next.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import SmtpdProcess, free_port
from helpers_filters import filter_command, lines_of, open_folder
from helpers_mta import (
    OpenSmtpd,
    RawRemote,
    Remote,
    ScriptedHandler,
    make_certificate,
    standard_script,
    wait_until,
)
from test_filter_processes_opensmtpd import converse

from smtpd.mta.reports import opener
from smtpd.smtp.processes import ProcessorSet

REFUSED = "550 5.1.1 no such user"
OPENSMTPD_QUEUE = "/var/spool/smtpd/queue"


@dataclass
class Scenario:
    domain: str  # also the last byte of its remote's loopback address
    recipients: list[str]
    filter: str = "out"


# Domain -> recipients; the remotes are made in remotes() below, in the same order.
SCENARIOS = [
    Scenario("2", ["bob@2.test", "carol@2.test"]),  # delivered to both recipients
    Scenario("3", ["nobody@3.test", "ftest@3.test"]),  # one recipient refused (5xx), the other accepted
    Scenario("4", ["x@4.test"]),  # MAIL refused (4xx)
    Scenario("5", ["x@5.test"]),  # connection refused (nothing listens)
    Scenario("6", ["x@6.test"], filter="ch"),  # DATA refused (5xx); the filter is a chain with a builtin member
    Scenario("7", ["x@7.test"]),  # the message refused at its end (4xx)
    Scenario("8", ["x@8.test"], filter="both"),  # greeting refused; the filter is also the listener's
    Scenario("9", ["x@9.test", "y@9.test"]),  # EHLO refused (HELO then), every RCPT refused (4xx)
]
SESSIONS = 7  # the scenarios with a connection


@pytest.fixture(scope="module")
def remotes() -> Iterator[tuple[dict[str, int], Remote]]:
    """Each scenario's remote port (the 5th: a port nothing listens on), and the remote that accepts all."""
    rcpt = ScriptedHandler(rcpt_replies={"<nobody@3.test>": REFUSED, "nobody@3.test": REFUSED})
    with Remote(host="127.0.0.2") as ok, Remote(rcpt, host="127.0.0.3") as refusing, \
            Remote(ScriptedHandler(mail_reply="451 4.7.1 try later"), host="127.0.0.4") as mail, \
            RawRemote(standard_script({"DATA": b"554 5.6.0 no data\r\n"}), host="127.0.0.6") as data, \
            RawRemote(standard_script({"EOM": b"452 4.3.1 full\r\n"}), host="127.0.0.7") as end, \
            RawRemote(standard_script({"GREETING": b"554 go away\r\n"}), host="127.0.0.8") as greeting, \
            RawRemote(standard_script({"EHLO": b"502 what\r\n", "RCPT": b"451 4.3.0 later\r\n"}),
                      host="127.0.0.9") as helo:
        yield {"2": ok.port, "3": refusing.port, "4": mail.port, "5": free_port("127.0.0.5"), "6": data.port,
               "7": end.port, "8": greeting.port, "9": helo.port}, ok


def config(folder: Path, port: int, remotes: dict[str, int], extra: str = "") -> str:
    """`out` on the relay actions (each process told of every smtp-out event), `both` on the listener and one
    relay, `decl` declared only. The actions are named after the port: a message an earlier run left in 6.8's
    global queue never goes to this run's remotes."""
    quiet = ("reports=", "phases=", "out=all")
    text = ("mta limit session-keepalive 0 conn-delay-route 0 conn-delay-relay 0\n"
            f'filter "out" proc-exec {filter_command(folder, "out.log", *quiet)}\n'
            f'filter "both" proc-exec {filter_command(folder, "both.log", *quiet)}\n'
            f'filter "decl" proc-exec {filter_command(folder, "decl.log", *quiet)}\n'
            'filter "bi" phase mail-from match mail-from regex "nomatch" reject "550 no"\n'
            'filter "ch" chain { "bi", "out" }\n'
            f'listen on 127.0.0.1 port {port} hostname mx.test filter "both"\n')
    for item in SCENARIOS:
        text += (f'action "r{item.domain}p{port}" relay host "smtp://127.0.0.{item.domain}:{remotes[item.domain]}" '
                 f'helo relay.test filter "{item.filter}"\n'
                 f'match from any for domain "{item.domain}.test" action "r{item.domain}p{port}"\n')
    return text + extra


def send_all(port: int) -> list[str]:
    """Each scenario's message, through the listener; the msgids the daemon gave them."""
    msgids = []
    for item in SCENARIOS:
        transcript = converse(port, ["EHLO client.test", "MAIL FROM:<alice@example.com>",
                                     *[f"RCPT TO:<{rcpt}>" for rcpt in item.recipients], "DATA",
                                     f"Subject: {item.domain}\r\n\r\nbody\r\n..one dot kept\r\n.", "QUIT"])
        assert transcript[-2].startswith("250 2.0.0 "), transcript
        msgids.append(transcript[-2].split()[2])
    return msgids


def sessions_told(folder: Path) -> int:
    text = "\n".join(lines_of(folder, "out.log") + lines_of(folder, "both.log"))
    return min(text.count("|link-connect|"), text.count("|link-disconnect|"))


@dataclass
class Run:
    logs: dict[str, list[str]]


def run(folder: Path, daemon: SmtpdProcess | OpenSmtpd, port: int, remove: bool) -> Run:
    with daemon:
        msgids = send_all(port)
        assert wait_until(lambda: sessions_told(folder) >= SESSIONS, 30)
    if remove:
        # What 6.8 did not deliver stays in its global queue (some envelopes are still in flight when it stops, so
        # `smtpctl remove` cannot take them): removed once it has stopped, not to be tried by later runs.
        for msgid in msgids:
            shutil.rmtree(f"{OPENSMTPD_QUEUE}/{msgid[:2]}/{msgid}", ignore_errors=True)
    return Run({log: lines_of(folder, log) for log in ("out.log", "both.log", "decl.log")})


@pytest.fixture(scope="module")
def both_runs(remotes: tuple[dict[str, int], Remote]) -> Iterator[tuple[Run, Run, bytes]]:
    """Our run, then 6.8's; and the message the accepting remote got from us."""
    ports, accepting = remotes
    with open_folder("out-ours") as ours, open_folder("out-theirs") as theirs:
        port = free_port()
        text = config(ours, port, ports)
        our_run = run(ours, SmtpdProcess(ours / "daemon", text, port=port), port, remove=False)
        received = accepting.received[0].data
        port = free_port()
        their_run = run(theirs, OpenSmtpd(str(theirs), config(theirs, port, ports), port), port, remove=True)
        yield our_run, their_run, received


# -- normalising ------------------------------------------------------------------------------------------------
def by_session(lines: list[str]) -> dict[str, list[str]]:
    """The smtp-out report lines of each session as `EVENT|FIELDS`, keyed by the scenario (the remote's address);
    a session without link-connect is left out (6.8 reports a connection that never opened, we do not)."""
    sessions: dict[str, list[str]] = {}
    for line in lines:
        fields = line.split("|")
        if fields[:2] != ["report", "0.6"] or fields[3] != "smtp-out":
            continue
        assert re.fullmatch(r"\d+\.\d{6}", fields[2]) and re.fullmatch(r"[0-9a-f]{16}", fields[5]), line
        sessions.setdefault(fields[5], []).append("|".join([fields[4], *fields[6:]]))
    named = {}
    for events in sessions.values():
        if events[0].startswith("link-connect|"):
            remote = events[0].split("|")[4]
            named[remote.split(":")[0].rsplit(".", 1)[1]] = events
    return named


def normalized(events: list[str]) -> list[str]:
    """Ports, msgids, evpids and sizes out; the recipients of a transaction in address order (6.8 sends them in
    the order of its random evpids)."""
    ids: dict[str, str] = {}

    def name(match: re.Match[str]) -> str:
        return ids.setdefault(match.group(0), f"<{'E' if len(match.group(0)) == 16 else 'M'}{len(ids)}>")

    events = [re.sub(r"(\d+\.\d+\.\d+\.\d+):\d+", r"\1:<port>", event) for event in sorted_recipients(events)]
    # (we offer the remote the message's SIZE, which 6.8 does not)
    events = [re.sub(r"^(protocol-client\|MAIL FROM:<[^>]*>) SIZE=\d+$", r"\1", event) for event in events]
    events = [re.sub(r"^(tx-commit\|[0-9a-f]{8})\|\d+$", r"\1|<size>", event) for event in events]
    return [event if event.startswith("protocol-") else re.sub(r"\b[0-9a-f]{16}\b|\b[0-9a-f]{8}\b", name, event)
            for event in events]


def sorted_recipients(events: list[str]) -> list[str]:
    """Each run of RCPT groups (a RCPT line and the reports up to the next command) sorted by the RCPT line. A
    transaction's end (tx-rollback, tx-reset) stays after the run, wherever the last recipient was sorted to."""
    result: list[str] = []
    groups: list[list[str]] = []
    ends: list[str] = []
    for event in events:
        if event.startswith("protocol-client|RCPT TO:"):
            groups.append([event])
        elif groups and event.startswith(("tx-rollback|", "tx-reset|")):
            ends.append(event)
        elif groups and not event.startswith("protocol-client|"):
            groups[-1].append(event)
        else:
            result += [line for group in sorted(groups) for line in group] + ends
            groups, ends = [], []
            result.append(event)
    return result + [line for group in sorted(groups) for line in group] + ends


def corrected(events: list[str]) -> list[str]:
    """6.8's lines with its mistake about refused recipients put right (docs/filters.md): it reports tx-rollback
    and tx-reset when one recipient is refused, though the transaction goes on, and then no tx-rcpt for the last
    one when none was accepted. We report tx-rcpt for each, and the rollback once the transaction is given up."""
    result: list[str] = []
    index = 0
    while index < len(events):
        event = events[index]
        last_command = next((line for line in reversed(result) if line.startswith("protocol-client|")), "")
        if event.startswith("tx-rollback|") and last_command.startswith("protocol-client|RCPT TO:<") \
                and result[-1].startswith("protocol-server|"):
            msgid = event.split("|")[1]
            index += 2  # (its tx-reset)
            if index < len(events) and events[index].startswith("tx-rcpt|"):
                continue
            code = result[-1].split("|")[1][:1]
            address = last_command.split("<", 1)[1].rstrip(">")
            word = "permfail" if code == "5" else "tempfail"
            result += [f"tx-rcpt|{msgid}|{word}|{address}", f"tx-rollback|{msgid}", f"tx-reset|{msgid}"]
            continue
        result.append(event)
        index += 1
    return result


# -- the tests ----------------------------------------------------------------------------------------------------
def test_relay_sessions_are_reported_as_opensmtpd_reports_them(both_runs: tuple[Run, Run, bytes]) -> None:
    ours, theirs, _ = both_runs
    our_sessions = by_session(ours.logs["out.log"] + ours.logs["both.log"])
    their_sessions = by_session(theirs.logs["out.log"] + theirs.logs["both.log"])
    assert sorted(their_sessions) == ["2", "3", "4", "6", "7", "8", "9"]
    assert sorted(our_sessions) == sorted(their_sessions)
    for scenario, events in their_sessions.items():
        assert normalized(our_sessions[scenario]) == normalized(corrected(events)), (
            scenario, our_sessions[scenario], events)
    # Who is told: the processes of the relay actions' filters, each told its subsystems; no one else.
    for log in ("out.log", "both.log", "decl.log"):
        assert [line for line in ours.logs[log] if line.startswith("config|") and "admd" not in line] == \
            [line for line in theirs.logs[log] if line.startswith("config|") and "admd" not in line], log
    assert "config|subsystem|smtp-out" in ours.logs["both.log"]
    assert not [line for line in ours.logs["decl.log"] + theirs.logs["decl.log"] if line.startswith("report|")]
    assert [event.split("|")[0] for event in our_sessions["8"]] == ["link-connect", "protocol-server",
                                                                    "link-disconnect"]
    assert not [line for line in ours.logs["out.log"] if "|127.0.0.5:" in line]  # (a connection refused)


def test_our_commit_size_is_the_message_as_sent(both_runs: tuple[Run, Run, bytes]) -> None:
    """tx-commit's size is what went on the wire after DATA (CRLF line ends, dots doubled, the final dot not
    counted), as 6.8 counts it."""
    ours, _, received = both_runs
    events = by_session(ours.logs["out.log"])["2"]
    size = int(next(event for event in events if event.startswith("tx-commit|")).split("|")[2])
    lines = received.replace(b"\r\n", b"\n").split(b"\n")[:-1]
    assert size == sum(len(line) + 2 + line.startswith(b".") for line in lines)
    lines = [event for event in events if event.startswith("tx-")]
    assert [line.split("|")[0] for line in lines] == ["tx-begin", "tx-mail", "tx-envelope", "tx-rcpt",
                                                      "tx-envelope", "tx-rcpt", "tx-data", "tx-commit", "tx-reset"]


def test_no_filter_process_no_reports() -> None:
    """A relay without a filter, or whose filter runs no process registered for smtp-out, opens no reports."""
    from smtpd.config.model import Config

    empty = ProcessorSet({})
    assert opener(empty, Config(path="<test>"), "f") is None
    assert opener(None, Config(path="<test>"), "f") is None
    assert opener(empty, Config(path="<test>"), None) is None


def test_tls_and_auth_are_reported_with_credentials_masked(tmp_path: Path) -> None:
    """Ours only (6.8's STARTTLS fails on Debian 12): link-tls after the handshake, AUTH's token masked as 6.8
    masks it, link-auth with the user and its result."""
    certificate = make_certificate(str(tmp_path), "smarthost.test")
    with open_folder("out-tls") as folder, \
            Remote(tls=certificate, require_starttls=True, credentials={"relayuser": "s3cret"},
                   host="127.0.0.2") as remote:
        port = free_port()
        text = ("mta limit session-keepalive 0\n"  # (the session ends, and is reported ended, after its message)
                f'table secrets {{ "lbl" = "relayuser:s3cret" }}\n'
                f'filter "out" proc-exec {filter_command(folder, "out.log", "reports=", "phases=", "out=all")}\n'
                f"listen on 127.0.0.1 port {port}\n"
                f'action "t" relay host "smtp+tls://lbl@127.0.0.2:{remote.port}" tls no-verify auth <secrets> '
                'filter "out"\nmatch from any for domain "t.test" action "t"\n')
        with SmtpdProcess(folder / "daemon", text, port=port):
            converse(port, ["EHLO client.test", "MAIL FROM:<a@example.com>", "RCPT TO:<b@t.test>", "DATA",
                            "Subject: tls\r\n\r\nbody\r\n.", "QUIT"])
            assert wait_until(lambda: "|link-disconnect|" in "\n".join(lines_of(folder, "out.log")), 20)
        events = by_session(lines_of(folder, "out.log"))["2"]
    tls = [event for event in events if event.startswith("link-tls|")]
    assert len(tls) == 1 and re.fullmatch(r"link-tls\|TLSv1\.[23]:[A-Z0-9_-]+:\d+", tls[0])
    assert events.index(tls[0]) == events.index("protocol-server|220 Ready to start TLS") + 1
    assert "protocol-client|AUTH PLAIN ********" in events
    assert "link-auth|relayuser|pass" in events
    assert not [event for event in events if "s3cret" in event or "cmVsYXl1c2Vy" in event]
    assert events[-1] == "link-disconnect" and "tx-commit" in "\n".join(events)
