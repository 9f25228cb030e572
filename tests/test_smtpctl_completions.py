"""Shell completions: generated from the Click definitions, never stale, and they complete in real shells."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


def load_generator():
    spec = importlib.util.spec_from_file_location("completions_generate", COMPLETIONS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_completion_files_are_up_to_date() -> None:
    generated = load_generator().render_all()
    for name, text in generated.items():
        assert (COMPLETIONS / name).read_text() == text, (
            f"completions/{name} is stale: run `python completions/generate.py`")


def test_tree_follows_the_cli() -> None:
    from smtpctl.words import cli

    tree = load_generator().walk(cli)
    assert tree[""].children[:4] == ["discover", "pause", "resume", "show"]
    assert "status" in tree["show"].children and "paused" in tree["show mta"].children
    assert "expand" in tree["trace"].values and "--follow" in tree["trace"].options
    assert tree["profile"].values == ["imsg", "queue"]


def bash_complete(*words: str) -> list[str]:
    script = (f"source {COMPLETIONS / 'smtpctl.bash'}; COMP_WORDS=({' '.join(repr(word) for word in words)}); "
              "COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _smtpctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.parametrize(("words", "expected"), [
    (("smtpctl", "show", "st"), ["stats", "status"]),
    (("smtpctl", "sh", "mta", ""), ["paused"]),  # an earlier word may be a unique prefix
    (("smtpctl", "--socket", "/tmp/s", "pa", "m"), ["mta", "mda"]),
    (("smtpctl", "trace", "exp"), ["expand"]),
    (("smtpctl", "trace", "smtp", "--fo"), ["--follow"]),
    (("smtpctl", "unprofile", ""), ["imsg", "queue"]),
    (("smtpctl", "log", ""), ["brief", "verbose"]),
])
def test_bash(words: tuple[str, ...], expected: list[str]) -> None:
    assert bash_complete(*words) == expected


def test_fish() -> None:
    def complete(line: str) -> list[str]:
        result = subprocess.run(["fish", "--no-config", "-c",
                                 f"source {COMPLETIONS / 'smtpctl.fish'}; complete -C '{line}'"],
                                capture_output=True, text=True, check=True)
        return [entry.split("\t")[0] for entry in result.stdout.splitlines()]

    assert complete("smtpctl show st") == ["stats", "status"]
    assert complete("smtpctl sh mta ") == ["paused"]
    assert complete("smtpctl trace expand --fol") == ["--follow"]
    assert "resume" in complete("smtpctl ")


def test_zsh() -> None:
    # compadd and compdef belong to zsh's completion system; stand-ins that print what they are given show
    # what the function offers (the real compadd then filters by the word under the cursor).
    script = (f"compdef(){{}}; compadd(){{ shift; print -r -- \"$@\"; }}; source {COMPLETIONS / '_smtpctl'}; "
              "words=(smtpctl sh mta ''); CURRENT=4; _smtpctl; "
              "words=(smtpctl show queue --state ''); CURRENT=5; _smtpctl; "
              "words=(smtpctl show status -); CURRENT=4; _smtpctl")
    result = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["paused", "pending inflight suspended offline", "--json -h --help"]
