"""The changing queue commands right after a start, while the queue found on disk is still being loaded: they wait
for the rest and act on the whole queue. Before, `remove all` removed the envelopes loaded so far (none, right
after the start: `0 envelope removed`), and the others were loaded afterwards and delivered."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers_queue import Harness, run, wait_for

from smtpd.control import queue_commands
from smtpd.queue import store


def fill(tmp_path: Path) -> list[int]:
    async def scenario() -> list[int]:
        async with Harness(tmp_path) as harness:
            harness.daemon.set_paused("mda", True)
            evpids: list[int] = []
            for number in range(3):
                _, more = await harness.submit(recipients=(f"a{number}@x.test", f"b{number}@x.test"))
                evpids += more
            return evpids

    return run(scenario())


@pytest.mark.parametrize("command", ["remove", "pause_envelope", "schedule", "discover"])
def test_a_command_during_the_loading_waits_for_it_and_acts_on_the_whole_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    evpids = fill(tmp_path)
    released = asyncio.Event()
    real_load = store.load_queue

    async def held_load(*args: Any) -> None:  # the loading of a big queue, held until the test lets it go
        await released.wait()
        await real_load(*args)

    monkeypatch.setattr(store, "load_queue", held_load)

    async def scenario() -> tuple[int, int, bool]:
        harness = Harness(tmp_path)
        harness.daemon.set_paused("mda", True)
        async with harness:
            assert not harness.queue.loading_done.is_set()
            target = f"{evpids[0] >> 32:08x}" if command == "discover" else "all"
            asked = asyncio.ensure_future(getattr(queue_commands, command)(harness.daemon, {"target": target}))
            await asyncio.sleep(0.2)
            waited = not asked.done()
            released.set()
            count = (await asyncio.wait_for(asked, 10))["count"]
            await wait_for(harness.queue.loading_done.is_set, what="the loading")
            return count, len(harness.scheduler.entries), waited

    count, left, waited = run(scenario())
    assert waited
    if command == "remove":
        assert (count, left) == (6, 0)
    elif command == "discover":
        assert (count, left) == (0, 6)  # the loader had given them all: nothing was unknown
    else:
        assert (count, left) == (6, 6)
