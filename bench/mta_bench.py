"""Relay benchmark: the relay agent (in-process) sending to an aiosmtpd sink on loopback.

    .venv/bin/python bench/mta_bench.py [--messages 500] [--size 2048] [--concurrency 50]

Prints, for each case, messages relayed per second and the number of SMTP sessions the sink saw:
  * one recipient per message, `--concurrency` deliveries at a time (session reuse at work);
  * ten recipients per message (one transaction each thanks to the grouping window);
  * the same with STARTTLS (self-signed certificate, `tls no-verify`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers_mta import MemoryTables, Remote, make_certificate, relay_config  # noqa: E402

from smtpd.config.model import Relay  # noqa: E402
from smtpd.mta import MtaAgent  # noqa: E402
from smtpd.mta.mx import Resolver  # noqa: E402
from smtpd.queue.envelope import Envelope  # noqa: E402


async def relay(agent: MtaAgent, messages: int, recipients: int, path: str, concurrency: int) -> float:
    limit = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        async with limit:
            envelopes = [Envelope(evpid=((number + 1) << 32) | (rcpt + 1), dispatcher="relay",
                                  sender="bench@local.test", rcpt=f"u{rcpt}@remote.test",
                                  dest=f"u{rcpt}@remote.test") for rcpt in range(recipients)]
            results = await asyncio.gather(*(agent.deliver(envelope, path) for envelope in envelopes))
            bad = [result for result in results if result.outcome.value != "ok"]
            if bad:
                raise SystemExit(f"delivery failed: {bad[0].text}")

    await agent.start()
    started = time.perf_counter()
    await asyncio.gather(*(one(number) for number in range(messages)))
    elapsed = time.perf_counter() - started
    await agent.stop()
    return elapsed


def case(name: str, remote: Remote, relay_options: Relay, messages: int, recipients: int, path: str,
         concurrency: int) -> None:
    agent = MtaAgent(relay_config(relay_options), MemoryTables(), "bench.test", resolver=Resolver("127.0.0.1:9"))
    before = len(remote.handler.sessions)
    elapsed = asyncio.run(relay(agent, messages, recipients, path, concurrency))
    sessions = len(remote.handler.sessions) - before
    print(f"{name:38} {messages / elapsed:8.1f} messages/s  {messages * recipients / elapsed:8.1f} rcpts/s  "
          f"{sessions} sessions")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=50)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "message")
        line = b"x" * 70 + b"\n"
        with open(path, "wb") as handle:
            handle.write(b"Subject: bench\n\n" + line * max(1, options.size // len(line)))
        certificate = make_certificate(folder, "bench.test")
        with Remote(tls=certificate) as remote:
            host = f"127.0.0.1:{remote.port}"
            case("1 rcpt/message, plain", remote, Relay(host=f"smtp+notls://{host}"), options.messages, 1, path,
                 options.concurrency)
            case("10 rcpts/message, plain", remote, Relay(host=f"smtp+notls://{host}"), options.messages // 5, 10,
                 path, options.concurrency)
            case("1 rcpt/message, STARTTLS", remote, Relay(host=f"smtp+tls://{host}", tls="no-verify"),
                 options.messages, 1, path, options.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
