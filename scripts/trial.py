"""`make run`: the daemon in the foreground on a working local default, with everything under ./local.

Listens on 127.0.0.1:2525; spool, control socket, pid file and delivered mail live in ./local, so no root is
needed. Every address at localhost (or at this host's name) is delivered into the Maildir ./local/Maildir as the
user running this (as root: as `nobody`, since deliveries never run as root). Try it:

    swaks --server 127.0.0.1:2525 --to you@localhost
    SMTPD_SOCKET=local/smtpd.sock .venv/bin/smtpctl show queue
"""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
LOCAL = PROJECT / "local"


def delivery_user() -> pwd.struct_passwd:
    if os.geteuid() == 0:
        return pwd.getpwnam("nobody")
    return pwd.getpwuid(os.geteuid())


def write_config(user: pwd.struct_passwd) -> Path:
    maildir = LOCAL / "Maildir"
    config = LOCAL / "smtpd.conf"
    config.write_text(
        "# Written by `make run` (scripts/trial.py); edit freely, it is rewritten on each run.\n"
        "listen on 127.0.0.1 port 2525\n"
        "\n"
        "table users { \"@\" = \"%s\" }\n"
        "action \"local\" maildir \"%s\" virtual <users> user \"%s\"\n"
        "action \"relay\" relay\n"
        "\n"
        "match from any for domain { localhost, \"%s\" } action \"local\"\n"
        "match from local for any action \"relay\"\n" % (user.pw_name, maildir, user.pw_name, hostname())
    )
    return config


def hostname() -> str:
    return os.uname().nodename


def main() -> int:
    LOCAL.mkdir(exist_ok=True)
    (LOCAL / "spool").mkdir(exist_ok=True)
    user = delivery_user()
    maildir = LOCAL / "Maildir"
    maildir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(maildir, user.pw_uid, user.pw_gid)
    config = write_config(user)
    environment = dict(os.environ)
    environment.update({
        "SMTPD_SPOOL": str(LOCAL / "spool"),
        "SMTPD_SOCKET": str(LOCAL / "smtpd.sock"),
        "SMTPD_PIDFILE": str(LOCAL / "smtpd.pid"),
    })
    print(f"PySMTPD trial run: SMTP on 127.0.0.1:2525, mail into {maildir}, control socket {LOCAL / 'smtpd.sock'}",
          file=sys.stderr)
    smtpd = str(Path(sys.executable).parent / "smtpd")
    os.execve(smtpd, [smtpd, "-d", "-f", str(config)], environment)


if __name__ == "__main__":
    sys.exit(main())
