"""The reference's formats computed by the control plane: durations (uptime.human) and monitor rows."""

from __future__ import annotations

import pytest

from shared.durations import duration_to_text
from smtpctl.commands.monitor import format_row, monitor_rows


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (3, "3s"), (60, "1m"), (3600, "1h"), (86403, "1d3s"), (93784, "1d2h3m4s"), (93600, "1d2h"),
    (-5, "-5s"),
])
def test_duration_to_text(seconds: int, text: str) -> None:
    assert duration_to_text(seconds) == text


def test_monitor_row_matches_the_reference_layout() -> None:
    # The reference's verified row: 8 clients, 89 connections, 81 gone; 8219 envelopes enqueued, none gone.
    stats = {"smtp.session": 8, "smtp.session.inet4": 89, "scheduler.envelope": 8219,
             "digest.enqueued": 8219}
    row = next(monitor_rows(iter([stats])))
    assert format_row(row) == "   8   89   81  8219 8219    0    0       0       0    0      0      0      0"


def test_monitor_rows_are_deltas_except_curr() -> None:
    first = {"smtp.session": 2, "smtp.session.inet4": 5, "smtp.session.local": 1, "scheduler.envelope": 3,
             "digest.enqueued": 10, "scheduler.delivery.ok": 7, "queue.bounce": 1}
    second = {"smtp.session": 1, "smtp.session.inet4": 7, "smtp.session.local": 1, "scheduler.envelope": 1,
              "digest.enqueued": 12, "scheduler.delivery.ok": 11, "scheduler.delivery.tempfail": 2,
              "queue.bounce": 1}
    rows = list(monitor_rows(iter([first, second])))
    assert rows[0]["client_conn"] == 6 and rows[0]["client_disc"] == 4 and rows[0]["ok"] == 7
    assert rows[1] == {"client_curr": 1, "client_conn": 2, "client_disc": 3, "envelope_curr": 1,
                       "envelope_enq": 2, "envelope_deq": 4, "ok": 4, "tmpfail": 2, "prmfail": 0, "loop": 0,
                       "expire": 0, "remove": 0, "bounce": 0}
