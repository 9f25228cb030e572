"""smtpctl as an administrator types it, against a running daemon: OpenSMTPD's words, abbreviations, listings,
outputs and exit codes (reference §2.2-2.4)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from helpers_control import DaemonProcess, running_daemon, smtpctl


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as running:
        yield running


SHOW_LISTING = ("possibilities are:\nshow mta\nshow envelope\nshow hoststats\nshow message\nshow queue\n"
                "show hosts\nshow relays\nshow routes\nshow stats\nshow status\n")


@pytest.mark.parametrize("words", [
    ["show", "status"], ["show", "stats", "--json"], ["show", "hosts"], ["pause", "mda"], ["log", "brief"],
    ["update", "table", "x"], ["monitor"], ["trace", "smtp", "--follow"], ["trace", "smtp"], ["reload"], ["stop"],
    ["explain", "--to", "x"],
])
def test_not_running(tmp_path, words: list[str]) -> None:
    result = smtpctl(str(tmp_path / "absent.sock"), *words)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "smtpctl: smtpd doesn't seem to be running\n")


def test_show_status(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("show", "status")
    assert (result.returncode, result.stdout, result.stderr) == (0, "MDA running\nMTA running\nSMTP running\n", "")


@pytest.mark.parametrize("words", [["sh", "status"], ["show", "statu"], ["sho", "status"]])
def test_unique_prefixes(daemon: DaemonProcess, words: list[str]) -> None:
    assert daemon.smtpctl(*words).stdout == "MDA running\nMTA running\nSMTP running\n"


def test_ambiguous_prefix_lists_possibilities(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("show", "st")
    assert (result.returncode, result.stdout, result.stderr) == (255, "", SHOW_LISTING)


@pytest.mark.parametrize("typed", ["st", "sto"])
def test_stop_is_never_reached_by_a_prefix(daemon: DaemonProcess, typed: str) -> None:
    """OpenSMTPD 6.8 has no `stop`: there `smtpctl st` is a listing, and a typo must not stop our daemon."""
    result = daemon.smtpctl(typed)
    assert result.returncode == 255 and result.stderr.startswith("possibilities are:\n")
    assert daemon.smtpctl("show", "status").returncode == 0  # still running


def test_a_prefix_means_what_it_meant_to_opensmtpd(daemon: DaemonProcess) -> None:
    """`smtpctl e` is OpenSMTPD's encrypt although our explain starts with e too; `ex` reaches explain."""
    encrypted = smtpctl(daemon.socket, "e", "secret")
    assert encrypted.returncode == 0 and encrypted.stdout.startswith("$")
    assert "--to" in smtpctl(daemon.socket, "ex", "--help").stdout


def test_missing_word_lists_possibilities(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("sh").stderr == SHOW_LISTING
    top = daemon.smtpctl()
    assert top.returncode == 255
    words = top.stderr.splitlines()
    assert words[0] == "possibilities are:"
    # OpenSMTPD's words in OpenSMTPD's order, then ours.
    assert words[1:14] == ["discover", "pause", "resume", "show", "log", "monitor", "profile", "remove",
                           "schedule", "trace", "unprofile", "untrace", "update"]
    assert "reload" in words and "stop" in words and "explain" in words


def test_unknown_word_lists_possibilities(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("frobnicate")
    assert result.returncode == 255 and result.stderr.startswith("possibilities are:\ndiscover\npause\n")


@pytest.mark.parametrize(("words", "choices"), [
    (["schedule", "123"], ["<msgid>", "<evpid>", "all"]),
    (["remove", "foo"], ["<evpid>", "<msgid>", "all"]),
    (["pause", "envelope", "foo"], ["<evpid>", "<msgid>", "all"]),
    (["resume", "envelope", "foo"], ["<evpid>", "<msgid>", "all"]),
    (["discover", "all"], ["<evpid>", "<msgid>"]),
    (["show", "queue", "foo"], ["<msgid>"]),
    (["show", "queue", "--json", "foo"], ["<msgid>"]),
])
def test_bad_target_lists_possibilities_as_opensmtpd(daemon: DaemonProcess, words: list[str],
                                                     choices: list[str]) -> None:
    """Each in the order OpenSMTPD 6.8's smtpctl lists them (checked by hand); before, Click's 'Invalid value'."""
    result = daemon.smtpctl(*words)
    prefix = " ".join(word for word in words[:-1] if not word.startswith("-"))
    assert (result.returncode, result.stdout) == (255, "")
    assert result.stderr == "possibilities are:\n" + "".join(f"{prefix} {choice}\n" for choice in choices)


@pytest.mark.parametrize(("words", "choices"), [
    (["schedule"], ["<msgid>", "<evpid>", "all"]),
    (["remove"], ["<evpid>", "<msgid>", "all"]),
    (["remove", "--dry-run"], ["<evpid>", "<msgid>", "all"]),
    (["pause", "envelope"], ["<evpid>", "<msgid>", "all"]),
    (["resume", "envelope"], ["<evpid>", "<msgid>", "all"]),
    (["discover"], ["<evpid>", "<msgid>"]),
])
def test_missing_target_lists_possibilities_as_opensmtpd(daemon: DaemonProcess, words: list[str],
                                                         choices: list[str]) -> None:
    """docs/control-api.md: a missing word prints `possibilities are:`, as OpenSMTPD 6.8's smtpctl does (checked
    against it); before, Click's usage text and `Error: missing ...`. With a filter, the target is `all`."""
    result = daemon.smtpctl(*words)
    prefix = " ".join(word for word in words if not word.startswith("-"))
    assert (result.returncode, result.stdout) == (255, "")
    assert result.stderr == "possibilities are:\n" + "".join(f"{prefix} {choice}\n" for choice in choices)


def test_a_filter_without_target_means_all(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("schedule", "--domain", "nowhere.test")
    assert (result.returncode, result.stdout) == (0, "0 envelope scheduled\n")


@pytest.mark.parametrize("words", [["explain"], ["explain", "root"], ["explain", "--from", "a@example.org"]])
def test_missing_required_option_is_named(daemon: DaemonProcess, words: list[str]) -> None:
    # Not an empty `possibilities are:` listing: explain has no words to list, only its --to option.
    result = daemon.smtpctl(*words)
    assert (result.returncode, result.stdout) == (255, "")
    assert "Missing option '--to'" in result.stderr
    assert "possibilities are:" not in result.stderr


def test_extra_word_is_invalid(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("show", "status", "extra")
    assert (result.returncode, result.stdout, result.stderr) == (255, "", "invalid command\n")


def test_hosts_is_exact_although_hoststats_exists(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("show", "hosts")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert daemon.smtpctl("show", "hoststats").returncode == 0


@pytest.mark.parametrize(("words", "listing"), [
    (["pause"], ["pause mta", "pause envelope", "pause mda", "pause smtp"]),
    (["resume"], ["resume mta", "resume envelope", "resume mda", "resume route", "resume smtp"]),
    (["pause", "m"], ["pause mta", "pause envelope", "pause mda", "pause smtp"]),
    (["show", "mta"], ["show mta paused"]),
    (["log"], ["log brief", "log verbose"]),
    (["update"], ["update table"]),
    (["update", "table"], ["update table <str>"]),
    (["trace"], ["trace <str>"]),
    (["untrace"], ["untrace <str>"]),
    (["profile"], ["profile <str>"]),
    (["resume", "route"], ["resume route <routeid>"]),
    (["pause", "mta", "from"], ["pause mta from <addr>"]),
    (["pause", "mta", "from", "1.2.3.4"], ["pause mta from <addr> for"]),
    (["pause", "mta", "from", "1.2.3.4", "x"], ["pause mta from <addr> for"]),
    (["pause", "mta", "from", "1.2.3.4", "for"], ["pause mta from <addr> for <str>"]),
    (["resume", "route", "-1"], ["resume route <routeid>"]),
])
def test_listings_match_opensmtpd(daemon: DaemonProcess, words: list[str], listing: list[str]) -> None:
    result = daemon.smtpctl(*words)
    assert result.returncode == 255
    assert result.stderr.splitlines() == ["possibilities are:", *listing]


@pytest.mark.parametrize("words", [["show", "queue", "01234567", "extra"], ["encrypt", "a", "b"],
                                   ["remove", "all", "extra"], ["discover", "0123456789abcdef", "x"]])
def test_extra_words_are_an_invalid_command_as_in_opensmtpd(daemon: DaemonProcess, words: list[str]) -> None:
    result = daemon.smtpctl(*words)
    assert (result.returncode, result.stdout, result.stderr) == (255, "", "invalid command\n")


def test_show_stats(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("show", "stats")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    keys = [line.split("=", 1)[0] for line in lines]
    assert keys == sorted(keys)
    values = dict(line.split("=", 1) for line in lines)
    assert int(values["control.session"]) >= 1  # this very connection
    assert re.fullmatch(r"(\d+d)?(\d+h)?(\d+m)?\d+s|(\d+d)?(\d+h)?(\d+m)", values["uptime.human"])
    assert int(values["uptime"]) >= 0


def test_show_json(daemon: DaemonProcess) -> None:
    status = json.loads(daemon.smtpctl("show", "status", "--json").stdout)
    assert status == {"mda": "running", "mta": "running", "smtp": "running"}
    stats = json.loads(daemon.smtpctl("show", "stats", "--json").stdout)
    assert "uptime" in stats and "uptime.human" in stats
    for what in (["hosts"], ["routes"], ["relays"], ["hoststats"], ["mta", "paused"]):
        assert json.loads(daemon.smtpctl("show", *what, "--json").stdout) == []


@pytest.mark.parametrize("subsystem", ["mda", "mta", "smtp"])
def test_pause_and_resume(daemon: DaemonProcess, subsystem: str) -> None:
    label = subsystem.upper()
    assert daemon.smtpctl("pause", subsystem).stdout == "command succeeded\n"
    assert f"{label} paused" in daemon.smtpctl("show", "status").stdout.splitlines()
    again = daemon.smtpctl("pause", subsystem)
    assert (again.returncode, again.stdout) == (1, "command failed\n")
    assert daemon.smtpctl("resume", subsystem).stdout == "command succeeded\n"
    assert f"{label} running" in daemon.smtpctl("show", "status").stdout.splitlines()
    again = daemon.smtpctl("resume", subsystem)
    assert (again.returncode, again.stdout) == (1, "command failed\n")
    assert f"info: {subsystem} paused" in daemon.log() and f"info: {subsystem} resumed" in daemon.log()


def test_abbreviated_pause(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("pa", "smt").stdout == "command succeeded\n"
    assert daemon.smtpctl("res", "smtp").stdout == "command succeeded\n"


def test_trace_keywords(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("trace", "expand").stdout == "command succeeded\n"
    assert daemon.smtpctl("trace", "lookup").stdout == "command succeeded\n"
    assert daemon.smtpctl("untrace", "expand").stdout == "command succeeded\n"
    assert daemon.smtpctl("untrace", "lookup").stdout == "command succeeded\n"
    bad = daemon.smtpctl("trace", "bogus")
    assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", "smtpctl: invalid trace keyword: bogus\n")
    assert daemon.smtpctl("untrace", "bogus").returncode == 1


def test_trace_keyword_checked_before_connecting(tmp_path) -> None:
    result = smtpctl(str(tmp_path / "absent.sock"), "trace", "bogus")
    assert (result.returncode, result.stderr) == (1, "smtpctl: invalid trace keyword: bogus\n")


def test_profile(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("profile", "imsg").stdout == "command succeeded\n"
    assert daemon.smtpctl("unprofile", "imsg").stdout == "command succeeded\n"
    bad = daemon.smtpctl("profile", "bogus")
    assert (bad.returncode, bad.stderr) == (1, "smtpctl: invalid profile keyword: bogus\n")


def test_log_levels(daemon: DaemonProcess) -> None:
    assert daemon.smtpctl("log", "verbose").stdout == "command succeeded\n"
    assert daemon.smtpctl("log", "b").stdout == "command succeeded\n"


def test_update_unknown_table_fails(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("update", "table", "nosuchtable")
    assert (result.returncode, result.stdout) == (1, "command failed\n")
    assert 'warn: Lookup table not found: "nosuchtable"' in daemon.log()


def test_pause_and_resume_a_relay_route(daemon: DaemonProcess) -> None:
    paused = daemon.smtpctl("pause", "mta", "from", "192.0.2.1", "for", "example.org")
    assert (paused.returncode, paused.stdout) == (0, "command succeeded\n")
    assert daemon.smtpctl("show", "mta", "paused").stdout == "192.0.2.1 -> example.org\n"
    rows = json.loads(daemon.smtpctl("sh", "mta", "p", "--json").stdout)
    assert [(row["source"], row["domain"]) for row in rows] == [("192.0.2.1", "example.org")]
    again = daemon.smtpctl("pause", "mta", "from", "192.0.2.1", "for", "example.org")
    assert (again.returncode, again.stdout) == (1, "command failed\n")
    resumed = daemon.smtpctl("resume", "mta", "from", "192.0.2.1", "for", "example.org")
    assert (resumed.returncode, resumed.stdout) == (0, "command succeeded\n")
    assert daemon.smtpctl("show", "mta", "paused").stdout == ""


def test_resume_unknown_route_fails(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("resume", "route", "3")
    assert (result.returncode, result.stdout) == (1, "command failed\n")


def all_command_paths() -> list[list[str]]:
    """Every command and group of the Click tree, as the words that reach it."""
    import click

    from smtpctl.words import cli

    paths: list[list[str]] = []

    def walk(command: click.Command, words: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=words[-1] if words else "smtpctl", parent=parent,
                            **command.context_settings)
        paths.append(words)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                child = command.get_command(ctx, name)
                if child is not None:
                    walk(child, [*words, name], ctx)

    walk(cli, [], None)
    return paths


def test_every_command_has_help_with_example() -> None:
    from click.testing import CliRunner

    from smtpctl.words import cli

    paths = all_command_paths()
    assert ["show", "queue"] in paths and ["spf", "walk"] in paths and ["explain"] in paths
    runner = CliRunner()
    for words in paths:
        result = runner.invoke(cli, [*words, "--help"])
        assert result.exit_code == 0, (words, result.output)
        example = result.output.split("Example", 1)[-1]
        assert "Example" in result.output and "smtpctl" in example, words


def test_fast_path_and_click_path_print_the_same(daemon: DaemonProcess) -> None:
    from click.testing import CliRunner

    from smtpctl.words import cli

    runner = CliRunner()
    for words in (["show", "status"], ["show", "status", "--json"], ["sh", "statu"]):
        fast = daemon.smtpctl(*words)  # a pipe: the fast path
        slow = runner.invoke(cli, ["--socket", daemon.socket, *words])
        assert (slow.exit_code, slow.output) == (fast.returncode, fast.stdout)
    fast_stats = daemon.smtpctl("show", "stats").stdout.splitlines()
    slow_stats = runner.invoke(cli, ["--socket", daemon.socket, "show", "stats"]).output.splitlines()
    assert [line.split("=")[0] for line in fast_stats] == [line.split("=")[0] for line in slow_stats]


def test_stop_last(daemon: DaemonProcess) -> None:
    result = daemon.smtpctl("stop")
    assert (result.returncode, result.stdout) == (0, "command succeeded\n")
    assert daemon.process is not None
    assert daemon.process.wait(15) == 0
    assert daemon.smtpctl("show", "status").stderr == "smtpctl: smtpd doesn't seem to be running\n"

