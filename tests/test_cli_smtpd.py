"""The `smtpd` command line, run as a user runs it (`python -m smtpd ...`): flags, outputs, exit codes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_config import ROOT, parse, run_smtpd, write

from smtpd.cli import USAGE, UsageError, parse_arguments

GOOD = 'listen on lo\naction "a" mbox\nmatch for local action "a"\n'


@pytest.fixture()
def good_config(tmp_path: Path) -> Path:
    return write(tmp_path, "smtpd.conf", GOOD)


def test_check_ok(good_config: Path) -> None:
    result = run_smtpd("-n", "-f", str(good_config))
    assert (result.returncode, result.stderr, result.stdout) == (0, "configuration OK\n", "")


def test_check_errors(tmp_path: Path) -> None:
    config = write(tmp_path, "smtpd.conf", 'listen on lo\naction "local" mbox\nmatch for local action "locla"\n')
    result = run_smtpd("-n", "-f", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{config}:3: no such dispatcher: locla", "warn: no rules, nothing to do"]


def test_missing_config(tmp_path: Path) -> None:
    result = run_smtpd("-n", "-f", str(tmp_path / "nope.conf"))
    assert result.returncode == 1
    assert result.stderr == f"pushfile: {tmp_path}/nope.conf: No such file or directory\n"


def test_help_prints_version_and_usage() -> None:
    result = run_smtpd("-h")
    assert result.returncode == 1
    assert result.stderr == f"version: PySMTPD 0.1.0\n{USAGE}\n"


def test_long_help_names_the_long_options_and_environment() -> None:
    """`-h` is OpenSMTPD's; `--help` also lists what docs/configuration.md documents beyond it (before, it was
    the same two lines, so --spool, --socket, --dump and the environment variables went unmentioned)."""
    result = run_smtpd("--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"{USAGE}\n")
    for word in ("--config FILE", "--spool DIR", "--socket PATH", "--mailname FILE", "--dump", "$SMTPD_CONFIG",
                 "$SMTPD_SPOOL", "$SMTPD_SOCKET", "$SMTPD_MAILNAME", "$SMTPD_PIDFILE", "$SMTPD_RESOLVER",
                 "$SMTPD_CONTROL_GROUP", "/var/spool/smtpd", "/var/run/smtpd.sock"):
        assert word in result.stdout, word


def test_usage_errors() -> None:
    missing = run_smtpd("-f")
    assert (missing.returncode, missing.stderr) == (1, f"smtpd: option requires an argument -- 'f'\n{USAGE}\n")
    unknown = run_smtpd("-z")
    assert (unknown.returncode, unknown.stderr) == (1, f"smtpd: invalid option -- 'z'\n{USAGE}\n")
    extra = run_smtpd("-n", "extra")
    assert (extra.returncode, extra.stderr) == (1, f"{USAGE}\n")


def test_macros_from_the_command_line(tmp_path: Path) -> None:
    config = write(tmp_path, "smtpd.conf", 'iface = "nosuchif0"\nlisten on $iface\naction "a" mbox\n'
                                            'match for local action "a"\n')
    assert run_smtpd("-n", "-f", str(config)).stderr == "smtpd: invalid virtual ip or interface: nosuchif0\n"
    # -D wins over the file, and splits at the last `=`.
    result = run_smtpd("-n", "-D", "iface=lo", "-f", str(config))
    assert (result.returncode, result.stderr) == (0, "configuration OK\n")
    weird = run_smtpd("-n", "-D", "x=y=lo", "-D", "iface=lo", "-v", "-f", str(config))
    assert weird.stderr.splitlines() == ["warning: macro 'x=y' not used", "configuration OK"]
    bad = run_smtpd("-n", "-D", "noequals", "-D", "iface=lo", "-f", str(config))
    assert (bad.returncode, bad.stderr) == (0, "warn: could not parse macro definition noequals\nconfiguration OK\n")


def test_a_macro_given_twice_with_dash_d_keeps_the_first(tmp_path: Path) -> None:
    # OpenSMTPD 6.8 (recorded): `-D p=25 -D p=xx` is OK, `-D p=xx -D p=25` says `invalid port: xx`; a
    # command-line macro is persistent from its first definition, so the second -D is ignored as the file's is.
    config = write(tmp_path, "smtpd.conf", 'listen on lo port $p\naction "a" mbox\nmatch for local action "a"\n')
    first_good = run_smtpd("-n", "-D", "p=25", "-D", "p=xx", "-f", str(config))
    assert (first_good.returncode, first_good.stderr) == (0, "configuration OK\n")
    first_bad = run_smtpd("-n", "-D", "p=xx", "-D", "p=25", "-f", str(config))
    assert (first_bad.returncode, first_bad.stderr) == (1, f"{config}:1: invalid port: xx\n")


def test_trace_and_backend_warnings(good_config: Path) -> None:
    result = run_smtpd("-n", "-T", "bogus", "-T", "expand", "-B", "nope", "-B", "queue=fs", "-P", "zzz",
                       "-x", "lka", "-f", str(good_config))
    assert result.returncode == 0
    assert result.stderr.splitlines() == ['warn: unknown trace flag "bogus"', "warn: invalid backend specifier nope",
                                          "configuration OK"]


def test_parse_arguments_collects_pauses_traces_and_paths() -> None:
    stderr = io.StringIO()
    options = parse_arguments(["-dv", "-P", "mta", "-P", "smtp", "-P", "nonsense", "-T", "transfer", "-T", "all",
                               "--config", "/c", "--spool", "/s", "--socket", "/k", "--mailname", "/m", "-n",
                               "--dump"], stderr)
    assert options.foreground and options.verbose and options.check_only and options.dump
    assert options.paused == {"mta", "smtp"} and options.traces == {"transfer", "all"}
    assert (options.config, options.spool, options.socket, options.mailname) == ("/c", "/s", "/k", "/m")
    assert stderr.getvalue() == ""
    with pytest.raises(UsageError):
        parse_arguments(["--nope"], stderr)


def test_config_from_environment_and_long_option(good_config: Path, tmp_path: Path) -> None:
    by_env = run_smtpd("-n", env={"SMTPD_CONFIG": str(good_config)})
    assert (by_env.returncode, by_env.stderr) == (0, "configuration OK\n")
    by_option = run_smtpd("-n", "--config", str(good_config), env={"SMTPD_CONFIG": str(tmp_path / "nope")})
    assert (by_option.returncode, by_option.stderr) == (0, "configuration OK\n")


def test_dump_prints_the_effective_modern_config(tmp_path: Path) -> None:
    config = write(tmp_path, "smtpd.conf", 'listen on lo\naccept for local deliver to maildir "~/Mail"\n')
    result = run_smtpd("-n", "--dump", "-f", str(config))
    assert result.returncode == 0
    assert result.stderr.splitlines()[-1] == "configuration OK"
    assert result.stderr.splitlines()[0].startswith(f"{config}:2: warning: legacy (pre-6.4) syntax")
    assert result.stdout == ('listen on "lo"\n\naction "local" maildir "~/Mail"\n\n'
                             'match from local for local action "local"\n'
                             'match from any for local auth action "local"\n')
    again = parse(result.stdout)
    assert again.ok and not again.warnings


def test_crlf_config_passes(tmp_path: Path) -> None:
    config = write(tmp_path, "smtpd.conf", GOOD.replace("\n", "\r\n").encode())
    result = run_smtpd("-n", "-f", str(config))
    assert (result.returncode, result.stderr) == (0, "configuration OK\n")


def test_runs_the_daemon_unprivileged_with_overridden_paths(tmp_path: Path) -> None:
    """Without -n the configuration is handed to the daemon; no root needed, every path is ours."""
    config = write(tmp_path, "smtpd.conf", 'action "a" mbox\nmatch for local action "a"\n')
    mailname = write(tmp_path, "mailname", "mail.test\n")
    control = tmp_path / "control.sock"
    environment = dict(os.environ)
    environment["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpd", "-d", "-f", str(config), "--spool", str(tmp_path / "spool"),
         "--socket", str(control), "--mailname", str(mailname)],
        cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not control.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control.exists(), process.stderr.read() if process.poll() is not None else "no control socket"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "PySMTPD 0.1.0 starting" in stderr


def test_control_socket_that_cannot_be_made_is_named_in_the_error(tmp_path: Path) -> None:
    """A start that fails on the control socket says which path, in one `smtpd: ...` line (not a bare errno)."""
    config = write(tmp_path, "smtpd.conf", 'action "a" mbox\nmatch for local action "a"\n')
    (tmp_path / "mailname").write_text("mx.test.example\n")
    missing = tmp_path / "no-such-folder" / "smtpd.sock"
    result = run_smtpd("-d", "-f", str(config), env={
        "SMTPD_SPOOL": str(tmp_path / "spool"), "SMTPD_SOCKET": str(missing),
        "SMTPD_MAILNAME": str(tmp_path / "mailname"), "SMTPD_PIDFILE": str(tmp_path / "smtpd.pid")})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"smtpd: control socket {missing}: No such file or directory"


def test_a_db_table_made_by_opensmtpds_makemap_says_how_to_rebuild_it(tmp_path: Path) -> None:
    """A migrating administrator's aliases.db from OpenSMTPD's makemap (Berkeley DB): ours are SQLite, and the
    message says so and names the command, rather than `not a table database made by makemap`."""
    source = write(tmp_path, "aliases", "root: bob\n")
    made = subprocess.run(["/usr/sbin/makemap", "-t", "aliases", str(source)], capture_output=True, text=True,
                          timeout=30)
    assert made.returncode == 0, made.stderr
    config = write(tmp_path, "smtpd.conf", f'table aliases db:{source}.db\naction "a" mbox alias <aliases>\n'
                                           'match for local action "a"\n')
    result = run_smtpd("-n", "-f", str(config))
    assert result.returncode == 1
    assert (f"{source}.db: dbopen: a Berkeley DB file, as OpenSMTPD's makemap writes; ours are SQLite: rebuild it "
            f"from its source with our makemap (makemap {source}, with -t aliases or -t set as it was made)") \
        in result.stderr.splitlines()
