"""Peak memory of the daemon while it receives 20 messages of 30 MB at once.

Starts the real daemon (tests/helpers_smtp.py runner) on a free loopback port with its own spool, delivery
paused, then 20 concurrent clients each send one 30 MB message over SMTP (streamed from a repeated block, so
the clients themselves stay small). Prints the daemon's peak RSS (VmHWM from /proc) and the throughput.
Target: peak RSS under 150 MB, since DATA is streamed to the spool in blocks.

With ``--baseline aiosmtpd`` the same load goes to an aiosmtpd server (its Controller, a handler that writes
each message to a file and fsyncs it) in a subprocess, for comparison: aiosmtpd holds whole messages in memory.

    .venv/bin/python bench/smtp_rss.py [--clients 20] [--size-mb 30] [--baseline aiosmtpd]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers_smtp import SmtpDaemon, free_port  # noqa: E402

CONFIG = """listen on 127.0.0.1 port {port}
action "local" mbox
match from any for domain "example.org" action "local"
"""
LINE = b"x" * 76 + b"\r\n"
BLOCK = LINE * 860  # about 66 KB


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


async def reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await reader.readline()).decode()
        if len(line) < 4 or line[3] != "-":
            return line.strip()


async def send_one(port: int, size: int, number: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    for command in (f"EHLO bench{number}.test", "MAIL FROM:<bench@sender.test>", "RCPT TO:<root@example.org>",
                    "DATA"):
        writer.write(command.encode() + b"\r\n")
        answer = await reply(reader)
        if answer[:1] not in "23":
            raise RuntimeError(f"{command}: {answer}")
    writer.write(b"Subject: bench %d\r\n\r\n" % number)
    sent = 0
    while sent < size:
        writer.write(BLOCK)
        sent += len(BLOCK)
        await writer.drain()
    writer.write(b".\r\n")
    answer = await reply(reader)
    writer.write(b"QUIT\r\n")
    await reply(reader)
    writer.close()
    return answer


async def run(port: int, clients: int, size: int) -> list[str]:
    return await asyncio.gather(*(send_one(port, size, number) for number in range(clients)))


AIOSMTPD_SERVER = r"""
import os, sys, signal, tempfile
from aiosmtpd.controller import Controller

class Handler:
    async def handle_DATA(self, server, session, envelope):
        fd, path = tempfile.mkstemp(dir=sys.argv[2])
        os.write(fd, envelope.content)
        os.fsync(fd)
        os.close(fd)
        return "250 OK"

controller = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]),
                        data_size_limit=64 * 1024 * 1024)
controller.start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
controller.stop()
"""


def run_baseline(clients: int, size: int) -> tuple[list[str], int, int, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="smtp-rss-aiosmtpd-") as folder:
        process = subprocess.Popen([sys.executable, "-c", AIOSMTPD_SERVER, str(port), folder],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            before = vm_kb(process.pid, "VmRSS")
            started = time.monotonic()
            answers = asyncio.run(run(port, clients, size))
            elapsed = time.monotonic() - started
            peak = vm_kb(process.pid, "VmHWM")
        finally:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(30)
    return answers, before, peak, elapsed


def run_ours(clients: int, size: int) -> tuple[list[str], int, int, float]:
    with tempfile.TemporaryDirectory(prefix="smtp-rss-") as folder:
        daemon = SmtpDaemon(Path(folder), CONFIG)
        with daemon:
            assert daemon.process is not None
            pid = daemon.process.pid
            before = vm_kb(pid, "VmRSS")
            started = time.monotonic()
            answers = asyncio.run(run(daemon.port, clients, size))
            elapsed = time.monotonic() - started
            peak = vm_kb(pid, "VmHWM")
    return answers, before, peak, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=30)
    parser.add_argument("--baseline", choices=["aiosmtpd"], help="measure aiosmtpd instead, for comparison")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    if args.baseline == "aiosmtpd":
        answers, before, peak, elapsed = run_baseline(args.clients, size)
        name = "aiosmtpd server"
    else:
        answers, before, peak, elapsed = run_ours(args.clients, size)
        name = "daemon"
    accepted = sum(answer.startswith("250 ") for answer in answers)
    total_mb = args.clients * size / 1024 / 1024
    print(f"messages accepted: {accepted}/{args.clients} of {args.size_mb} MB")
    print(f"{name} RSS before: {before / 1024:.1f} MB")
    print(f"{name} peak RSS:   {peak / 1024:.1f} MB (target < 150 MB)")
    print(f"elapsed: {elapsed:.1f} s, {total_mb / elapsed:.1f} MB/s")
    return 0 if accepted == args.clients and peak < 150 * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
