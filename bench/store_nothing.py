"""Our daemon with a queue that stores nothing: each message is dropped where it would be committed, and the 250
goes out all the same. A measuring instrument for `bench/queue_bench.py --ceiling`, never a way to run a server:
it shows how fast the SMTP side alone (sessions, parsing, expansion, headers, logs) can take messages, the
ceiling that no work on the queue can lift.

    python bench/store_nothing.py -d -f smtpd.conf -P mta -P mda     (the arguments of smtpd)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpd.cli import main  # noqa: E402 — after the path is set
from smtpd.queue.store import IncomingMessage  # noqa: E402


async def _drop(self: IncomingMessage) -> None:
    await self.abort()  # the message held in memory is let go; no file, no journal record, no fsync


IncomingMessage.commit = _drop  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "smtpd"
    sys.exit(main())
