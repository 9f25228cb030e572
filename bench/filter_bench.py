"""Filter benchmark: accepting mail through a filter process, our daemon against real OpenSMTPD 6.8.

    sudo .venv/bin/python bench/filter_bench.py [--rounds 3] [--messages 2000] [--sessions 8]

Both daemons run the same configuration, with deliveries paused (`-P mta -P mda`): a listener whose filter is
Debian's opensmtpd-filter-dkimsign (C, libopensmtpd), which receives every message line by line and sends it
back with a DKIM-Signature on top, and a second listener without filters for reference. Rows (2 KB messages):
with the filter and without, 1 and `--sessions` sessions; the two daemons take turns row by row in each round
(the host's speed drifts), and the report gives the medians and the median of the per-round ratios
(ours / OpenSMTPD, > 1: we are faster).

Like bench/queue_bench.py (whose daemons and load generator it uses): root, no other OpenSMTPD running,
/var/spool/smtpd moved aside before and after, spools moved aside rather than deleted between runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import queue_bench  # noqa: E402
from queue_bench import OpenSMTPD, Ours, Target, free_port, load, median, opensmtpd_running  # noqa: E402

WORK = Path("/tmp/filter-bench")
FILTER = "/usr/libexec/opensmtpd/filter-dkimsign"
CONFIG = """filter "dkim" proc-exec "{filter} -d example.org -s sel -k {key}" user _dkimsign group _dkimsign
listen on 127.0.0.1 port {port} filter "dkim"
listen on 127.0.0.1 port {plain}
action "relay" relay
match from any for any action "relay"
"""


def make_key() -> Path:
    key = WORK / "dkim.key"
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o755)
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    shutil.chown(key, "_dkimsign", "_dkimsign")
    key.chmod(0o400)
    return key


def configure(target: Target, key: Path, plain: int) -> None:
    text = CONFIG.format(filter=FILTER, key=key, port=target.port, plain=plain)
    original = target.prepare_spool

    def prepare(run: int) -> None:
        original(run)
        (target.workdir / "smtpd.conf").write_text(text)

    target.prepare_spool = prepare  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=8)
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("filter_bench.py: run as root (OpenSMTPD needs it, and the filter runs as _dkimsign)")
        return 2
    if opensmtpd_running():
        print("filter_bench.py: an OpenSMTPD is running already; stop it first")
        return 2
    queue_bench.WORK = WORK / "trash"  # where spools are moved aside
    queue_bench.WORK.mkdir(parents=True, exist_ok=True)
    key = make_key()
    if queue_bench.OPENSMTPD_SPOOL.exists():
        queue_bench.OPENSMTPD_SPOOL.rename(queue_bench.WORK / f"opensmtpd-spool-before-{time.time_ns()}")
    plain = {"ours": free_port(), "opensmtpd": free_port()}
    targets: list[Target] = [Ours("ours", free_port(), WORK / "ours"), OpenSMTPD("opensmtpd", free_port(),
                                                                                 WORK / "opensmtpd")]
    for target in targets:
        configure(target, key, plain[target.name])
    rows = [(1, options.messages // 2, True), (options.sessions, options.messages, True),
            (1, options.messages // 2, False), (options.sessions, options.messages, False)]
    figures: dict[str, dict[str, list[float]]] = {target.name: {} for target in targets}
    try:
        for round_number in range(options.rounds):
            order = targets if round_number % 2 == 0 else list(reversed(targets))
            for target in order:
                target.workdir.mkdir(parents=True, exist_ok=True)
                target.prepare_spool(round_number)
                target.start()
                try:
                    for sessions, messages, filtered in rows:
                        port = target.port if filtered else plain[target.name]
                        probe = Target(target.name, port, target.workdir)
                        os.sync()
                        result = load(probe, sessions, messages, 2048)
                        if result["failures"]:
                            raise RuntimeError(f"{target.name}: {result['first_error']}")
                        key_name = f"{sessions} session(s), {'dkimsign' if filtered else 'no filter'}"
                        figures[target.name].setdefault(key_name, []).append(float(result["msg_per_s"]))
                        print(f"  round {round_number + 1}: {target.name}: {key_name}: {result['msg_per_s']} msg/s",
                              flush=True)
                finally:
                    target.stop()
    finally:
        if queue_bench.OPENSMTPD_SPOOL.exists():
            queue_bench.OPENSMTPD_SPOOL.rename(queue_bench.WORK / f"opensmtpd-spool-after-{time.time_ns()}")
        shutil.rmtree(WORK, ignore_errors=True)
    print("\n| row (2 KB, msg/s) | PySMTPD | OpenSMTPD | ratio | per round |\n|---|---:|---:|---:|---|")
    for row in figures["ours"]:
        ours, theirs = figures["ours"][row], figures["opensmtpd"][row]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(f"| {row} | {median(ours):,.0f} | {median(theirs):,.0f} | {median(ratios):.2f}× | "
              + " ".join(f"{ratio:.2f}" for ratio in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
