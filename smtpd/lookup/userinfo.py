"""Who a local recipient is: the userbase answer (`UID:GID:/home`), and the daemon's own unprivileged user.

The userbase is a table looked up with the USERINFO service: the builtin `<getpwnam>` (system users) unless an
action names another one (`userbase <t>`, entries `user  UID:GID:/home/dir`, reference §5.2).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from shared.numbers import ascii_digits

DEFAULT_USERBASE = "getpwnam"
# Commands and files that come from aliases (not from a user's .forward) run as this user, as OpenSMTPD runs them
# as its unprivileged user. The environment variable lets an installation pick another account.
ENV_UNPRIVILEGED_USER = "SMTPD_UNPRIVILEGED_USER"
UNPRIVILEGED_CANDIDATES = ("opensmtpd", "_smtpd", "nobody")


@dataclass(frozen=True)
class UserInfo:
    username: str
    uid: int
    gid: int
    directory: str

    def to_value(self) -> str:
        return f"{self.uid}:{self.gid}:{self.directory}"


class UserInfoError(ValueError):
    pass


def parse_userinfo(username: str, value: str) -> UserInfo:
    """`UID:GID:/home/dir` -> UserInfo. Raises UserInfoError on a malformed value."""
    parts = value.strip().split(":", 2)
    if len(parts) != 3 or not ascii_digits(parts[0]) or not ascii_digits(parts[1]) or not parts[2].startswith("/"):
        raise UserInfoError(f"invalid userinfo for {username}: {value!r}")
    return UserInfo(username, int(parts[0]), int(parts[1]), parts[2])


def unprivileged_user() -> str:
    """The account that runs alias commands: the daemon's own user when it is not root, else a system one."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    chosen = os.environ.get(ENV_UNPRIVILEGED_USER)
    if chosen:
        return chosen
    for name in UNPRIVILEGED_CANDIDATES:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return "nobody"
