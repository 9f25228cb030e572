"""A real Dovecot (IMAP + LMTP) started by a test on loopback with a private config, stopped by its pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class DovecotUser:
    name: str
    uid: int
    gid: int
    home: str
    password: str = "secret"
    fields: str = ""  # userdb extra fields, e.g. "userdb_quota_rule=*:storage=1K"


@dataclass
class Dovecot:
    """Dovecot serving `users` from `base` (a folder of the test). mail_location as in dovecot.conf."""

    base: str
    users: list[DovecotUser]
    mail_location: str
    extra_config: str = ""  # appended to dovecot.conf (plugins, their settings)
    imap_port: int = field(default_factory=free_port)
    lmtp_port: int = field(default_factory=free_port)
    pid: int | None = None

    @property
    def config_path(self) -> str:
        return os.path.join(self.base, "dovecot.conf")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "dovecot.log")

    @property
    def lmtp_socket(self) -> str:
        return os.path.join(self.base, "run", "lmtp")

    def write_config(self) -> None:
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        users_file = os.path.join(self.base, "users")
        with open(users_file, "w") as handle:
            for user in self.users:
                handle.write(f"{user.name}:{{PLAIN}}{user.password}:{user.uid}:{user.gid}::{user.home}::{user.fields}\n")
        os.chmod(users_file, 0o644)
        config = f"""
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {self.base}/run
state_dir = {self.base}/state
log_path = {self.log_path}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
mail_privileged_group = mail
first_valid_uid = 1
mbox_write_locks = dotlock fcntl
mbox_read_locks = fcntl
mail_location = {self.mail_location}
lmtp_save_to_detail_mailbox = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {users_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {users_file}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
{self.extra_config}
"""
        with open(self.config_path, "w") as handle:
            handle.write(config)

    def start(self) -> None:
        self.write_config()
        # dovecot forks into the background and keeps its output descriptors: do not wait on pipes.
        with open(os.path.join(self.base, "start.log"), "w") as output:
            subprocess.run(["dovecot", "-c", self.config_path], check=True, stdin=subprocess.DEVNULL,
                           stdout=output, stderr=output)
        pid_file = os.path.join(self.base, "run", "master.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.exists(pid_file) and self._accepting(self.lmtp_port) and self._accepting(self.imap_port):
                with open(pid_file) as handle:
                    text = handle.read().strip()
                if text.isdigit():  # (dovecot creates the file before it writes its pid into it)
                    self.pid = int(text)
                    return
            time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start; log:\n{self.log()}")

    @staticmethod
    def _accepting(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.pid = None

    def log(self) -> str:
        try:
            with open(self.log_path) as handle:
                return handle.read()
        except OSError:
            return ""

    def fetch(self, user: str, mailbox: str = "INBOX") -> list[str]:
        """Every message's full text in the mailbox, as `doveadm fetch` reads it."""
        result = subprocess.run(
            ["doveadm", "-c", self.config_path, "-f", "json", "fetch", "-u", user, "text", "mailbox", mailbox, "all"],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"doveadm fetch failed: {result.stderr}\n{self.log()}")
        return [entry["text"] for entry in json.loads(result.stdout or "[]")]

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
