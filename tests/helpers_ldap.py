"""A private OpenLDAP server for the `ldap:` table tests: Debian's slapd, started by the test as an unprivileged
process in a temporary folder (slapd.conf, an mdb database loaded with slapadd), listening on
ldap://127.0.0.1:PORT/ only, and stopped by its pid. Never the system's slapd or its configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from daemon import accepts, free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson", "misc")  # misc: nisMailAlias, rfc822MailMember
SUFFIX = "dc=example,dc=com"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "ldap-secret"
UNPRIVILEGED = ("nobody", "nogroup")  # slapd drops to them when the tests run as root

SLAPD_CONF = """{includes}
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {password}
directory {directory}
"""


class Slapd:
    """``with Slapd(folder, ldif) as server:`` — ``server.url`` answers, with ``ldif`` loaded under SUFFIX."""

    def __init__(self, folder: Path, ldif: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.config_path = folder / "slapd.conf"
        self.database = folder / "db"
        self.log_path = folder / "slapd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_config()
        self._load(ldif)

    def _write_config(self) -> None:
        self.database.mkdir(mode=0o700)
        includes = "\n".join(f"include /etc/ldap/schema/{name}.schema" for name in SCHEMAS)
        self.config_path.write_text(SLAPD_CONF.format(includes=includes, suffix=SUFFIX, rootdn=ROOT_DN,
                                                      password=ROOT_PASSWORD, directory=self.database))

    def _load(self, ldif: str) -> None:
        source = self.folder / "data.ldif"
        source.write_text(ldif)
        result = subprocess.run([SLAPADD, "-f", str(self.config_path), "-l", str(source)], capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"slapadd failed:\n{result.stderr}")
        if os.geteuid() == 0:
            for path in (self.database, *self.database.iterdir()):
                shutil.chown(path, *UNPRIVILEGED)

    def start(self) -> None:
        command = [SLAPD, "-d", "0", "-f", str(self.config_path), "-h", f"{self.url}/"]
        if os.geteuid() == 0:
            command += ["-u", UNPRIVILEGED[0], "-g", UNPRIVILEGED[1]]
        with open(self.log_path, "ab") as log:  # (-d 0: slapd stays in the foreground, its pid is ours)
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"slapd did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, 15)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait(5)

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def table_config(url: str, *lines: str) -> str:
    """A table-ldap configuration file's text: the server, the root DN's bind, the suffix, and ``lines``."""
    return "\n".join([f"url {url}", f"username {ROOT_DN}", f"password {ROOT_PASSWORD}", f"basedn {SUFFIX}",
                      *lines]) + "\n"
