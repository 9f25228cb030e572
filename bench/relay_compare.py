"""Relay throughput, our daemon against real OpenSMTPD 6.8: submit N messages over SMTP, each relayed to a sink.

    sudo .venv/bin/python bench/relay_compare.py [--messages 300] [--sessions 8] [--only ours|opensmtpd]

For each daemon: it listens on a loopback port with `action "benchrelay" relay host "smtp://127.0.0.1:SINK"`;
it starts with relaying paused (-P mta); the load generator sends N messages (2 KB, one recipient each) over
`--sessions` parallel SMTP sessions (accept rate); then `smtpctl resume mta` and the time until the sink (aiosmtpd)
has received all N (relay rate). Prints both rates for each daemon and the ratios ours/OpenSMTPD.

OpenSMTPD uses /var/spool/smtpd and /var/run/smtpd.sock: if another OpenSMTPD runs, the script waits for it.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers_mta import Daemon, DnsServer, OpenSmtpd, Remote, free_port, wait_until  # noqa: E402
from loopback_dns import LOOPBACK_NAMES  # noqa: E402

BODY = "Subject: relay bench\r\n\r\n" + ("x" * 70 + "\r\n") * 28


def config_text(port: int, sink: int) -> str:
    return (f"listen on 127.0.0.1 port {port}\n"
            f'action "benchrelay" relay host "smtp://127.0.0.1:{sink}"\n'
            'match from any for domain "bench.test" action "benchrelay"\n')


def load(port: int, messages: int, sessions: int) -> None:
    def worker(index: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for number in range(index, messages, sessions):
                client.sendmail("load@bench.test", [f"u{number}@bench.test"], BODY)
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure(name: str, start_daemon, resume, messages: int, sessions: int) -> tuple[float, float]:  # noqa: ANN001
    """(accept rate, relay rate): the daemon starts with the relay paused, takes the load, then relays it all."""
    with Remote() as sink:
        port = free_port()
        with start_daemon(port, sink.port) as daemon:
            started = time.perf_counter()
            load(port, messages, sessions)
            accepted = time.perf_counter() - started
            started = time.perf_counter()
            resume(daemon)
            done = wait_until(lambda: sum(len(item.rcpt_tos) for item in sink.received
                                          if item.rcpt_tos[0].endswith("@bench.test")) >= messages, 600)
            relayed = time.perf_counter() - started
    if not done:
        raise SystemExit(f"{name}: the sink did not receive every message")
    print(f"{name:10} {messages} messages: accepted in {accepted:6.2f}s ({messages / accepted:7.1f}/s), "
          f"relayed in {relayed:6.2f}s ({messages / relayed:7.1f}/s)")
    return messages / accepted, messages / relayed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--only", choices=("ours", "opensmtpd"))
    options = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="relay-bench-", dir="/tmp")
    os.chmod(folder, 0o755)
    rates: dict[str, tuple[float, float]] = {}
    if options.only in (None, "ours"):
        # Our reverse lookups go to the tests' DNS server on loopback, which names 127.0.0.1 as /etc/hosts does
        # for OpenSMTPD (tests/helpers_mta.py, opensmtpd_command). Until 2026-12-07 they went to 127.0.0.1:9,
        # where nothing answers: each connection waited 5 s for its client's name, and the accept figure said
        # 36 msg/s.
        with DnsServer(LOOPBACK_NAMES) as names:
            rates["ours"] = measure(
                "PySMTPD", lambda port, sink: Daemon(os.path.join(folder, "ours"), config_text(port, sink),
                                                     "bench.local", port, {"SMTPD_RESOLVER": names.setting},
                                                     args=("-P", "mta")),
                lambda daemon: daemon.smtpctl("resume", "mta"), options.messages, options.sessions)
    if options.only in (None, "opensmtpd"):
        rates["opensmtpd"] = measure(
            "OpenSMTPD", lambda port, sink: OpenSmtpd(folder, config_text(port, sink), port, args=("-P", "mta")),
            lambda daemon: subprocess.run(["/usr/sbin/smtpctl", "resume", "mta"], capture_output=True, check=True),
            options.messages, options.sessions)
    if len(rates) == 2:
        print(f"ratio ours/OpenSMTPD: accept {rates['ours'][0] / rates['opensmtpd'][0]:.2f}, "
              f"relay {rates['ours'][1] / rates['opensmtpd'][1]:.2f}  (> 1: we are faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
