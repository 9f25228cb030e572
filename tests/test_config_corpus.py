"""The config corpus: every case under tests/config_corpus/cases/ checked with our `smtpd -n`.

Each case holds a smtpd.conf (plus any table/include files it needs) and an expected.json whose
"opensmtpd" section is what real OpenSMTPD 6.8 `smtpd -n -f` printed (recorded by
tests/config_corpus/record.py). Our checker runs as a user would run it, and must agree: same exit code,
and for errors the same `FILE:LINE: message` lines. Where we differ on purpose, the case's "ours" section
says what we print instead and why. See tests/config_corpus/README.md for the format.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "config_corpus"
CASES = CORPUS / "cases"
PLACEHOLDER = "@DIR@"
CONFIG_OK = "configuration OK"
WARNING_MARK = ": warning:"


def _load_recorder():
    """The recorder owns `materialize`, so the runner feeds our checker exactly what OpenSMTPD was fed."""
    spec = importlib.util.spec_from_file_location("config_corpus_record", CORPUS / "record.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recorder = _load_recorder()


@dataclass(frozen=True)
class Expectation:
    """What our `smtpd -n` must print for one case, derived from expected.json."""

    exit_code: int
    required_lines: list[str]
    allowed_lines: set[str]
    warning_prefixes: list[str] = field(default_factory=list)
    error_patterns: list[str] = field(default_factory=list)
    why: str | None = None


def _warning_prefix(where: int | str) -> str:
    """A warning location: a bare line number means the case's smtpd.conf, a string is FILE:LINE."""
    location = f"smtpd.conf:{where}" if isinstance(where, int) else where
    return f"{PLACEHOLDER}/{location}{WARNING_MARK}"


def load_expectation(case_dir: Path) -> Expectation:
    data = json.loads((case_dir / "expected.json").read_text())
    recorded = data["opensmtpd"]
    ours = data.get("ours", {})
    exit_code = ours.get("exit", recorded["exit"])
    recorded_lines = [line.rstrip() for line in recorded["stderr"] if line.rstrip() != CONFIG_OK]
    if "errors" in ours or "exit" in ours:
        # A deliberate difference in verdict states its own error lines (none unless listed).
        required = [line.rstrip() for line in ours.get("errors", [])]
    elif exit_code != 0:
        required = [line.rstrip() for line in data.get("required", recorded_lines)]
    else:
        required = []
    # Lines OpenSMTPD printed are never "unexpected" unless ours overrides them.
    allowed = set(required) if "errors" in ours or "exit" in ours else set(recorded_lines)
    return Expectation(
        exit_code=exit_code,
        required_lines=required,
        allowed_lines=allowed,
        warning_prefixes=[_warning_prefix(where) for where in ours.get("warnings", [])],
        error_patterns=list(ours.get("error_patterns", [])),
        why=ours.get("why"),
    )


def run_our_checker(config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "smtpd", "-n", "-f", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )


def problems_with(output: list[str], exit_code: int, expected: Expectation) -> list[str]:
    """Every way our output disagrees with the expectation (empty when it agrees)."""
    problems: list[str] = []
    if exit_code != expected.exit_code:
        problems.append(f"exit code {exit_code}, expected {expected.exit_code}")
    for line in expected.required_lines:
        if line not in output:
            problems.append(f"missing line: {line}")
    for pattern in expected.error_patterns:
        if not any(re.search(pattern, line) for line in output if WARNING_MARK not in line):
            problems.append(f"no error line matches: {pattern}")
    for prefix in expected.warning_prefixes:
        if not any(line.startswith(prefix) for line in output):
            problems.append(f"missing warning: {prefix} ...")
    if expected.exit_code == 0:
        if CONFIG_OK not in output:
            problems.append(f"missing line: {CONFIG_OK}")
        for line in output:
            if line != CONFIG_OK and WARNING_MARK not in line and line not in expected.allowed_lines:
                problems.append(f"unexpected line: {line}")
    elif CONFIG_OK in output:
        problems.append(f"said '{CONFIG_OK}' for a config that must fail")
    if any(line.startswith("Traceback") for line in output):
        problems.append("a Python traceback on stderr")
    return problems


def case_names() -> list[str]:
    return sorted(path.name for path in CASES.iterdir() if (path / "expected.json").exists())


def test_corpus_is_big_and_varied() -> None:
    """The acceptance floor: at least 150 cases, with accepted, refused, legacy and CRLF ones among them."""
    names = case_names()
    assert len(names) >= 150
    verdicts = [load_expectation(CASES / name) for name in names]
    assert sum(1 for v in verdicts if v.exit_code == 0) >= 50
    assert sum(1 for v in verdicts if v.exit_code != 0) >= 50
    assert sum(1 for name in names if name.startswith("legacy-")) >= 20
    assert any(name.startswith("crlf-") for name in names)


@pytest.mark.parametrize("case_name", case_names())
def test_config_case(case_name: str, tmp_path: Path) -> None:
    case_dir = CASES / case_name
    expected = load_expectation(case_dir)
    config = recorder.materialize(case_dir, tmp_path)
    result = run_our_checker(config)
    output = [line.replace(str(tmp_path), PLACEHOLDER).rstrip() for line in result.stderr.splitlines()]
    problems = problems_with(output, result.returncode, expected)
    if problems:
        report = [f"case {case_name}" + (f" (deliberate difference: {expected.why})" if expected.why else "")]
        report += [f"  {problem}" for problem in problems]
        report += ["our stderr:"] + [f"  {line}" for line in output]
        if result.stdout.strip():
            report += ["our stdout:"] + [f"  {line}" for line in result.stdout.splitlines()]
        pytest.fail("\n".join(report), pytrace=False)


def test_opensmtpd_own_output_passes_the_comparison() -> None:
    """Where we mean to agree, OpenSMTPD's recorded output satisfies the runner's checks."""
    for name in case_names():
        data = json.loads((CASES / name / "expected.json").read_text())
        if "ours" in data:
            continue
        recorded = data["opensmtpd"]
        output = [line.rstrip() for line in recorded["stderr"]]
        assert problems_with(output, recorded["exit"], load_expectation(CASES / name)) == [], name


def test_comparison_catches_wrong_verdicts() -> None:
    """The runner fails on a wrong exit code, a missing or altered error line, a missing warning, a traceback."""
    dispatcher = load_expectation(CASES / "err-unknown-dispatcher")
    right = ["@DIR@/smtpd.conf:3: no such dispatcher: locla", "warn: no rules, nothing to do"]
    assert problems_with(right, 1, dispatcher) == []
    assert problems_with([CONFIG_OK], 0, dispatcher)
    assert problems_with(right[1:], 1, dispatcher)
    assert problems_with(["@DIR@/smtpd.conf:2: no such dispatcher: locla", right[1]], 1, dispatcher)
    assert problems_with([*right, "Traceback (most recent call last):"], 1, dispatcher)

    debian = load_expectation(CASES / "debian-default")
    assert problems_with([CONFIG_OK], 0, debian) == []
    assert problems_with(["@DIR@/smtpd.conf:9: warning: anything", CONFIG_OK], 0, debian) == []
    assert problems_with(["@DIR@/smtpd.conf:9: syntax error", CONFIG_OK], 0, debian)
    assert problems_with([], 0, debian)

    legacy = load_expectation(CASES / "legacy-issue-minimal")
    assert problems_with(["@DIR@/smtpd.conf:3: syntax error", "warn: no rules, nothing to do"], 1, legacy)
    warned = [
        "@DIR@/smtpd.conf:3: warning: legacy rule",
        "@DIR@/smtpd.conf:4: warning: legacy rule",
        CONFIG_OK,
    ]
    assert problems_with(warned, 0, legacy) == []
    assert problems_with(warned[1:], 0, legacy)

    mixed = load_expectation(CASES / "legacy-mixed-grammars")
    assert problems_with(["@DIR@/smtpd.conf:4: syntax error"], 1, mixed)
    assert problems_with(["@DIR@/smtpd.conf:4: legacy and modern grammar cannot be mixed"], 1, mixed) == []


def test_materialized_case_has_no_placeholder_left(tmp_path: Path) -> None:
    config = recorder.materialize(CASES / "include-tables-and-rules", tmp_path)
    for path in [config, tmp_path / "tables.conf"]:
        text = path.read_text()
        assert PLACEHOLDER not in text
        assert str(tmp_path) in text
    assert (tmp_path / "common" / "key.pem").stat().st_mode & 0o077 == 0


def legacy_cases_with_modern_equivalent() -> list[str]:
    return sorted(path.parent.name for path in CASES.glob("legacy-*/modern.conf"))


@pytest.mark.parametrize("case_name", legacy_cases_with_modern_equivalent())
def test_modern_equivalent_is_clean(case_name: str, tmp_path: Path) -> None:
    """The hand-written 6.8 equivalent of a legacy case (OpenSMTPD accepts it) passes with no warning at all."""
    recorder.materialize(CASES / case_name, tmp_path)
    result = run_our_checker(tmp_path / "modern.conf")
    output = [line.replace(str(tmp_path), PLACEHOLDER).rstrip() for line in result.stderr.splitlines()]
    assert (result.returncode, output) == (0, [CONFIG_OK])
