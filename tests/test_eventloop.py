"""The daemon's event loop polls before it sleeps only during quick exchanges (smtpd/eventloop.py): it returns
what the plain selector returns, keeps to the loop's timeouts, and an idle daemon burns no CPU."""

from __future__ import annotations

import asyncio
import itertools
import os
import selectors
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest
from daemon import SmtpdProcess

from smtpd import eventloop
from smtpd.eventloop import PollingEventLoop, PollingSelector


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.fixture
def selector(pair: tuple[socket.socket, socket.socket]) -> PollingSelector:
    chosen = PollingSelector(poll_seconds=0.0002)
    chosen.register(pair[0], selectors.EVENT_READ)
    yield chosen
    chosen.close()


def ready_sockets(events: list[tuple[selectors.SelectorKey, int]]) -> list[object]:
    return [key.fileobj for key, _ in events]


@pytest.mark.parametrize("polling", [False, True])
def test_data_already_there_is_returned(selector: PollingSelector, pair: tuple[socket.socket, socket.socket],
                                        polling: bool) -> None:
    selector.polling = polling
    pair[1].send(b"x")
    assert ready_sockets(selector.select(5)) == [pair[0]]


@pytest.mark.parametrize("polling", [False, True])
def test_data_arriving_after_the_poll_is_returned(selector: PollingSelector,
                                                  pair: tuple[socket.socket, socket.socket], polling: bool) -> None:
    """The poll finds nothing, the wait sleeps, and the data that comes wakes it."""
    selector.polling = polling
    sender = threading.Timer(0.05, pair[1].send, args=(b"x",))
    sender.start()
    try:
        assert ready_sockets(selector.select(10)) == [pair[0]]
    finally:
        sender.join()


@pytest.mark.parametrize("polling", [False, True])
def test_a_wait_with_nothing_to_read_ends_with_its_timeout(selector: PollingSelector, polling: bool) -> None:
    selector.polling = polling
    assert selector.select(0.01) == []
    assert selector.select(0) == []


def test_a_poll_longer_than_the_wait_stops_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's timeout (its next timer) bounds the poll. The selector reads a clock that moves 10 ms at each
    reading: a 50 ms timeout ends the poll after a few readings, where a poll running for its own hour would read
    it 360,000 times."""
    readings = itertools.count()
    monkeypatch.setattr(eventloop, "_clock", lambda: next(readings) * 0.01)
    with PollingSelector(poll_seconds=3600.0) as selector:
        selector.polling = True
        assert selector.select(0.05) == []
    assert next(readings) < 20


def test_it_polls_after_a_quick_wait_and_sleeps_at_once_after_a_long_one(
        selector: PollingSelector, pair: tuple[socket.socket, socket.socket]) -> None:
    assert not selector.polling  # (a new loop sleeps at once)
    pair[1].send(b"x")
    selector.select(5)  # ended at once: a quick exchange is going on
    assert selector.polling
    pair[0].recv(1)
    selector.select(0.05)  # 50 ms with nothing: far over ten poll times
    assert not selector.polling


def test_a_ready_callback_turn_teaches_nothing(selector: PollingSelector) -> None:
    """select(0) is the loop running callbacks that are ready, not a wait."""
    selector.polling = True
    selector.select(0)
    assert selector.polling


def test_the_loop_serves_sockets_timers_threads_subprocesses_and_signals() -> None:
    """Everything the daemon asks of asyncio's loop works on the polling one."""
    async def everything() -> list[object]:
        loop = asyncio.get_running_loop()
        assert getattr(loop, "polls", False)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"hello\n")
        line = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)
        from_thread = await asyncio.to_thread(lambda: "thread")
        process = await asyncio.create_subprocess_exec("true")
        status = await process.wait()
        hup = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, hup.set_result, "signal")
        os.kill(os.getpid(), signal.SIGUSR1)
        signalled = await asyncio.wait_for(hup, 10)
        loop.remove_signal_handler(signal.SIGUSR1)
        return [line, from_thread, status, signalled]

    assert asyncio.run(everything(), loop_factory=PollingEventLoop) == [b"hello\n", "thread", 0, "signal"]


def test_polling_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "POLL_SECONDS", 0.0)
    loop = eventloop.new_event_loop()
    try:
        assert not getattr(loop, "polls", False)
    finally:
        loop.close()
    monkeypatch.setattr(eventloop, "POLL_SECONDS", 0.0002)
    loop = eventloop.new_event_loop()
    try:
        assert loop.polls  # type: ignore[attr-defined]
    finally:
        loop.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


RELAY_CONFIG = """listen on 127.0.0.1 port {port}
action "relay" relay
match from any for any action "relay"
"""


def test_an_idle_daemon_burns_no_cpu_after_a_quick_exchange(tmp_path: Path) -> None:
    """Mail from a client on the same host switches polling on; once the client is gone, the daemon's loop
    sleeps again (polling without end would burn a whole CPU here)."""
    with SmtpdProcess(tmp_path, RELAY_CONFIG, paused=("mta",)) as daemon:
        assert daemon.process is not None
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            for number in range(20):
                client.sendmail("a@example.org", ["b@example.net"], f"Subject: {number}\r\n\r\nbody\r\n")
        time.sleep(0.2)
        before = cpu_seconds(daemon.process.pid)
        time.sleep(2)
        spent = cpu_seconds(daemon.process.pid) - before
    assert spent < 0.5, f"the idle daemon used {spent:.2f} s of CPU in 2 s"
