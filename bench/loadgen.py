"""A small SMTP load generator over loopback: N concurrent sessions send M messages of S bytes in total.

    python bench/loadgen.py --port 2525 --sessions 8 --messages 2000 --size 2048

Each session speaks plain SMTP (EHLO, then MAIL/RCPT/DATA per message, a new connection every
--per-connection messages), waits for every reply (or, with --pipelining, sends MAIL, RCPT and DATA as one group
and then reads their three replies, as Postfix's client does: RFC 2920), and counts a message only on the 250
after DATA. At most --opening connections are being opened at a time (connected, banner not yet read), as a client's
connection pool would: N sessions connecting in the same millisecond overflow a listen backlog smaller than N
(OpenSMTPD's is 5), and the dropped handshakes cost whole seconds that say nothing of the server's speed.
Prints one JSON object: messages, seconds, msg_per_s, failures, stalled_connects (no banner within 5 s:
connected again), slow_connects (a banner, but over 0.5 s after connecting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass

BANNER_TIMEOUT = 5.0  # seconds to wait for the 220 of a new connection before connecting again
# A banner later than this after connecting: the kernel dropped the first SYN (a full listen queue) and the
# client's retransmission came 1 s later. On a short run that second decides the figure.
SLOW_CONNECT = 0.5
OPENING = 4  # connections being opened at a time, below OpenSMTPD's listen backlog of 5


@dataclass
class Totals:
    accepted: int = 0
    failures: int = 0
    stalled_connects: int = 0  # connections the server never answered (see session())
    slow_connects: int = 0  # banners that came, but more than SLOW_CONNECT after connecting (see session())
    first_error: str = ""


def make_body(size: int, index: int) -> bytes:
    header = (f"From: loadgen@smtpload.test\r\nTo: user@relay.test\r\nSubject: load {index}\r\n"
              f"Message-ID: <{index}.{time.time_ns()}@smtpload.test>\r\n\r\n").encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmn\r\n"  # 78 bytes
    count = max(1, (size - len(header)) // len(line))
    return header + line * count


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line.decode(errors="replace").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), "\n".join(lines)


async def expect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: bytes | None,
                 code: int) -> None:
    if command is not None:
        writer.write(command)
    status, text = await read_reply(reader)
    if status != code:
        raise RuntimeError(f"{command!r} -> {text}")


async def session(host: str, port: int, count: int, body: bytes, per_connection: int, rcpt: str,
                  totals: Totals, opening: asyncio.Semaphore, pipelining: bool = False) -> None:
    mail, rcpt_line = b"MAIL FROM:<loadgen@smtpload.test>\r\n", f"RCPT TO:<{rcpt}>\r\n".encode()
    sent = 0
    consecutive_failures = 0
    stalls = 0
    while sent < count and consecutive_failures < 5:
        await opening.acquire()
        connecting = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        except OSError as error:
            opening.release()
            totals.failures += 1
            consecutive_failures += 1
            totals.first_error = totals.first_error or f"connect: {error}"
            await asyncio.sleep(0.1)
            continue
        try:
            try:
                async with asyncio.timeout(BANNER_TIMEOUT):
                    await expect(reader, writer, None, 220)
            except TimeoutError:
                # The server never took the connection: its listen queue was full, the kernel answered with a SYN
                # cookie, and since the server speaks first nothing ever completes it. A real client gives up
                # and connects again; so do we (the time lost counts, as it would for the client).
                totals.stalled_connects += 1
                stalls += 1
                if stalls % 10 == 0:  # a server that never answers: a failure (five of them end the session)
                    raise ConnectionError("no banner within 5 s, 10 times in a row") from None
                continue
            finally:
                opening.release()
            stalls = 0
            if time.perf_counter() - connecting > SLOW_CONNECT:
                totals.slow_connects += 1
            await expect(reader, writer, b"EHLO smtpload.test\r\n", 250)
            for _ in range(min(per_connection, count - sent)):
                sent += 1
                if pipelining:
                    writer.write(mail + rcpt_line + b"DATA\r\n")
                    for code in (250, 250, 354):
                        await expect(reader, writer, None, code)
                else:
                    await expect(reader, writer, mail, 250)
                    await expect(reader, writer, rcpt_line, 250)
                    await expect(reader, writer, b"DATA\r\n", 354)
                writer.write(body + b".\r\n")
                await expect(reader, writer, None, 250)
                totals.accepted += 1
                consecutive_failures = 0
            writer.write(b"QUIT\r\n")
            await read_reply(reader)
        except (RuntimeError, ConnectionError, OSError, ValueError) as error:
            # A refused or broken transaction: count it and go on with a new connection.
            totals.failures += 1
            consecutive_failures += 1
            totals.first_error = totals.first_error or str(error)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def run_load(host: str, port: int, sessions: int, messages: int, size: int, per_connection: int = 100,
                   rcpt: str = "user@relay.test", opening: int = OPENING,
                   pipelining: bool = False) -> dict[str, object]:
    body = make_body(size, 0)
    totals = Totals()
    shares = [messages // sessions + (1 if index < messages % sessions else 0) for index in range(sessions)]
    opening_now = asyncio.Semaphore(opening)
    started = time.perf_counter()
    await asyncio.gather(*(session(host, port, share, body, per_connection, rcpt, totals, opening_now, pipelining)
                           for share in shares if share))
    seconds = time.perf_counter() - started
    return {"messages": totals.accepted, "seconds": round(seconds, 3),
            "msg_per_s": round(totals.accepted / seconds, 1) if seconds else 0.0, "failures": totals.failures, "stalled_connects": totals.stalled_connects,
            "slow_connects": totals.slow_connects,
            "first_error": totals.first_error, "sessions": sessions, "size": len(body)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--per-connection", type=int, default=100)
    parser.add_argument("--rcpt", default="user@relay.test")
    parser.add_argument("--opening", type=int, default=OPENING,
                        help=f"connections being opened at a time at most [{OPENING}]")
    parser.add_argument("--pipelining", action="store_true",
                        help="send MAIL, RCPT and DATA as one group (RFC 2920), then read their replies")
    args = parser.parse_args(argv)
    result = asyncio.run(run_load(args.host, args.port, args.sessions, args.messages, args.size,
                                  args.per_connection, args.rcpt, args.opening, args.pipelining))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
