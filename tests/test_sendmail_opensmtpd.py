"""Our sendmail side by side with OpenSMTPD 6.8's (Debian's /usr/sbin/sendmail is its smtpctl), invocation by
invocation: what cron, mail(1), mutt, PHP's mail(), git send-email and scripts run.

Each side submits the same list of invocations to its own daemon (6.8's to a real OpenSMTPD 6.8, ours to ours,
both delivering everything to a maildir through a catch-all virtual table), as an unprivileged user whose home
is in a temp folder. Compared: the exit status, what is printed (the program name set aside), whether a
dead.letter was written, and each delivery: the envelope (Return-Path, Delivered-To), the header fields in
order with ids, the dates added and the product name blanked, and the body bytes. The few invocations where
6.8's sendmail does something no administrator wants are KEPT_DIFFERENCES, asserted as such for both sides
(and documented in docs/delivery.md, "sendmail"). With the daemon down, both keep the message offline.

Our sendmail runs in a child forked from the test and switched to the user (the venv's interpreter may not be
reachable by other users), through the same entry as the `sendmail` program (smtpctl.cli's personality).
"""

from __future__ import annotations

import io
import os
import pprint
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon import SmtpdProcess, free_port
from helpers_delivery import system_user
from helpers_mta import OpenSmtpd
from waiting import wait_until

OPENSMTPD_SENDMAIL = "/usr/sbin/sendmail"
LONG = b"x" * 1000


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    data: bytes
    # run as root in the user's login session (`sudo -i`): /proc/self/loginuid, what getlogin(3) reads, is theirs
    root_in_users_session: bool = False


def case(name: str, args: list[str], data: bytes, root_in_users_session: bool = False) -> Case:
    return Case(name, tuple(args), data, root_in_users_session)


CASES = [
    # -- habits --------------------------------------------------------------------------------------------------
    case("echo-hi", ["root"], b"hi\n"),
    case("debian-cron", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
         b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts /etc/cron.daily\n"
         b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
         b"X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\n\nrun-parts: /etc/cron.daily/logrotate exited 1\n"),
    case("mailx", ["-i", "--", "root"], b"To: root\nSubject: disk report\nUser-Agent: mail (GNU Mailutils 3.15)\n\n"
                                        b"/dev/sda1  91%\n"),
    case("mutt", ["-oem", "-oi", "--", "alice@example.org"],
         b"Date: Tue, 1 Dec 2020 10:00:00 +0100\nFrom: Admin <admin@example.org>\nTo: alice@example.org\n"
         b"Subject: hello\nMessage-ID: <20201201090000.GA1@example.org>\nMIME-Version: 1.0\n"
         b"Content-Type: text/plain; charset=utf-8\nContent-Disposition: inline\nContent-Transfer-Encoding: 8bit\n"
         b"User-Agent: NeoMutt/20220429\n\nGr\xc3\xbc\xc3\x9fe\n-- \nAdmin\n"),
    case("php-mail", ["-t", "-i"],
         b"To: alice@example.org\nSubject: Your order\nFrom: Web Shop <shop@example.org>\r\n"
         b"Reply-To: shop@example.org\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\n\n"
         b"Thank you for your order.\n.\nTotal: 12 \xe2\x82\xac\n"),
    case("git-send-email", ["-i", "-f", "dev@example.org", "alice@example.org", "bob@example.org"],
         b"From: Dev Eloper <dev@example.org>\nTo: alice@example.org\nCc: bob@example.org\n"
         b"Subject: [PATCH] fix the frobnicator\nDate: Tue, 1 Dec 2020 10:00:00 +0000\n"
         b"Message-Id: <20201201100000.1-1-dev@example.org>\nX-Mailer: git-send-email 2.39.2\nMIME-Version: 1.0\n"
         b"Content-Transfer-Encoding: 8bit\n\nfix it\n---\n .hidden | 2 +-\n\n"
         b"diff --git a/.hidden b/.hidden\n--- a/.hidden\n+++ b/.hidden\n@@ -1 +1 @@\n-.old\n+.new\n.\n"),
    case("script-f-F", ["-f", "backup", "-F", "Backup Script", "root"], b"Subject: backup done\n\nall fine\n"),
    case("r-sender", ["-r", "noreply@example.org", "root"], b"Subject: via -r\n\nbody\n"),
    case("F-non-ascii", ["-F", "J\u00fcrgen M\u00fcller", "root"], b"Subject: name\n\nbody\n"),
    case("bm-odi", ["-bm", "-odi", "-oi", "root"], b"Subject: ignored options\n\nbody\n"),
    case("verbose", ["-v", "root"], b"Subject: verbose\n\nbody\n"),
    case("dash-dash", ["--", "root", "bob"], b"Subject: after --\n\nbody\n"),
    case("f-overrides-from-header", ["-f", "bounce@example.org", "root"],
         b"From: Shop <shop@example.org>\nSubject: -f and From:\n\nbody\n"),
    # -- recipients --------------------------------------------------------------------------------------------
    case("t-and-arguments", ["-t", "bob"], b"To: alice@example.org\nCc: carol\nSubject: both\n\nbody\n"),
    case("t-bcc", ["-t"], b"To: root\nBcc: hidden@example.org,\n  other@example.org\nSubject: bcc\n\nbody\n"),
    case("bcc-without-t", ["root"], b"To: alice@example.org\nBcc: hidden@example.org\nSubject: bcc, no -t\n\nbody\n"),
    case("t-address-forms", ["-t"],
         b'To: "Doe, John" <john@example.org>, jane@example.org (Jane), undisclosed-recipients:;\n'
         b"Subject: address forms\n\nbody\n"),
    case("t-no-recipients", ["-t"], b"Subject: nobody\n\nbody\n"),
    case("comma-list", ["root,bob"], b"Subject: list\n\nbody\n"),
    # -- message forms -----------------------------------------------------------------------------------------
    case("complete-message", ["root"], b"From: Web Shop <shop@example.org>\nMessage-ID: <abc@example.org>\n"
                                       b"Date: Tue, 1 Dec 2020 10:00:00 +0000\nSubject: complete\n\nbody\n"),
    case("long-line-8bit", ["root"], b"Subject: long\n\n" + LONG + b" caf\xe9 = tail  \nshort\n"),
    case("long-line-content-type", ["root"], b"Subject: long html\nContent-Type: text/html; charset=iso-8859-1\n\n"
                                             b"<p>" + LONG + b"\xe9</p>\n"),
    case("line-989", ["root"], b"Subject: 989\n\n\xe9" + b"y" * 988 + b"\n"),  # (bytes, line end not counted)
    case("line-988", ["root"], b"Subject: 988\n\n\xe9" + b"y" * 987 + b"\n"),
    case("t-folded-to", ["-t"], b"To: alice@example.org,\n\tbob@example.org\nSubject: folded\n\nbody\n"),
    case("crlf", ["root"], b"Subject: crlf\r\n\r\nline one\r\nline two\r\n"),
    case("mixed-endings", ["root"], b"Subject: mixed\r\n\nline one\nline two\r\nno final newline"),
    case("lone-dot", ["root"], b"Subject: lone dot\n\nbefore\n.\nafter\n"),
    case("lone-dot-oi", ["-oi", "root"], b"Subject: lone dot, -oi\n\nbefore\n.\nafter\n"),
    case("leading-dots", ["root"], b"Subject: dots\n\n..two\n.one\n. space\n"),
    case("8bit-body", ["root"], b"Subject: 8bit\n\ncaf\xc3\xa9 latin \xe9\n"),
    case("8bit-header", ["root"], b"Subject: caf\xc3\xa9\n\nbody\n"),
    case("empty", ["root"], b""),
    case("only-headers", ["root"], b"Subject: only headers\n"),
    case("only-headers-crlf", ["root"], b"Subject: only headers\r\nX-Test: 1\r\n"),
    case("from-header-comment", ["root"], b"From: root (Cron Daemon)\nSubject: comment\n\nbody\n"),
    case("from-header-bare-name", ["root"], b"From: backup\nSubject: bare name\n\nbody\n"),
    case("mbox-from-line", ["root"], b"From someone@example.org Mon Jan  1 00:00:00 2024\nReturn-Path: <old@x>\n"
                                     b"Subject: resent\n\nbody\n"),
    case("return-path-inside", ["root"], b"Delivered-To: someone@example.org\nReturn-Path: <old@example.org>\n"
                                         b"Subject: resent from a maildir\n\nbody\n"),
    case("warning-text", ["root"], b"Warning: disk 90% full\n"),
    case("uptime", ["root"], b" 10:00:01 up 3 days,  2 users,  load average: 0.00, 0.01, 0.05\n"),
    # -- mistakes ----------------------------------------------------------------------------------------------
    case("bad-option", ["-Z", "root"], b"x\n"),
    case("missing-argument", ["-f"], b"x\n"),
    case("no-recipients", [], b"x\n"),
    case("space-in-address", ["root", "a b"], b"Subject: space\n\nbody\n"),
    case("double-at", ["user@@example.org"], b"Subject: bad\n\nbody\n"),
    case("unclosed-bracket", ["-f", "<bounce@example.org", "root"], b"x\n"),
    case("null-sender", ["-f", "", "root"], b"Subject: null sender\n\nbody\n"),
    case("null-sender-brackets", ["-f", "<>", "root"], b"Subject: null sender\n\nbody\n"),
    case("sender-with-name", ["-f", "Shop <shop@example.org>", "root"], b"Subject: named sender\n\nbody\n"),
    case("recipient-with-name", ["Joe <joe@example.org>"], b"Subject: named recipient\n\nbody\n"),
]

# Where 6.8's sendmail does what no administrator wants, we do otherwise; each is asserted for both sides below.
KEPT_DIFFERENCES = {
    "F-comma": case("F-comma", ["-F", "Doe, John", "root"], b"Subject: comma\n\nbody\n"),
    "t-recipient-twice": case("t-recipient-twice", ["-t", "root"], b"To: root\nSubject: twice\n\nbody\n"),
    "text-then-to": case("text-then-to", ["root"], b"hello\nTo: someone\n"),
    "queue-run": case("queue-run", ["-q"], b""),
    "long-line-utf8": case("long-line-utf8", ["root"], b"Subject: long\n\n" + LONG + b" caf\xc3\xa9\n"),
    "long-line-no-header": case("long-line-no-header", ["root"], LONG + b" a=b\n"),
    "long-header-line": case("long-header-line", ["root"], b"Subject: long\nX-List: " + b"z" * 1000 + b"\n\na=b\n"),
    "root-in-a-login-session": case("root-in-a-login-session", ["root"], b"Subject: sudo\n\nbody\n",
                                    root_in_users_session=True),
    "dsn-options": case("dsn-options", ["-N", "NEVER", "-R", "HDRS", "-V", "env-1", "root"], b"Subject: dsn\n\nbody\n"),
}
ALL_CASES = CASES + list(KEPT_DIFFERENCES.values())


# -- running both sides --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    dead_letter: bytes | None
    deliveries: list[bytes] = field(default_factory=list)


def config(folder: Path, side: str, port: int) -> str:
    return (f'table users{port} {{ "@" = "nobody" }}\nlisten on 127.0.0.1 port {port}\n'
            f'action "sendmail{port}" maildir "{folder}/{side}" virtual <users{port}>\n'
            f'match from local for any action "sendmail{port}"\n')


def run_opensmtpd_sendmail(user: pwd.struct_passwd, item: Case, wrapper: tuple[str, ...] = ()) -> tuple[int, str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"}
    args, data = item.args, item.data
    if item.root_in_users_session:
        command = ["sh", "-c", 'echo "$0" >/proc/self/loginuid && exec "$@"', str(user.pw_uid), OPENSMTPD_SENDMAIL,
                   *args]
        result = subprocess.run(command, input=data, capture_output=True, env=env, cwd="/", timeout=60)
    elif wrapper:  # (a wrapper runs as root and switches to the user itself)
        command = [*wrapper, "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                   OPENSMTPD_SENDMAIL, *args]
        result = subprocess.run(command, input=data, capture_output=True, env=env, cwd="/", timeout=60)
    else:
        result = subprocess.run([OPENSMTPD_SENDMAIL, *args], input=data, capture_output=True, env=env, cwd="/",
                                timeout=60, user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def run_our_sendmail(user: pwd.struct_passwd, item: Case, env: dict[str, str], folder: Path) -> tuple[int, str, str]:
    """`sendmail ARGS` as the user, in a forked child: the program's entry (the `sendmail` personality) with the
    user's uid, standard input, output and error on files, and only the environment given."""
    from smtpctl.cli import _personality

    paths = {name: folder / f"ours.{name}" for name in ("stdin", "stdout", "stderr")}
    paths["stdin"].write_bytes(item.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (fork with the test's threads: the child execs nothing)
        pid = os.fork()
    if pid == 0:
        status = 99
        try:
            for fd, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                    (2, "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                os.dup2(os.open(paths[name], flags, 0o600), fd)
            sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, closefd=False)))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            os.environ.clear()
            os.environ.update(env)
            if item.root_in_users_session:
                Path("/proc/self/loginuid").write_text(str(user.pw_uid))
            else:
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            os.chdir("/")
            status = _personality("sendmail", list(item.args)) or 0
        except SystemExit as leaving:
            status = leaving.code if isinstance(leaving.code, int) else 1
        except BaseException:  # noqa: BLE001 — shown in the child's standard error, which the test reports
            traceback.print_exc()
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    return (os.waitstatus_to_exitcode(wait_status), paths["stdout"].read_text(errors="replace"),
            paths["stderr"].read_text(errors="replace"))


def take_dead_letter(user: pwd.struct_passwd) -> bytes | None:
    path = Path(user.pw_dir) / "dead.letter"
    if not path.exists():
        return None
    content = path.read_bytes()
    path.unlink()
    return content


def maildir_files(maildir: Path) -> list[Path]:
    folder = maildir / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def session_id(message: bytes) -> str:
    """The id of the SMTP transaction that accepted a delivered message (its Received: header's `id`)."""
    found = re.search(rb"\n\tby [^\n]* with ESMTPA id ([0-9a-f]+)", message)
    assert found, message
    return found.group(1).decode()


@dataclass
class Mailbox:
    """One side's daemon log and maildir, and how much of each the invocations so far have accounted for."""
    log: Callable[[], str]
    maildir: Path
    transactions: int = 0
    taken: set[str] = field(default_factory=set)

    def deliveries_of_the_last_submission(self) -> list[bytes]:
        """What the transaction the daemon accepted last delivered: its log line says how many recipients it
        had, and that many new messages, each with the transaction's id in its Received:, are waited for."""
        def next_transaction() -> tuple[str, str] | None:
            accepted = re.findall(r"smtp message msgid=([0-9a-f]+) .*nrcpt=(\d+)", self.log())
            return accepted[self.transactions] if len(accepted) > self.transactions else None

        msgid, count = wait_until(next_transaction, 30, explain=self.log)
        self.transactions += 1

        def arrived() -> list[Path] | None:
            new = [path for path in maildir_files(self.maildir) if path.name not in self.taken]
            return new if len(new) >= int(count) else None

        new = wait_until(arrived, 30, explain=self.log)
        self.taken.update(path.name for path in new)
        messages = [path.read_bytes() for path in new]
        assert [session_id(message) for message in messages] == [msgid] * int(count), (msgid, messages)
        return sorted(messages, key=delivered_to)


def delivered_to(message: bytes) -> bytes:
    found = re.search(rb"^Delivered-To: (.*)$", message, re.MULTILINE)
    return found.group(1) if found else b""


@dataclass
class World:
    mailname: str = ""
    theirs: dict[str, Outcome] = field(default_factory=dict)
    ours: dict[str, Outcome] = field(default_factory=dict)
    # ~/dead.letter after two refused submissions in a row, by side
    dead_letter_after_two: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="pysmtpd-sendmail68-"))
    os.chmod(made, 0o755)  # (deliveries run as nobody, sendmail as the user)
    try:
        for side in ("ours", "theirs"):
            (made / side).mkdir(mode=0o755)
            shutil.chown(made / side, "nobody")
        (made / "homes").mkdir(mode=0o755)
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="module")
def user(folder: Path) -> Iterator[pwd.struct_passwd]:
    with system_user(str(folder / "homes"), "psm") as entry:
        # A GECOS field as adduser writes it, with `&` for the login name: both sendmails make a full name of it.
        subprocess.run(["usermod", "-c", "& Tester,Room 1,555", entry.pw_name], check=True, capture_output=True)
        yield pwd.getpwnam(entry.pw_name)


def run_cases(outcomes: dict[str, Outcome], send: Callable[[Case], tuple[int, str, str]],
              user: pwd.struct_passwd, mailbox: Mailbox) -> bytes:
    """Every invocation, one after the other, each with what it delivered; then two refused ones in a row:
    returns the dead.letter they leave."""
    take_dead_letter(user)
    for item in ALL_CASES:
        outcome = outcomes[item.name] = Outcome(*send(item), dead_letter=take_dead_letter(user))
        if outcome.status == 0:
            outcome.deliveries = mailbox.deliveries_of_the_last_submission()
    refused = next(item for item in CASES if item.name == "double-at")
    for text in (b"first refused\n", b"second refused\n"):
        send(Case(refused.name, refused.args, text))
    return take_dead_letter(user) or b""


@pytest.fixture(scope="module")
def world(folder: Path, user: pwd.struct_passwd) -> World:
    found = World()
    port = free_port()
    with OpenSmtpd(str(folder), config(folder, "theirs", port), port) as opensmtpd:
        found.dead_letter_after_two["theirs"] = run_cases(
            found.theirs, lambda item: run_opensmtpd_sendmail(user, item), user,
            Mailbox(opensmtpd.log, folder / "theirs"))
    # 6.8's sendmail names bare addresses after /etc/mailname, else the host's canonical name: ours gets the same.
    found.mailname = delivered_to(found.theirs["echo-hi"].deliveries[0]).decode().removeprefix("root@")
    port = free_port()
    ours = SmtpdProcess(folder / "daemon", config(folder, "ours", port), mailname=found.mailname, port=port)
    with ours:
        env = {key: value for key, value in ours.env.items() if key.startswith("SMTPD_")}
        env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", HOME=user.pw_dir, LANG="C.UTF-8")
        found.dead_letter_after_two["ours"] = run_cases(
            found.ours, lambda item: run_our_sendmail(user, item, env, folder), user, Mailbox(ours.log, folder / "ours"))
    return found


# -- normalizing -------------------------------------------------------------------------------------------------

def header_fields(message: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """The header as (name, value) pairs in order, continuation lines kept in the value, and the body bytes."""
    head, separator, body = message.partition(b"\n\n")
    if not separator:  # (a message of header fields only, without the blank line)
        head, body = message.removesuffix(b"\n"), b""
    fields: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
    return fields, body


def normalized_delivery(message: bytes, given: bytes = b"") -> tuple[list[tuple[str, str]], bytes]:
    """The header fields with what differs by nature blanked: session and message ids, a date the sendmail or the
    daemon added (not in the message given; 6.8 writes `Mon, 7 Dec 2026 10:00:00 +0000 (UTC)`, we
    `Mon, 07 Dec 2026 10:00:00 +0000`), and the product name in Received:."""
    fields, body = header_fields(message)
    result = []
    for name, value in fields:
        if name.lower() == "received":
            value = re.sub(r"\((OpenSMTPD|PySMTPD)\)", "(PRODUCT)", value)
            value = re.sub(r" id [0-9a-f]+", " id ID", value)
            value = re.sub(r";\n\t.*$", ";\n\tDATE", value, flags=re.DOTALL)
        elif name.lower() == "message-id":
            value = re.sub(r"^<[0-9a-f]{16}@", "<ID@", value)
        elif name.lower() == "date" and value.encode() not in given:
            value = "DATE"
        result.append((name, value))
    return result, body


def normalized_text(text: str) -> list[str]:
    """Printed lines with the program name (6.8's getopt says `/usr/sbin/sendmail:`), the daemon's product and
    ids, and the EHLO extensions only our daemon offers set aside; 6.8's `-v` prints the CR of CRLF too."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^/usr/sbin/sendmail: ", "sendmail: ", line.rstrip())
        line = re.sub(r"ESMTP (OpenSMTPD|PySMTPD)$", "ESMTP PRODUCT", line)
        line = re.sub(r"2\.0\.0 [0-9a-f]{8} Message accepted", "2.0.0 ID Message accepted", line)
        if re.fullmatch(r"<<< 250-(DSN|PIPELINING|CHUNKING|SMTPUTF8)", line):
            continue
        lines.append(line)
    return lines


def comparable(outcome: Outcome, given: bytes) -> dict[str, object]:
    return {"status": outcome.status, "stdout": normalized_text(outcome.stdout),
            "stderr": normalized_text(outcome.stderr), "dead.letter": outcome.dead_letter is not None,
            "deliveries": [normalized_delivery(message, given) for message in outcome.deliveries]}


# -- the comparison ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [item.name for item in CASES])
def test_sendmail_does_as_opensmtpd_68(world: World, name: str) -> None:
    given = next(item.data for item in CASES if item.name == name)
    theirs, ours = comparable(world.theirs[name], given), comparable(world.ours[name], given)
    if world.theirs[name].stderr.startswith("sendmail: command failed: "):
        # 6.8 prints the daemon's reply with its line end, and a second one after it: an empty line we do not copy.
        assert theirs["stderr"][-1] == ""
        theirs["stderr"] = theirs["stderr"][:-1]
    assert ours == theirs, f"ours: {pprint.pformat(ours)}\ntheirs: {pprint.pformat(theirs)}"


# -- where we differ on purpose (docs/delivery.md, "sendmail") ----------------------------------------------------

def header(outcome: Outcome, name: str, index: int = 0) -> str:
    fields, _ = normalized_delivery(outcome.deliveries[index])
    [value] = [value for field_name, value in fields if field_name.lower() == name.lower()]
    return value


def test_a_full_name_with_a_comma_stays_one_name(world: World) -> None:
    """6.8 writes `-F 'Doe, John'` as it is: its daemon then reads two addresses and qualifies the first."""
    theirs, ours = world.theirs["F-comma"], world.ours["F-comma"]
    assert header(theirs, "From") == f"Doe@{world.mailname}, John <{header(theirs, 'Return-Path')[1:-1]}>"
    assert header(ours, "From") == f'"Doe, John" <{header(ours, "Return-Path")[1:-1]}>'


def test_a_recipient_named_twice_gets_one_copy(world: World) -> None:
    """`sendmail -t root` with `To: root`: 6.8 sends RCPT TO twice and its daemon delivers two copies."""
    assert len(world.theirs["t-recipient-twice"].deliveries) == 2
    assert len(world.ours["t-recipient-twice"].deliveries) == 1


def test_text_with_a_field_further_down_is_text(world: World) -> None:
    """`hello` then `To: someone`: 6.8 takes it for a header (a `To:` before the first empty line) and its daemon
    refuses the message as not RFC 2822 compliant; for us it is text, all body."""
    theirs, ours = world.theirs["text-then-to"], world.ours["text-then-to"]
    assert (theirs.status, theirs.deliveries, theirs.dead_letter is not None) == (70, [], True)
    assert "550 5.7.1 Delivery not authorized, message refused: Message is not RFC 2822 compliant" in theirs.stderr
    assert (ours.status, ours.stderr) == (0, "")
    assert header_fields(ours.deliveries[0])[1] == b"hello\nTo: someone\n"


def test_a_queue_run_says_why_it_fails(world: World) -> None:
    """`sendmail -q` runs the queue (as root: tests/test_sendmail.py); a user may not, and is told why."""
    theirs, ours = world.theirs["queue-run"], world.ours["queue-run"]
    assert (theirs.status, theirs.stderr) == (70, "")  # 6.8: silent
    assert (ours.status, ours.stderr) == (70, "sendmail: cannot run the queue: need root privileges for schedule\n")


def test_a_long_utf8_line_is_labelled_utf8(world: World) -> None:
    """6.8 labels every text it makes quoted-printable unknown-8bit; we say UTF-8 when it is, so that readers
    show it (the same body otherwise; a text that is not UTF-8 is unknown-8bit for both: `long-line-8bit`)."""
    theirs, ours = world.theirs["long-line-utf8"], world.ours["long-line-utf8"]
    assert header(theirs, "Content-Type") == "text/plain; charset=unknown-8bit"
    assert header(ours, "Content-Type") == "text/plain; charset=utf-8"
    assert header_fields(theirs.deliveries[0])[1] == header_fields(ours.deliveries[0])[1]


def test_a_long_line_of_text_without_a_header_is_encoded_as_said(world: World) -> None:
    """Text without a header and with a long line: 6.8 says the body is quoted-printable but sends it as it is
    (readers then decode `a=b` as an escape, and the line stays over the SMTP limit); we encode it."""
    import quopri

    theirs, ours = world.theirs["long-line-no-header"], world.ours["long-line-no-header"]
    text = KEPT_DIFFERENCES["long-line-no-header"].data
    for outcome in (theirs, ours):
        assert header(outcome, "Content-Transfer-Encoding") == "quoted-printable"
    assert header_fields(theirs.deliveries[0])[1] == text
    body = header_fields(ours.deliveries[0])[1]
    assert quopri.decodestring(body) == text and max(len(line) for line in body.split(b"\n")) <= 76


def test_a_long_header_line_leaves_the_body_alone(world: World) -> None:
    """6.8 makes the body quoted-printable when a header line is long (its code says the count is "not really
    exact" there); the body's own lines are short, and we send it as it is."""
    theirs, ours = world.theirs["long-header-line"], world.ours["long-header-line"]
    assert header(theirs, "Content-Transfer-Encoding") == "quoted-printable"
    assert header_fields(theirs.deliveries[0])[1] == b"a=3Db\n"
    assert "Content-Transfer-Encoding" not in dict(header_fields(ours.deliveries[0])[0])
    assert header_fields(ours.deliveries[0])[1] == b"a=b\n"


def test_root_sends_as_root_whoever_logged_in(world: World, user: pwd.struct_passwd) -> None:
    """Root in the user's login session (`sudo -i`, or a job started from there long ago): 6.8 sends as the user
    whose session it is (getlogin(3)), with their name; we send as the account that runs sendmail, as Postfix and
    Exim do, whatever session it was started from."""
    theirs, ours = world.theirs["root-in-a-login-session"], world.ours["root-in-a-login-session"]
    assert header(theirs, "Return-Path") == f"<{user.pw_name}@{world.mailname}>"
    assert header(theirs, "From").startswith(f"{user.pw_name.capitalize()} Tester <")
    assert header(ours, "Return-Path") == f"<root@{world.mailname}>"
    assert header(ours, "From").endswith(f" <root@{world.mailname}>") or header(ours, "From") == f"<root@{world.mailname}>"


def test_dsn_options_reach_the_daemon(world: World) -> None:
    """`-N`, `-R`, `-V`: 6.8's daemon offers no DSN on its local submissions and refuses what its own sendmail
    sends for them (exit 70, dead.letter); ours takes them."""
    theirs, ours = world.theirs["dsn-options"], world.ours["dsn-options"]
    assert theirs.status == 70 and "503 5.5.4 Invalid command arguments: Unsupported option RET=HDRS" in theirs.stderr
    assert (ours.status, ours.stderr, len(ours.deliveries)) == (0, "", 1)


def test_a_refusal_adds_to_dead_letter_and_prints_no_empty_line(world: World) -> None:
    """6.8 rewrites ~/dead.letter at each refusal (an earlier lost message is gone) with its completed copy, and
    prints an empty line after the reply; we append the message as it was given, and print no empty line."""
    assert b"second refused" in world.dead_letter_after_two["theirs"]
    assert b"first refused" not in world.dead_letter_after_two["theirs"]
    assert world.dead_letter_after_two["ours"] == b"first refused\nsecond refused\n"
    assert world.theirs["double-at"].stderr.endswith("error\n\n")
    assert world.ours["double-at"].stderr == "sendmail: command failed: 501 5.1.3 Recipient address syntax error\n"


# -- the daemon down ---------------------------------------------------------------------------------------------

OFFLINE_CASES = [
    case("offline-t-bcc", ["-t", "-f", "cron"],
         b"To: alice@example.org\r\nBcc: hidden@example.org\r\nSubject: while down\r\n\r\nbody\r\n"),
    case("offline-plain", ["root"], b"hi\n"),
    case("offline-pipe", ["a|b"], b"x\n"),
    case("offline-no-recipients", [], b"x\n"),
]


def offline_files(spool: Path) -> list[tuple[int, str, bytes]]:
    """The files kept in spool/offline, emptied: (mode, first line, the message that follows)."""
    found = []
    for path in sorted((spool / "offline").iterdir()):
        arguments, _, message = path.read_bytes().partition(b"\n")
        found.append((path.stat().st_mode & 0o777, arguments.decode(), message))
        path.unlink()
    return found


def test_with_the_daemon_down_the_message_is_kept_offline_as_by_opensmtpd(folder: Path,
                                                                          user: pwd.struct_passwd) -> None:
    """No daemon: both sendmails keep the message in the spool's offline/ folder (exit 75, nothing printed) with
    the arguments on its first line, or refuse as 6.8 does. 6.8's sendmail runs in a mount namespace of its own
    whose /var/spool/smtpd and /run are folders of the test: no daemon to find, and nothing left in the machine's
    spool. 6.8 keeps its completed copy, Bcc: lines gone (so its replay of `-t` never sends the blind copies); we
    keep the message as given."""
    theirs_spool, no_run, ours_spool = folder / "spool-theirs", folder / "run-empty", folder / "spool-ours"
    for made in (theirs_spool / "offline", no_run, ours_spool / "offline"):
        made.mkdir(parents=True)
    os.chmod(theirs_spool, 0o711)
    shutil.chown(theirs_spool / "offline", "root", "opensmtpq")
    os.chmod(theirs_spool / "offline", 0o770)  # (as Debian's: smtpctl is setgid opensmtpq)
    os.chmod(ours_spool / "offline", 0o1733)  # (as our daemon makes it)
    namespace = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount --bind "$0" /var/spool/smtpd && mount --bind "$1" /run && shift && exec "$@"',
                 str(theirs_spool), str(no_run))
    (folder / "offline-mailname").write_text("offline.test\n")
    env = {"SMTPD_SOCKET": str(folder / "no-daemon.sock"), "SMTPD_SPOOL": str(ours_spool),
           "SMTPD_MAILNAME": str(folder / "offline-mailname"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": user.pw_dir, "LANG": "C.UTF-8"}
    for item in OFFLINE_CASES:
        theirs = run_opensmtpd_sendmail(user, item, wrapper=namespace)
        ours = run_our_sendmail(user, item, env, folder)
        assert ours[0] == theirs[0], (item.name, ours, theirs)
        assert normalized_text(ours[2]) == normalized_text(theirs[2]), item.name
        # (6.8 makes its file before it looks at the arguments, and leaves it empty when it refuses them: its
        # daemon removes empty files at start. We make none.)
        kept_theirs = [kept for kept in offline_files(theirs_spool) if kept[1:] != ("", b"")]
        kept_ours = offline_files(ours_spool)
        assert [kept[:2] for kept in kept_ours] == [kept[:2] for kept in kept_theirs], item.name
        if kept_ours:
            [(_, _, message_theirs)], [(_, _, message_ours)] = kept_theirs, kept_ours
            assert message_ours == item.data
            assert message_theirs == b"".join(line for line in item.data.replace(b"\r\n", b"\n").splitlines(True)
                                              if not line.startswith(b"Bcc:"))
    assert theirs[0] == 70  # (the last: no recipients)
