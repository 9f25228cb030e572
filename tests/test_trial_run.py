"""The README's first command: `make run` (scripts/trial.py) gives a daemon that accepts and delivers mail."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from daemon import free_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_trial_run_delivers_to_the_local_maildir() -> None:
    # As root the trial delivers as nobody, who must reach the Maildir: pytest's tmp_path is private to root.
    tmp_path = Path(tempfile.mkdtemp(prefix="pysmtpd-trial-"))
    tmp_path.chmod(0o755)
    port = free_port()
    environment = dict(os.environ, SMTPD_TRIAL_DIR=str(tmp_path / "local"), SMTPD_TRIAL_PORT=str(port))
    log = open(tmp_path / "trial.log", "wb")  # noqa: SIM115 — the daemon keeps writing to it
    daemon = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "trial.py")], env=environment,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, 30, 0.1, explain=lambda: (tmp_path / "trial.log").read_text())
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("me@example.org", ["you@localhost"], b"Subject: trial\r\n\r\nhello from the README\r\n")
        new = tmp_path / "local" / "Maildir" / "new"
        delivered = wait_until(lambda: list(new.glob("*")) if new.exists() else [], 30, 0.1,
                               explain=lambda: (tmp_path / "trial.log").read_text())
        assert b"hello from the README" in delivered[0].read_bytes()
        status = subprocess.run([sys.executable, "-m", "smtpctl", "show", "status"], capture_output=True, text=True,
                                env=dict(environment, SMTPD_SOCKET=str(tmp_path / "local" / "smtpd.sock")))
        assert status.stdout == "MDA running\nMTA running\nSMTP running\n"
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_trial_run_prints_the_environment_for_smtpctl_and_sendmail_and_it_holds_when_the_daemon_is_down() -> None:
    """The README's hint named only the socket: with the daemon down, smtpctl and sendmail then used the system's
    spool (/var/spool/smtpd: permission denied as a user, OpenSMTPD's queue as root), not ./local/spool."""
    tmp_path = Path(tempfile.mkdtemp(prefix="pysmtpd-trial-"))
    tmp_path.chmod(0o755)
    local = tmp_path / "local"
    port = free_port()
    environment = dict(os.environ, SMTPD_TRIAL_DIR=str(local), SMTPD_TRIAL_PORT=str(port))
    for name in ("SMTPD_SOCKET", "SMTPD_SPOOL"):
        environment.pop(name, None)
    log = open(tmp_path / "trial.log", "wb")  # noqa: SIM115 — the daemon keeps writing to it
    daemon = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "trial.py")], env=environment,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (local / "smtpd.sock").exists(), 30, 0.1,
                   explain=lambda: (tmp_path / "trial.log").read_text())
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()
    try:
        exports = [line for line in (tmp_path / "trial.log").read_text().splitlines() if "export " in line]
        assert exports == [f"For smtpctl, sendmail and mailq: export SMTPD_SOCKET={local / 'smtpd.sock'} "
                           f"SMTPD_SPOOL={local / 'spool'}"]
        script = (f"{exports[0].split(': ', 1)[1]}; echo hi | {sys.executable} -c "
                  f"'import sys; from smtpctl.cli import main; main(sys.argv[1:], \"sendmail\")' you@localhost")
        submitted = subprocess.run(["sh", "-c", script], env=environment, capture_output=True, text=True,
                                   cwd=ROOT, timeout=60)
        assert (submitted.returncode, submitted.stderr) == (75, "")  # waits offline, for the next start
        assert len(list((local / "spool" / "offline").iterdir())) == 1
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_trial_run_as_root_in_a_folder_nobody_may_enter_says_so_and_stops() -> None:
    """A clone in /root (0700): as root the trial delivers as nobody, who cannot reach ./local. It said nothing,
    and every mail then failed with `Permission denied` and waited in the queue for days."""
    private = Path(tempfile.mkdtemp(prefix="pysmtpd-trial-private-"))  # 0700, owned by root, as /root is
    try:
        port = free_port()
        environment = dict(os.environ, SMTPD_TRIAL_DIR=str(private / "local"), SMTPD_TRIAL_PORT=str(port))
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "trial.py")], env=environment,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result
        assert result.stderr == (
            f"make run: as root, mail is delivered as nobody (deliveries never run as root), and {private} cannot "
            f"be entered by nobody (mode 0700, owner root).\nRun `make run` as an ordinary user, or use a clone in "
            "a folder that others may enter (such as /srv or /opt).\n")
        assert not (private / "local" / "smtpd.pid").exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)
