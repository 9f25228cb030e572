"""Wall time of `smtpctl show status` against a running daemon (target: under 60 ms).

    .venv/bin/python bench/smtpctl_start.py [--runs N]

Starts a real daemon (`python -m smtpd -d`) on a private socket and spool, then runs smtpctl as a script would
(output to a pipe) N times per command and prints min / median / p90 in milliseconds. `show status` takes the
fast path that imports neither Click nor rich; `show hosts` goes through the whole Click command line, for
comparison. The console script (.venv/bin/smtpctl, after `pip install -e .`) is measured when present, as well
as `python -m smtpctl`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_daemon(workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    (workdir / "smtpd.conf").write_text('action "local" mbox\nmatch from local for local action "local"\n')
    (workdir / "mailname").write_text("bench.test\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SMTPD_SOCKET": str(workdir / "smtpd.sock"),
           "SMTPD_SPOOL": str(workdir / "spool"), "SMTPD_MAILNAME": str(workdir / "mailname"),
           "SMTPD_PIDFILE": str(workdir / "smtpd.pid")}
    daemon = subprocess.Popen([sys.executable, "-m", "smtpd", "-d", "-f", str(workdir / "smtpd.conf")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(env["SMTPD_SOCKET"])
            return daemon, env
        except OSError:
            time.sleep(0.05)
    daemon.kill()
    raise SystemExit("the daemon did not start")


def measure(command: list[str], env: dict[str, str], runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        began = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True)
        timings.append((time.perf_counter() - began) * 1000)
        if completed.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {completed.stderr.decode()}")
    return timings


def report(label: str, timings: list[float]) -> None:
    ordered = sorted(timings)
    p90 = ordered[max(0, int(len(ordered) * 0.9) - 1)]
    print(f"{label:<42} min {ordered[0]:6.1f} ms  median {statistics.median(ordered):6.1f} ms  "
          f"p90 {p90:6.1f} ms  (n={len(ordered)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    runs = parser.parse_args().runs
    workdir = Path(tempfile.mkdtemp(prefix="smtpctl-bench-"))
    daemon, env = start_daemon(workdir)
    try:
        launchers = [("python -m smtpctl", [sys.executable, "-m", "smtpctl"])]
        script = Path(sys.executable).parent / "smtpctl"
        if script.exists():
            launchers.insert(0, ("smtpctl", [str(script)]))
        report("python -c pass (interpreter start)", measure([sys.executable, "-c", "pass"], env, runs))
        for name, launcher in launchers:
            report(f"{name} show status", measure([*launcher, "show", "status"], env, runs))
            report(f"{name} show hosts (Click path)", measure([*launcher, "show", "hosts"], env, runs))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
