"""Queue benchmark: our daemon against real OpenSMTPD 6.8, one after the other, same load, on loopback.

    sudo .venv/bin/python bench/queue_bench.py [--only ours|opensmtpd] [--scale 1.0]

Measures, for each daemon (started with deliveries paused, so that mail stays queued):
  * accept+queue throughput (250 after DATA) with 1, 8 and 32 sessions at 2 KB, and 8 sessions at 100 KB, in
    --rounds rounds (3) where the two daemons take turns row by row: the host's CPU speed drifts, and each
    ratio then compares runs a few seconds apart (the median of the per-round ratios is reported);
  * `smtpctl show queue` with 10,000 and with 50,000 envelopes queued;
  * the daemon's RSS (all its processes) with 50,000 queued;
  * after a restart with 50,000 queued, the time until all of them are loaded (`show stats`:
    scheduler.envelope reaches the count).
With --ceiling, only the accept rows, with a third daemon taking its turns: ours with a queue that stores
nothing (bench/store_nothing.py), how fast the SMTP side alone takes messages.
Prints both figures and the ratio ours/OpenSMTPD (for times: OpenSMTPD/ours, so > 1 is always "we are better").

OpenSMTPD needs root and its spool is fixed at /var/spool/smtpd and its socket at /var/run/smtpd.sock: the
script refuses to run if an OpenSMTPD is already running, moves an existing /var/spool/smtpd aside first, and
stops the daemon it started by pid. Spools are never deleted right before the next run (creating many files
shortly after deleting many is slow on this filesystem): they are moved aside and deleted at the very end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from helpers_mta import opensmtpd_command  # noqa: E402
from loadgen import run_load  # noqa: E402

OPENSMTPCTL = "/usr/sbin/smtpctl"
OPENSMTPD_SPOOL = Path("/var/spool/smtpd")
WORK = Path("/tmp/queue-bench")
CONFIG = """listen on 127.0.0.1 port {port}
action "relay" relay
match from any for any action "relay"
"""
# --encrypted: both daemons store their queue compressed and encrypted (the same key).
ENCRYPTED = "queue compression\nqueue encryption 0123456789abcdef0123456789abcdef\n"


def opensmtpd_running() -> bool:
    """A live (not zombie) process named smtpd: another OpenSMTPD, whose spool and socket we would share."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("Name") == "smtpd" and not fields.get("State", "").startswith("Z"):
            return True
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            pass
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            children = []
        pending.extend(int(child) for child in children)
    return total


@dataclass
class Target:
    name: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    results: dict[str, float] = field(default_factory=dict)

    # overridden
    config_prefix = ""  # statements before the listener (--encrypted)

    def command(self) -> list[str]: raise NotImplementedError
    def env(self) -> dict[str, str]: return dict(os.environ)
    def ctl(self) -> list[str]: raise NotImplementedError
    def prepare_spool(self, run: int) -> None: ...

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "daemon.log", "ab")  # noqa: SIM115 — kept for the daemon's lifetime
        self.process = subprocess.Popen(self.command(), env=self.env(), stdout=log, stderr=log,
                                        start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def show_queue_seconds(self, runs: int = 3) -> tuple[float, int]:
        """The median time of `runs` runs of `smtpctl show queue` (a single run right after filling the queue
        caught the disk writing the fill back: 0.21 s in one run, 0.47 s in the next), and the lines shown."""
        times: list[float] = []
        lines = 0
        for _ in range(runs):
            started = time.perf_counter()
            output = subprocess.run(self.ctl() + ["show", "queue"], env=self.env(), capture_output=True, check=True)
            times.append(time.perf_counter() - started)
            lines = output.stdout.count(b"\n")
        return median(times), lines

    def stat(self, key: str) -> int:
        output = subprocess.run(self.ctl() + ["show", "stats"], env=self.env(), capture_output=True, text=True)
        for line in output.stdout.splitlines():
            name, _, value = line.partition("=")
            if name == key:
                return int(value)
        return 0


class OpenSMTPD(Target):
    def command(self) -> list[str]:
        return opensmtpd_command(["-d", "-f", str(self.workdir / "smtpd.conf"), "-P", "mta", "-P", "mda"],
                                 str(self.workdir))

    def ctl(self) -> list[str]:
        return [OPENSMTPCTL]

    def prepare_spool(self, run: int) -> None:
        if OPENSMTPD_SPOOL.exists():
            OPENSMTPD_SPOOL.rename(WORK / f"trash-opensmtpd-spool-{run}-{time.time_ns()}")
        (self.workdir / "smtpd.conf").write_text(self.config_prefix + CONFIG.format(port=self.port))


class Ours(Target):
    PROGRAM = ["-m", "smtpd"]

    def env(self) -> dict[str, str]:
        return dict(os.environ, SMTPD_SPOOL=str(self.workdir / "spool"), SMTPD_SOCKET=str(self.workdir / "sock"),
                    SMTPD_PIDFILE=str(self.workdir / "smtpd.pid"), PYTHONPATH=str(ROOT))

    def command(self) -> list[str]:
        return [sys.executable, *self.PROGRAM, "-d", "-f", str(self.workdir / "smtpd.conf"), "-P", "mta", "-P",
                "mda"]

    def ctl(self) -> list[str]:
        return [sys.executable, "-m", "smtpctl"]

    def stat(self, key: str) -> int:
        """Asked on the control socket directly: polling through a new Python process ten times a second
        would take a CPU of this small machine away from the daemon being measured."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(self.workdir / "sock"))
            connection.sendall(b'{"v":1,"id":1,"cmd":"show.stats","args":{}}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
        stats = json.loads(data).get("result", {}).get("stats", {})
        return int(stats.get(key, 0))

    def prepare_spool(self, run: int) -> None:
        spool = self.workdir / "spool"
        if spool.exists():
            spool.rename(WORK / f"trash-ours-spool-{run}-{time.time_ns()}")
        (self.workdir / "smtpd.conf").write_text(self.config_prefix + CONFIG.format(port=self.port))


class OursStoringNothing(Ours):
    """Ours with a queue that drops every message at its commit (bench/store_nothing.py): the SMTP side's
    ceiling."""

    PROGRAM = [str(HERE / "store_nothing.py")]


def load(target: Target, sessions: int, messages: int, size: int) -> dict[str, object]:
    return asyncio.run(run_load("127.0.0.1", target.port, sessions, messages, size))


def fill_to(target: Target, count: int, already: int) -> int:
    missing = count - already
    if missing > 0:
        result = load(target, 8, missing, 2048)
        already += int(result["messages"])  # type: ignore[arg-type]
    return already


def wait_loaded(target: Target, count: int, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if target.stat("scheduler.envelope") >= count:
            return time.perf_counter() - started
        time.sleep(0.1)
    return float("inf")


ACCEPT_ROWS = ((1, 1000, 2048, "accept 1 session 2 KB"),
               (8, 3000, 2048, "accept 8 sessions 2 KB"),
               (32, 3000, 2048, "accept 32 sessions 2 KB"),
               (8, 600, 100 * 1024, "accept 8 sessions 100 KB"))


def start_fresh(target: Target) -> None:
    target.workdir.mkdir(parents=True, exist_ok=True)
    target.prepare_spool(0)
    target.start()


# Rows with more sessions than this are not run again when not calm. Every row is, since OpenSMTPD's reverse
# lookups stay on loopback (before, it stalled in every try of the 32-session row; see the README).
CALM_SESSIONS = 32


def accept_interleaved(targets: list[Target], rounds: int, scale: float,
                       retries: int = 0) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Every accept row, `rounds` times, the daemons taking turns row by row (the first one alternating), so
    that each ratio compares runs made a few seconds apart: on a shared host the CPU's speed drifts by tens of
    percent from one minute to the next. A row in which a connection of either daemon stalled or got its banner
    late is run again by both, up to `retries` times (the last try counts; rows of up to CALM_SESSIONS
    sessions). Returns {daemon: {row: [msg/s per round]}} and messages queued."""
    figures: dict[str, dict[str, list[float]]] = {target.name: {} for target in targets}
    queued = {target.name: 0 for target in targets}
    for round_number in range(rounds):
        for sessions, messages, size, key in ACCEPT_ROWS:
            order = targets if round_number % 2 == 0 else list(reversed(targets))
            for attempt in range(retries + 1):
                tries = [_accept_row(target, sessions, max(1, int(messages * scale)), size,
                                     f"round {round_number + 1}: {target.name}: {key}") for target in order]
                for target, (_, _, count) in zip(order, tries, strict=True):
                    queued[target.name] += count
                if not any(stalls for _, stalls, _ in tries) or attempt == retries or sessions > CALM_SESSIONS:
                    break
                print(f"  round {round_number + 1}: {key}: not calm, both again", flush=True)
            for target, (rate, stalls, _) in zip(order, tries, strict=True):
                figures[target.name].setdefault(key + " (msg/s)", []).append(rate)
                figures[target.name].setdefault(key + STALLS, []).append(float(stalls))
    return figures, queued


def _accept_row(target: Target, sessions: int, messages: int, size: int, label: str) -> tuple[float, int, int]:
    """One accept row on one daemon: (msg/s, connections that stalled or got their banner late, messages)."""
    # Each row starts with nothing left unwritten by the row before (the other daemon's, often): OpenSMTPD never
    # flushes its files, and our next checkpoint's syncfs would write them out inside our timed row (3-13%
    # slower, measured). Not timed.
    os.sync()
    result = load(target, sessions, messages, size)
    stalls = int(result.get("stalled_connects", 0))  # type: ignore[call-overload]
    slow = int(result.get("slow_connects", 0))  # type: ignore[call-overload]
    notes = [f"{stalls} connection(s) got no banner within 5 s"] if stalls else []
    notes += [f"{slow} got it over 0.5 s after connecting"] if slow else []
    note = f" ({', '.join(notes)})" if notes else ""
    print(f"  {label}: {result['msg_per_s']} msg/s{note}", flush=True)
    if result["failures"]:
        raise RuntimeError(f"{target.name}: failures: {result['first_error']}")
    return float(result["msg_per_s"]), stalls + slow, int(result["messages"])  # type: ignore[arg-type]


STALLS = " (stalled or slow connects)"  # kept beside each accept row's figures, not reported as a measure


def queue_measures(target: Target, queued: int, scale: float, load_timeout: float) -> dict[str, float]:
    """show queue at 10,000 and 50,000 envelopes, RSS at 50,000, then the load time after a restart."""
    results: dict[str, float] = {}
    try:
        for count in (10_000, 50_000):
            count = int(count * scale)
            queued = fill_to(target, count, queued)
            seconds, lines = target.show_queue_seconds()
            print(f"  {target.name}: show queue with {lines} envelopes: {seconds:.2f}s", flush=True)
            # (after the accept rounds the first figure may be taken with more than 10,000 queued)
            results[f"show queue {max(count, queued)} (s)"] = seconds
        assert target.process is not None
        results[f"RSS with {queued} queued (MB)"] = process_tree_rss(target.process.pid) / 1e6
        target.stop()
        target.start()
        results[f"load {queued} after restart (s)"] = wait_loaded(target, queued, load_timeout)
        print(f"  {target.name}: loaded after restart in {results[f'load {queued} after restart (s)']:.2f}s",
              flush=True)
    finally:
        target.stop()
    return results


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report(ours: dict[str, float], theirs: dict[str, float],
           rounds: dict[str, dict[str, list[float]]] | None = None) -> str:
    """One line per measure; accept rows give the medians and the median of the per-round ratios."""
    lines = [f"{'measure':40} {'PySMTPD':>10} {'OpenSMTPD':>10} {'ratio':>7}  per round"]
    calm: list[str] = []
    for key in ours:
        mine, other = ours[key], theirs.get(key, float("nan"))
        higher_is_better = "msg/s" in key
        ratio = (mine / other if higher_is_better else other / mine) if mine and other else float("nan")
        per_round = ""
        if rounds is not None and key in rounds.get("PySMTPD", {}) and key in rounds.get("OpenSMTPD", {}):
            ratios = [a / b for a, b in zip(rounds["PySMTPD"][key], rounds["OpenSMTPD"][key], strict=True) if b]
            ratio = median(ratios)
            per_round = " ".join(f"{value:.2f}x" for value in ratios)
            calm_ratios = _calm_ratios(rounds, key)
            if calm_ratios:
                calm.append(f"  {key}: {median(calm_ratios):.2f}x over {len(calm_ratios)} round(s)")
        lines.append(f"{key:40} {mine:10.2f} {other:10.2f} {ratio:6.2f}x  {per_round}")
    lines.append("ratio > 1: PySMTPD is better (throughput ours/theirs; times and memory theirs/ours); accept rows:")
    lines.append("medians over the rounds, ratio = median of the per-round ratios")
    if calm:
        lines.append("the same ratios over the rounds in which no connection of either daemon stalled or waited "
                     "over 0.5 s for its banner:")
        lines.extend(calm)
    return "\n".join(lines)


STORING_NOTHING = "PySMTPD storing nothing"


def ceiling_report(rounds: dict[str, dict[str, list[float]]]) -> str:
    """Per accept row: ours storing nothing against OpenSMTPD (median of the per-round ratios)."""
    lines = [f"{'ours storing nothing':40} {'msg/s':>10} {'OpenSMTPD':>10} {'ratio':>7}  per round"]
    for key, values in rounds[STORING_NOTHING].items():
        if key.endswith(STALLS):
            continue
        ratios = [a / b for a, b in zip(values, rounds["OpenSMTPD"][key], strict=True) if b]
        lines.append(f"{key:40} {median(values):10.2f} {median(rounds['OpenSMTPD'][key]):10.2f} "
                     f"{median(ratios):6.2f}x  {' '.join(f'{ratio:.2f}x' for ratio in ratios)}")
    return "\n".join(lines)


def _calm_ratios(rounds: dict[str, dict[str, list[float]]], key: str) -> list[float]:
    """Per-round ratios of one accept row, leaving out rounds in which a connection stalled or got its banner
    late (OpenSMTPD's listen backlog of 5: see the README), so that a 5 s stall or a 1 s SYN retransmission does
    not decide the figure."""
    stalls_key = key.replace(" (msg/s)", STALLS)
    ours, theirs = rounds["PySMTPD"], rounds["OpenSMTPD"]
    if stalls_key not in ours or stalls_key not in theirs:
        return []
    return [a / b for a, b, mine, other in zip(ours[key], theirs[key], ours[stalls_key], theirs[stalls_key],
                                                 strict=True) if b and not mine and not other]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["ours", "opensmtpd"])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts (e.g. 0.2 for a try)")
    parser.add_argument("--load-timeout", type=float, default=300.0)
    parser.add_argument("--rounds", type=int, default=3, help="accept rounds, the daemons taking turns [3]")
    parser.add_argument("--accept-only", action="store_true", help="only the accept rows (a few minutes)")
    parser.add_argument("--ceiling", action="store_true",
                        help="accept rows only, with a third daemon: ours storing nothing (bench/store_nothing.py)")
    parser.add_argument("--encrypted", action="store_true",
                        help="both daemons with `queue compression` and `queue encryption KEY`")
    parser.add_argument("--retries", type=int, default=2,
                        help="run an accept row again (both daemons) when a connection stalled in it [2]")
    args = parser.parse_args()
    # SIGTERM ends the script through its finally blocks, which stop the daemons it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    if os.geteuid() != 0 and args.only != "ours":
        print("OpenSMTPD needs root", file=sys.stderr)
        return 1
    if args.only != "ours" and opensmtpd_running():
        print("an OpenSMTPD is already running; not touching it", file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    if args.only != "opensmtpd":
        targets.append(Ours("PySMTPD", free_port(), WORK / "ours"))
    if args.only != "ours":
        targets.append(OpenSMTPD("OpenSMTPD", free_port(), WORK / "opensmtpd"))
    if args.ceiling:
        args.accept_only = True
        targets.append(OursStoringNothing(STORING_NOTHING, free_port(), WORK / "nothing"))
    for target in targets:
        target.config_prefix = ENCRYPTED if args.encrypted else ""
    results: dict[str, dict[str, float]] = {target.name: {} for target in targets}
    rounds: dict[str, dict[str, list[float]]] = {}
    try:
        for target in targets:
            start_fresh(target)
        print(f"accept+queue, {args.rounds} round(s), the daemons taking turns:", flush=True)
        rounds, queued = accept_interleaved(targets, args.rounds, args.scale, args.retries)
        for target in targets:
            results[target.name].update({key: median(values) for key, values in rounds[target.name].items()
                                         if not key.endswith(STALLS)})
        for target in targets:
            if args.accept_only:
                target.stop()
                continue
            print(f"{target.name}:", flush=True)
            results[target.name].update(queue_measures(target, queued[target.name], args.scale, args.load_timeout))
    finally:
        for target in targets:
            target.stop()
        if OPENSMTPD_SPOOL.exists() and args.only != "ours":
            OPENSMTPD_SPOOL.rename(WORK / f"trash-opensmtpd-spool-end-{time.time_ns()}")
        for trash in WORK.glob("trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
    print(json.dumps({"results": results, "rounds": rounds}, indent=1))
    if "PySMTPD" in results and "OpenSMTPD" in results:
        print(report(results["PySMTPD"], results["OpenSMTPD"], rounds))
    if STORING_NOTHING in results and "OpenSMTPD" in results:
        print(ceiling_report(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
