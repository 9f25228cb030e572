"""Filter processes in tests: a folder both daemons' unprivileged users can use, and the command line of the
scripted filter (tests/filters/scripted_filter.py) in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCRIPT = Path(__file__).parent / "filters" / "scripted_filter.py"
PYTHON = "/usr/bin/python3"  # filters run as the unprivileged user, who cannot read the test venv


@contextlib.contextmanager
def open_folder(prefix: str) -> Iterator[Path]:
    """A world-writable folder outside pytest's private (0700) tree, with the filter script and a Maildir that
    `nobody` owns; removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix=f"pysmtpd-{prefix}-"))
    try:
        os.chmod(folder, 0o777)
        shutil.copy(SCRIPT, folder / "scripted_filter.py")
        (folder / "Maildir").mkdir()
        shutil.chown(folder / "Maildir", "nobody")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def filter_command(folder: Path, log: str, *arguments: str) -> str:
    """The quoted command of a `proc-exec`: the scripted filter writing its lines to ``folder/log``."""
    words = " ".join(f"'{word}'" for word in arguments)
    return f'"{PYTHON} {folder}/scripted_filter.py {folder}/{log} {words}"'


def lines_of(folder: Path, log: str) -> list[str]:
    path = folder / log
    return path.read_text().splitlines() if path.exists() else []
