"""Default file locations and their overrides.

The system defaults are OpenSMTPD's. Each one can be overridden by an environment variable (and, in the
programs, by a command-line option that takes precedence), so the daemon, smtpctl and the tests can run
unprivileged anywhere: point SMTPD_SPOOL and SMTPD_SOCKET at a folder you own.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

DEFAULT_CONFIG = "/etc/smtpd.conf"
DEFAULT_SPOOL = "/var/spool/smtpd"
DEFAULT_SOCKET = "/var/run/smtpd.sock"
DEFAULT_MAILNAME = "/etc/mailname"
DEFAULT_PIDFILE = "/var/run/smtpd.pid"

ENV_CONFIG = "SMTPD_CONFIG"
ENV_SPOOL = "SMTPD_SPOOL"
ENV_SOCKET = "SMTPD_SOCKET"
ENV_MAILNAME = "SMTPD_MAILNAME"
ENV_PIDFILE = "SMTPD_PIDFILE"
# Where the daemon's DNS questions (reverse lookups, MX) go: "host:port" of a resolver. Tests point it at a
# DNS server of their own on loopback; unset means the system resolver.
ENV_RESOLVER = "SMTPD_RESOLVER"


def parse_resolver_setting(value: str) -> tuple[str, int]:
    """SMTPD_RESOLVER's value as (address, port): '127.0.0.1:5353', '[::1]:5353', '127.0.0.1' or '::1' (port
    53). One reading for every place that asks DNS (MX, reverse names, listen targets, spf walk); ValueError
    for anything that is not an IP address with an optional port."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, "53"
    ipaddress.ip_address(host)
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"invalid resolver port: {port!r}")
    return host, int(port)


RESOLV_CONF = "/etc/resolv.conf"


def read_system_resolver(resolver: Any, path: str = RESOLV_CONF) -> None:
    """Configure a dnspython resolver made with ``configure=False`` from resolv.conf. A file without
    `nameserver` lines (or no file) means the server on this machine, as resolv.conf(5) says and libc and
    OpenSMTPD do; dnspython refuses it ("no nameservers"), which stopped the daemon at start."""
    import dns.resolver

    try:
        resolver.read_resolv_conf(path)
    except dns.resolver.NoResolverConfiguration:
        resolver.nameservers = ["127.0.0.1"]


@dataclass(frozen=True)
class Paths:
    config: str
    spool: str
    socket: str
    mailname: str
    pidfile: str

    @classmethod
    def from_environment(cls, **overrides: str | None) -> Paths:
        """Defaults, then environment variables, then explicit (non-None) overrides."""
        values = {
            "config": os.environ.get(ENV_CONFIG, DEFAULT_CONFIG),
            "spool": os.environ.get(ENV_SPOOL, DEFAULT_SPOOL),
            "socket": os.environ.get(ENV_SOCKET, DEFAULT_SOCKET),
            "mailname": os.environ.get(ENV_MAILNAME, DEFAULT_MAILNAME),
            "pidfile": os.environ.get(ENV_PIDFILE, DEFAULT_PIDFILE),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


class MailnameError(Exception):
    pass


def read_mailname(path: str) -> str:
    """The server name as OpenSMTPD derives it: the mailname file's first line (less blanks around it), else the
    host's FQDN."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            # (trimmed: a host name holds no blank, and `echo 'mx.example.org ' >/etc/mailname` put one in every
            # address qualified with it, which the daemon refuses)
            first_line = handle.readline().strip()
    except OSError:
        first_line = ""
    if first_line:
        if len(first_line) >= 255:
            raise MailnameError(f"{path} entry too long")
        return first_line
    name = socket.gethostname()
    if not name:
        raise MailnameError("getmailname: gethostname() failed")
    if "." not in name:
        try:
            infos = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)
        except (OSError, UnicodeError, LookupError):
            # LookupError: the idna codec cannot be imported (an unprivileged user who cannot read the whole
            # stdlib); the short name is still a usable server name.
            infos = []
        for info in infos:
            if info[3]:
                return info[3]
    return name
