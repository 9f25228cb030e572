"""The SMTP server end to end: real daemon, real clients (smtplib, swaks, openssl s_client), real spool files."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import select
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_smtp import MAILNAME, ROOT, LineClient, SmtpDaemon, make_certificate, server_end
from waiting import wait_until

PASSWORD = "s3cret pass"

CONFIG = """
pki mx.test.example cert "{dir}/mx.test.example.crt"
pki mx.test.example key "{dir}/mx.test.example.key"
pki other.test cert "{dir}/other.test.crt"
pki other.test key "{dir}/other.test.key"
pki "*" cert "{dir}/other.test.crt"
pki "*" key "{dir}/other.test.key"
ca clientca cert "{dir}/client.test.crt"
table creds { alice = "HASH", vacation = "HASH" }
table sendermap { alice = "alice@example.org", vacation = "@" }
listen on 127.0.0.1 port {port} tls pki mx.test.example
listen on ::1 port {port}
listen on 127.0.0.1 port {port2} tls-require pki mx.test.example auth <creds> received-auth senders <sendermap> masquerade tag SUBMIT
listen on 127.0.0.1 port {port3} smtps pki mx.test.example
listen on 127.0.0.1 port {port4} tls-require verify pki mx.test.example ca clientca
listen on 127.0.0.1 port {port5} proxy-v2
listen on 127.0.0.1 port {port6} mask-src
listen on 127.0.0.1 port {port7} tls pki mx.test.example auth-optional
listen on 127.0.0.1 port {port8} smtps proxy-v2 pki mx.test.example
listen on 127.0.0.1 port {port9} tls pki mx.test.example ca clientca
action "local" mbox
action "relay" relay
match from any for domain "example.org" action "local"
match from any for local action "local"
match auth from any for any action "relay"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    from shared.passwords import hash_password

    folder = tmp_path_factory.mktemp("session")
    for name in ("mx.test.example", "other.test", "client.test"):
        make_certificate(folder, name)
    server = SmtpDaemon(folder, CONFIG.replace("HASH", hash_password(PASSWORD, "sha512")), traces=("smtp", "rules"))
    server.start()
    for port in server.ports.values():
        server.wait_listening(port)
    yield server
    server.stop()


def accepted_msgid(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert code == 250, reply
    match = re.match(rb"2\.0\.0 ([0-9a-f]{8}) Message accepted for delivery", text)
    assert match, reply
    return match.group(1).decode()


def send_data(client: smtplib.SMTP, body: bytes) -> str:
    """DATA through smtplib, returning the msgid of the 250 reply."""
    return accepted_msgid(client.data(body))


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- the connection ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("host", "port_name"), [("127.0.0.1", "port"), ("::1", "port"), ("127.0.0.1", "port3")],
                         ids=["ipv4", "ipv6", "smtps"])
def test_client_sockets_send_replies_without_nagle_delay(daemon: SmtpDaemon, host: str, port_name: str) -> None:
    # With Nagle's algorithm a reply written while the one before it is unacknowledged waits for the client's
    # delayed ACK: 40 ms for every pipelined transaction. The daemon's end of the connection must have it off.
    with socket.create_connection((host, daemon.ports[port_name]), timeout=30) as client:
        reader = insecure_context().wrap_socket(client, server_hostname=MAILNAME) if port_name == "port3" else client
        assert reader.recv(512).startswith(b"220 ")  # the daemon has accepted the connection
        with server_end(daemon.process.pid, reader) as ours:
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# -- the stored message ------------------------------------------------------------------------------------------
def test_stored_message_has_received_header_and_lf_endings(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"Subject: hello\r\nTo: root, Bob <bob>\r\nBcc: secret@example.org\r\n\r\n"
                                  b"line one\r\n.starts with a dot\r\n")  # smtplib stuffs it
    stored = daemon.message(msgid).decode()
    received, rest = stored.split("\n\t", 1)[0], stored
    assert received == "Received: from client.test (localhost [127.0.0.1])"
    assert rest.startswith("Received: from client.test (localhost [127.0.0.1])\n\tby mx.test.example (PySMTPD) "
                           f"with ESMTP id {msgid}\n\tfor <root@example.org>;\n\t")
    assert "\r" not in stored
    assert "Bcc:" not in stored and "secret@example.org" not in stored
    assert "To: root@mx.test.example, Bob <bob@mx.test.example>\n" in stored
    assert re.search(r"^Date: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(.+\)$", stored, re.M)
    assert re.search(rf"^Message-ID: <[0-9a-f]{{16}}@{MAILNAME}>$", stored, re.M)
    assert stored.endswith("\nline one\n.starts with a dot\n")


def test_dot_lines_found_after_many_dots_inside_lines(daemon: SmtpDaemon) -> None:
    # More dots inside lines than the dot-to-dot scan looks at, so the stuffed lines and the end marker are
    # found by the fallback search too; the body is sent in pieces that cut lines and the "\r\n." apart.
    prose = b"Mr. Smith wrote: e.g. this, i.e. that. See www.example.org. Done.\r\n" * 40
    body = b"Subject: dots\r\n\r\n" + prose + b"..stuffed\r\n" + prose + b"...\r\n.\r\n"
    client = LineClient(daemon.port)
    try:
        assert client.reply()[0].startswith("220")
        for command, code in ((b"EHLO client.test", "250"), (b"MAIL FROM:<a@sender.test>", "250"),
                              (b"RCPT TO:<root@example.org>", "250"), (b"DATA", "354")):
            client.send(command + b"\r\n")
            assert client.reply()[-1].startswith(code)
        for start in range(0, len(body), 997):
            client.send(body[start:start + 997])
        reply = client.reply()[-1]
    finally:
        client.close()
    msgid = accepted_msgid((int(reply[:3]), reply[4:].encode()))
    expected = (prose + b".stuffed\r\n" + prose + b"..\r\n").replace(b"\r\n", b"\n")
    headers, _, stored_body = daemon.message(msgid).partition(b"\n\n")
    assert b"\nSubject: dots\n" in headers + b"\n" and stored_body == expected


def test_dsn_parameters_kept_per_recipient(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test", ["RET=HDRS", "ENVID=env42"])
        client.rcpt("root@example.org", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;boss@example.org"])
        assert client.rcpt("daemon@example.org", ["NOTIFY=NEVER"])[0] == 250
        msgid = send_data(client, b"Subject: dsn\r\n\r\nbody\r\n")
    envelopes = "\n----\n".join(daemon.envelopes(msgid))
    assert "dsn-ret: HDRS" in envelopes and "dsn-envid: env42" in envelopes
    assert "dsn-orcpt: boss@example.org" in envelopes
    assert "dsn-notify: 5" in envelopes  # SUCCESS | DELAY
    assert "dsn-notify: 8" in envelopes  # NEVER
    assert "sockaddr: 127.0.0.1" in envelopes and "helo: client.test" in envelopes


def test_ipv6_client_is_printed_in_one_pair_of_brackets(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP("::1", daemon.port) as client:
        code, text = client.ehlo("six.test")
        assert text.split(b"\n")[0] == b"mx.test.example Hello six.test [::1], pleased to meet you"
        client.mail("alice@sender.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"Subject: v6\r\n\r\nbody\r\n")
    assert daemon.message(msgid).decode().startswith("Received: from six.test (localhost [::1])\n") or \
        re.match(r"Received: from six\.test \(\S+ \[::1\]\)\n", daemon.message(msgid).decode())


def test_swaks_sends_a_message(daemon: SmtpDaemon) -> None:
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{daemon.port}", "--from", "alice@sender.test",
                             "--to", "root@example.org", "--helo", "swaks.test", "--body", "from swaks"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    msgid = re.search(r"<.\s+250 2\.0\.0 ([0-9a-f]{8}) Message accepted for delivery", result.stdout).group(1)
    assert "from swaks" in daemon.message(msgid).decode()


def test_accepted_message_is_logged_as_the_reference_says(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.ehlo("logged.test")
        client.mail("alice@sender.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"Subject: logged\r\n\r\nbody\r\n")
    message_line = wait_until(lambda: re.search(
        rf"^([0-9a-f]{{16}}) smtp message msgid={msgid} size=(\d+) nrcpt=1 proto=ESMTP$", daemon.log(), re.M),
        explain=daemon.log)
    token = message_line.group(1)
    assert f"\n{token} smtp connected address=127.0.0.1 host=localhost\n" in daemon.log()  # no level word: OpenSMTPD's
    assert int(message_line.group(2)) == len(b"Subject: logged\n\nbody\n")  # the client's text, LF line ends
    assert re.search(rf"^{token} smtp envelope evpid={msgid}[0-9a-f]{{8}} from=<alice@sender.test> "
                     rf"to=<root@example.org>$", daemon.log(), re.M), daemon.log()


def test_swaks_pipelining_gets_every_reply_in_order(daemon: SmtpDaemon) -> None:
    # swaks sends MAIL, both RCPTs and DATA as one group (RFC 2920) and reads the four replies after it.
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{daemon.port}", "--pipeline", "--from",
                             "alice@sender.test", "--to", "root@example.org,nosuchuser@example.org", "--helo",
                             "swaks.test", "--body", "pipelined by swaks"], capture_output=True, text=True, timeout=60)
    replies = [line[4:] for line in result.stdout.splitlines() if line.startswith(("<-  ", "<** "))]
    assert replies[-6:-2] == ["250 2.0.0 Ok", "250 2.1.5 Destination address valid: Recipient ok",
                              "550 Invalid recipient: <nosuchuser@example.org>",
                              '354 Enter mail, end with "." on a line by itself'], result.stdout
    msgid = re.search(r"<.\s+250 2\.0\.0 ([0-9a-f]{8}) Message accepted for delivery", result.stdout).group(1)
    assert "pipelined by swaks" in daemon.message(msgid).decode()
    envelopes = daemon.envelopes(msgid)
    assert len(envelopes) == 1 and "\nrcpt: root@example.org\n" in envelopes[0]


def test_large_message_is_stored_whole(daemon: SmtpDaemon) -> None:
    line = b"0123456789" * 7 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 60_000  # about 4.3 MB
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, body)
    stored = daemon.message(msgid)
    assert stored.endswith(b"\n\n" + line.replace(b"\r\n", b"\n") * 60_000)


def test_address_headers_keep_their_layout(daemon: SmtpDaemon) -> None:
    """To:/Cc:/From: are stored as sent, folds and spacing included, with a domain added to bare addresses, as
    OpenSMTPD 6.8 does: they used to be unfolded, and a folded To: of 200 addresses became one 1,800-character
    line (RFC 5322 allows 998)."""
    many = ",\r\n ".join(f"u{number}" for number in range(200)).encode()
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"To: " + many + b"\r\nCc:  carol ,\r\n\t(root) root\r\nFROM:Bob\r\n  <bob>\r\n"
                                  b"Subject: folded\r\n\r\nbody\r\n")
    stored = daemon.message(msgid).decode()
    expected_to = ",\n ".join(f"u{number}@{MAILNAME}" for number in range(200))
    assert f"\nTo: {expected_to}\nCc:  carol@{MAILNAME} ,\n\t(root) root@{MAILNAME}\nFROM:Bob\n  <bob@{MAILNAME}>\n" \
        "Subject: folded\n" in stored
    assert max(len(line) for line in stored.split("\n")) < 998


def test_header_folded_over_many_lines_is_stored_whole(daemon: SmtpDaemon) -> None:
    """One header folded over 100,000 continuation lines (each line used to copy the whole header so far: 500,000
    took 15 s of a blocked event loop, measured; now it is extended in place), followed by more headers whose
    address rewriting must still see them apart: the stored header block is the one sent, every fold kept."""
    folds = b"".join(b" f%d\r\n" % number for number in range(100_000))
    body = b"X-Folded: start\r\n" + folds + b"To: bob\r\nSubject: folded\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", daemon.port) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, body)
    stored = daemon.message(msgid)
    expected = b"X-Folded: start\n" + folds.replace(b"\r\n", b"\n") + b"To: bob@"
    assert expected in stored and b"\nSubject: folded\n" in stored and stored.endswith(b"\n\nbody\n")


def test_header_block_over_one_mib_is_refused_and_not_held(daemon: SmtpDaemon) -> None:
    """Many short header lines: past 1 MiB the message is refused as malformed (docs/smtp.md), and the daemon stops
    holding the block (it used to keep every line in memory however many came, whatever the size limit)."""

    def peak_rss_kib() -> int:
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

    before = peak_rss_kib()
    client = LineClient(daemon.port)
    try:
        assert client.reply()[0].startswith("220 ")
        client.send(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
        for _ in range(4):
            client.reply()
        line = b"X-Filler: " + b"y" * 60 + b"\r\n"
        for _ in range(34):  # 34 MiB of header lines, under max-message-size (35 MiB)
            client.send(line * ((1 << 20) // len(line)))
        client.send(b"\r\nbody\r\n.\r\nNOOP\r\n")
        assert client.reply() == ["550 5.7.1 Delivery not authorized, message refused: Message is not RFC 2822 "
                                  "compliant"]
        assert client.reply() == ["250 2.0.0 Ok"]
    finally:
        client.close()
    assert peak_rss_kib() - before < 24 * 1024, "the daemon held the header block in memory"


def test_a_data_line_too_long_is_refused_however_the_reads_split_it(daemon: SmtpDaemon) -> None:
    """A line of 65535 bytes or more in DATA (its CR counted, as OpenSMTPD 6.8 counts it): `500 5.0.0 Line too
    long` and the end of the session, also when the line arrives whole with its CRLF in one read (it was let
    through then, and refused only when a read ended inside it). One byte shorter is taken."""
    for length, refused in ((65533, False), (65534, True), (70000, True)):  # (65534 and its CR: 65535 bytes)
        client = LineClient(daemon.port)
        try:
            assert client.reply()[0].startswith("220 ")
            client.send(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
            for _ in range(4):
                client.reply()
            client.send(b"Subject: long\r\n\r\n" + b"y" * length + b"\r\nnext line\r\n.\r\n")
            reply = client.reply()
            if refused:
                assert reply == ["500 5.0.0 Line too long"], reply
                assert client.closed(), "the session goes on after a line too long"
            else:
                assert reply[0].startswith("250 2.0.0 "), reply
        finally:
            client.close()


def test_bdat_chunks_split_inside_crlf(daemon: SmtpDaemon) -> None:
    client = LineClient(daemon.port)
    try:
        assert client.reply()[0].startswith("220 ")
        client.send(b"EHLO c.test\r\n")
        assert "250-CHUNKING" in client.reply()
        client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<root@example.org>\r\n")
        assert client.reply() == ["250 2.0.0 Ok"]
        assert client.reply()[0].startswith("250 2.1.5")
        client.send(b"BDAT 15\r\nSubject: split\r")
        assert client.reply() == ["250 2.0.0 15 octets received"]
        client.send(b"BDAT 14 LAST\r\n\n\r\nno end CRLF")
        msgid = re.match(r"250 2\.0\.0 ([0-9a-f]{8}) ", client.reply()[0]).group(1)
    finally:
        client.close()
    stored = daemon.message(msgid).decode()
    assert "\nSubject: split\n" in stored and stored.endswith("\n\nno end CRLF\n")


# -- TLS ------------------------------------------------------------------------------------------------------------
def test_openssl_starttls_submission_auth_plain(daemon: SmtpDaemon) -> None:
    """The seed guide's manual check: s_client -starttls smtp to the submission port, EHLO, AUTH PLAIN."""
    token = base64.b64encode(b"alice\0alice\0" + PASSWORD.encode()).decode()
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-crlf", "-quiet", "-connect", f"127.0.0.1:{daemon.port2}"],
        input=f"EHLO client.test\nAUTH PLAIN {token}\nQUIT\n", capture_output=True, text=True, timeout=60)
    assert "250-AUTH PLAIN LOGIN" in result.stdout, result.stdout + result.stderr
    assert "235 2.0.0 Authentication succeeded" in result.stdout, result.stdout + result.stderr
    # the dialog is traced, the secret is not
    log = daemon.log()
    assert token not in log and "<<< AUTH PLAIN ********" in log
    assert "smtp authentication user=alice result=ok" in log


def test_submission_with_smtplib_received_auth_and_masquerade(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port2) as client:
        client.ehlo("laptop.test")
        assert not client.has_extn("auth")  # AUTH is offered only under TLS
        client.starttls(context=insecure_context())
        client.ehlo("laptop.test")
        assert client.has_extn("auth")
        client.login("alice", PASSWORD)
        client.mail("alice@example.org")
        client.rcpt("friend@foreign.test")
        msgid = send_data(client, b"From: Alice <someone-else@elsewhere.test>\r\nSubject: s\r\n\r\nhi\r\n")
    stored = daemon.message(msgid).decode()
    assert "rules: rule #3 matched: match from any for any auth action relay" in daemon.log()
    head = stored.split("\n\t")
    assert head[0] == "Received: from laptop.test (localhost [127.0.0.1])"
    assert re.match(rf"by mx\.test\.example \(PySMTPD\) with ESMTPSA id {msgid} "
                    r"\(TLSv1\.[23]:[A-Z0-9_-]+:\d+:NO\) auth=yes user=alice$", head[1]), head[1]
    assert "From: Alice <alice@example.org>\n" in stored
    envelope = daemon.envelopes(msgid)[0]
    assert "tag: SUBMIT" in envelope and "username: alice" in envelope


@pytest.mark.parametrize(("written", "masqueraded"), [
    ("alice@elsewhere.test (Alice Smith)", "alice@example.org (Alice Smith)"),
    ("Alice <someone@elsewhere.test> (work)", "Alice <alice@example.org> (work)"),
    ("someone@elsewhere.test (Alice <home>)", "alice@example.org (Alice <home>)"),
    ('"Smith <A>" <someone@elsewhere.test>', '"Smith <A>" <alice@example.org>'),
    ("Team: someone@elsewhere.test;", "Team: someone@elsewhere.test;"),
], ids=["comment-name", "comment-after", "angle-in-comment", "angle-in-quotes", "group"])
def test_masquerade_replaces_only_the_from_address(daemon: SmtpDaemon, written: str, masqueraded: str) -> None:
    # Only the address is replaced by the envelope sender: a display name, in quotes or in a comment, stays.
    with smtplib.SMTP("127.0.0.1", daemon.port2) as client:
        client.starttls(context=insecure_context())
        client.login("alice", PASSWORD)
        client.mail("alice@example.org")
        client.rcpt("root@example.org")
        msgid = send_data(client, f"From: {written}\r\nSubject: s\r\n\r\nhi\r\n".encode())
    assert f"\nFrom: {masqueraded}\n" in daemon.message(msgid).decode()


def test_masquerade_leaves_from_alone_for_a_null_sender(daemon: SmtpDaemon) -> None:
    # An auto-responder submits its replies with MAIL FROM:<>: there is no envelope address to put in From:, which
    # must keep the address it has (it was made `Bob <>`, an address nobody can answer).
    with smtplib.SMTP("127.0.0.1", daemon.port2) as client:
        client.starttls(context=insecure_context())
        client.login("vacation", PASSWORD)
        client.mail("<>")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"From: Bob <bob@example.org>\r\nSubject: away\r\n\r\nhi\r\n")
    assert "\nFrom: Bob <bob@example.org>\n" in daemon.message(msgid).decode()


def test_smtps_banner_after_handshake(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", daemon.ports["port3"], context=insecure_context()) as client:
        code, text = client.ehlo("tls.test")
        assert code == 250 and b"STARTTLS" not in text
        client.mail("a@b.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"Subject: smtps\r\n\r\nx\r\n")
    assert f"with ESMTPS id {msgid} (TLSv1." in daemon.message(msgid).decode()


def smtps_banner_with_sni(daemon: SmtpDaemon, name: str) -> bytes:
    """The SMTPS banner, the handshake asking for ``name`` and accepting only the certificate of that name."""
    context = ssl.create_default_context(cafile=str(daemon.dir / f"{name}.crt"))
    with socket.create_connection(("127.0.0.1", daemon.ports["port3"]), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=name) as secure:
        return secure.recv(1024)


def test_sni_picks_the_pki(daemon: SmtpDaemon) -> None:
    for name in ("other.test", "mx.test.example"):
        assert smtps_banner_with_sni(daemon, name).startswith(b"220 mx.test.example ESMTP PySMTPD")


def test_sni_name_without_a_pki_gets_the_listeners_own(daemon: SmtpDaemon) -> None:
    """A name no pki has is answered with the listener's `pki` (mx.test.example), as without SNI and as OpenSMTPD
    does; the `*` pki (here other.test's certificate) was presented instead."""
    context = ssl.create_default_context(cafile=str(daemon.dir / "mx.test.example.crt"))
    context.check_hostname = False  # (the name asked for is not on the certificate: only its issuer is checked)
    with socket.create_connection(("127.0.0.1", daemon.ports["port3"]), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="unknown.test") as secure:
        assert secure.recv(1024).startswith(b"220 mx.test.example ESMTP PySMTPD")


def test_a_sni_name_that_is_not_ascii_writes_no_traceback_in_the_log(daemon: SmtpDaemon) -> None:
    """Python's ssl refuses such a name before our SNI callback is called (the handshake fails), and wrote the
    decoding error's traceback to the log, for any client that sends one."""
    subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{daemon.ports['port3']}", "-servername",
                    "caf\u00e9.test"], input=b"", capture_output=True, timeout=60, check=False)
    wait_until(lambda: "callback failed" in daemon.log())
    assert "Traceback" not in daemon.log() and "Exception ignored" not in daemon.log()
    assert smtps_banner_with_sni(daemon, "other.test").startswith(b"220 ")  # and SNI still chooses


def test_verify_requires_a_client_certificate(daemon: SmtpDaemon) -> None:
    port = daemon.ports["port4"]
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("c.test")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=insecure_context())
            client.ehlo("c.test")
            client.noop()
    context = insecure_context()
    context.load_cert_chain(str(daemon.dir / "client.test.crt"), str(daemon.dir / "client.test.key"))
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("c.test")
        client.starttls(context=context)
        client.ehlo("c.test")
        client.mail("a@b.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"Subject: verified\r\n\r\nx\r\n")
    assert re.search(r"\(TLSv1\.[23]:[A-Z0-9_-]+:\d+:YES\)", daemon.message(msgid).decode())


def test_a_failed_handshake_is_logged_with_its_cause(daemon: SmtpDaemon) -> None:
    """The disconnect line says why the handshake failed, as 6.8's `io-error: ...` does: it said only `tls handshake
    failed`, and the cause was in the `smtp` trace alone."""
    with smtplib.SMTP("127.0.0.1", daemon.ports["port4"]) as client:  # `verify`, and no client certificate
        client.ehlo("c.test")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=insecure_context())
            client.noop()
    with socket.create_connection(("127.0.0.1", daemon.ports["port3"]), timeout=30) as plain:  # smtps
        plain.sendall(b"EHLO plaintext.test\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert plain.recv(1024) == b""
    for cause in ("peer did not return a certificate", "wrong version number"):
        wait_until(lambda cause=cause: f'smtp disconnected reason="tls handshake failed: {cause}"' in daemon.log())


def test_ca_without_verify_turns_no_client_certificate_away(daemon: SmtpDaemon) -> None:
    """`ca` without `verify`: a client presenting a certificate that is not from that CA (here a self-signed one,
    as Exim or Postfix with a certificate file present) still delivers; OpenSMTPD accepts any certificate
    unless `verify` is set. Before, the handshake was aborted and the session dropped."""
    port = daemon.ports["port9"]
    for certificate in ("other.test", None):
        context = insecure_context()
        if certificate:
            context.load_cert_chain(str(daemon.dir / f"{certificate}.crt"), str(daemon.dir / f"{certificate}.key"))
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo("c.test")
            client.starttls(context=context)
            client.ehlo("c.test")
            client.mail("a@b.test")
            client.rcpt("root@example.org")
            msgid = send_data(client, b"Subject: unverified\r\n\r\nx\r\n")
        assert re.search(r"\(TLSv1\.[23]:[A-Z0-9_-]+:\d+:NO\)", daemon.message(msgid).decode())


# -- listener options ---------------------------------------------------------------------------------------------------
def proxy_v2_header(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", source_port,
                                                                                      destination_port)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def test_proxy_v2_gives_the_real_client_address(daemon: SmtpDaemon) -> None:
    client = LineClient(daemon.ports["port5"])
    try:
        client.send(proxy_v2_header("203.0.113.7", "127.0.0.1", 40000, 25))
        assert client.reply()[0] == "220 mx.test.example ESMTP PySMTPD"
        client.send(b"HELO proxied.test\r\n")
        assert client.reply() == ["250 mx.test.example Hello proxied.test [203.0.113.7], pleased to meet you"]
        # 203.0.113.7 is not local: it may not relay (`match from local` is absent anyway) but may deliver here
        client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@foreign.test>\r\n")
        assert client.reply() == ["250 2.0.0 Ok"]
        assert client.reply() == ["550 Invalid recipient: <x@foreign.test>"]
    finally:
        client.close()


@pytest.mark.parametrize(("command", "family", "addresses"), [
    (0x20, 0x00, b""),  # LOCAL: the proxy's own connection (HAProxy's health checks send it)
    (0x20, 0x11, socket.inet_aton("203.0.113.8") * 2 + b"\0\1\0\2"),  # LOCAL: its addresses are ignored
    (0x21, 0x31, b"/run/client.sock".ljust(108, b"\0") + b"/run/proxy.sock".ljust(108, b"\0")),  # a Unix client
], ids=["local", "local-with-addresses", "unix-socket-client"])
def test_proxy_v2_headers_without_a_client_address_use_the_connection(daemon: SmtpDaemon, command: int,
                                                                     family: int, addresses: bytes) -> None:
    """As the PROXY spec says and OpenSMTPD 6.8 does, the session goes on with the connection's own address;
    LOCAL used to be dropped, and a Unix-socket client's address became the text "b'/run/client.sock\\x00...'"."""
    client = LineClient(daemon.ports["port5"])
    try:
        client.send(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, family]) + struct.pack("!H", len(addresses))
                    + addresses)
        assert client.reply() == ["220 mx.test.example ESMTP PySMTPD"]
        client.send(b"HELO checker.test\r\n")
        assert client.reply() == ["250 mx.test.example Hello checker.test [127.0.0.1], pleased to meet you"]
    finally:
        client.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_ipv4_client_of_a_dual_stack_proxy_is_an_ipv4_client(daemon: SmtpDaemon, version: str) -> None:
    """A proxy on a dual-stack socket names an IPv4 client `::ffff:198.51.100.3` in a TCP6 header: the client is
    198.51.100.3 (rules, Received, logs). It was taken as an IPv6 address and shown `[::ffff:c633:6403]`."""
    mapped = ipaddress.IPv6Address("::ffff:198.51.100.3")
    if version == "v1":
        header = b"PROXY TCP6 ::ffff:198.51.100.3 ::1 40003 25\r\n"
    else:
        addresses = mapped.packed + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", 40003, 25)
        header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x21" + struct.pack("!H", len(addresses)) + addresses
    client = LineClient(daemon.ports["port5"])
    try:
        client.send(header)
        assert client.reply() == ["220 mx.test.example ESMTP PySMTPD"]
        client.send(b"HELO dual.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
        assert client.reply() == ["250 mx.test.example Hello dual.test [198.51.100.3], pleased to meet you"]
        assert [client.reply()[0][:3] for _ in range(3)] == ["250", "250", "354"]
        client.send(b"Subject: dual stack\r\n\r\nx\r\n.\r\n")
        msgid = accepted_msgid((250, client.reply()[0][4:].encode()))
    finally:
        client.close()
    assert daemon.message(msgid).decode().startswith("Received: from dual.test (<unknown> [198.51.100.3])\n")


def assert_proxy_listener_drops(daemon: SmtpDaemon, data: bytes) -> None:
    """The proxy-v2 listener closes the connection that began with data."""
    client = LineClient(daemon.ports["port5"])
    try:
        client.send(data)
        assert client.closed()
    finally:
        client.close()


def test_proxy_v2_proxy_command_without_an_address_is_dropped(daemon: SmtpDaemon) -> None:
    """The PROXY command with an unspecified family names no client: dropped, as OpenSMTPD 6.8 does."""
    assert_proxy_listener_drops(daemon, b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00EHLO x.test\r\n")


def test_proxy_v2_listener_drops_a_client_without_header(daemon: SmtpDaemon) -> None:
    assert_proxy_listener_drops(daemon, b"EHLO not-a-proxy.test\r\n")


def test_a_bad_proxy_header_is_logged_once_in_our_format(daemon: SmtpDaemon) -> None:
    """aiosmtpd's parser wrote its own bare `PROXY error: ...` line beside ours for every bad header, and ours did
    not say who sent it."""
    assert_proxy_listener_drops(daemon, b"PROXY TCP4 192.0.2.300 127.0.0.1 1 25\r\n")
    wait_until(lambda: "bad PROXY header from 127.0.0.1: malformed PROXY header: PROXYv1 address malformed"
                       in daemon.log())
    assert "PROXY error:" not in daemon.log()


class MemoryTlsClient:
    """A TLS client over a plain socket through memory BIOs, so that a test decides what goes in which packet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = insecure_context().wrap_bio(self.incoming, self.outgoing, server_hostname="mx.test.example")
        self.pending = b""

    def client_hello(self) -> bytes:
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def _pump(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.incoming.write(chunk)

    def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump()
        self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def reply(self) -> str:
        """The next reply (a pipelined group's replies may come in one record: the rest waits for the next call)."""
        while not (end := re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n", self.pending)):
            try:
                self.pending += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._pump()
        text, self.pending = self.pending[:end.end()], self.pending[end.end():]
        return text.decode()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_smtps_behind_proxy_with_the_handshake_in_the_header_packet(daemon: SmtpDaemon, version: str) -> None:
    """The PROXY header and the TLS ClientHello arrive in one packet, as a proxy forwarding at once sends them."""
    header = (proxy_v2_header("198.51.100.4", "127.0.0.1", 40001, 465) if version == "v2"
              else b"PROXY TCP4 198.51.100.4 127.0.0.1 40001 465\r\n")
    with socket.create_connection(("127.0.0.1", daemon.ports["port8"]), timeout=30) as sock:
        client = MemoryTlsClient(sock)
        sock.sendall(header + client.client_hello())
        client.finish_handshake()
        assert client.reply() == "220 mx.test.example ESMTP PySMTPD\r\n"
        client.send(b"EHLO proxied.test\r\n")
        ehlo = client.reply()
        assert ehlo.startswith("250-mx.test.example Hello proxied.test [198.51.100.4], pleased to meet you\r\n")
        assert "STARTTLS" not in ehlo
        client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
        assert [client.reply() for _ in range(3)] == [
            "250 2.0.0 Ok\r\n", "250 2.1.5 Destination address valid: Recipient ok\r\n",
            '354 Enter mail, end with "." on a line by itself\r\n']
        client.send(b"Subject: proxied smtps\r\n\r\nx\r\n.\r\n")
        msgid = accepted_msgid((250, client.reply()[4:].strip().encode()))
        client.send(b"QUIT\r\n")
        assert client.reply() == "221 2.0.0 Bye\r\n"
    received = daemon.message(msgid).decode().split("\n\t")
    assert received[0] == "Received: from proxied.test (<unknown> [198.51.100.4])"
    assert f"with ESMTPS id {msgid}" in received[1]


def test_smtps_proxy_listener_drops_a_bad_header_and_keeps_serving(daemon: SmtpDaemon) -> None:
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"PROXY TCP4 not-an-address\r\n",
                    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x02ab"):
        with socket.create_connection(("127.0.0.1", daemon.ports["port8"]), timeout=30) as sock:
            sock.sendall(garbage)
            try:
                answer = sock.recv(1024)
            except ConnectionResetError:  # closed with our unread bytes still in its buffer: a reset
                answer = b""
            assert answer == b""
    with socket.create_connection(("127.0.0.1", daemon.ports["port8"]), timeout=30) as sock:
        client = MemoryTlsClient(sock)
        sock.sendall(proxy_v2_header("198.51.100.5", "127.0.0.1", 40002, 465))
        sock.sendall(client.client_hello())  # a separate packet works as well
        client.finish_handshake()
        assert client.reply() == "220 mx.test.example ESMTP PySMTPD\r\n"


def test_mask_src_hides_the_client(daemon: SmtpDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.ports["port6"]) as client:
        client.ehlo("hidden.test")
        client.mail("a@b.test")
        client.rcpt("root@example.org")
        msgid = send_data(client, b"Subject: masked\r\n\r\nx\r\n")
    stored = daemon.message(msgid).decode()
    assert stored.startswith(f"Received: by mx.test.example (PySMTPD) with ESMTP id {msgid}\n\tfor <root@example.org>;")
    assert "hidden.test" not in stored.split("\n\n")[0]


def test_pause_keeps_the_socket_bound_and_resume_serves_the_waiting_client(daemon: SmtpDaemon) -> None:
    smtpctl = [sys.executable, "-m", "smtpctl"]
    env = dict(daemon.env)
    paused = subprocess.run([*smtpctl, "pause", "smtp"], env=env, capture_output=True, text=True, cwd=str(ROOT))
    assert paused.returncode == 0, paused.stdout + paused.stderr
    try:
        waiting = socket.create_connection(("127.0.0.1", daemon.port6 if hasattr(daemon, "port6")
                                            else daemon.ports["port6"]), timeout=30)
        readable, _, _ = select.select([waiting], [], [], 1.0)
        assert not readable  # connected in the backlog, no banner while paused
    finally:
        resumed = subprocess.run([*smtpctl, "resume", "smtp"], env=env, capture_output=True, text=True,
                                 cwd=str(ROOT))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    waiting.settimeout(30)
    assert waiting.recv(1024).startswith(b"220 mx.test.example ESMTP PySMTPD")
    waiting.close()


def enqueue_client(daemon: SmtpDaemon) -> LineClient:
    """A local submission: `enqueue` on the control socket, after which the connection speaks SMTP."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(daemon.socket_path))
    sock.sendall(json.dumps({"v": 1, "id": 1, "cmd": "enqueue", "args": {}}).encode() + b"\n")
    received = b""
    while b"\n" not in received:
        received += sock.recv(4096)
    answer, rest = received.split(b"\n", 1)
    assert json.loads(answer)["ok"] is True
    client = LineClient.__new__(LineClient)
    client.sock, client.pending = sock, rest
    return client


def test_local_enqueue_through_the_control_socket(daemon: SmtpDaemon) -> None:
    client = enqueue_client(daemon)
    sock = client.sock
    try:
        assert client.reply() == ["220 mx.test.example ESMTP PySMTPD"]
        client.send(b"EHLO localhost\r\nMAIL FROM:<root@mx.test.example>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
        assert client.reply()[0] == "250-mx.test.example Hello localhost [local], pleased to meet you"
        assert client.reply() == ["250 2.0.0 Ok"]
        assert client.reply()[0].startswith("250 2.1.5")
        assert client.reply()[0].startswith("354 ")
        client.send(b"Subject: local\nX-Note: bare LF lines are fine here\n\nbody\r\n.\r\n")
        final = client.reply()
        msgid = re.match(r"250 2\.0\.0 ([0-9a-f]{8}) ", final[0]).group(1)
    finally:
        sock.close()
    stored = daemon.message(msgid).decode()
    assert stored.startswith(f"Received: from localhost (mx.test.example [local])\n\tby mx.test.example (PySMTPD) "
                             f"with ESMTPA id {msgid}\n")
    assert "flags: authenticated" in daemon.envelopes(msgid)[0]


def test_a_long_local_submission_with_bare_lf_lines_is_taken_whole(daemon: SmtpDaemon) -> None:
    """Local submissions may end their lines with a bare LF; 300 KB of such lines is 5,000 short lines, not one
    line too long (it was cut with `500 Line too long` once the buffer passed 64 KiB without a CRLF)."""
    client = enqueue_client(daemon)
    lines = [f"line {number:05d} ".ljust(60, "x") for number in range(5000)]
    try:
        assert client.reply()[0].startswith("220 ")
        client.send(b"EHLO localhost\r\nMAIL FROM:<root@mx.test.example>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
        while not client.reply()[0].startswith("354 "):
            pass
        client.send(b"Subject: long\n\n" + "\n".join(lines).encode() + b"\r\n.\r\n")
        final = client.reply()
        assert final[0].startswith("250 2.0.0 "), final
        msgid = final[0].split()[2]
    finally:
        client.sock.close()
    stored = daemon.message(msgid).decode()
    assert stored.count("\nline ") == 5000 and stored.rstrip("\n").endswith(lines[-1])


# -- limits needing their own daemon ----------------------------------------------------------------------------------------
def test_idle_and_slow_clients_and_session_limit(tmp_path: Path) -> None:
    config = ('listen on 127.0.0.1 port {port}\naction "local" mbox\n'
              'match from any for domain "example.org" action "local"\n')
    env = {"SMTPD_SMTP_TIMEOUT": "1", "SMTPD_SMTP_MAX_SESSIONS": "2"}
    with SmtpDaemon(tmp_path, config, env=env) as server:
        while "smtp disconnected" not in server.log():  # the start-up probe's session is over
            select.select([], [], [], 0.05)
        first, second = LineClient(server.port), LineClient(server.port)
        try:
            assert first.reply()[0].startswith("220 ") and second.reply()[0].startswith("220 ")
            third = LineClient(server.port)
            assert third.reply() == ["421 4.7.0 mx.test.example Too many connections, try again later"]
            assert third.closed()
            # an idle client is closed silently, as OpenSMTPD does
            assert first.closed() and first.pending == b""
        finally:
            first.close()
            second.close()
        slow = LineClient(server.port)
        try:
            assert slow.reply()[0].startswith("220 ")
            # one byte at a time, never a whole line within the timeout: the slot is not held
            for byte in b"NOOP":
                slow.send(bytes([byte]))
                select.select([], [], [], 0.4)
            assert slow.closed()
        finally:
            slow.close()
        trickle = LineClient(server.port)
        try:
            assert trickle.reply()[0].startswith("220 ")
            trickle.send(b"HELO t.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<root@example.org>\r\nDATA\r\n")
            assert [trickle.reply()[0][:3] for _ in range(4)] == ["250", "250", "250", "354"]
            # message data arriving a byte at a time: every read is quick, but 64 KiB never come in time
            try:
                for byte in b"Subject: slow\r\n":
                    trickle.send(bytes([byte]))
                    select.select([], [], [], 0.2)
                trickle.send(b"\r\nbody\r\n.\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while we were still trickling: what we want
            try:
                answer = trickle.reply()
            except ConnectionResetError:
                answer = []
            assert answer == []  # closed, the trickled message was never accepted
        finally:
            trickle.close()
        assert "smtp disconnected reason=timeout" in server.log()


def test_proxy_connections_beyond_the_session_limit_are_refused_without_waiting_for_a_header(
        tmp_path: Path) -> None:
    """Connections to a proxy-v2 listener that send no header counted as sessions but were never refused: each held
    a descriptor for the whole timeout, however many came (the limit is there to keep descriptors free). Beyond the
    limit a connection is now refused at once, with the 421 a direct client gets."""
    config = 'listen on 127.0.0.1 port {port} proxy-v2\naction "local" mbox\nmatch from any for local action "local"\n'
    with SmtpDaemon(tmp_path, config, env={"SMTPD_SMTP_MAX_SESSIONS": "2"}) as server:
        wait_until(lambda: "bad PROXY header" in server.log())  # the start-up probe's connection is over
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as extra:
                answer = b""
                while not answer.endswith(b"\r\n"):
                    chunk = extra.recv(1024)  # (a timeout here: the connection was held, waiting for a header)
                    assert chunk, answer
                    answer += chunk
            assert answer == b"421 4.7.0 mx.test.example Too many connections, try again later\r\n"
            wait_until(lambda: "smtp: connection from 127.0.0.1 refused before its PROXY header: too many sessions"
                       in server.log())
        finally:
            for sock in held:
                sock.close()
        # the slots come back once the header-less connections are gone
        wait_until(lambda: server.log().count("bad PROXY header") == 3)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
            client.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 40009 25\r\n")
            assert client.recv(1024) == b"220 mx.test.example ESMTP PySMTPD\r\n"


@pytest.fixture()
def system_user():
    """A system account with a password in /etc/shadow (removed afterwards)."""
    name = "pysmtpdauth"
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n", text=True, check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def test_auth_without_table_checks_system_passwords(daemon: SmtpDaemon, system_user: str) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.ports["port7"]) as client:
        client.ehlo("c.test")
        client.starttls(context=insecure_context())
        client.ehlo("c.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(system_user, "wrong password")
        assert refused.value.smtp_code == 535
        client.login(system_user, PASSWORD)  # 235
        # auth-optional: a locked account (no password) can never log in, whatever is sent
    with smtplib.SMTP("127.0.0.1", daemon.ports["port7"]) as client:
        client.ehlo("c.test")
        client.starttls(context=insecure_context())
        client.ehlo("c.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("daemon", "")
    assert f"smtp authentication user={system_user} result=ok" in daemon.log()


def test_garbage_input_never_kills_the_daemon(daemon: SmtpDaemon) -> None:
    import random

    generator = random.Random(4242)
    verbs = [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"AUTH", b"STARTTLS", b"RSET", b"\x00"]
    for _ in range(40):
        client = LineClient(daemon.port, timeout=10)
        try:
            client.reply()
            for _ in range(generator.randint(1, 8)):
                noise = bytes(generator.randrange(256) for _ in range(generator.randint(0, 300)))
                client.send(generator.choice(verbs) + b" " + noise + generator.choice([b"\r\n", b"\n", b"\r", b""]))
        except OSError:
            pass  # the server may close on us: that is allowed, dying is not
        finally:
            client.close()
    with smtplib.SMTP("127.0.0.1", daemon.port) as still_there:
        assert still_there.noop()[0] == 250
    assert "Traceback" not in daemon.log()


def test_helo_before_the_banner_is_refused(daemon: SmtpDaemon) -> None:
    """A client that talks first (here: in the same packet as its PROXY header) gets 503 for HELO/EHLO."""
    client = LineClient(daemon.ports["port5"])
    try:
        client.send(proxy_v2_header("198.51.100.9", "127.0.0.1", 40001, 25) + b"EHLO early.test\r\nNOOP\r\n")
        assert client.reply() == ["220 mx.test.example ESMTP PySMTPD"]
        assert client.reply() == ["503 5.5.1 Invalid command: Command not allowed at this point."]
        assert client.reply() == ["250 2.0.0 Ok"]
        client.send(b"EHLO late.test\r\n")
        assert client.reply()[0] == "250-mx.test.example Hello late.test [198.51.100.9], pleased to meet you"
    finally:
        client.close()
