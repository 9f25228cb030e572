"""The `smtpd` command line (reference §1): the flags, outputs and exit codes of OpenSMTPD's smtpd(8).

    usage: smtpd [-dFhnv] [-D macro=value] [-f file] [-P system] [-T trace]

plus long options that override the paths of shared/paths.py (and their environment variables):
``--config FILE`` (same as -f), ``--spool DIR``, ``--socket PATH``, ``--mailname FILE``, and ``--dump``,
which with -n prints the effective configuration in modern syntax on stdout (docs/configuration.md).

Deliberate difference: we never require root. The daemon is designed to run as an ordinary user (with its
spool and socket where that user can write); OpenSMTPD's `need root privileges` check does not apply.
"""

from __future__ import annotations

import getopt
import sys
from dataclasses import dataclass, field
from typing import TextIO

from shared.paths import MailnameError, Paths, read_mailname
from smtpd import trace
from smtpd.config import load
from smtpd.config.dump import dump

VERSION = "PySMTPD 0.1.0"
USAGE = "usage: smtpd [-dFhnv] [-D macro=value] [-f file] [-P system] [-T trace]"
SHORT_OPTIONS = "B:dD:hnP:f:FT:vx:"
LONG_OPTIONS = ["config=", "spool=", "socket=", "mailname=", "dump", "help"]
PAUSABLE = ("mda", "mta", "smtp")
BACKENDS = ("queue", "scheduler", "stat")


@dataclass
class Options:
    foreground: bool = False
    log_to_syslog: bool = False
    check_only: bool = False
    verbose: bool = False
    dump: bool = False
    config: str | None = None
    spool: str | None = None
    socket: str | None = None
    mailname: str | None = None
    macros: dict[str, str] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    traces: set[str] = field(default_factory=set)
    backends: dict[str, str] = field(default_factory=dict)


class UsageError(Exception):
    """Print the message (if any) and the usage line; exit 1."""


class HelpRequested(Exception):
    """`smtpd --help`: the usage line and what it leaves out (our long options, the environment); exit 0."""


# `-h` stays OpenSMTPD's (version and usage on stderr, exit 1); `--help` also names what smtpd(8)'s usage cannot.
LONG_HELP = f"""{USAGE}

  -d              run in the foreground, log to stderr
  -F              run in the foreground, log to syslog
  -D macro=value  define a macro (overrides the configuration's)
  -f file         the configuration (default /etc/smtpd.conf)
  -n              check the configuration, print `configuration OK`, exit
  -P system       start with mda, mta or smtp paused
  -T trace        trace a subsystem (imsg io smtp filters mta bounce scheduler lookup stat rules mproc expand
                  table queue all)
  -v              verbose (debug) logging; with -n, name unused macros
  -h              version and usage

PySMTPD's long options (each overrides its environment variable, which overrides the default):
  --config FILE   same as -f                                  $SMTPD_CONFIG    /etc/smtpd.conf
  --spool DIR     the queue directory                         $SMTPD_SPOOL     /var/spool/smtpd
  --socket PATH   the control socket                          $SMTPD_SOCKET    /var/run/smtpd.sock
  --mailname FILE the server name file                        $SMTPD_MAILNAME  /etc/mailname
  --dump          with -n: print the effective configuration in modern syntax on stdout
  --help          this text
Also from the environment: $SMTPD_PIDFILE (default /var/run/smtpd.pid), $SMTPD_RESOLVER (host:port of the DNS
server to ask; default the system's), $SMTPD_CONTROL_GROUP (a group whose members may run smtpctl's read-only
commands). docs/configuration.md has the details.
"""


def _getopt_message(error: getopt.GetoptError, argv: list[str]) -> str:
    """glibc's wording, which OpenSMTPD prints (e.g. `smtpd: option requires an argument -- 'f'`)."""
    option = error.opt
    if len(option) > 1:
        if "requires argument" in error.msg:
            return f"smtpd: option '--{option}' requires an argument"
        if "must not have an argument" in error.msg:
            return f"smtpd: option '--{option}' doesn't allow an argument"
        if "not a unique prefix" in error.msg:
            return f"smtpd: option '--{option}' is ambiguous"
        return f"smtpd: unrecognized option '--{option}'"
    if "requires argument" in error.msg:
        return f"smtpd: option requires an argument -- '{option}'"
    return f"smtpd: invalid option -- '{option}'"


def parse_arguments(argv: list[str], stderr: TextIO) -> Options:
    try:
        pairs, rest = getopt.gnu_getopt(argv, SHORT_OPTIONS, LONG_OPTIONS)
    except getopt.GetoptError as error:
        raise UsageError(_getopt_message(error, argv)) from None
    options = Options()
    for flag, value in pairs:
        if flag == "-d":
            options.foreground = True
        elif flag == "-F":
            options.foreground = True
            options.log_to_syslog = True
        elif flag in ("-f", "--config"):
            options.config = value
        elif flag == "-n":
            options.check_only = True
        elif flag == "-v":
            options.verbose = True
        elif flag == "-h":
            print(f"version: {VERSION}", file=stderr)
            raise UsageError("")
        elif flag == "--help":
            raise HelpRequested
        elif flag == "-D":
            name, equals, macro_value = value.rpartition("=")
            if not equals:
                print(f"warn: could not parse macro definition {value}", file=stderr)
            else:
                # The first -D of a name wins: OpenSMTPD's command-line macros are persistent from their first
                # definition, so a later -D (like the file's own `name = ...`) does not replace it.
                options.macros.setdefault(name, macro_value)
        elif flag == "-P":
            if value in PAUSABLE:
                options.paused.add(value)
        elif flag == "-T":
            if trace.canonical_subsystem(value) is None:
                print(f'warn: unknown trace flag "{value}"', file=stderr)
            else:
                options.traces.add(value)
        elif flag == "-B":
            backend, equals, name = value.partition("=")
            if not equals or backend not in BACKENDS:
                print(f"warn: invalid backend specifier {value}", file=stderr)
            else:
                options.backends[backend] = name
        elif flag == "-x":
            pass  # OpenSMTPD re-executes its own processes with -x; we have none
        elif flag == "--spool":
            options.spool = value
        elif flag == "--socket":
            options.socket = value
        elif flag == "--mailname":
            options.mailname = value
        elif flag == "--dump":
            options.dump = True
    if rest:
        raise UsageError("")
    return options


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    stderr = sys.stderr
    try:
        options = parse_arguments(arguments, stderr)
    except HelpRequested:
        sys.stdout.write(LONG_HELP)
        return 0
    except UsageError as error:
        if str(error):
            print(error, file=stderr)
        print(USAGE, file=stderr)
        return 1
    paths = Paths.from_environment(config=options.config, spool=options.spool, socket=options.socket,
                                   mailname=options.mailname)
    try:
        mailname: str | None = read_mailname(paths.mailname)
    except MailnameError:
        mailname = None
    result = load(paths.config, macros=options.macros, check_files=True, mailname=mailname)
    for line in result.lines():
        print(line, file=stderr)
    if options.verbose:
        for name in result.unused_macros:
            print(f"warning: macro '{name}' not used", file=stderr)
    if not result.ok or result.config is None:
        return 1
    if options.check_only:
        if options.dump:
            sys.stdout.write(dump(result.config))
            sys.stdout.flush()
        print("configuration OK", file=stderr)
        return 0
    if mailname is None:
        try:
            read_mailname(paths.mailname)
        except MailnameError as error:
            print(f"smtpd: {error}", file=stderr)
            return 1
    return run_daemon(paths, result.config, options)


def run_daemon(paths: Paths, config, options: Options) -> int:  # noqa: ANN001 - a smtpd.config.model.Config
    """Start the daemon (smtpd/daemon.py, imported only here so that -n stays light)."""
    from smtpd import daemon

    daemon_options = daemon.DaemonOptions(
        foreground=options.foreground,
        log_to_syslog=options.log_to_syslog,
        verbose=options.verbose,
        paused=frozenset(options.paused),
        traces=frozenset(options.traces),
        macros=dict(options.macros),
    )
    return int(daemon.run(paths, config, daemon_options) or 0)
