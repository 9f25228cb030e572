"""Every reply the SMTP server sends, in one place (reference §7.3, §7.4).

The texts are OpenSMTPD 6.8's, with our identity ("PySMTPD") where it says "OpenSMTPD". A reply is a code
and a text that already holds the enhanced status code when the reference has one. Replies that take a value
are functions. Replies marked "ours" do not exist in OpenSMTPD: they cover what we do beyond it (PIPELINING,
BDAT, limits, bare line endings).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

IDENTITY = "PySMTPD"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def wire(self) -> bytes:
        """The reply on the wire: `CODE-line` for all but the last line, `CODE line` for the last, CRLF each."""
        return self._wire

    @functools.cached_property
    def _wire(self) -> bytes:
        # Most replies are module constants sent for every message: rendered once (a cache in the instance's
        # dict, not a field: equality and hash ignore it).
        parts = self.lines
        out = [f"{self.code}-{line}" for line in parts[:-1]]
        out.append(f"{self.code} {parts[-1]}" if parts[-1] or len(parts) == 1 else f"{self.code} ")
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return "\n".join(f"{self.code}{'-' if index < len(self.lines) - 1 else ' '}{line}"
                         for index, line in enumerate(self.lines))

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def failed(self) -> bool:
        return self.code >= 400


# -- greeting and identification -----------------------------------------------------------------------
def banner(smtpname: str) -> Reply:
    return Reply(220, f"{smtpname} ESMTP {IDENTITY}")


def hello(smtpname: str, helo: str, client: str) -> str:
    """The first line of the HELO/EHLO reply; ``client`` is the IP text, "::1" style, or "local"."""
    return f"{smtpname} Hello {helo} [{client}], pleased to meet you"


def helo_ok(smtpname: str, helo: str, client: str) -> Reply:
    return Reply(250, hello(smtpname, helo, client))


def ehlo_ok(smtpname: str, helo: str, client: str, extensions: list[str]) -> Reply:
    return Reply(250, "\n".join([hello(smtpname, helo, client), *extensions]))


ALREADY_IDENTIFIED = Reply(503, "5.5.1 Invalid command: Already identified")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.1 Invalid command: HELO requires domain name")
EHLO_NEEDS_DOMAIN = Reply(501, "5.5.1 Invalid command: EHLO requires domain name")
BAD_HELO_DOMAIN = Reply(501, "5.5.4 Invalid command arguments: Invalid domain name")

# -- generic ----------------------------------------------------------------------------------------------
BAD_SEQUENCE = Reply(503, "5.5.1 Invalid command: Command not allowed at this point.")
UNKNOWN_COMMAND = Reply(500, "5.5.1 Invalid command: Command unrecognized")
NO_ARGUMENTS = Reply(500, "5.5.4 Invalid command arguments: command does not accept arguments.")
NOOP_OK = Reply(250, "2.0.0 Ok")
RSET_OK = Reply(250, "2.0.0 Reset state")
QUIT_OK = Reply(221, "2.0.0 Bye")
HELP = Reply(214, "\n".join([
    f"2.0.0 This is {IDENTITY}",
    # (OpenSMTPD names its own bug address here: reports about us must not go to OpenBSD)
    f"2.0.0 To report bugs in the implementation, please open an issue with the {IDENTITY} project",
    "2.0.0 with full details",
    "2.0.0 End of HELP info",
]))
WIZ = Reply(500, "5.5.1 Invalid command: this feature is not supported yet ;-)")
LINE_TOO_LONG = Reply(500, "5.0.0 Line too long")
COMMAND_TOO_LONG = Reply(500, "5.0.0 Command line too long")
# ours: a command line must end with CRLF (a bare LF never ends a command, so it cannot start one either).
BARE_LF_COMMAND = Reply(500, "5.5.2 Syntax error: command line must end with CRLF")

# -- STARTTLS ----------------------------------------------------------------------------------------------
STARTTLS_OK = Reply(220, "2.0.0 Ready to start TLS")
NOT_SUPPORTED = Reply(503, "5.5.1 Invalid command: Command not supported")
ALREADY_SECURE = Reply(503, "5.5.1 Invalid command: Channel already secured")
NO_PARAMETERS_ALLOWED = Reply(501, "5.5.4 Invalid command arguments: No parameters allowed")

# -- MAIL --------------------------------------------------------------------------------------------------
MUST_STARTTLS = Reply(530, "5.5.1 Invalid command: Must issue a STARTTLS command first")
MUST_AUTH = Reply(530, "5.5.1 Invalid command: Must issue an AUTH command first")
TOO_MANY_MAILS = Reply(452, "4.5.3 Too many recipients: Too many messages sent")
SENDER_SYNTAX = Reply(553, "5.1.0 Sender address syntax error")
MAIL_OK = Reply(250, "2.0.0 Ok")


def unsupported_option(parameter: str) -> Reply:
    return Reply(503, f"5.5.4 Invalid command arguments: Unsupported option {parameter}")


def envid_too_large(value: str) -> Reply:
    return Reply(503, f"5.5.4 Invalid command arguments: option too large, truncated: {value}")


SENDER_REJECTED = Reply(530, "Sender rejected")
TEMPORARY_ERROR = Reply(421, "4.3.0 Temporary Error")

# -- RCPT --------------------------------------------------------------------------------------------------
TOO_MANY_RCPTS = Reply(451, "4.5.3 Too many recipients: Too many recipients")
RECIPIENT_SYNTAX = Reply(501, "5.1.3 Recipient address syntax error")
NOTIFY_NEVER_COMBINED = Reply(553, "NOTIFY option NEVER cannot be combined with other options")
ORCPT_SYNTAX = Reply(553, "ORCPT address syntax error")


def unsupported_rcpt_option(parameter: str) -> Reply:
    return Reply(503, f"Unsupported option {parameter}")


RCPT_OK = Reply(250, "2.1.5 Destination address valid: Recipient ok")


def rcpt_refused(code: int, text: str, rcpt: str) -> Reply:
    """A refusal from the rules or the expansion (§7.4): `<text>: <user@domain>`."""
    return Reply(code, f"{text}: <{rcpt}>")


INVALID_RECIPIENT = (550, "Invalid recipient")
TEMPORARY_FAILURE = (451, "Temporary failure")

# -- DATA / BDAT ---------------------------------------------------------------------------------------------
NO_RECIPIENT = Reply(503, "5.5.4 Invalid command arguments: No recipient specified")
DATA_OK = Reply(354, 'Enter mail, end with "." on a line by itself')


def message_accepted(msgid: str) -> Reply:
    return Reply(250, f"2.0.0 {msgid} Message accepted for delivery")


TOO_BIG = Reply(554, "5.3.4 Message too big for system: Transaction failed, message too big")
LOOP_DETECTED = Reply(500, "5.4.6 Routing loop detected: Loop detected")
MALFORMED = Reply(550, "5.7.1 Delivery not authorized, message refused: Message is not RFC 2822 compliant")
# ours: the SMTP-smuggling defence (docs/smtp.md): a message with a bare CR or a bare LF is refused whole.
BARE_LINE_ENDING = Reply(550, "5.6.0 Message refused: it contains a bare CR or LF (lines must end with CRLF)")
TEMPORARY_FAILURE_CLOSE = Reply(421, "4.3.0 Temporary failure")
# A filter process that could not judge (exited, timed out, answered garbage): nothing passes unfiltered.
FILTER_FAILED = Reply(451, "4.3.0 Temporary failure")
INTERNAL_ERROR = Reply(421, "Internal server error")


def bdat_ok(size: int) -> Reply:
    """ours: one BDAT chunk (not the last) received."""
    return Reply(250, f"2.0.0 {size} octets received")


BDAT_SYNTAX = Reply(501, "5.5.4 Invalid command arguments: BDAT chunk-size [LAST]")
# ours: DATA after BDAT in one transaction (RFC 3030 §3).
DATA_AFTER_BDAT = Reply(503, "5.5.1 Invalid command: DATA not allowed after BDAT")

# -- AUTH --------------------------------------------------------------------------------------------------
ALREADY_AUTHENTICATED = Reply(503, "5.5.1 Invalid command: Already authenticated")
AUTH_NO_PARAMETERS = Reply(501, "5.5.4 Invalid command arguments: No parameters given")


def auth_method_unsupported(mechanism: str) -> Reply:
    return Reply(504, f'5.7.4 Security features not supported: AUTH method "{mechanism}" not supported')


AUTH_CONTINUE_EMPTY = Reply(334, "")
AUTH_USERNAME_PROMPT = Reply(334, "VXNlcm5hbWU6")
AUTH_PASSWORD_PROMPT = Reply(334, "UGFzc3dvcmQ6")
AUTH_SYNTAX = Reply(501, "5.5.2 Syntax error: Syntax error")
AUTH_OK = Reply(235, "2.0.0 Authentication succeeded")
AUTH_FAILED = Reply(535, "Authentication failed")
AUTH_TEMPFAIL = Reply(421, "4.3.0 Temporary failure")

# -- limits (ours) ----------------------------------------------------------------------------------------------
def too_many_sessions(smtpname: str) -> Reply:
    return Reply(421, f"4.7.0 {smtpname} Too many connections, try again later")


def too_many_errors(smtpname: str) -> Reply:
    return Reply(421, f"4.7.0 {smtpname} Too many errors, closing connection")


def too_many_auth_failures(smtpname: str) -> Reply:
    return Reply(421, f"4.7.0 {smtpname} Too many authentication failures, closing connection")


def shutting_down(smtpname: str) -> Reply:
    return Reply(421, f"4.3.2 {smtpname} Service shutting down, closing connection")


def local_enqueue_paused() -> Reply:
    return Reply(421, "4.3.2 Service temporarily paused")
