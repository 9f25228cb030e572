"""`make run`: the daemon in the foreground on a working local default, with everything under ./local.

Listens on 127.0.0.1:2525; spool, control socket, pid file and delivered mail live in ./local, so no root is
needed. Every address at localhost (or at this host's name) is delivered into the Maildir ./local/Maildir as the
user running this (as root: as `nobody`, since deliveries never run as root). Try it:

    swaks --server 127.0.0.1:2525 --to you@localhost
    export SMTPD_SOCKET=local/smtpd.sock SMTPD_SPOOL=local/spool
    .venv/bin/smtpctl show queue

(without SMTPD_SPOOL, smtpctl and sendmail work on /var/spool/smtpd whenever the daemon is down).
"""

from __future__ import annotations

import os
import pwd
import shlex
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


def unreachable(user: pwd.struct_passwd, folder: Path) -> str | None:
    """What keeps user from writing into folder: the first folder on the way that user may not enter (as root in
    /root, which is 0700, `nobody` cannot reach ./local), or folder itself when user may not write there. None when
    nothing does. Asked in a child that has become user, so the kernel's own rules answer (ACLs included)."""
    way = [*reversed(folder.parents), folder]
    child = os.fork()
    if child == 0:
        status = 255
        try:
            os.initgroups(user.pw_name, user.pw_gid)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            status = 0
            for index, step in enumerate(way):
                wanted = os.X_OK | (os.W_OK if step == folder else 0)
                if not os.access(step, wanted):
                    status = min(index + 1, 254)
                    break
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    if code == 255 or code > len(way):
        return f"{folder} (could not check as {user.pw_name})"
    step = way[code - 1]
    mode = f"mode {step.stat().st_mode & 0o7777:04o}, owner {pwd.getpwuid(step.stat().st_uid).pw_name}"
    if step == folder:
        return f"{step} cannot be written by {user.pw_name} ({mode})"
    return f"{step} cannot be entered by {user.pw_name} ({mode})"


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
        # Every delivery would fail (`Permission denied`, retried for days) with the mail stuck in the queue: say
        # so now. Typical: a clone in root's home, which no other user may enter.
        problem = unreachable(user, maildir)
        if problem is not None:
            print(f"make run: as root, mail is delivered as {user.pw_name} (deliveries never run as root), and "
                  f"{problem}.\nRun `make run` as an ordinary user, or use a clone in a folder that others may "
                  "enter (such as /srv or /opt).", file=sys.stderr)
            return 1
    config = write_config(user)
    environment = dict(os.environ)
    environment.update({
        "SMTPD_SPOOL": str(LOCAL / "spool"),
        "SMTPD_SOCKET": str(LOCAL / "smtpd.sock"),
        "SMTPD_PIDFILE": str(LOCAL / "smtpd.pid"),
    })
    print(f"PySMTPD trial run: SMTP on 127.0.0.1:{PORT}, mail into {maildir}, control socket {LOCAL / 'smtpd.sock'}",
          file=sys.stderr)
    print(f"For smtpctl, sendmail and mailq: export SMTPD_SOCKET={shlex.quote(str(LOCAL / 'smtpd.sock'))} "
          f"SMTPD_SPOOL={shlex.quote(str(LOCAL / 'spool'))}", file=sys.stderr)
    smtpd = str(Path(sys.executable).parent / "smtpd")
    os.execve(smtpd, [smtpd, "-d", "-f", str(config)], environment)


if __name__ == "__main__":
    sys.exit(main())
