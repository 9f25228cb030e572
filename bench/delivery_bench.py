"""End-to-end delivery benchmark: N messages over SMTP into a local user's Maildir, ours against OpenSMTPD 6.8.

    sudo .venv/bin/python bench/delivery_bench.py [--only ours|opensmtpd] [--messages 2000] [--size 2048] [--rounds N]

For each daemon (one after the other, same load, same config): a fresh spool, a test user created for the run
(removed afterwards), `action "local" maildir "<home>/Maildir-<daemon>"`, `match from any for any action
"local"`. The load generator sends the messages over 8 sessions; the clock runs from the first connection until
the last message file is in `new/`. Prints accept throughput, end-to-end throughput, and the ratio
ours/OpenSMTPD (> 1: we are faster). Needs root (OpenSMTPD's spool is fixed; deliveries switch users).

Each phase also prints the CPU time per message of the daemon's processes (all of its session, reaped children
included; and its main process alone): on a shared machine whose speed changes from minute to minute, that
figure moves far less than the wall-clock rates. `--profile DIR` records the drain of each daemon with py-spy
(raw stacks, all its processes) into DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import queue_bench  # noqa: E402
from loadgen import run_load  # noqa: E402

WORK = Path("/tmp/delivery-bench")
USER = "pysmtpdbench"
CONFIG = """listen on 127.0.0.1 port {port}
action "local" maildir "{maildir}"
match from any for any action "local"
"""


def create_user(home: Path) -> tuple[int, int]:
    subprocess.run(["userdel", USER], capture_output=True)
    subprocess.run(["groupdel", USER], capture_output=True)
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/usr/sbin/nologin", "-U", USER], check=True)
    import pwd

    entry = pwd.getpwnam(USER)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return entry.pw_uid, entry.pw_gid


def remove_user() -> None:
    subprocess.run(["userdel", USER], capture_output=True)
    subprocess.run(["groupdel", USER], capture_output=True)


def tree_cpu(session: int) -> dict[str, float]:
    """CPU seconds (user + system, with reaped children) of the processes in the daemon's session: the daemon
    itself ("main", its threads included) and the others ("helpers": OpenSMTPD's processes, our fork helper)."""
    total = {"main": 0.0, "helpers": 0.0}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of stat (sid), counted after the command name
            ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
            total["main" if int(entry.name) == session else "helpers"] += ticks / os.sysconf("SC_CLK_TCK")
    return total


def cpu_figures(target: queue_bench.Target, before: dict[str, float], messages: int,
                label: str) -> dict[str, float]:
    """CPU milliseconds per message since ``before``: all the daemon's processes, and the main one alone."""
    assert target.process is not None
    after = tree_cpu(target.process.pid)
    used = {key: 1000 * (after[key] - before[key]) / messages for key in after}
    return {f"{label} CPU (ms/msg)": round(used["main"] + used["helpers"], 2),
            f"{label} CPU main process (ms/msg)": round(used["main"], 2)}


def count_new(maildir: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(maildir / "new"))
    except FileNotFoundError:
        return 0


def run_one(target: queue_bench.Target, maildir: Path, messages: int, size: int, timeout: float) -> dict[str, float]:
    """End to end: the clock runs from the first connection until the last file is in new/."""
    target.workdir.mkdir(parents=True, exist_ok=True)
    target.prepare_spool(0)
    (target.workdir / "smtpd.conf").write_text(CONFIG.format(port=target.port, maildir=maildir))
    target.paused = False
    target.start()
    try:
        assert target.process is not None
        cpu_before = tree_cpu(target.process.pid)
        started = time.perf_counter()
        result = asyncio.run(run_load("127.0.0.1", target.port, 8, messages, size, rcpt=f"{USER}@bench.test"))
        accepted = time.perf_counter() - started
        if result["failures"]:
            raise RuntimeError(f"{target.name}: failures: {result['first_error']}")
        delivered = wait_delivered(maildir, messages, started, timeout)
        total = time.perf_counter() - started
        time.sleep(0.2)  # the last children reaped, their time counted in their parent's
        cpu = cpu_figures(target, cpu_before, messages, "end to end")
    finally:
        target.stop()
    figures = {"accepted (msg/s)": messages / accepted, "delivered": float(delivered),
               "end to end (s)": total, "end to end (msg/s)": delivered / total, **cpu}
    print(f"  {target.name}: {figures}", flush=True)
    return figures


def run_drain(target: queue_bench.Target, maildir: Path, messages: int, size: int, timeout: float) -> dict[str, float]:
    """Deliveries alone: queue everything with the MDA paused, then `resume mda` and time the drain."""
    target.workdir.mkdir(parents=True, exist_ok=True)
    target.prepare_spool(1)
    (target.workdir / "smtpd.conf").write_text(CONFIG.format(port=target.port, maildir=maildir))
    target.paused = True
    target.start()
    try:
        result = asyncio.run(run_load("127.0.0.1", target.port, 8, messages, size, rcpt=f"{USER}@bench.test"))
        if result["failures"]:
            raise RuntimeError(f"{target.name}: failures: {result['first_error']}")
        assert target.process is not None
        time.sleep(0.5)  # the last commits placed
        cpu_before = tree_cpu(target.process.pid)
        started = time.perf_counter()
        profiler = start_profiler(target.process.pid, target.name)
        subprocess.run(target.ctl() + ["resume", "mda"], env=target.env(), check=True, capture_output=True)
        delivered = wait_delivered(maildir, messages, started, timeout)
        total = time.perf_counter() - started
        time.sleep(0.2)
        stop_profiler(profiler)
        cpu = cpu_figures(target, cpu_before, messages, "drain")
    finally:
        target.stop()
    figures = {"drain (s)": total, "drain (msg/s)": delivered / total, **cpu}
    print(f"  {target.name}: {figures}", flush=True)
    return figures


PROFILE_DIR: Path | None = None  # --profile: py-spy records the drain of each daemon here


def start_profiler(pid: int, name: str) -> subprocess.Popen[bytes] | None:
    if PROFILE_DIR is None:
        return None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                             "--format", "raw", "--output", str(PROFILE_DIR / f"drain-{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=60)


def wait_delivered(maildir: Path, messages: int, started: float, timeout: float) -> int:
    while count_new(maildir) < messages and time.perf_counter() - started < timeout:
        time.sleep(0.02)
    return count_new(maildir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("ours", "opensmtpd"))
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--profile", type=Path, help="record the drain with py-spy (raw stacks) into this folder")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds in which the daemons take turns (who goes first alternates) [1]")
    args = parser.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if os.geteuid() != 0:
        print("needs root: OpenSMTPD's spool is fixed, and deliveries switch to the test user", file=sys.stderr)
        return 1
    if args.only != "ours" and subprocess.run(["pgrep", "-x", "smtpd"], capture_output=True).returncode == 0:
        print("an OpenSMTPD is already running; not touching it", file=sys.stderr)
        return 1
    queue_bench.WORK = WORK
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o755)
    home = WORK / "home"
    create_user(home)
    rounds: dict[str, list[dict[str, float]]] = {}
    try:
        targets: list[queue_bench.Target] = []
        if args.only != "opensmtpd":
            targets.append(_Ours("ours", queue_bench.free_port(), WORK / "ours"))
        if args.only != "ours":
            targets.append(_OpenSMTPD("opensmtpd", queue_bench.free_port(), WORK / "opensmtpd"))
        for round_number in range(args.rounds):
            # Taking turns: on this shared host the CPU's speed drifts within minutes, so only runs made close
            # together compare (as in queue_bench.py). Maildirs and spools are kept until the end.
            for target in targets if round_number % 2 == 0 else list(reversed(targets)):
                figures = run_one(target, home / f"Maildir-{target.name}-{round_number}", args.messages,
                                  args.size, args.timeout)
                figures.update(run_drain(target, home / f"Maildir-{target.name}-drain-{round_number}",
                                         args.messages, args.size, args.timeout))
                rounds.setdefault(target.name, []).append(figures)
    finally:
        remove_user()
        if queue_bench.OPENSMTPD_SPOOL.exists() and args.only != "ours":
            queue_bench.OPENSMTPD_SPOOL.rename(WORK / f"trash-opensmtpd-spool-end-{time.time_ns()}")
        shutil.rmtree(WORK, ignore_errors=True)
    if len(rounds) == 2:
        print(report(rounds["ours"], rounds["opensmtpd"], args.messages, args.size))
    return 0


def report(ours: list[dict[str, float]], theirs: list[dict[str, float]], messages: int, size: int) -> str:
    """Medians over the rounds, and the median of the per-round ratios (> 1: we are faster)."""
    lines = [f"\n{messages} x {size} B into a Maildir, 8 sessions, {len(ours)} round(s):"]
    for key in ("accepted (msg/s)", "end to end (msg/s)", "drain (msg/s)"):
        ratios = [mine[key] / other[key] for mine, other in zip(ours, theirs, strict=True) if other[key]]
        per_round = " ".join(f"{ratio:.2f}" for ratio in ratios)
        lines.append(f"  {key}: ours {queue_bench.median([r[key] for r in ours]):.1f}, OpenSMTPD "
                     f"{queue_bench.median([r[key] for r in theirs]):.1f}, ratio {queue_bench.median(ratios):.2f}"
                     f" (per round: {per_round})")
    return "\n".join(lines)


class _Ours(queue_bench.Ours):
    paused = False

    def command(self) -> list[str]:
        return [sys.executable, "-m", "smtpd", "-d", "-f", str(self.workdir / "smtpd.conf"),
                *(["-P", "mda"] if self.paused else [])]


class _OpenSMTPD(queue_bench.OpenSMTPD):
    paused = False

    def command(self) -> list[str]:
        return queue_bench.opensmtpd_command(["-d", "-f", str(self.workdir / "smtpd.conf"),
                                              *(["-P", "mda"] if self.paused else [])], str(self.workdir))


if __name__ == "__main__":
    sys.exit(main())
