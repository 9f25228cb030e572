"""The tests' DNS server on loopback, as a process of its own (so that pytest's process stays single-threaded:
tests fork, and a thread there would make every fork unsafe).

    python tests/loopback_dns.py      # prints its port, serves until its stdin closes

It names 127.0.0.1 and ::1 as a machine's /etc/hosts does, and nothing else (see conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_mta import DnsServer  # noqa: E402

LOOPBACK_NAMES = {
    "1.0.0.127.in-addr.arpa": [("PTR", "localhost.")],
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa": [("PTR", "localhost.")],
    "localhost": [("A", "127.0.0.1"), ("AAAA", "::1")],
}


def main() -> int:
    with DnsServer(LOOPBACK_NAMES) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the test session closes it (or ends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
