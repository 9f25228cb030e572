"""Our smtpctl, mailq and sendmail pointed at OpenSMTPD 6.8's control socket (/var/run/smtpd.sock, the default of
both: OpenSMTPD still running while PySMTPD is tried or taken into use).

6.8's control process reads binary imsg frames: the first bytes of our JSON request, taken for an imsg header,
announced a frame of about 12 KB, for which it waited without end. smtpctl waited for its 120 s timeout, mailq
for ever, sendmail for 300 s before keeping the message offline. The request now starts with bytes that make a
length no imsg may have, and 6.8 hangs up at once.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from daemon import ROOT, free_port
from helpers_mta import OpenSmtpd

OPENSMTPD_SOCKET = "/var/run/smtpd.sock"
BIN = ROOT / ".venv" / "bin"


def test_our_programs_do_not_hang_on_opensmtpds_control_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="pysmtpd-68sock-") as folder:
        os.chmod(folder, 0o755)
        port = free_port()
        config = f'listen on 127.0.0.1 port {port}\naction "l" mbox\nmatch from local for local action "l"\n'
        spool = Path(folder) / "spool"
        env = {**os.environ, "SMTPD_SOCKET": OPENSMTPD_SOCKET, "SMTPD_SPOOL": str(spool)}
        with OpenSmtpd(folder, config, port):
            results = [subprocess.run([str(BIN / name), *args], capture_output=True, text=True, env=env, timeout=30)
                       for name, args in (("smtpctl", ["show", "status"]), ("mailq", []),
                                          ("smtpctl", ["pause", "smtp"]))]
            sent = subprocess.run([str(BIN / "sendmail"), "root"], input="Subject: kept\n\nbody\n",
                                  capture_output=True, text=True, env={**env, "HOME": folder}, timeout=30)
    for result in results:
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr in ("smtpctl: connection closed by smtpd\n", "mailq: connection closed by smtpd\n"), result
    assert sent.returncode == 75, sent.stderr  # kept offline, for a daemon of ours to take
