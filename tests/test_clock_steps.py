"""The wall clock set back under a running daemon (an admin correcting a date that was ahead, a virtual machine's
clock resynchronized), or between two runs: the daemon runs under libfaketime (package faketime), its wall clock
read from a file the test rewrites, its monotonic clock the real one (as a real clock step leaves it)."""

from __future__ import annotations

import smtplib
from pathlib import Path

from daemon import SmtpdProcess, free_port
from waiting import wait_until

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
DAY = 86400

CONFIG = """listen on 127.0.0.1 port {port}
action "relay" relay host "smtp://127.0.0.1:%d"
match from any for domain "remote.test" action "relay"
"""


class ShiftedDaemon(SmtpdProcess):
    """A daemon whose wall clock is the real one shifted by what shift() last said."""

    def __init__(self, workdir: Path) -> None:
        assert LIBFAKETIME.exists(), "libfaketime is missing: make test-deps (package faketime)"
        self.clock_file = Path(workdir) / "faketime"
        self.clock_file.parent.mkdir(parents=True, exist_ok=True)
        self.shift(0)
        env = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
               "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        # Nothing listens on the relay's port: every attempt is a temporary failure (connection refused).
        super().__init__(workdir, CONFIG % free_port(), env=env)

    def shift(self, seconds: int) -> None:
        self.clock_file.write_text(f"{seconds:+d}\n")

    def send(self, rcpt: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as client:
            client.sendmail("s@sender.test", [rcpt], b"Subject: t\r\n\r\nhello\r\n")

    def queue(self) -> dict[str, list[str]]:
        """evpid -> the `show queue` fields, for the envelopes to rcpt."""
        lines = self.smtpctl("show", "queue").stdout.splitlines()
        return {line.split("|")[0]: line.split("|") for line in lines}


def retried(daemon: ShiftedDaemon, rcpt: str) -> list[str]:
    """The `show queue` fields of the envelope to rcpt once its first attempt has failed."""
    def row() -> list[str] | None:
        return next((fields for fields in daemon.queue().values() if fields[5] == rcpt and fields[10] != "0"
                     and fields[11] == "pending"), None)

    return wait_until(row, 30, explain=daemon.log)


def test_a_clock_set_back_a_day_does_not_stop_retries_for_a_day(tmp_path: Path) -> None:
    with ShiftedDaemon(tmp_path) as daemon:
        daemon.send("first@remote.test")
        fields = retried(daemon, "first@remote.test")
        assert fields[11] == "pending" and 0 < int(fields[12]) <= 400
        daemon.shift(-DAY)
        # The scheduler looks at the clock at least once a minute; a new message makes it look at once.
        daemon.send("second@remote.test")
        retried(daemon, "second@remote.test")
        after = daemon.queue()[fields[0]]
        # The retry planned for ~400 s ahead stays ~400 s ahead (it was due in a day and 400 s).
        assert after[11] == "pending" and 0 < int(after[12]) <= 400, after
        assert after[7] == fields[7]  # (the arrival time recorded is not changed)
        assert "scheduler: the clock was set back by 1 day; 1 planned try moved back as much" in daemon.log()


def test_mail_that_arrived_after_the_clock_time_is_retried_after_a_restart(tmp_path: Path) -> None:
    daemon = ShiftedDaemon(tmp_path)
    with daemon:
        daemon.send("first@remote.test")
        evpid = retried(daemon, "first@remote.test")[0]
    daemon.shift(-DAY)  # set back while the daemon was down
    with daemon:
        # Its ctime is a day ahead: tried at once at the start, then on the usual spacing from now (retry 2 at
        # 4 × 400 s); from its ctime, the next try was a day and 1600 s away.
        wait_until(lambda: daemon.queue().get(evpid, [""] * 11)[10] == "2", 30, explain=daemon.log)
        fields = daemon.queue()[evpid]
        assert fields[11] == "pending" and 0 < int(fields[12]) <= 1600, fields


def test_a_clock_set_back_a_day_does_not_keep_a_disabled_route_disabled_for_a_day(tmp_path: Path) -> None:
    with ShiftedDaemon(tmp_path) as daemon:
        # Four connection failures in a row disable the route, for 200 s after the first penalty.
        for number in range(4):
            daemon.send(f"r{number}@remote.test")
        wait_until(lambda: "Disabling route" in daemon.log(), 30, explain=daemon.log)
        daemon.shift(-DAY)
        routes = daemon.smtpctl("show", "routes").stdout
        assert " -DQ- " in routes and "penalty=1 timeout=3m" in routes, routes  # 3m and some seconds, not 1d3m
