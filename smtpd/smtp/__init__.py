"""The SMTP server: listeners, sessions, replies (docs/smtp.md).

``build(daemon)`` sets ``daemon.smtp`` to the ``SmtpServer`` component: ``start()/stop()``, ``reconfigure()``,
pausing through ``daemon.set_paused("smtp", ...)``, and ``serve_local(reader, writer, uid)`` for local enqueue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpd.smtp.listener import SmtpServer

if TYPE_CHECKING:
    from smtpd.daemon import Daemon


def build(daemon: Daemon) -> SmtpServer:
    daemon.smtp = SmtpServer(daemon)
    return daemon.smtp


__all__ = ["SmtpServer", "build"]
