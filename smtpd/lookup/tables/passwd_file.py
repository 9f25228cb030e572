"""`passwd:` tables: a passwd(5)-style file of virtual users, read by the daemon itself.

OpenSMTPD runs these through an external program (table-passwd from opensmtpd-extras); we read the file
natively. It answers two services only (the others are a temporary failure, as the external program's):

* CREDENTIALS (listener `auth <t>`): the password field, a crypt(3) or bcrypt hash -> `user:HASH`;
* USERINFO (action `userbase <t>`): uid, gid and home -> `UID:GID:/home/dir`.

File format (docs/tables.md): one user a line, `user:password:uid:gid:gecos:home[:shell[:extra...]]`. A `#`
starts a comment anywhere in a line (crypt hashes never hold one); what is left is trimmed, and blank lines are
skipped. A line needs at least the six fields up to the home directory, and a non-empty user name: otherwise
the whole file is refused (`FILE:LINE: message`), at start and at reload, and a reload keeps the old content.
The other fields may be empty; they are checked only when a lookup needs them (a credentials-only table
leaves uid, gid and home empty). gecos, shell and any further fields (Dovecot passwd-file's extra fields) are
ignored. User names are matched case-insensitively; of two lines for one user, the last wins.

Dovecot compatibility: a `{SHA512-CRYPT}`-style scheme prefix of the crypt family is removed from the hash,
and uid/gid may be system user/group names (Dovecot allows `vmail:vmail`), resolved when the file is loaded.
"""

from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass

from shared.numbers import ascii_digits
from smtpd.config.model import TableShape
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.static import read_table_file

BACKEND = "passwd"
FIELDS_NEEDED = 6  # user:password:uid:gid:gecos:home
ID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to the system calls
SERVED = frozenset({Service.CREDENTIALS, Service.USERINFO})
# Dovecot's names for hashes that crypt(3)/bcrypt verify; the prefix is dropped, the hash kept.
_CRYPT_SCHEMES = re.compile(r"\{(?:CRYPT|DES-CRYPT|MD5-CRYPT|SHA256-CRYPT|SHA512-CRYPT|BLF-CRYPT)\}",
                            re.IGNORECASE)


@dataclass(frozen=True)
class PasswdEntry:
    name: str  # as written
    password: str  # the hash, without a Dovecot crypt scheme prefix; "" for none
    uid: int | None  # None: empty or not a number / known user name
    gid: int | None
    home: str
    line: int
    uid_text: str
    gid_text: str

    def credentials(self) -> str | None:
        """The CREDENTIALS answer, `user:HASH`; None when the entry has no password (it cannot log in)."""
        return f"{self.name}:{self.password}" if self.password else None

    def userinfo_problem(self) -> str | None:
        if self.uid is None:
            return f"invalid uid {self.uid_text!r}" if self.uid_text else "no uid"
        if self.gid is None:
            return f"invalid gid {self.gid_text!r}" if self.gid_text else "no gid"
        if not self.home.startswith("/"):
            return f"invalid home directory {self.home!r}" if self.home else "no home directory"
        return None

    def userinfo(self) -> str | None:
        return None if self.userinfo_problem() is not None else f"{self.uid}:{self.gid}:{self.home}"


class PasswdContent:
    """One immutable snapshot of a passwd file: lowercased user name -> entry."""

    def __init__(self, path: str, entries: dict[str, PasswdEntry]) -> None:
        self.path = path
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)


def _resolve_id(text: str, names: dict[str, int | None], by_name) -> int | None:  # noqa: ANN001
    if ascii_digits(text):
        number = int(text)
        return number if number <= ID_MAX else None
    if not text:
        return None
    if text not in names:
        try:
            names[text] = by_name(text)
        except (KeyError, UnicodeError, ValueError):
            names[text] = None
    return names[text]


def parse_passwd_text(text: str, path: str) -> PasswdContent:
    """Parse a passwd table file. Raises TableLoadError(`PATH:N: ...`) on the first malformed line."""
    entries: dict[str, PasswdEntry] = {}
    users: dict[str, int | None] = {}
    groups: dict[str, int | None] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        fields = line.split(":")
        if len(fields) < FIELDS_NEEDED:
            raise TableLoadError(f"{path}:{number}: invalid passwd entry: {len(fields)} field"
                                 f"{'s' if len(fields) != 1 else ''}, at least {FIELDS_NEEDED} needed "
                                 "(user:password:uid:gid:gecos:home[:shell])")
        name, password, uid_text, gid_text, _gecos, home = fields[:FIELDS_NEEDED]
        if not name:
            raise TableLoadError(f"{path}:{number}: invalid passwd entry: empty user name")
        password = _CRYPT_SCHEMES.sub("", password, count=1) if password.startswith("{") else password
        entries[name.lower()] = PasswdEntry(
            name=name, password=password,
            uid=_resolve_id(uid_text, users, lambda user: pwd.getpwnam(user).pw_uid),
            gid=_resolve_id(gid_text, groups, lambda group: grp.getgrnam(group).gr_gid),
            home=home, line=number, uid_text=uid_text, gid_text=gid_text)
    return PasswdContent(path, entries)


def load_passwd_file(path: str) -> PasswdContent:
    return parse_passwd_text(read_table_file(path), path)


class PasswdFileTable:
    """`table NAME passwd:/path`. Lookups answer from an in-memory snapshot; a reload swaps a new one in."""

    backend_name = BACKEND
    shape = TableShape.ANY  # like every external backend in 6.8: any use is accepted by the parser
    in_memory = True  # lookups never wait (the registry may then expand recipients on the event loop)

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.content = load_passwd_file(path)

    def entries(self) -> list[PasswdEntry]:
        return sorted(self.content.entries.values(), key=lambda entry: entry.line)

    def lookup(self, service: Service, key: str) -> str | None:
        if service not in SERVED:
            raise TableError(f"the passwd backend answers credentials and userinfo lookups only, not {service}")
        entry = self.content.entries.get(key)
        if entry is None:
            return None
        if service is Service.CREDENTIALS:
            return entry.credentials()
        problem = entry.userinfo_problem()
        if problem is not None:
            # A temporary failure, as for a malformed userbase value in any table: the mail waits for a fix.
            raise TableError(f"{self.path}:{entry.line}: user {entry.name}: {problem}")
        return entry.userinfo()

    def match(self, service: Service, candidate: str) -> bool:
        if service not in SERVED:
            raise TableError(f"the passwd backend answers credentials and userinfo lookups only, not {service}")
        return self.lookup(service, candidate) is not None

    def fetch(self, service: Service) -> str | None:
        raise TableError("the passwd backend answers credentials and userinfo lookups only")

    def reload(self) -> None:
        self.content = load_passwd_file(self.path)  # raises, keeping the old snapshot, on failure

    def close(self) -> None:
        """Nothing held open."""
