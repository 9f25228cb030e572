"""Test helpers for the queue, scheduler and bounces: a real Daemon object with the real queue and scheduler
on a temporary spool, and a small delivery component (the MDA is another subsystem) that writes each delivered
message into a folder and answers what the test tells it to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers_control import DaemonProcess

from shared.paths import Paths
from smtpd import queue as queue_package
from smtpd import scheduler as scheduler_package
from smtpd.config.model import Action, Config, Method
from smtpd.daemon import Daemon, DaemonOptions
from smtpd.delivery import DeliveryResult
from smtpd.queue.envelope import DsnNotify, Envelope, EnvelopeType

Policy = Callable[[Envelope], DeliveryResult]


@dataclass
class Delivered:
    envelope: Envelope
    data: bytes


@dataclass
class FolderDelivery:
    """Delivers by copying the queued message into ``folder``; ``policy`` decides the outcome."""

    folder: Path
    policy: Policy = field(default=lambda envelope: DeliveryResult.ok())
    delivered: list[Delivered] = field(default_factory=list)
    attempts: list[Envelope] = field(default_factory=list)
    name_with_rcpt: bool = False  # files named "<evpid>-<rcpt>": which envelope carried which message

    async def deliver(self, envelope: Envelope, message_path: str) -> DeliveryResult:
        self.attempts.append(envelope)
        result = self.policy(envelope)
        if result.outcome == "ok":
            with open(message_path, "rb") as handle:
                data = handle.read()
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self.folder / (f"{envelope.evpid:016x}-{envelope.rcpt}" if self.name_with_rcpt
                                    else f"{envelope.evpid:016x}")
            temporary = self.folder / f".{envelope.evpid:016x}.tmp"
            temporary.write_bytes(data)
            temporary.rename(target)  # a delivered file is whole even if the process is killed
            self.delivered.append(Delivered(envelope, data))
        return result


def queue_config(queue_ttl: int | None = None, warn: tuple[int, ...] | None = None) -> Config:
    from smtpd.config.model import QueueOptions

    kwargs: dict[str, Any] = {"path": "test.conf",
                              "actions": {"local": Action("local", Method.MBOX),
                                          "relay": Action("relay", Method.RELAY)}}
    if queue_ttl is not None:
        kwargs["queue"] = QueueOptions(ttl=queue_ttl)
    if warn is not None:
        kwargs["bounce_warn_intervals"] = warn
    return Config(**kwargs)


def make_daemon(tmp_path: Path, config: Config | None = None) -> Daemon:
    mailname = tmp_path / "mailname"
    mailname.write_text("mx.test.example\n")
    paths = Paths.from_environment(spool=str(tmp_path / "spool"), mailname=str(mailname),
                                   socket=str(tmp_path / "smtpd.sock"), pidfile=str(tmp_path / "smtpd.pid"))
    return Daemon(paths, config or queue_config(), DaemonOptions())


class Harness:
    """The real queue + scheduler of a Daemon, started in the running loop, with a FolderDelivery as MDA."""

    def __init__(self, tmp_path: Path, config: Config | None = None, group_delay: float = 0.05) -> None:
        self.tmp_path = tmp_path
        self.daemon = make_daemon(tmp_path, config)
        self.queue = queue_package.build(self.daemon)
        self.scheduler = scheduler_package.build(self.daemon)
        self.scheduler.bouncer.group_delay = group_delay
        self.scheduler.bouncer.router = self.route_bounce
        self.mda = FolderDelivery(tmp_path / "delivered")
        self.scheduler.deliverers["mda"] = self.mda
        self.scheduler.deliverers["mta"] = self.mda

    async def route_bounce(self, sender: str, smtpname: str) -> list[Envelope]:
        """Reports go to a local mailbox of the sender (routing is the rules' job, tested elsewhere)."""
        return [Envelope(dispatcher="local", type=EnvelopeType.MDA, rcpt=sender, dest=sender)]

    async def __aenter__(self) -> Harness:
        await self.queue.start()
        await self.scheduler.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.scheduler.stop()
        await self.queue.stop()

    @property
    def spool(self) -> Path:
        return Path(self.daemon.paths.spool)

    async def submit(self, body: bytes = b"Subject: test\n\nhello\n", recipients: tuple[str, ...] = ("bob@example.org",),
                     sender: str = "alice@example.com", agent: EnvelopeType = EnvelopeType.MDA,
                     **envelope_fields: Any) -> tuple[int, list[int]]:
        message = self.queue.new_message()
        await message.write(body)
        evpids = []
        for rcpt in recipients:
            envelope = Envelope(dispatcher="local" if agent is EnvelopeType.MDA else "relay", type=agent,
                                sender=sender, rcpt=rcpt, dest=rcpt, sockaddr="127.0.0.1", helo="client.test",
                                hostname="localhost", **envelope_fields)
            evpids.append(message.add_envelope(envelope))
        await message.commit()
        assert message.placed is not None
        await message.placed  # the scheduler has it now
        return message.msgid, evpids


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until ``condition()`` holds; fail with ``what`` after ``timeout`` seconds (a liveness bound only)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def spool_files(spool: Path, sub: str) -> list[str]:
    base = spool / sub
    return sorted(str(path.relative_to(base)) for path in base.rglob("*") if path.is_file())


__all__ = ["Delivered", "DsnNotify", "FolderDelivery", "Harness", "make_daemon", "run", "spool_files",
           "queue_config", "wait_for"]


# -- the crash worker: a real process that is killed with SIGKILL by tests/test_queue_crash.py ------------------
def crash_payload(token: str, size: int) -> bytes:
    line = (token * 8)[:70].encode() + b"\n"
    body = line * max(1, size // len(line))
    return f"Subject: {token}\nX-Size: {len(body)}\n\n".encode() + body + f"END {token}\n".encode()


def crash_worker(tmp: str, round_number: int, concurrency: int = 8) -> None:
    """Deliver what is queued (from earlier rounds) while submitting new messages, forever, reporting on stdout:
    `WRITE t` (receiving started), `COMMIT t` (commit asked: in doubt from here), `ACK t` (commit returned)."""
    import random
    import sys

    async def producer(harness: Harness, worker: int) -> None:
        number = 0
        while True:
            number += 1
            token = f"r{round_number}w{worker}n{number}"
            data = crash_payload(token, random.choice((100, 2000, 30000, 200000)))
            message = harness.queue.new_message()
            print(f"WRITE {token}", flush=True)
            for start in range(0, len(data), 8192):  # streamed in blocks, as a session does
                await message.write(data[start:start + 8192])
                await asyncio.sleep(0)
            message.add_envelope(Envelope(dispatcher="local", type=EnvelopeType.MDA, sender="a@x.test",
                                          rcpt=f"{token}@y.test", dest=f"{token}@y.test", sockaddr="local"))
            print(f"COMMIT {token}", flush=True)
            await message.commit()
            print(f"ACK {token}", flush=True)

    async def main() -> None:
        harness = Harness(Path(tmp))
        harness.mda.name_with_rcpt = True
        async with harness:
            print("READY", flush=True)
            await asyncio.gather(*(producer(harness, worker) for worker in range(concurrency)))

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)


def drain_worker(tmp: str) -> None:
    """Start once more without producing; exit when every loaded envelope is delivered."""

    async def main() -> None:
        harness = Harness(Path(tmp))
        harness.mda.name_with_rcpt = True
        async with harness:
            await harness.queue.loading_done.wait()
            await wait_for(lambda: not harness.scheduler.entries, timeout=120, what="the queue to drain")
        print(f"DRAINED {len(harness.mda.delivered)}", flush=True)

    asyncio.run(main())


# -- a real daemon process with deliveries paused ------------------------------------------------------------
def paused_daemon(workdir: Path, config_text: str | None = None) -> DaemonProcess:
    """A daemon process (`python -m smtpd -d -P mda -P mta`) on workdir's spool and socket, with both delivery
    agents paused."""
    return DaemonProcess(workdir, config_text, paused=("mda", "mta"))
