"""What `smtpctl show queue` / `mailq` print: one row per envelope, filters, and the reference's line format.

Shared by the daemon (rows from the scheduler's memory) and smtpctl (rows read from the spool when the daemon
is down). A row is a list in ROW_FIELDS order (compact on the control socket); ``row_to_json`` names the fields
for `--json` (schema in docs/queue.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from smtpd.queue.envelope import Envelope

ROW_FIELDS = ("evpid", "src", "agent", "flags", "sender", "rcpt", "dest", "ctime", "expire", "lasttry", "retry",
              "runstate", "runvalue", "errorline")
FLAG_ORDER = (("bounce", "bounce"), ("authenticated", "auth"), ("internal", "internal"), ("suspend", "suspend"),
              ("hold", "hold"))
STATES = ("pending", "inflight", "suspended", "offline", "invalid")

Row = list  # [str, str, str, str, str, str, str, int, int, int, int, str, int | None, str]


def source_of(sockaddr: str) -> str:
    if sockaddr == "local":
        return "local"
    if sockaddr.startswith("[") or ":" in sockaddr:
        return "inet6"
    if sockaddr and sockaddr[0] in "0123456789":
        return "inet4"
    return "?"


def flags_text(flags: AbstractSet[str]) -> str:
    return ",".join(shown for name, shown in FLAG_ORDER if name in flags)


def envelope_row(envelope: Envelope, runstate: str, runvalue: int | None) -> Row:
    return [
        f"{envelope.evpid:016x}",
        source_of(envelope.sockaddr),
        str(envelope.type) if str(envelope.type) in ("mda", "mta", "bounce") else "?",
        flags_text(envelope.flags),
        envelope.sender or "@",
        envelope.rcpt,
        envelope.dest,
        envelope.ctime,
        envelope.ctime + envelope.ttl,  # QUIRK fixed: OpenSMTPD stores ttl 0 and shows expire == ctime
        envelope.last_try,
        envelope.retry,
        runstate,
        runvalue,
        envelope.errorline,
    ]


def vis(text: str) -> str:
    """vis(3) with flags 0: control characters as \\^X, backslash doubled, bytes >= 0x80 as \\M-x."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the usual case, unchanged
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char in " \t\n":
            out.append(char)
        elif code < 0x20:
            out.append("\\^" + chr(code + 0x40))
        elif code == 0x7F:
            out.append("\\^?")
        elif 0xDC80 <= code <= 0xDCFF or 0x80 <= code <= 0xFF:  # a raw byte (surrogateescape) or Latin-1
            byte = code - 0xDC00 if code >= 0xDC80 else code
            low = byte & 0x7F
            if low < 0x20:
                out.append("\\M^" + chr(low + 0x40))
            elif low == 0x7F:
                out.append("\\M^?")
            else:
                out.append("\\M-" + chr(low))
        else:
            out.append(char)
    return "".join(out)


def errorline_text(text: str) -> str:
    """An errorline as `show queue` prints it: vis-encoded, and a line break as `\\n` (the relay keeps every line of a
    remote's reply): printed as it was, it broke the envelope's record over several lines. (vis doubles a
    backslash, so a `\\n` of the reply's own text stays told apart.)"""
    return vis(text).replace("\n", "\\n")


_AGENTS = frozenset(("mda", "mta", "bounce"))


def line_parts(envelope: Envelope) -> tuple[str, str]:
    """The parts of an envelope's line around `runstate|runvalue`: (the 11 fields before, the errorline).

    The fields of envelope_row, written out directly: `show queue` makes this for every envelope it has not
    shown before (50,000 after a restart)."""
    kind = str(envelope.type)
    return (f"{envelope.evpid:016x}|{source_of(envelope.sockaddr)}|{kind if kind in _AGENTS else '?'}|"
            f"{flags_text(envelope.flags) if envelope.flags else ''}|{envelope.sender or '@'}|{envelope.rcpt}|"
            f"{envelope.dest}|{envelope.ctime}|{envelope.ctime + envelope.ttl}|{envelope.last_try}|"
            f"{envelope.retry}", errorline_text(envelope.errorline) if envelope.errorline else "")


def format_line(row: Row) -> str:
    """The 14 `|`-separated fields of reference §2.4."""
    values = list(row)
    values[12] = "" if values[12] is None else str(values[12])
    values[13] = errorline_text(values[13])
    return "|".join(str(value) for value in values)


def row_to_json(row: Row) -> dict[str, object]:
    record: dict[str, object] = dict(zip(ROW_FIELDS, row, strict=True))
    record["msgid"] = str(row[0])[:8]
    record["flags"] = [flag for flag in str(row[3]).split(",") if flag]
    record["sender"] = "" if row[4] == "@" else row[4]
    return record


_AGE_RE = re.compile(r"^([0-9]+)([smhdw]?)$")  # ASCII digits: `９h` is no age
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> int:
    """`90`, `90s`, `15m`, `4h`, `2d`, `1w` -> seconds. Raises ValueError with a clear message."""
    match = _AGE_RE.match(text.strip())
    if not match:
        raise ValueError(f"invalid age {text!r} (use e.g. 90s, 15m, 4h, 2d, 1w)")
    return int(match.group(1)) * _AGE_UNITS[match.group(2)]


@dataclass(frozen=True)
class EnvelopeFilter:
    """Selects envelopes for show queue / remove / schedule / pause / resume. Empty fields select everything.

    sender, rcpt: case-insensitive substring of the address (rcpt matches the original or the final one); the
    sender `@` selects the null sender only;
    domain: the recipient's domain, exactly (case-insensitive; an IDN in either form); older/newer: age in seconds since creation;
    state: pending | inflight | suspended | offline.
    """

    sender: str | None = None
    rcpt: str | None = None
    domain: str | None = None
    older: int | None = None
    newer: int | None = None
    state: str | None = None

    @classmethod
    def from_args(cls, args: dict[str, object]) -> EnvelopeFilter:
        def text(key: str) -> str | None:
            value = args.get(key)
            return str(value) if value not in (None, "") else None

        def number(key: str) -> int | None:
            value = args.get(key)
            if value in (None, ""):
                return None
            return value if isinstance(value, int) else parse_age(str(value))

        state = text("state")
        if state is not None and state not in STATES:
            raise ValueError(f"invalid state {state!r} (one of {', '.join(STATES[:4])})")
        return cls(sender=text("sender"), rcpt=text("rcpt"), domain=text("domain"), older=number("older"),
                   newer=number("newer"), state=state)

    def to_args(self) -> dict[str, object]:
        return {key: value for key, value in self.__dict__.items() if value is not None}

    @property
    def empty(self) -> bool:
        return not self.to_args()

    def matches(self, envelope: Envelope, state: str, now: float) -> bool:
        if self.state is not None and state != self.state:
            return False
        if self.sender is not None:
            if self.sender == "@":
                # `@` is how the null sender is written (docs/queue.md): only mail from <> (reports), not
                # every address with an @ in it (`smtpctl remove --sender @` must not empty the queue).
                if envelope.sender:
                    return False
            elif self.sender.lower() not in (envelope.sender or "@").lower():
                return False
        if self.rcpt is not None:
            needle = self.rcpt.lower()
            if needle not in envelope.rcpt.lower() and needle not in envelope.dest.lower():
                return False
        if self.domain is not None:
            forms = domain_forms(self.domain)
            if not any(address.rpartition("@")[2].lower() in forms for address in (envelope.rcpt, envelope.dest)):
                return False
        age = now - envelope.ctime
        if self.older is not None and age < self.older:
            return False
        return not (self.newer is not None and age > self.newer)


@functools.lru_cache(maxsize=64)
def domain_forms(domain: str) -> frozenset[str]:
    """The ways an envelope may hold a domain: as given, and an IDN in both its Unicode and its A-label form
    (`--domain bücher.example` also selects `xn--bcher-kva.example`, and the other way round), case aside."""
    import dns.exception  # (here: the listing is also read by smtpctl, which needs dnspython only for this)
    import dns.name

    forms = {domain.lower()}
    try:
        name = dns.name.from_unicode(domain)
        forms |= {name.to_text(omit_final_dot=True).lower(), name.to_unicode(omit_final_dot=True).lower()}
    except (dns.exception.DNSException, UnicodeError, ValueError):
        pass  # (not a valid IDN: only as given)
    return frozenset(forms)


def plural_envelopes(count: int, verb: str) -> str:
    """`0 envelope removed`, `1 envelope scheduled`, `3 envelopes paused` (reference §2.3)."""
    return f"{count} envelope{'s' if count > 1 else ''} {verb}"
