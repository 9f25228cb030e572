"""Helpers for the config tests: parse text, run `python -m smtpd` as a user would, corpus access."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from smtpd.config import ParseResult, load, parse_text

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "config_corpus"
CASES = CORPUS / "cases"
COMMON = CORPUS / "common"


def parse(text: str, path: str = "/etc/smtpd.conf", **kwargs: object) -> ParseResult:
    return parse_text(text, path, **kwargs)  # type: ignore[arg-type]


def lines(text: str, **kwargs: object) -> list[str]:
    """What `smtpd -n` would print for this text, as lines, with the file called F."""
    return parse_text(text, "F", **kwargs).lines()  # type: ignore[arg-type]


def write(directory: Path, name: str, text: str | bytes, mode: int = 0o600) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(mode)
    return path


def run_smtpd(*arguments: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    for key in ("SMTPD_CONFIG", "SMTPD_SPOOL", "SMTPD_SOCKET", "SMTPD_MAILNAME", "SMTPD_PIDFILE"):
        environment.pop(key, None)
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "smtpd", *arguments], capture_output=True, text=True,
                          env=environment, cwd=cwd or ROOT, timeout=timeout, check=False)


def _recorder():
    spec = importlib.util.spec_from_file_location("config_corpus_record", CORPUS / "record.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECORDER = _recorder()


def materialize(case: str, directory: Path) -> Path:
    """A corpus case copied to directory (with @DIR@ replaced), as the corpus runner does it."""
    return RECORDER.materialize(CASES / case, directory)


def case_names() -> list[str]:
    return sorted(path.name for path in CASES.iterdir() if (path / "smtpd.conf").exists())


def load_case(case: str, directory: Path) -> ParseResult:
    return load(str(materialize(case, directory)))
