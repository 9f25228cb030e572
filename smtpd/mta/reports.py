"""The relay client's `smtp-out` reports to filter processes (docs/filters.md, "Reports of relay sessions").

As in OpenSMTPD 6.8, a relay session is reported only to the filter processes that its relay action's `filter`
option runs (a `proc-exec` filter, a `proc` one, or those of a chain), for the smtp-out events each registered.
A relay without such a process makes no SessionReports at all: its sessions pay one check, made when they open.

The lines are made by smtpd.smtp.processes.report_line, the same formatter as smtp-in's.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from smtpd.smtp.processes import OUT_SUBSYSTEM, Processor, ProcessorSet, report_line

if TYPE_CHECKING:
    from smtpd.config.model import Config

# 6.8 writes these in place of what an AUTH line carries: the PLAIN token, and LOGIN's user and password lines.
HIDDEN = "********"


class SessionReports:
    """The reports of one relay session, from its connection to its end. It holds its processes' snapshot (a
    reload that drops them lets them run until the session ends, as incoming sessions do)."""

    def __init__(self, processors: ProcessorSet, reporters: tuple[Processor, ...], session_id: str) -> None:
        self.processors = processors.hold()
        self.reporters = reporters
        self.session_id = session_id
        self._ended = False

    def __call__(self, event: str, *fields: str) -> None:
        if self._ended:
            # link-disconnect was the session's last word: a filter forgets the session there, and a line after
            # it would be about a session it no longer knows (the QUIT tried on a connection already closed).
            return
        line = None
        for processor in self.reporters:
            if event in processor.out_reports:
                if line is None:
                    line = report_line(event, self.session_id, fields, OUT_SUBSYSTEM)
                processor.report(line)

    def link_connect(self, rdns: str, local: object, remote: object) -> None:
        """`RDNS|pass|LOCAL|REMOTE`. 6.8 always says `pass`: no FCrDNS check is made of the host we connect to."""
        self("link-connect", rdns, "pass", _endpoint(local), _endpoint(remote))

    def disconnected(self) -> None:
        """`link-disconnect`, once, and the snapshot let go."""
        if self._ended:
            return
        self("link-disconnect")
        self._ended = True
        self.processors.release()


# Opens the reports of a connected session (its id given); None when no process hears of it by then.
Opener = Callable[[str], SessionReports | None]


def opener(processors: ProcessorSet | None, config: Config, filter_name: str | None) -> Opener | None:
    """What opens the reports of a session of the relay whose `filter` is ``filter_name``; None when no process
    would hear anything."""
    reporters = listeners(processors, config, filter_name)
    if processors is None or not reporters:
        return None
    return lambda session_id: SessionReports(processors, reporters, session_id)


def listeners(processors: ProcessorSet | None, config: Config, filter_name: str | None) -> tuple[Processor, ...]:
    """The processes told of the sessions of the relay whose `filter` is ``filter_name``: none without a filter,
    without a process in it, or when none of them registered for a smtp-out event."""
    if processors is None or not filter_name:
        return ()
    reporters = processors.relay_reporters(config, filter_name)
    return reporters if any(processor.out_reports for processor in reporters) else ()


def masked(line: str) -> str:
    """A command as protocol-client reports it: 6.8's masks for the credentials of AUTH."""
    if line[:11].upper() == "AUTH PLAIN ":
        return f"{line[:10]} {HIDDEN}"
    return HIDDEN


def _endpoint(address: object) -> str:
    """`127.0.0.1:25`, `[::1]:25` (as smtp-in's link-connect writes them); a Unix socket by its path."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0]).split("%")[0]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return f"unix:{address}" if address else "unix:"


def tls_text(ssl_object: object) -> str:
    """link-tls's field, as smtp-in writes it (and 6.8, as its `mta tls ciphers=` line):
    `TLSv1.3:TLS_AES_256_GCM_SHA384:256`."""
    from smtpd.smtp import tls

    described = tls.describe(ssl_object) if isinstance(ssl_object, ssl.SSLObject) else None
    return ":".join((described or "::").split(":")[:3])
