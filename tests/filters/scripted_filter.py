#!/usr/bin/env python3
"""A filter process for the tests: speaks OpenSMTPD 6.8's filter protocol on stdin/stdout, writes every line it
reads to a log file, and answers as its arguments say.

    scripted_filter.py LOG [PHASE=RESULT ...] [dataline=prepend:TEXT] [hang=PHASE] [exit=PHASE] [name=NAME]
                       [slow=SECONDS]

PHASE=RESULT answers that phase's requests with RESULT (`reject|550 5.7.1 no`, `rewrite|x@y`, `junk`, ...),
when the request's argument holds the text after an `@` in the phase (`rcpt-to@bad=reject|550 no`), else
`proceed`. `dataline=prepend:TEXT` adds TEXT as the message's first line (before everything it is given, the
daemon's Received header included; `\\xNN` in TEXT stands for that byte). `hang=PHASE` never answers that phase; `exit=PHASE` exits when asked
(`exit=PHASE@TEXT`: when the request's argument holds TEXT). `slow=SECONDS` waits that long before it
answers a message's first data line (its input pipe fills up meanwhile). It registers for every report event
and filter phase of smtp-in, or for those named by `reports=a,b` and `phases=c,d`; `out=a,b` (`out=all`: every
report event) registers for those report events of smtp-out as well.
"""

import re
import sys
import time

REPORTS = ("link-connect link-greeting link-identify link-tls link-auth link-disconnect tx-reset tx-begin "
           "tx-mail tx-rcpt tx-envelope tx-data tx-commit tx-rollback protocol-client protocol-server "
           "filter-report filter-response timeout").split()
PHASES = "connect helo ehlo starttls auth mail-from rcpt-to data data-line commit".split()


def main() -> None:
    log = open(sys.argv[1], "a", buffering=1, encoding="utf-8", errors="surrogateescape")
    rules: list[tuple[str, str, str]] = []
    options: dict[str, str] = {}
    for word in sys.argv[2:]:
        key, _, value = word.partition("=")
        if key in ("dataline", "hang", "exit", "reports", "phases", "name", "slow", "out"):
            options[key] = value
        else:
            phase, _, needle = key.partition("@")
            rules.append((phase, needle, value))
    reports = options["reports"].split(",") if "reports" in options else REPORTS
    phases = options["phases"].split(",") if "phases" in options else PHASES
    out_reports = REPORTS if options.get("out") == "all" else options.get("out", "").split(",")
    prepend = re.sub(r"\\x([0-9a-fA-F]{2})", lambda hexa: chr(int(hexa[1], 16)),
                     options.get("dataline", "").removeprefix("prepend:"))
    started: set[str] = set()
    out = sys.stdout
    log.write(f"# started {options.get('name', '')} pid\n")
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        log.write(line + "\n")
        fields = line.split("|")
        if line == "config|ready":
            for event in filter(None, reports):
                out.write(f"register|report|smtp-in|{event}\n")
            for event in filter(None, out_reports):
                out.write(f"register|report|smtp-out|{event}\n")
            for phase in filter(None, phases):
                out.write(f"register|filter|smtp-in|{phase}\n")
            out.write("register|ready\n")
            out.flush()
            continue
        if fields[0] != "filter" or len(fields) < 7:
            continue
        phase, session, token = fields[4], fields[5], fields[6]
        argument = "|".join(fields[7:])
        exit_phase, _, exit_needle = options.get("exit", "").partition("@")
        if phase == exit_phase and exit_needle in argument:
            sys.exit(3)
        if phase == options.get("hang"):
            continue
        if phase == "data-line":
            if "slow" in options and session not in started:
                time.sleep(float(options["slow"]))
            if session not in started:
                started.add(session)
                if prepend:
                    out.write(f"filter-dataline|{session}|{token}|{prepend}\n")
            if argument == ".":
                started.discard(session)
            out.write(f"filter-dataline|{session}|{token}|{argument}\n")
            out.flush()
            continue
        result = "proceed"
        for rule_phase, needle, value in rules:
            if rule_phase == phase and needle in argument:
                result = value
                break
        out.write(f"filter-result|{session}|{token}|{result}\n")
        out.flush()
    log.write(f"# end of input {time.time():.0f}\n")


if __name__ == "__main__":
    main()
