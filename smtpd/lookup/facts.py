"""What rule matching and expansion know about where a recipient came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionFacts:
    """The facts of one SMTP session (or local submission) that match rules test.

    ``address`` is the client's IP as text ("1.2.3.4", "::1"), or "local" for the Unix socket.
    """

    address: str = "local"
    rdns: str | None = None  # None: no reverse name ("<unknown>")
    helo: str = ""
    auth_user: str | None = None  # authenticated user name; local submissions count as authenticated
    tls: bool = False
    tag: str | None = None
    listener_hostname: str = ""
    local_socket: bool = False
    fcrdns: bool = False  # forward-confirmed reverse DNS: rdns resolves back to address (filters' `fcrdns`)

    @property
    def is_local(self) -> bool:
        return self.local_socket
