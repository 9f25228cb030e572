"""Running a delivery command: `mda "..."` actions, `|command` items, and wrappers.

How an `mda "CMD"` string is honoured without envelope data ever reaching a shell: the configured string is split
into words first (shell quoting rules, `shlex.split`), and only then are the `%{...}` specifiers expanded inside
each word. The result is an argv that is executed directly. A command line that uses the shell's syntax
(`spamc | procmail`, `cat > file`: OpenSMTPD runs every mda command through `/bin/sh -c`) runs in a shell, with
each specifier turned into a positional parameter whose value is an argument of sh (shell_argv): the envelope
data reaches the program only as whole arguments and as environment variables, never as shell text.

`|command` items come from the alias table (written by the administrator) or from a user's own `.forward`:
their text is a shell command by definition, so it runs as `/bin/sh -c TEXT` — TEXT holds no envelope data, which
the command finds in its environment ($SENDER, $RECIPIENT, ...).

The environment is exactly the reference's: PATH, DOMAIN, HOME, RECIPIENT, SHELL, LOCAL, LOGNAME, USER, SENDER,
and EXTENSION when the recipient had a sub-address. The message (with Return-Path and Delivered-To prepended) is
the command's standard input; its output is captured and its last line becomes the error text.

Exit status: 0 delivered; 71 (EX_OSERR) or 75 (EX_TEMPFAIL) temporary; any other status permanent; killed by a
signal or the 300 s limit: temporary.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shlex
import signal
import stat
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from smtpd import trace
from smtpd.mda.privilege import CHILD_TIMEOUT, Identity, privileged
from smtpd.mda.variables import VariableContext, VariableError, expand

DEFAULT_PATH = "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin"
TEMPFAIL_STATUSES = frozenset({71, 75})
FEED_CHUNK = 1 << 16


@dataclass(frozen=True)
class CommandOutcome:
    status: int | None  # exit status; None when killed
    signal: int | None
    timed_out: bool
    last_line: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def temporary(self) -> bool:
        return self.status is None or self.status in TEMPFAIL_STATUSES

    def error_text(self) -> str:
        if self.timed_out:
            return "terminated; timeout"
        if self.signal is not None:
            return f"terminated; signal {self.signal}"
        if self.last_line:
            return '"' + vis(self.last_line) + '"'
        return f"exited with status {self.status}"


def vis(text: str) -> str:
    """Make output printable in one line: control characters and backslashes are escaped."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable() or char == " ":
            out.append(char)
        else:
            out.append(f"\\{ord(char):03o}")
    return "".join(out)


def delivery_environment(identity: Identity, sender: str, rcpt: str, dest: str, extension: str) -> dict[str, str]:
    rcpt_user, _, rcpt_domain = rcpt.rpartition("@")
    environment = {
        "PATH": DEFAULT_PATH,
        "DOMAIN": rcpt_domain,
        "HOME": identity.home or "/",
        "RECIPIENT": dest,
        "SHELL": "/bin/sh",
        "LOCAL": rcpt_user,
        "LOGNAME": identity.username,
        "USER": identity.username,
        "SENDER": sender,
    }
    if extension:
        environment["EXTENSION"] = extension
    return environment


# Outside quotes these make a command line a shell program (a pipeline, a redirection, a list, a substitution);
# inside double quotes, ` and $ still do.
_SHELL_OPERATORS = frozenset("|&;<>()`$")
_DOUBLE_QUOTED_OPERATORS = frozenset("`$")


# A command line starting with one of these, or with a variable assignment, is shell text though it has no
# operator (`exit 75`, `umask 077`, `LC_ALL=C procmail`): no program of that name is run.
_SHELL_FIRST_WORDS = frozenset({
    ":", ".", "break", "continue", "eval", "exec", "exit", "export", "readonly", "return", "set", "shift",
    "times", "trap", "unset", "cd", "umask", "ulimit", "alias", "unalias", "wait", "read", "command", "type",
    "hash", "getopts", "if", "case", "for", "while", "until", "{", "!", "function", "select"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def needs_shell(template: str) -> bool:
    """Whether the configured command uses the shell's syntax (`spamc | procmail`, `cat > file`, `exit 75`),
    outside of what shlex.split alone honours (words, quotes, backslashes)."""
    first_word = template.split(maxsplit=1)[0] if template.strip() else ""
    if first_word in _SHELL_FIRST_WORDS or _ASSIGNMENT.match(first_word):
        return True
    quote = ""
    escaped = False
    for char in template:
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = ""
            elif quote == '"' and char in _DOUBLE_QUOTED_OPERATORS:
                return True
        elif char in "'\"":
            quote = char
        elif char in _SHELL_OPERATORS:
            return True
    return False


def shell_argv(template: str, context: VariableContext, wrapped: list[str] | None = None,
               offset: int = 0) -> list[str]:
    """`/bin/sh -c SCRIPT sh VALUE...`: the command line as the administrator wrote it runs in a shell (as
    OpenSMTPD runs every mda command), but each %{...} in it becomes a reference to a positional parameter
    ("${1}", ...) whose value is passed as an argument of sh: the envelope data is never read as shell text.

    wrapped: for a wrapper, the wrapped command's argv; `%{mda}` is then that command: outside quotes (`exec
    %{mda}`, `sed ... | %{mda}`) its words are positional parameters as well; inside quotes, where it must be
    one string for a shell within (`sh -c '%{mda}'`), its words are written quoted by shlex.

    offset: how many positional parameters the script has already (its own arguments after `sh -c SCRIPT
    NAME`): the values are numbered after them."""
    values: list[str] = []
    script: list[str] = []
    quote = ""
    escaped = False
    position = 0
    while position < len(template):
        char = template[position]
        if escaped:
            escaped = False
        elif char == "%" and template.startswith("%%", position):
            script.append("%")
            position += 2
            continue
        elif char == "%" and template.startswith("%{", position):
            end = template.find("}", position)
            if end < 0:
                raise VariableError(f"unterminated format specifier in {template!r}")
            specifier = template[position:end + 1]
            if wrapped is not None and specifier.lower() in ("%{mda}", "%{mda:raw}"):
                if quote:  # one string for a shell inside (`sh -c '%{mda}'`): shlex-quoted words, as data
                    script.append(_quoted_for(quote, shlex.join(wrapped)))
                else:  # (the usual `exec %{mda}`) the wrapped argv as positional parameters too
                    first = offset + len(values) + 1
                    values.extend(wrapped)
                    script.append(" ".join(f'"${{{number}}}"' for number in range(first, offset + len(values) + 1)))
                position = end + 1
                continue
            values.append(expand(specifier, context))
            reference = f"${{{offset + len(values)}}}"
            script.append({"": f'"{reference}"', '"': reference, "'": f"'\"{reference}\"'"}[quote])
            position = end + 1
            continue
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote and char == quote:
            quote = ""
        elif not quote and char in "'\"":
            quote = char
        script.append(char)
        position += 1
    if quote:
        raise VariableError(f"mda command line could not be split: no closing quotation in {template!r}")
    return ["/bin/sh", "-c", "".join(script), "sh", *values]


def _quoted_for(quote: str, text: str) -> str:
    """Shell text that reads as ``text`` where it stands: unquoted, inside '...' or inside "..."."""
    if quote == "'":
        return text.replace("'", "'\\''")
    if quote == '"':
        return "".join("\\" + char if char in '\\"$`' else char for char in text)
    return text


# Programs whose `-c SCRIPT` argument is shell text.
_SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "posh", "yash"})


def _shell_script_index(words: list[str]) -> int | None:
    """The index of the script in `sh [options] -c SCRIPT [NAME [ARG...]]`, else None."""
    if os.path.basename(words[0]) not in _SHELLS:
        return None
    index = 1
    while index < len(words):
        word = words[index]
        if word in ("-o", "+o"):  # takes an option name
            index += 2
            continue
        if len(word) < 2 or word[0] not in "-+" or word == "--":
            return None  # a script file, not -c
        if word.startswith("--"):  # bash's long options (--norc, --login)
            index += 1
            continue
        if word[0] == "-" and "c" in word[1:]:
            return index + 1 if index + 1 < len(words) else None
        index += 1
    return None


def _with_shell_script(words: list[str], context: VariableContext,
                       wrapped: list[str] | None = None) -> list[str] | None:
    """`sh -c '... %{rcpt.user} ...'`, the script written as one quoted word: it is shell text, so its specifiers
    become positional parameters (shell_argv), never text pasted into it. None when the words are no such command
    (or its script holds no specifier)."""
    index = _shell_script_index(words)
    if index is None or "%{" not in words[index]:
        return None
    arguments = [expand(word, context) for word in words[index + 1:]]  # the script's $0, $1, ...: data already
    converted = shell_argv(words[index], context, wrapped, offset=max(len(arguments) - 1, 0))
    script, values = converted[2], converted[4:]
    head = [expand(word, context) for word in words[:index]]
    return [*head, script, *(arguments or ["sh"]), *values]


def command_argv(template: str, context: VariableContext) -> list[str]:
    """Split the configured command into words, then expand %{...} inside each word; a command line that uses
    the shell's syntax runs in a shell instead (shell_argv), and so does the script of a written-out
    `sh -c '...'`. Raises VariableError."""
    if needs_shell(template):
        return shell_argv(template, context)
    try:
        words = shlex.split(template)
    except ValueError as error:
        raise VariableError(f"mda command line could not be split: {error}") from None
    if not words:
        raise VariableError("empty mda command")
    scripted = _with_shell_script(words, context)
    if scripted is not None:
        return scripted
    return [expand(word, context) for word in words]


def wrap_argv(wrapper: str, wrapped: list[str], context: VariableContext) -> list[str]:
    """The wrapper's words with %{mda}: a word that is exactly %{mda} is replaced by the wrapped argv,
    elsewhere %{mda} stands for the wrapped command quoted as one shell string. A wrapper written with the
    shell's syntax (`ulimit -t 60; exec %{mda}`, `sed ... | %{mda}`) runs in a shell, as OpenSMTPD runs every
    wrapper, with the envelope data passed as positional parameters (shell_argv)."""
    joined = shlex.join(wrapped)
    with_mda = VariableContext(context.sender, context.rcpt, context.dest, context.username, context.directory,
                               joined, context.delimiter)
    if needs_shell(wrapper):
        return shell_argv(wrapper, with_mda, wrapped)
    try:
        words = shlex.split(wrapper)
    except ValueError as error:
        raise VariableError(f"mda wrapper could not be split: {error}") from None
    if not words:
        raise VariableError("empty mda wrapper")
    scripted = _with_shell_script(words, with_mda, wrapped)
    if scripted is not None:
        return scripted
    argv: list[str] = []
    for word in words:
        if word.strip() in ("%{mda}", "%{mda:raw}"):
            argv.extend(wrapped)
        else:
            argv.append(expand(word, with_mda))
    return argv


def _working_directory(home: str) -> str:
    """The home when it is a folder, or when root may not even look (the user enters it: see run_command); else /."""
    if not home:
        return "/"
    try:
        return home if stat.S_ISDIR(os.stat(home).st_mode) else "/"
    except PermissionError:
        return home
    except OSError:
        return "/"


# Run as the user: change into the home ($1), or to / when the user cannot; then the command.
_CHANGE_DIRECTORY = 'cd -- "$1" 2>/dev/null || cd /; shift; exec "$@"'
_TEMPORARY_SPAWN_ERRORS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ETXTBSY,
                                     errno.EIO, errno.EINTR})


async def run_command(argv: list[str], identity: Identity, environment: dict[str, str], prefix: bytes,
                      message: BinaryIO, timeout: float = CHILD_TIMEOUT,
                      stdout: BinaryIO | None = None) -> CommandOutcome:
    """Run argv as identity (when we are root) with the message on stdin.

    stdout: a file (opened by the daemon) that receives the command's standard output, for filters such as the
    wrappers of mbox and maildir actions; by default stdout and stderr both go to the captured error output.
    """
    switch: dict[str, object] = {}
    if privileged():
        switch = {"user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}
    cwd = _working_directory(identity.home)
    with tempfile.TemporaryFile() as output:

        def start(command: list[str], directory: str) -> Any:
            return asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=output if stdout is None else stdout, stderr=output,
                env=environment, cwd=directory, start_new_session=True, close_fds=True, **switch)

        try:
            try:
                process = await start(argv, cwd)
            except OSError as error:
                if error.filename != cwd or cwd == "/":
                    raise
                # The directory change happens before the switch to the user, as root: a home root may not enter
                # (NFS with root_squash) made every command fail for good, said as "<program>: Permission
                # denied". The user changes into it, or to / when it cannot either (as OpenSMTPD falls back).
                process = await start(["/bin/sh", "-c", _CHANGE_DIRECTORY, "sh", cwd, *argv], "/")
        except OSError as error:
            # A program that cannot run (missing, not executable) fails for good; a lack of resources (no process
            # or memory left, too many open files) is temporary: the mail must wait, not bounce.
            status = 75 if error.errno in _TEMPORARY_SPAWN_ERRORS else 127
            return CommandOutcome(status, None, False, f"{argv[0]}: {error.strerror}")
        uid = identity.uid if privileged() else os.getuid()
        trace.emit("mproc", f"mda command {argv[0]} started, pid {process.pid}, uid {uid}", pid=process.pid, uid=uid,
                   command=argv[0], **trace.bound())
        timed_out = False
        try:
            await asyncio.wait_for(_feed_and_wait(process, prefix, message), timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(process.pid)
            await process.wait()
        except asyncio.CancelledError:
            # The daemon is stopping: the delivery is tried again at the next start, so nothing of this one may
            # go on (asyncio kills only the command itself; what it started would live on and might deliver).
            _kill_group(process.pid)
            raise
        output.seek(0)
        last_line = _last_line(output)
    code = process.returncode
    trace.emit("mproc", f"mda command pid {process.pid} exited with status {code}{' (timed out)' if timed_out else ''}",
               pid=process.pid, status=code, timed_out=timed_out, **trace.bound())
    if code is not None and code < 0:
        return CommandOutcome(None, -code, timed_out, last_line)
    return CommandOutcome(None if timed_out else code, None, timed_out, last_line)


async def _feed_and_wait(process: asyncio.subprocess.Process, prefix: bytes, message: BinaryIO) -> None:
    assert process.stdin is not None
    try:
        process.stdin.write(prefix)
        while block := await asyncio.to_thread(message.read, FEED_CHUNK):
            process.stdin.write(block)
            await process.stdin.drain()
        process.stdin.close()
        await process.stdin.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read all of its input; its exit status decides
    await process.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(output: BinaryIO) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - 4096))
    tail = output.read().decode("utf-8", "replace")
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
