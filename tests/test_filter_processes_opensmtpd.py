"""Filter processes, side by side with the real OpenSMTPD 6.8: the same filter program (tests/filters/
scripted_filter.py, which writes down every line it is sent) runs under both daemons with the same configuration,
the same client dialogue goes to both, and what the filter was told, what the client was answered and what was
delivered must be the same, once the parts that differ by nature are put aside (ids, tokens, times, ports, the
product name, the EHLO keywords we offer beyond 6.8's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
from daemon import SmtpdProcess, free_port
from helpers_filters import filter_command, open_folder
from helpers_mta import OpenSmtpd, maildir_messages, wait_until
from helpers_smtp import LineClient

RULES = ("ehlo@evil=reject|550 5.7.1 helo refused", "mail-from@later=reject|451 4.7.1 try later",
         "mail-from@old=rewrite|<new@sender.test>", "mail-from@bare=rewrite|bare@sender.test",
         "rcpt-to@nobody=reject|550 5.1.1 no such user", "rcpt-to@moved=rewrite|<nobody2@remote.test>",
         "rcpt-to@bye=disconnect|421 4.7.0 go away", "rcpt-to@odd=reject|oops",
         "rcpt-to@spam=junk", "dataline=prepend:X-Filtered: yes")


def config(folder: Path, ports: list[int]) -> str:
    return (f'table users {{ "@" = "nobody" }}\n'
            f'filter "rec" proc-exec {filter_command(folder, "filter.log", *RULES)}\n'
            f"listen on 127.0.0.1 port {ports[0]} hostname mx.test filter \"rec\"\n"
            f'action "local{ports[0]}" maildir "{folder}/Maildir" virtual <users>\n'
            f'match from any for domain "remote.test" action "local{ports[0]}"\n')


@pytest.fixture()
def folders() -> Iterator[tuple[Path, Path]]:
    with open_folder("filters-ours") as ours, open_folder("filters-theirs") as theirs:
        yield ours, theirs


def converse(port: int, commands: list[str]) -> list[str]:
    """Each command's reply (a multi-line reply joined with ` | `), from the greeting on; `<closed>` at the end
    when the server closed. A command of several lines (a message) is sent whole."""
    client = LineClient(port)
    try:
        transcript = [" | ".join(client.reply())]
        for command in commands:
            client.send(command.encode() + b"\r\n")
            try:
                reply = client.reply()
            except ConnectionResetError:
                reply = []
            transcript.append(" | ".join(reply) or "<closed>")
            if not reply:
                break
        return transcript
    finally:
        client.close()


def normalized_stream(log: Path) -> list[str]:
    """The filter's log, from its configuration on, with each session's lines kept (the start's probe
    connections left out) and what differs by nature replaced."""
    lines = [line for line in log.read_text().splitlines() if not line.startswith("#")]
    probes = {line.split("|")[5] for line in lines if "|link-connect|" in line} - {
        line.split("|")[5] for line in lines if "|link-identify|" in line or "|filter|0.6|" in line
        and "|connect|" not in line}
    ids: dict[str, str] = {}

    def name(match: re.Match[str]) -> str:
        return ids.setdefault(match.group(0), f"<{'S' if len(match.group(0)) == 16 else 'M'}{len(ids)}>")

    result = []
    for line in lines:
        fields = line.split("|")
        if len(fields) > 5 and fields[5] in probes:
            continue
        if line.startswith("config|admd|"):
            line = "config|admd|<host>"
        line = re.sub(r"^(report|filter)\|0\.6\|\d+\.\d{6}\|", r"\1|0.6|<time>|", line)
        if fields[0] == "filter" and len(fields) > 6:
            fields = line.split("|")
            fields[6] = "<token>"
            line = "|".join(fields)
        if "|protocol-server|" in line and re.search(r"\|250-(?!mx\.test)", line):
            continue  # EHLO keywords: we offer PIPELINING, CHUNKING and SMTPUTF8 besides 6.8's
        line = re.sub(r"\b[0-9a-f]{16}\b|\b[0-9a-f]{8}\b", name, line)
        # 6.8's size counts more than the message it stores (535 for a message of 297 bytes); ours is the
        # stored message's size, the `size=` of the log (docs/filters.md)
        line = re.sub(r"(\|tx-commit\|<S\d+>\|<M\d+>)\|\d+$", r"\1|<size>", line)
        line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", line)
        line = re.sub(r"OpenSMTPD|PySMTPD", "<name>", line)
        line = re.sub(r"\w{3}, \d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(\w+\)", "<date>", line)
        result.append(line)
    return result


DIALOGUE = [
    # (the accepted recipient last: 6.8's Received header names the last recipient given, accepted or not)
    "EHLO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@other.test>", "RCPT TO:<nobody@remote.test>",
    "RCPT TO:<ftest@remote.test>", "DATA",
    "From: Alice <alice@example.com>\r\nTo: ftest@remote.test\r\nSubject: one\r\n\r\nbody line\r\n"
    "..one dot kept\r\n...two dots kept\r\nlast\r\n.",
    "RSET", "MAIL FROM:<carol@example.com> SIZE=100", "RCPT TO:<ftest@remote.test>", "RSET", "NOOP", "QUIT",
]

DECISIONS = [
    "EHLO evil.test", "EHLO good.test", "MAIL FROM:<later@example.com>", "MAIL FROM:<bare@example.com>",
    "MAIL FROM:<old@example.com>", "RCPT TO:<moved@remote.test>", "RCPT TO:<spam@remote.test>", "DATA",
    "Subject: two\r\n\r\nrewritten and junk\r\n.", "MAIL FROM:<a@example.com>", "RCPT TO:<odd@remote.test>",
]


# Each run names its action after its port: a message an earlier, failed run left in OpenSMTPD's global queue
# is then not delivered into this run's Maildir.
def run_both(folders: tuple[Path, Path], make_config: Callable[[Path, list[int]], str], listeners: int,
             dialogues: list[tuple[int, list[str]]], logs: tuple[str, ...], messages: int) -> dict[str, Side]:
    """Each daemon in turn on the same configuration and dialogues (each to the listener of its index);
    what the clients were answered, the filters' normalized logs, and the delivered messages."""
    results: dict[str, Side] = {}
    for side, folder in zip(("ours", "theirs"), folders, strict=True):
        ports = [free_port() for _ in range(listeners)]
        text = make_config(folder, ports)
        if side == "ours":
            daemon: SmtpdProcess | OpenSmtpd = SmtpdProcess(folder / "daemon", text, port=ports[0])
        else:
            daemon = OpenSmtpd(str(folder), text, ports[0])
        with daemon:
            transcripts = [converse(ports[index], dialogue) for index, dialogue in dialogues]
            maildir = str(folder / "Maildir")
            wait_until(lambda: len(maildir_messages(maildir)) >= messages, 20)  # noqa: B023 — used at once
            # 6.8 sends reports through another of its processes: wait for each session's last one
            wait_until(lambda: all(ended(folder / log) for log in logs), 20)  # noqa: B023 — used at once
            delivered = sorted(maildir_messages(maildir), key=lambda item: (item["Delivered-To"], item["Subject"]))
        results[side] = Side([plain(transcript) for transcript in transcripts],
                             {log: normalized_stream(folder / log) for log in logs}, delivered)
    return results


def ended(log: Path) -> bool:
    text = log.read_text() if log.exists() else ""
    return text.count("|link-connect|") == text.count("|link-disconnect|")


@dataclass
class Side:
    transcripts: list[list[str]]
    streams: dict[str, list[str]]
    messages: list[Message]


def plain(transcript: list[str]) -> list[str]:
    """Replies without the product name, the msgid and the EHLO keywords we offer beyond 6.8's."""
    return [re.sub(r"OpenSMTPD|PySMTPD|\b[0-9a-f]{8}\b", "<x>",
                   re.sub(r" \| 250-(PIPELINING|CHUNKING|SMTPUTF8)", "", reply)) for reply in transcript]


def assert_same(ours: Side, theirs: Side, messages: int) -> None:
    assert ours.transcripts == theirs.transcripts
    for log in theirs.streams:
        # Reports and filter requests each in order. How 6.8 interleaves the two streams depends on its
        # processes (the 354's report arrives after the message's first lines, though made before them);
        # ours are in the order things happen.
        for kind in ("config|", "report|", "filter|"):
            assert [line for line in ours.streams[log] if line.startswith(kind)] == \
                [line for line in theirs.streams[log] if line.startswith(kind)], (log, kind)
    assert len(theirs.messages) == messages
    for our_message, their_message in zip(ours.messages, theirs.messages, strict=True):
        # A filter's added line is above the Received header (it saw it first), the client's headers below it.
        assert [name for name, _ in our_message.items()] == [name for name, _ in their_message.items()]
        assert our_message.get_payload() == their_message.get_payload()


def test_what_filters_are_told_and_what_clients_get_is_opensmtpds(folders: tuple[Path, Path]) -> None:
    results = run_both(folders, config, 1, [(0, DIALOGUE), (0, DECISIONS)], ("filter.log",), 3)
    assert_same(results["ours"], results["theirs"], 3)


def chain_config(folder: Path, ports: list[int]) -> str:
    """A chain of a builtin filter that only reports, a proc-exec filter and a shared proc, the proc alone on a
    second listener, a listener without filters, and a filter no listener uses."""
    return (f'table users {{ "@" = "nobody" }}\ntable chained {{ "^chain" }}\n'
            'filter "said" phase ehlo match helo regex <chained> report "chain seen"\n'
            f'proc "shared" {filter_command(folder, "shared.log", "dataline=prepend:X-Shared: 1")}\n'
            f'filter "first" proc-exec {filter_command(folder, "first.log", "ehlo@chain=rewrite|rewritten.test", "dataline=prepend:X-First: 1")}\n'
            f'filter "unused" proc-exec {filter_command(folder, "unused.log")}\n'
            'filter "fa" proc "shared"\nfilter "fa2" proc "shared"\nfilter "both" chain { "said", "first", "fa" }\n'
            f'listen on 127.0.0.1 port {ports[0]} hostname mx.test filter "both"\n'
            f'listen on 127.0.0.1 port {ports[1]} hostname mx.test filter "fa2"\n'
            f"listen on 127.0.0.1 port {ports[2]} hostname mx.test\n"
            f'action "local{ports[0]}" maildir "{folder}/Maildir" virtual <users>\n'
            f'match from any for domain "remote.test" action "local{ports[0]}"\n')


def message_to(subject: str) -> list[str]:
    return ["MAIL FROM:<alice@example.com>", "RCPT TO:<ftest@remote.test>", "DATA",
            f"Subject: {subject}\r\n\r\nbody\r\n.", "QUIT"]


def test_chains_shared_procs_and_who_gets_reports_are_opensmtpds(folders: tuple[Path, Path]) -> None:
    """A builtin filter's report reaches the chain's processes (filter-report) and the chain goes on, a rewrite
    ends the phase (the chain's next filter is not asked), data lines flow through the chain in order, a proc used by two filters is one process, reports go only to the filters of the session's
    listener, and a declared filter no listener uses is started (and told nothing more)."""
    dialogues = [(0, ["EHLO chain.test", *message_to("chain")]), (1, ["EHLO other.test", *message_to("proc")]),
                 (2, ["EHLO plain.test", *message_to("none")])]
    results = run_both(folders, chain_config, 3, dialogues, ("first.log", "shared.log", "unused.log"), 3)
    assert_same(results["ours"], results["theirs"], 3)
    headers = {message["Subject"]: [name for name, _ in message.items()][2:4] for message in results["ours"].messages}
    assert headers == {"chain": ["X-Shared", "X-First"], "proc": ["X-Shared", "Received"],
                       "none": ["Received", "Subject"]}
