"""Helpers for the local-delivery tests: real system users, small tables, and configs built in code."""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from daemon import SmtpdProcess, free_port

from smtpd.config.model import Action, Condition, Config, MatchRule, Method, SmtpOptions
from smtpd.lookup.tables.base import Service, TableError


@contextmanager
def system_user(home_parent: str, prefix: str = "pyt") -> Iterator[pwd.struct_passwd]:
    """A real system user with a home under home_parent, removed afterwards."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    home = os.path.join(home_parent, name)
    subprocess.run(["useradd", "-M", "-d", home, "-s", "/usr/sbin/nologin", "-U", name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        os.makedirs(home, mode=0o755, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield entry
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@dataclass
class DictTables:
    """A small table registry with the contract's lookup() (used where the real Tables is not needed).

    ``maps`` holds mapping tables by name; ``getpwnam`` answers USERINFO from the system user database;
    tables named in ``broken`` raise TableError, as a failing backend does.
    """

    maps: dict[str, dict[str, str]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    asked: list[tuple[str, str]] = field(default_factory=list)

    def lookup(self, name: str, service: Service, key: str) -> str | None:
        self.asked.append((name, key))
        if name in self.broken:
            raise TableError(f"table {name} is broken")
        if name == "getpwnam" and service is Service.USERINFO:
            try:
                entry = pwd.getpwnam(key)
            except KeyError:
                return None
            return f"{entry.pw_uid}:{entry.pw_gid}:{entry.pw_dir}"
        return self.maps.get(name, {}).get(key.lower())

    def match(self, name: str, service: Service, candidate: str) -> bool:
        if name in self.broken:
            raise TableError(f"table {name} is broken")
        table = self.maps.get(name, {})
        if service is Service.DOMAIN:
            return candidate.lower() in table
        return candidate.lower() in table


def rule_for_domain(number: int, domains_table: str, action: str | None) -> MatchRule:
    return MatchRule(conditions=(Condition("from", "any"), Condition("for", "domain", domains_table)),
                     action=action, reject=action is None, number=number)


def make_config(actions: list[Action], rules: list[MatchRule], delimiter: str = "+") -> Config:
    return Config(path="test.conf", actions={action.name: action for action in actions}, rules=tuple(rules),
                  smtp=SmtpOptions(sub_addr_delim=delimiter))


def local_action(name: str = "local", method: Method = Method.MBOX, **options: object) -> Action:
    return Action(name=name, method=method, **options)  # type: ignore[arg-type]


def relay_action(name: str = "relay") -> Action:
    return Action(name=name, method=Method.RELAY)


def maildir_count(maildir: Path | str) -> int:
    """How many messages a Maildir holds in new/ (0 while it does not exist yet)."""
    new = Path(maildir) / "new"
    return len(os.listdir(new)) if new.is_dir() else 0


def make_mail_root(parent: str) -> str:
    """A mail spool like Debian's /var/mail: root:mail, mode 2775, under a private temp folder."""
    import grp

    os.chmod(parent, 0o755)
    root = os.path.join(parent, "mail")
    os.mkdir(root)
    os.chown(root, 0, grp.getgrnam("mail").gr_gid)
    os.chmod(root, 0o2775)
    return root


def write_message(path: str, text: str) -> str:
    """A queued message file as the queue stores it: LF line endings."""
    with open(path, "wb") as handle:
        handle.write(text.encode())
    return path


def mda_envelope(dispatcher: str, dest: str, user: str, sender: str = "alice@sender.test", **fields: object):
    from smtpd.queue.envelope import Envelope

    envelope = Envelope(evpid=0x1234567890ABCDEF, dispatcher=dispatcher, dest=dest, rcpt=dest, sender=sender,
                        mda_user=user, ctime=1_700_000_000)
    for name, value in fields.items():
        setattr(envelope, name, value)
    return envelope


@contextmanager
def open_temp_dir(prefix: str = "pysmtpd-test-") -> Iterator[str]:
    """A temp folder others may traverse (0755), removed afterwards: for deliveries that run as test users."""
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix=prefix)
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Daemon(SmtpdProcess):
    """The real daemon on a private spool, socket and mail spool (tests/daemon.py), ready once its control socket
    answers; the delivery tests' call signature."""

    def __init__(self, workdir: str, config_text: str, mail_root: str, mailname: str = "mx.delivery.test",
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, config_text, mailname=mailname, env={"SMTPD_MAILDIR_ROOT": mail_root},
                         args=extra_args, listens=False)
        self.socket = str(self.socket_path)
        self.spool = str(self.workdir / "spool")
        self.config_path = str(self.config_path)  # type: ignore[assignment]


@contextmanager
def running(top: str | os.PathLike[str], mail_root: str, rules: str) -> Iterator[tuple[Daemon, int]]:
    """The daemon with ``rules`` (its actions and match lines), listening on a free loopback port; yields it and
    the port, and stops it afterwards."""
    port = free_port()
    daemon = Daemon(str(top), f"listen on 127.0.0.1 port {port}\n" + rules, mail_root).start()
    try:
        yield daemon, port
    finally:
        daemon.stop()


@contextmanager
def mail_world(monkeypatch, prefix: str, user_prefix: str) -> Iterator[tuple[str, str, pwd.struct_passwd]]:  # noqa: ANN001
    """A traversable temp folder with a mail root (SMTPD_MAILDIR_ROOT) and one real system user homed in it."""
    with open_temp_dir(prefix) as top:
        root = make_mail_root(top)
        monkeypatch.setenv("SMTPD_MAILDIR_ROOT", root)
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        with system_user(homes, user_prefix) as user:
            yield top, root, user

