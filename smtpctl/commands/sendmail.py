"""The sendmail personality (reference §2.6): what cron, mail(1) and scripts call to submit local mail.

    sendmail [-tv] [-f from] [-F name] [-N notify] [-R ret] [-V envid] [-S] to ...

Online, it asks the daemon for an enqueue session on the control socket (`enqueue` request), then speaks SMTP on
the same connection: EHLO, MAIL FROM, one RCPT TO per recipient, DATA. Offline (no daemon), the message is kept
in `<spool>/offline/` and exit status 75 says so; the daemon replays these files at start (smtpd/mda/offline.py).
So is a message the daemon cannot take for now and took no copy of: SMTP paused, a 4xx reply, a cut session.

Bare names get `@<mailname>`; an argument may hold several comma-separated addresses; `-t` adds the To, Cc
and Bcc recipients of the header. Without -f/-r the envelope sender is the header's From: address, else the
user (with their GECOS full name in the From: header added). The message gets `From:` and `Date:` if it has
none, before the message's own fields; leading `From ` lines and every `Return-Path:` and `Bcc:` header are
removed. Input whose leading lines name no usual message field (MESSAGE_FIELDS) is text without a header, all
of it body (`echo "Warning: disk full" | sendmail root`).
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import quopri
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import paths

USAGE = "usage: sendmail [-tv] [-f from] [-F name] to ..."
EX_USAGE_ERROR = 1
EX_DATAERR = 65  # an address or option value holding a line break: it would have added SMTP commands
EX_NOUSER = 67  # -S (the daemon replaying an offline file): the daemon refused the message for good (5xx)
EX_UNAVAILABLE = 69  # the message could not be read (standard input closed or unreadable), as OpenSMTPD's getline
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
LINE_SPLIT = 990
# Options with an argument, and those whose argument is optional (attached only), as enqueue.c takes them.
WITH_ARGUMENT = set("ABbeFfLNopRrV")
OPTIONAL_ARGUMENT = set("EJ")
FLAGS = set("imqStvx")
SENDING_MODES = ("m", "a")  # -bm (deliver the message: the default) and the older name -ba
OFFLINE_DIRECTORY = "offline"
# A message's leading lines are its header only if one of them is one of these fields (OpenSMTPD's enqueue list,
# plus RFC 5322's other originator and identification fields); otherwise the input is text, all body.
MESSAGE_FIELDS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version", "content-type",
    "content-disposition", "content-transfer-encoding", "user-agent",
    "reply-to", "sender", "in-reply-to", "references",
})
SMTP_TIMEOUT = 300.0
CONNECTION_CLOSED = "connection closed by the server"
DISALLOWED = "server disallowed submission request"  # the daemon's answer while SMTP is paused
BUSY_WAIT = 120.0  # seconds a sendmail waits for one of its uid's control connections to end (a burst of them)


class UsageError(Exception):
    pass


class SubmissionError(Exception):
    """The daemon refused the message (exit 70, dead.letter written)."""


class TemporaryRefusal(SubmissionError):
    """The daemon cannot take the message now (SMTP paused, a 4xx reply, the session cut) and has taken none of
    it: the message is kept offline, exit 75, as when the daemon is down."""


class NotRunning(Exception):
    pass


class Incompatible(NotRunning):
    """The daemon answered the enqueue request with something that is not our protocol (another version of it,
    or not smtpd at all): nothing was handed over, so the message is kept offline for a daemon that can take it."""


class Busy(TemporaryRefusal):
    """The daemon serves as many control connections for our uid as it allows: try again shortly."""


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    server_mode: bool = False  # -S: replaying an offline file; never write it offline again
    from_headers: bool = False  # -t
    verbose: bool = False
    queue_run: bool = False  # -q
    queue_interval: str = ""  # what follows -q: `-q30m` asks for a periodic queue runner (Sendmail's daemon mode)
    mode: str | None = None  # -b: `-bs` (SMTP on standard input and output) and `-bp` (mailq) mean something
    recipients: list[str] = field(default_factory=list)


def parse_arguments(argv: list[str]) -> Options:
    """Options may follow recipients (`sendmail root -f cron`), as with the glibc getopt(3) that OpenSMTPD's
    smtpctl uses on Linux; `--` ends the options, and so does the first recipient when POSIXLY_CORRECT is set."""
    options = Options()
    operands: list[str] = []
    in_order = "POSIXLY_CORRECT" in os.environ
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--":
            index += 1
            break
        if not argument.startswith("-") or argument == "-":
            if in_order:
                break
            operands.append(argument)
            index += 1
            continue
        position = 1
        while position < len(argument):
            letter = argument[position]
            rest = argument[position + 1:]
            if letter in WITH_ARGUMENT:
                if rest:
                    value = rest
                else:
                    index += 1
                    if index >= len(argv):
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    value = argv[index]
                _apply(options, letter, value)
                break
            if letter in OPTIONAL_ARGUMENT:
                break  # ignored, with or without an attached argument
            if letter not in FLAGS:
                raise UsageError(f"invalid option -- '{letter}'")
            _apply(options, letter, None)
            if options.queue_run:
                options.queue_interval = rest
                return options  # -q ends it all there, whatever follows (`-q1h`)
            position += 1
        index += 1
    for argument in operands + argv[index:]:
        options.recipients.extend(part.strip() for part in argument.split(",") if part.strip())
    return options


def _apply(options: Options, letter: str, value: str | None) -> None:
    if letter in "fr":
        options.sender = value
    elif letter == "F":
        options.full_name = value
    elif letter == "N":
        options.notify = value
    elif letter == "R":
        options.ret = value
    elif letter == "V":
        options.envid = value
    elif letter == "S":
        options.server_mode = True
    elif letter == "t":
        options.from_headers = True
    elif letter == "v":
        options.verbose = True
    elif letter == "q":
        options.queue_run = True
    elif letter == "b":
        options.mode = value
    # A, B, e, L, o, p, i, m, x (and -b other than -bs): accepted and ignored.


# -- addresses ----------------------------------------------------------------------------------------------

def qualify(address: str, mailname: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address and "@" not in address:
        address = f"{address}@{mailname}"
    return address


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def gecos_name(gecos: str, username: str) -> str:
    """The full name of a passwd entry: its GECOS field up to the first comma, `&` standing for the login name
    capitalised (`& Smith,Room 1` of `john` is `John Smith`)."""
    name = gecos.split(",", 1)[0]
    return name.replace("&", username[:1].upper() + username[1:], 1)


def current_full_name() -> str | None:
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return None
    return gecos_name(entry.pw_gecos, entry.pw_name) or None


def envelope_sender(options: Options, message: Message, mailname: str) -> tuple[str, str | None]:
    """The envelope sender and the full name for an added From: header. Without -f/-r, the sender is the
    address of the message's From: header if it has one (as OpenSMTPD's enqueue does), else the user running
    sendmail, whose full name (GECOS) then goes with it unless -F gives one."""
    if options.sender is not None:
        return qualify(options.sender, mailname), options.full_name
    header_from = [address for _, address in email.utils.getaddresses(message.header_values("from")) if address]
    if header_from:
        return qualify(header_from[0], mailname), options.full_name
    full_name = options.full_name if options.full_name is not None else current_full_name()
    return qualify(current_user(), mailname), full_name


# -- the message --------------------------------------------------------------------------------------------

@dataclass
class Message:
    headers: list[str]  # header lines (continuations included), without line ends; never a Bcc: line
    body: list[str]
    bcc: list[str] = field(default_factory=list)  # the removed Bcc: lines, still recipients for -t

    def header_values(self, *names: str) -> list[str]:
        wanted = {name.lower() for name in names}
        values: list[str] = []
        current: str | None = None
        lines = self.headers + self.bcc if "bcc" in wanted else self.headers
        for line in lines + [""]:
            if line[:1] in (" ", "\t") and current is not None:
                current += " " + line.strip()
                continue
            if current is not None:
                values.append(current)
                current = None
            name, colon, value = line.partition(":")
            if colon and name.strip().lower() in wanted:
                current = value.strip()
        return values

    def has_header(self, name: str) -> bool:
        prefix = name.lower() + ":"
        return any(line.lower().startswith(prefix) for line in self.headers)


def parse_message(data: bytes) -> Message:
    text = data.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    headers: list[str] = []
    index = 0
    # Leading "From " and Return-Path lines are the envelope of an earlier hop.
    while index < len(lines) and (lines[index].startswith("From ") or lines[index].lower().startswith("return-path:")):
        index += 1
    while index < len(lines):
        line = lines[index]
        if line == "":
            index += 1
            break
        if line[:1] in (" ", "\t") and not headers:
            break  # an indented first line continues nothing: text, not a header
        if ":" not in line and line[:1] not in (" ", "\t"):
            break  # not a header: the body starts here (no blank line was given)
        headers.append(line)
        index += 1
    if not any(_field_name(line) in MESSAGE_FIELDS for line in headers):
        # Plain text such as `Warning: disk full` or uptime's ` 10:00:01 up 3 days`: it is all body, the
        # lines skipped above included (as OpenSMTPD's enqueue tells a message from text).
        return Message([], lines)
    kept, bcc = _split_header(headers, "bcc")
    # A Return-Path: further down (a message resent from a mailbox file) is an earlier hop's envelope too: the
    # daemon adds the real one, and two would disagree (OpenSMTPD drops them anywhere in the header).
    kept, _ = _split_header(kept, "return-path")
    return Message(kept, lines[index:], bcc)


def _field_name(line: str) -> str:
    if line[:1] in (" ", "\t"):
        return ""
    return line.partition(":")[0].strip().lower()


def _split_header(headers: list[str], name: str) -> tuple[list[str], list[str]]:
    """The header lines without field `name` (continuations go with their field), and that field's lines."""
    kept: list[str] = []
    taken: list[str] = []
    taking = False
    for line in headers:
        if line[:1] not in (" ", "\t"):
            taking = line.partition(":")[0].strip().lower() == name
        (taken if taking else kept).append(line)
    return kept, taken


def _same_address(address: str) -> str:
    """What tells two recipients apart: the local part as written, the domain in any case."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address


def recipients_from_headers(message: Message) -> list[str]:
    values = message.header_values("to", "cc", "bcc")
    return [address for _, address in email.utils.getaddresses(values) if address]


_SPECIALS = frozenset('()<>[]:;@\\,."')  # RFC 5322: a display name holding one must be a quoted string


def display_name(name: str) -> str:
    """The full name as the From: header's display name: quoted when it holds a special (`-F 'Doe, John'` would
    otherwise read as two addresses, `Doe` and `John <...>`), unless the caller quoted it already."""
    if (len(name) > 1 and name[0] == name[-1] == '"') or not _SPECIALS.intersection(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def complete_message(message: Message, sender: str, full_name: str | None, written: float | None = None) -> list[str]:
    """The lines to send: the fields the message lacks (From, Date; the MIME ones if a line is too long and the
    body becomes quoted-printable) and then the message's own, in OpenSMTPD's order."""
    added: list[str] = []
    if not message.has_header("from"):
        added.append(f"From: {display_name(full_name)} <{sender}>" if full_name else f"From: <{sender}>")
    if not message.has_header("date"):
        added.append(f"Date: {email.utils.formatdate(written, localtime=True)}")
    body = message.body
    # A line is too long at LINE_SPLIT bytes with its line end, as OpenSMTPD counts (989 bytes of text are).
    if any(len(line.encode("utf-8", "surrogateescape")) + 1 >= LINE_SPLIT for line in body) \
            and not message.has_header("mime-version") and not message.has_header("content-transfer-encoding"):
        raw = "\n".join(body).encode("utf-8", "surrogateescape") + b"\n"
        # A Content-Type the message has is kept (a second one would contradict it): only the missing ones go in.
        added += [f"{name}: {value}" for name, value in (
            ("MIME-Version", "1.0"), ("Content-Type", f"text/plain; charset={_charset(raw)}"),
            ("Content-Disposition", "inline"), ("Content-Transfer-Encoding", "quoted-printable"))
            if not message.has_header(name)]
        body = quopri.encodestring(raw).decode("ascii").split("\n")
        if body and body[-1] == "":
            body.pop()
    return added + message.headers + [""] + body


def _charset(raw: bytes) -> str:
    """The charset of a text made quoted-printable: UTF-8 when it is (ASCII is), so that readers show it right;
    otherwise unknown-8bit, as OpenSMTPD labels every such text (a Latin-1 byte in a text said to be UTF-8 is
    shown as a replacement character)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown-8bit"
    return "utf-8"


# -- talking to the daemon -----------------------------------------------------------------------------------

class _Connection:
    def __init__(self, connection: socket.socket, verbose: bool) -> None:
        self.connection = connection
        self.verbose = verbose
        self.buffer = b""

    def line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.connection.recv(65536)
            if not chunk:
                raise SubmissionError(CONNECTION_CLOSED)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def reply(self) -> str:
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line())
        if self.verbose:
            for line in lines:
                _transcript(f"<<< {line}")
        return lines[-1]

    def send(self, line: str) -> None:
        if self.verbose:
            _transcript(f">>> {line}")
        self.connection.sendall(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def command(self, line: str) -> str:
        self.send(line)
        return self.expect(self.reply())

    @staticmethod
    def expect(reply: str) -> str:
        if reply[:1] not in ("2", "3"):
            raise SubmissionError(reply)
        return reply


def _transcript(line: str) -> None:
    """One line of the -v transcript: on standard output, as OpenSMTPD's and Sendmail's (`sendmail -v ... >log`
    keeps it; errors stay on standard error). A reader that left (`sendmail -v root | head -1`) ends the
    transcript, not the submission: the rest of it goes nowhere."""
    try:
        print(line, flush=True)
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def open_enqueue(socket_path: str) -> socket.socket:
    import json

    from shared.protocol import encode, request

    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(SMTP_TIMEOUT)
    try:
        connection.connect(socket_path)
    except BlockingIOError:
        # EAGAIN: the daemon is there, but its queue of connections not yet accepted is full (a burst of
        # sendmails): wait like for a busy answer, rather than take it for a daemon that is down (offline).
        connection.close()
        raise Busy("the control socket's backlog is full") from None
    except OSError:
        connection.close()
        raise NotRunning() from None
    send_error: OSError | None = None
    try:
        connection.sendall(encode(request(1, "enqueue")))
    except OSError as error:
        send_error = error  # a daemon that refuses the connection (busy) answers and closes before reading
    # Read the JSON reply byte by byte up to its newline: what follows belongs to the SMTP session.
    answer = bytearray()
    while not answer.endswith(b"\n"):
        try:
            chunk = connection.recv(1)
        except OSError:
            chunk = b""
        if not chunk:
            connection.close()
            if send_error is not None:
                raise send_error
            raise NotRunning()
        answer += chunk
    try:
        reply = json.loads(answer)
        if not isinstance(reply, dict) or not isinstance(reply.get("error") or {}, dict):
            raise ValueError("not an answer of the protocol")
        error = reply.get("error") or {}
    except (ValueError, RecursionError):  # (invalid UTF-8 is a ValueError too)
        connection.close()
        raise Incompatible() from None
    if not reply.get("ok"):
        connection.close()
        message = error.get("message", "enqueue refused")
        if error.get("code") == "busy":
            raise Busy(message)
        if "disallowed" in message:
            raise TemporaryRefusal(DISALLOWED)
        raise SubmissionError(message)
    return connection


def open_enqueue_waiting(socket_path: str, wait: float = BUSY_WAIT) -> socket.socket:
    """open_enqueue, waiting (up to ``wait`` seconds) while the daemon already serves as many connections of
    our uid as it allows: a burst of sendmails from one user (parallel cron jobs, a web application) queues up
    rather than fails."""
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        try:
            return open_enqueue(socket_path)
        except Busy:
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _too_many_recipients(reply: str) -> bool:
    """A temporary refusal of a recipient because the transaction has as many as the server takes (X.5.3)."""
    return reply[:1] == "4" and reply[4:9] == "4.5.3"


def submit(socket_path: str, options: Options, sender: str, recipients: list[str], lines: list[str]) -> None:
    """Raises TemporaryRefusal for a temporary refusal (or a cut session) before any copy was taken, when keeping
    the whole message for later can neither lose nor double a copy; any other failure is a SubmissionError."""
    connection = open_enqueue_waiting(socket_path)
    try:
        _transactions(connection, options, sender, recipients, lines)
    finally:
        connection.close()


def _transactions(connection: socket.socket, options: Options, sender: str, recipients: list[str],
                  lines: list[str]) -> None:
    taken_any = False  # a transaction went through: trying the whole message again would double its copies
    in_doubt = False  # the message is sent and its answer not read: a cut session may have delivered it
    try:
        session = _Connection(connection, options.verbose)
        session.expect(session.reply())
        session.command("EHLO localhost")
        mail = f"MAIL FROM:<{sender}>"
        if not all(address.isascii() for address in (sender, *recipients)):
            mail += " SMTPUTF8"  # (RFC 6531: the daemon takes an address in UTF-8 only so)
        if options.ret:
            mail += f" RET={options.ret}"
        if options.envid:
            mail += f" ENVID={options.envid}"
        payload = "".join(("." + line if line.startswith(".") else line) + "\r\n" for line in lines) + ".\r\n"
        pending = list(recipients)
        while pending:
            # One transaction per as many recipients as the daemon takes in one (`smtp limit max-rcpt`): the
            # one too many is answered `4.5.3 Too many recipients`, and the rest go in the next (RFC 5321 4.5.3.1.10).
            session.command(mail)
            taken = 0
            for recipient in pending:
                session.send(f"RCPT TO:<{recipient}>" + (f" NOTIFY={options.notify}" if options.notify else ""))
                reply = session.reply()
                if taken and _too_many_recipients(reply):
                    break
                session.expect(reply)
                taken += 1
            session.command("DATA")
            if options.verbose:
                _transcript(">>> .")  # (the message itself is not shown, only its end, as OpenSMTPD's -v)
            in_doubt = True
            connection.sendall(payload.encode("utf-8", "surrogateescape"))
            reply = session.reply()
            in_doubt = False
            session.expect(reply)
            taken_any = True
            pending = pending[taken:]
    except SubmissionError as error:
        text = str(error)
        cut = text == CONNECTION_CLOSED and not in_doubt
        if not taken_any and (text[:1] == "4" or cut):
            raise TemporaryRefusal(text) from None
        raise
    session.send("QUIT")
    try:
        session.reply()
    except SubmissionError:
        pass


# -- offline ------------------------------------------------------------------------------------------------

def write_offline(spool: str, argv: list[str], data: bytes) -> str:
    """Keep the message in <spool>/offline/ for the daemon to replay at start. Returns the file's path."""
    directory = os.path.join(spool, OFFLINE_DIRECTORY)
    for argument in argv:
        if "|" in argument:
            raise UsageError(f"{argument} contains illegal character")
    if not os.path.isdir(directory) and os.geteuid() == 0:
        # The daemon never ran here yet: make the folder it will replay (same mode as the queue gives it).
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o1733)
    # Written under a hidden name (the daemon's replay passes over names starting with a dot), then linked to
    # its real name once whole and flushed: a replay never takes a file half written, whether the write failed
    # (a full disk: the file is removed) or was cut short (a crash, or the daemon starting meanwhile).
    old_umask = os.umask(0o077)
    try:
        hidden, fd = _unique_name(directory, ".", lambda path: os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    finally:
        os.umask(old_umask)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write("|".join(argv).encode("utf-8", "surrogateescape") + b"\n")
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        path = _link_offline(directory, hidden)
    finally:
        os.unlink(hidden)
    return path


def _unique_name[T](directory: str, prefix: str, create: Callable[[str], T]) -> tuple[str, T]:
    """Make a new file under a name of its own, ``<prefix><unixtime>.<random>`` (OpenSMTPD's offline names)."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{int(time.time())}.{os.urandom(5).hex()}")
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise OSError("could not create a unique offline file")


def _link_offline(directory: str, hidden: str) -> str:
    """Give the whole file its real name (a link: never over another file); flush the folder where we may."""
    path, _ = _unique_name(directory, "", lambda path: os.link(hidden, path))
    try:
        folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return path  # (a user may not read offline/: the file itself is flushed)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def write_dead_letter(data: bytes) -> None:
    home = os.environ.get("HOME") or _home()
    if not home:
        return
    try:
        with open(os.path.join(home, "dead.letter"), "ab") as handle:
            handle.write(data if data.endswith(b"\n") else data + b"\n")
    except OSError:
        pass


def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return ""


# -- main ---------------------------------------------------------------------------------------------------

_LINE_BREAKS = frozenset("\r\n\0")


def sendmail_main(argv: list[str], prog: str = "sendmail") -> int:
    try:
        options = parse_arguments(argv)
    except UsageError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return EX_USAGE_ERROR
    if options.server_mode and (options.mode in ("s", "p") or options.queue_run):
        # Replaying an offline file (the daemon's child, as the file's owner): sendmail never writes one with
        # -bs, -bp or -q, so a file that says so was put in offline/ by hand. With -bs the child would have
        # spoken SMTP on the daemon's own standard input and output (its log) for up to 300 s, at every start.
        print(f"{prog}: -{'b' + options.mode if options.mode in ('s', 'p') else 'q'} cannot be replayed from an "
              "offline file", file=sys.stderr)
        return _refuse_replay(prog)
    if options.mode is not None and options.mode not in SENDING_MODES + ("s", "p"):
        # -bv (verify), -bt (address test), -bd (daemon), ...: modes of other sendmails that send no message.
        # Ignored, they sent standard input as mail to the addresses given.
        print(f"{prog}: -b{options.mode} is not supported (only -bm, -bs, -bp and -bi are)", file=sys.stderr)
        # (an offline file asking for one, from a sendmail that did not refuse it: refused for good, not kept)
        return _refuse_replay(prog) if options.server_mode else EX_USAGE_ERROR
    if options.mode == "p":
        # `sendmail -bp` is mailq in every sendmail-compatible program: the queue, and no message to read.
        from smtpctl.commands.queue import mailq_main

        return mailq_main([], prog)
    if options.sender is not None and options.sender.startswith("<") and not options.sender.endswith(">"):
        # As OpenSMTPD's: refused at once, not taken as the address `<abc@mailname` (refused by the daemon with
        # 501 online, or kept offline only to be refused at the replay).
        print(f"{prog}: leading < but no trailing >", file=sys.stderr)
        return EX_USAGE_ERROR
    locations = paths.Paths.from_environment()
    if options.queue_run:
        if options.queue_interval[:1].isdigit():
            # (-qf, -qR<site>, -qI<id>, Sendmail's and Postfix's narrower runs, get the whole queue run: more)
            print(f"{prog}: periodic queue runs are not supported: the daemon schedules deliveries itself",
                  file=sys.stderr)
            return EX_SOFTWARE
        return flush_queue(prog, locations.socket)
    if options.mode == "s":
        return smtp_on_stdio(prog, locations.socket)
    try:
        mailname = paths.read_mailname(locations.mailname)
    except paths.MailnameError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EX_SOFTWARE
    try:
        data = read_input()
    except OSError as error:
        print(f"{prog}: cannot read the message: {error.strerror or error}", file=sys.stderr)
        return EX_UNAVAILABLE
    message = parse_message(data)
    sender, full_name = envelope_sender(options, message, mailname)
    recipients = [qualify(address, mailname) for address in options.recipients]
    if options.from_headers:
        recipients += [qualify(address, mailname) for address in recipients_from_headers(message)]
    # One copy per address: a domain is the same whatever its case (`-t root@Example.org` of `To: root@example.org`)
    unique: dict[str, str] = {}
    for recipient in recipients:
        if recipient:
            unique.setdefault(_same_address(recipient), recipient)
    recipients = list(unique.values())
    if not recipients:
        print(f"{prog}: no recipients", file=sys.stderr)
        return EX_SOFTWARE
    broken = next((value for value in (sender, *recipients, options.notify, options.ret, options.envid, full_name)
                   if value is not None and _LINE_BREAKS.intersection(value)), None)
    if broken is not None:
        # Each of these goes into an SMTP command line (or the From: header) as it is: a CR or LF in one, from a
        # script passing on what a web form gave it, would end that line and add commands (another RCPT TO).
        print(f"{prog}: {broken.encode('unicode_escape').decode('ascii')} contains a line break", file=sys.stderr)
        write_dead_letter(data)
        return EX_DATAERR
    lines = complete_message(message, sender, full_name, _written_at() if options.server_mode else None)
    try:
        submit(locations.socket, options, sender, recipients, lines)
    except NotRunning as not_running:
        if isinstance(not_running, Incompatible):
            print(f"{prog}: incompatible smtpd and sendmail: the message is kept offline", file=sys.stderr)
        if options.server_mode:
            print(f"{prog}: smtpd doesn't seem to be running", file=sys.stderr)
            return EX_TEMPFAIL
        return _go_offline(prog, locations.spool, argv, data)
    except TemporaryRefusal as refusal:
        if options.server_mode:
            _say_refused(prog, str(refusal))
            return EX_SOFTWARE  # (the offline file stays for a later try)
        # SMTP paused for maintenance, the daemon stopping, a table it cannot read now: a later try will do, as
        # for a daemon that is down (cron's mail went to ~/dead.letter, never delivered, while SMTP was paused).
        print(f"{prog}: {refusal}: the message is kept offline for a later try", file=sys.stderr)
        return _go_offline(prog, locations.spool, argv, data)
    except SubmissionError as error:
        text = str(error)
        _say_refused(prog, text)
        if options.server_mode:
            # Replaying an offline file: refused for good, it is saved and the daemon removes the file (trying at
            # every start would never succeed); otherwise the file stays for a later try, and so nothing is saved.
            if text[:1] != "5":
                return EX_SOFTWARE
            write_dead_letter(data)
            return EX_NOUSER
        write_dead_letter(data)
        return EX_SOFTWARE
    except OSError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        if not options.server_mode:  # (an offline file being replayed stays for a later try)
            write_dead_letter(data)
        return EX_SOFTWARE
    return 0


def _say_refused(prog: str, text: str) -> None:
    if text == DISALLOWED:
        print(f"{prog}: {text}", file=sys.stderr)
    else:
        print(f"{prog}: command failed: {text}", file=sys.stderr)


def flush_queue(prog: str, socket_path: str) -> int:
    """`sendmail -q`: try every queued message now (`smtpctl schedule all`), what Postfix's, Exim's and Sendmail's
    `sendmail -q` do (a network hook runs it when the link comes up). Quiet when it worked, as theirs; without a
    daemon, exit 69 as Postfix's (OpenSMTPD's exits 70 for any -q, saying nothing)."""
    from smtpctl.client import Client, ControlError, DaemonNotRunning

    try:
        with Client(socket_path) as client:
            client.call("schedule", target="all")
    except DaemonNotRunning:
        print(f"{prog}: smtpd doesn't seem to be running: the queue cannot be run", file=sys.stderr)
        return EX_UNAVAILABLE
    except ControlError as error:
        print(f"{prog}: cannot run the queue: {error.message}", file=sys.stderr)
        return EX_SOFTWARE
    return 0


def _written_at() -> float | None:
    """When an offline file being replayed was written (SMTPD_OFFLINE_WRITTEN, set by the daemon from the file):
    the Date added to a message without one is the time of the submission, not of the replay (cron mail sent
    while the daemon was down said it was sent when the daemon came back)."""
    try:
        return float(os.environ["SMTPD_OFFLINE_WRITTEN"])
    except (KeyError, ValueError):
        return None


def _refuse_replay(prog: str) -> int:
    """An offline file whose arguments sendmail could never have written: refused for good (the daemon then
    removes it, where a temporary failure would keep it, and try it, at every start), its message saved."""
    try:
        write_dead_letter(read_input())
    except OSError:
        pass
    return EX_NOUSER


def smtp_on_stdio(prog: str, socket_path: str) -> int:
    """`sendmail -bs`: an SMTP session on standard input and output, as Postfix's and Sendmail's (what Symfony
    Mailer and Laravel call by default). The caller's dialogue goes to an enqueue session of the daemon and the
    daemon's replies come back: the session `sendmail` itself speaks, with the caller's own MAIL FROM, RCPT TO
    and message. Lines may end with LF alone, as Postfix takes them (see _ClientStream). Without a daemon there
    is no session to offer: a 421 reply, exit 75."""
    import select

    try:
        connection = open_enqueue_waiting(socket_path)
    except NotRunning:
        _write_all(1, b"421 4.3.0 mail system not running, try again later\r\n")
        print(f"{prog}: smtpd doesn't seem to be running", file=sys.stderr)
        return EX_TEMPFAIL
    except SubmissionError as error:
        _write_all(1, b"421 4.3.0 submission refused, try again later\r\n")
        print(f"{prog}: {error}", file=sys.stderr)
        return EX_TEMPFAIL
    with connection:
        connection.settimeout(None)  # (the daemon's session times an idle caller out)
        readers = [0, connection.fileno()]
        stream = _ClientStream()
        try:
            while True:
                ready, _, _ = select.select(readers, [], [])
                if connection.fileno() in ready:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return 0  # the daemon ended the session (QUIT, timeout)
                    _write_all(1, chunk)
                if 0 in ready:
                    chunk = os.read(0, 65536)
                    if chunk:
                        connection.sendall(stream.feed(chunk))
                        continue
                    # The caller is done writing. The daemon takes a closed connection for a client that is gone
                    # (what it left unanswered is dropped): end the session with a QUIT instead, so that all it
                    # sent is answered; but never in the middle of a message (it must not go out cut short).
                    readers = [connection.fileno()]
                    if stream.in_message():
                        _pass_on_replies(connection)
                        print(f"{prog}: the input ended after DATA without the closing dot: no message is sent", file=sys.stderr)
                        return EX_SOFTWARE
                    connection.sendall(stream.feed(b"\n") if stream.pending else b"")
                    connection.sendall(b"QUIT\r\n")
        except BrokenPipeError:
            return 0  # the caller stopped reading (it had what it wanted, or it gave up)
        except OSError as error:
            print(f"{prog}: {error}", file=sys.stderr)
            return EX_SOFTWARE


def _pass_on_replies(connection: socket.socket, wait: float = 10.0) -> None:
    """The caller's input ended in a message: end our side (the daemon drops a message whose client is gone, never
    takes it cut short) and pass on what the daemon said to the commands before, up to its end of the session."""
    try:
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(wait)
        while chunk := connection.recv(65536):
            _write_all(1, chunk)
    except OSError:  # (a timeout, a reset, or the caller gone from our standard output)
        pass


class _ClientStream:
    """What the caller of `sendmail -bs` writes, passed on with every line ended by CRLF (a caller's bare LF
    would leave a command unanswered and a message without its end: the daemon takes only CRLF), except the
    bytes of a BDAT chunk, which go as they are. It also tells whether the caller is in the middle of a message."""

    def __init__(self) -> None:
        self.pending = b""
        self.in_data = False  # after DATA, before the lone dot
        self.chunk_left = 0  # bytes of a BDAT chunk still to come

    def in_message(self) -> bool:
        return self.in_data or self.chunk_left > 0

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        out = bytearray()
        while self.pending:
            if self.chunk_left:
                taken = self.pending[: self.chunk_left]
                out += taken
                self.chunk_left -= len(taken)
                self.pending = self.pending[len(taken):]
                continue
            line, newline, rest = self.pending.partition(b"\n")
            if not newline:
                break
            self.pending = rest
            line = line.removesuffix(b"\r")
            out += line + b"\r\n"
            if self.in_data:
                self.in_data = line != b"."
                continue
            words = line.split()
            verb = words[0].upper() if words else b""
            if verb == b"DATA" and len(words) == 1:
                self.in_data = True
            elif verb == b"BDAT" and len(words) >= 2 and words[1].isdigit():
                self.chunk_left = int(words[1])
        return bytes(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_input() -> bytes:
    """The message on standard input. A caller that started us with standard input closed leaves Python no
    sys.stdin at all: that is a read error (EBADF), as OpenSMTPD's `sendmail: getline: Bad file descriptor`."""
    if sys.stdin is None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return sys.stdin.buffer.read()


def _go_offline(prog: str, spool: str, argv: list[str], data: bytes) -> int:
    try:
        write_offline(spool, argv, data)
    except UsageError as error:
        # (OpenSMTPD 6.8 exits EX_SOFTWARE for this one; cron and scripts see the same status)
        print(f"{prog}: {error}", file=sys.stderr)
        return EX_SOFTWARE
    except OSError as error:
        directory = os.path.join(spool, "offline")
        print(f"{prog}: cannot write the offline queue {directory}: {error.strerror or error}", file=sys.stderr)
        write_dead_letter(data)
        return EX_SOFTWARE
    return EX_TEMPFAIL
