"""Crash safety of the real daemon: SMTP clients send mail while the daemon (`python -m smtpd`) is killed with
SIGKILL at random moments, many times over the same spool. After the last restart:

* every message that got its 250 after DATA is in the queue, whole;
* no message whose DATA was not finished (final dot not sent) is there;
* no partial or corrupt file is anywhere in the queue.
(A message whose final dot was sent but whose reply never came is in doubt: it may or may not be there.)
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
from pathlib import Path

from helpers_control import free_port
from helpers_queue import paused_daemon
from waiting import wait_until

from smtpd.queue import codec
from smtpd.queue.spool import Spool

ROUNDS = 8
SESSIONS = 8
SIZES = (200, 3000, 60000)
# With queue compression and encryption, also messages over the 256 KiB held in memory: their clear file in
# temporary/ is encoded into another at commit.
ENCODED_SIZES = (200, 3000, 60000, 300000)
KEY = "0123456789abcdef0123456789abcdef"


def body_for(token: str, size: int) -> bytes:
    line = (token * 8)[:70].encode() + b"\r\n"
    return (f"Subject: {token}\r\n\r\n".encode() + line * max(1, size // len(line)) +
            f"END {token}\r\n".encode())


async def client(port: int, worker: int, round_number: int, state: dict[str, set[str]],
                 randomizer: random.Random, sizes: tuple[int, ...] = SIZES) -> None:
    number = 0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def reply() -> int:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return int(line[:3])

        assert await reply() == 220
        writer.write(b"EHLO crash.test\r\n")
        assert await reply() == 250
        while True:
            number += 1
            token = f"r{round_number}s{worker}n{number}"
            writer.write(b"MAIL FROM:<load@crash.test>\r\n")
            assert await reply() == 250
            writer.write(f"RCPT TO:<{token}@relay.test>\r\n".encode())
            assert await reply() == 250
            writer.write(b"DATA\r\n")
            assert await reply() == 354
            data = body_for(token, randomizer.choice(sizes))
            state["started"].add(token)
            for start in range(0, len(data), 16384):
                writer.write(data[start:start + 16384])
                await writer.drain()
            state["dot"].add(token)
            writer.write(b".\r\n")
            if await reply() == 250:
                state["acked"].add(token)
            if number % 50 == 0:
                writer.write(b"RSET\r\n")
                await reply()
    except (ConnectionError, OSError, AssertionError, ValueError):
        return


async def load_until_killed(port: int, daemon, round_number: int, kill_after: float,
                            state: dict[str, set[str]], randomizer: random.Random,
                            sizes: tuple[int, ...] = SIZES) -> None:
    tasks = [asyncio.create_task(client(port, worker, round_number, state, randomizer, sizes))
             for worker in range(SESSIONS)]
    await asyncio.sleep(kill_after)
    daemon.signal(signal.SIGKILL)
    daemon.process.wait(10)
    await asyncio.wait(tasks, timeout=20)


def test_kill_9_of_the_real_daemon_under_smtp_load(tmp_path: Path) -> None:
    crash_rounds(tmp_path, "", ROUNDS, SIZES)


def test_kill_9_with_queue_compression_and_encryption(tmp_path: Path, monkeypatch) -> None:
    """The same with every file stored encoded (fewer rounds: the other test covers the rounds themselves)."""
    monkeypatch.setattr(codec, "_current", codec.QueueCodec(compress=True, key=KEY.encode()))  # (to read back)
    crash_rounds(tmp_path, f"queue compression\nqueue encryption {KEY}\n", 3, ENCODED_SIZES)


def crash_rounds(tmp_path: Path, queue_lines: str, rounds: int, sizes: tuple[int, ...]) -> None:
    randomizer = random.Random(int(os.environ.get("CRASH_SEED", "0")) or None)
    port = free_port()
    config = (f"{queue_lines}listen on 127.0.0.1 port {port}\n"
              'action "relay" relay\n'
              'match from any for any action "relay"\n')
    state: dict[str, set[str]] = {"started": set(), "dot": set(), "acked": set()}
    for round_number in range(rounds):
        daemon = paused_daemon(tmp_path, config)
        assert daemon.real
        daemon.start()
        asyncio.run(load_until_killed(port, daemon, round_number, randomizer.uniform(0.2, 1.5), state,
                                      randomizer, sizes))
        daemon.stop()
    assert len(state["acked"]) > rounds

    daemon = paused_daemon(tmp_path, config)
    daemon.start()  # recovery runs at start
    wait_until(lambda: "loaded" in daemon.log(), 30, 0.1, explain=daemon.log)
    daemon.stop()

    spool = Spool(str(tmp_path / "spool"))
    queued: dict[str, bytes] = {}
    for msgid in spool.message_ids():
        loaded = spool.load_message(msgid, move_corrupt=False)
        assert loaded.corrupt == []
        data = codec.clear(Path(spool.message_path(msgid)).read_bytes())
        token = re.search(rb"Subject: (\S+)\n", data)
        assert token is not None
        name = token.group(1).decode()
        assert data.endswith(f"END {name}\n".encode()), f"partial message {name}"
        assert [envelope.rcpt for envelope in loaded.envelopes] == [f"{name}@relay.test"]
        queued[name] = data
    missing = state["acked"] - queued.keys()
    assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
    ghosts = queued.keys() - state["dot"]
    assert not ghosts, f"queued although DATA never ended: {sorted(ghosts)[:5]}"
    assert list((tmp_path / "spool" / "temporary").iterdir()) == []
    assert list((tmp_path / "spool" / "incoming").iterdir()) == []
    assert list((tmp_path / "spool" / "corrupt").iterdir()) == []
