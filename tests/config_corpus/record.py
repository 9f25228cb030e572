#!/usr/bin/env python3
"""Re-record the config corpus expectations from real OpenSMTPD (`smtpd -n`).

Usage: python3 tests/config_corpus/record.py [--smtpd /usr/sbin/smtpd] [CASE ...]

For every case directory under cases/ (or only the named ones) this copies the case into a fresh temporary
directory exactly as the test runner does (placeholder @DIR@ replaced by that directory, common/ copied next
to it), runs `SMTPD -n -f DIR/smtpd.conf`, and stores the exit code and the stderr lines, with the directory
turned back into @DIR@, as the "opensmtpd" section of the case's expected.json. Hand-written keys of
expected.json ("ours", "required", "note") are kept as they are. CI never runs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent
CASES = CORPUS / "cases"
COMMON = CORPUS / "common"
PLACEHOLDER = "@DIR@"
CONFIG_NAME = "smtpd.conf"
EXPECTED_NAME = "expected.json"


def materialize(case_dir: Path, work_dir: Path) -> Path:
    """Copy a case into work_dir with @DIR@ replaced; return the path of its smtpd.conf.

    Shared by the recorder and the pytest runner so both see byte-identical inputs. Every file is made
    mode 0600, because git does not keep modes and OpenSMTPD refuses a group/world-readable pki key; a
    file whose name contains "insecure" gets 0644 so that refusal can be a case of its own.
    """
    shutil.copytree(COMMON, work_dir / "common")
    for source in sorted(case_dir.iterdir()):
        if source.name == EXPECTED_NAME:
            continue
        data = source.read_bytes().replace(PLACEHOLDER.encode(), str(work_dir).encode())
        (work_dir / source.name).write_bytes(data)
    for path in work_dir.rglob("*"):
        if path.is_file():
            path.chmod(0o644 if "insecure" in path.name else 0o600)
    return work_dir / CONFIG_NAME


def stderr_lines(stderr: str, work_dir: Path) -> list[str]:
    """Split stderr into lines with the temporary directory turned back into the placeholder."""
    return [line.replace(str(work_dir), PLACEHOLDER) for line in stderr.splitlines()]


def record_case(case_dir: Path, smtpd: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        work_dir = Path(tmp)
        config = materialize(case_dir, work_dir)
        proc = subprocess.run(
            [smtpd, "-n", "-f", str(config)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
        )
        return {"exit": proc.returncode, "stderr": stderr_lines(proc.stderr, work_dir)}


def update_expectation(case_dir: Path, recorded: dict[str, object], version: str) -> None:
    expected_file = case_dir / EXPECTED_NAME
    expected = json.loads(expected_file.read_text()) if expected_file.exists() else {}
    expected["opensmtpd"] = {"version": version, **recorded}
    required = expected.get("required")
    if required is not None:
        missing = [line for line in required if line not in recorded["stderr"]]
        if missing:
            print(f"{case_dir.name}: 'required' lines no longer recorded: {missing}", file=sys.stderr)
    # Stable key order keeps diffs small: recorded data first, hand-written notes after.
    ordered = {key: expected[key] for key in ("opensmtpd", "required", "ours", "note") if key in expected}
    expected_file.write_text(json.dumps(ordered, indent=2) + "\n")


def smtpd_version(smtpd: str) -> str:
    proc = subprocess.run([smtpd, "-h"], capture_output=True, text=True, check=False)
    for line in proc.stderr.splitlines():
        if "version:" in line:
            return line.split("version:", 1)[1].strip()
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smtpd", default="/usr/sbin/smtpd", help="the real OpenSMTPD binary")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        # OpenSMTPD refuses pki files not owned by root, so an unprivileged run would record false errors.
        print("record.py: run as root (sudo), like the recorded data", file=sys.stderr)
        return 1
    names = args.cases or sorted(path.name for path in CASES.iterdir() if path.is_dir())
    version = smtpd_version(args.smtpd)
    for name in names:
        case_dir = CASES / name
        recorded = record_case(case_dir, args.smtpd)
        update_expectation(case_dir, recorded, version)
        verdict = "OK" if recorded["exit"] == 0 else f"exit {recorded['exit']}"
        print(f"{name}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
