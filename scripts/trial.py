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
# The folder and port can be moved (the test of this script does), but the defaults are what the README promises.
LOCAL = Path(os.environ.get("SMTPD_TRIAL_DIR", PROJECT / "local"))
PORT = int(os.environ.get("SMTPD_TRIAL_PORT", "2525"))


def delivery_user() -> pwd.struct_passwd:
    if os.geteuid() == 0:
        return pwd.getpwnam("nobody")
    return pwd.getpwuid(os.geteuid())


def write_config(user: pwd.struct_passwd) -> Path:
    maildir = LOCAL / "Maildir"
    config = LOCAL / "smtpd.conf"
    config.write_text(
        "# Written by `make run` (scripts/trial.py); edit freely, it is rewritten on each run.\n"
        f"listen on 127.0.0.1 port {PORT}\n"
        "\n"
        f'table users {{ "@" = "{user.pw_name}" }}\n'
        f'action "local" maildir "{maildir}" virtual <users> user "{user.pw_name}"\n'
        'action "relay" relay\n'
        "\n"
        f'match from any for domain {{ localhost, "{hostname()}" }} action "local"\n'
        'match from local for any action "relay"\n'
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
    print(f"PySMTPD trial run: SMTP on 127.0.0.1:{PORT}, mail into {maildir}, control socket {LOCAL / 'smtpd.sock'}",
          file=sys.stderr)
    smtpd = str(Path(sys.executable).parent / "smtpd")
    os.execve(smtpd, [smtpd, "-d", "-f", str(config)], environment)


if __name__ == "__main__":
    sys.exit(main())
