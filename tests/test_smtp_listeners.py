"""Listener life: starting paused, reload, address families, hostnames, counters, and delivery of hostile senders."""

from __future__ import annotations

import collections
import grp
import os
import select
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers_smtp import ROOT, LineClient, SmtpDaemon, make_certificate
from waiting import wait_until

LOCAL_RULES = 'action "local" mbox\nmatch from any for domain "example.org" action "local"\n'


def smtpctl(daemon: SmtpDaemon, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smtpctl", *words], env=daemon.env, capture_output=True,
                          text=True, cwd=str(ROOT), timeout=60)


def banner_within(sock: socket.socket, seconds: float) -> bytes:
    readable, _, _ = select.select([sock], [], [], seconds)
    return sock.recv(1024) if readable else b""


def test_started_paused_keeps_the_socket_listening(tmp_path: Path) -> None:
    """`smtpd -P smtp`: the port accepts connections (backlog) but no session starts until resume."""
    with SmtpDaemon(tmp_path, "listen on 127.0.0.1 port {port}\n" + LOCAL_RULES, paused=("mda", "smtp")) as daemon:
        waiting = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
        try:
            assert banner_within(waiting, 1.0) == b""
            assert "SMTP paused" in smtpctl(daemon, "show", "status").stdout
            assert smtpctl(daemon, "resume", "smtp").returncode == 0
            waiting.settimeout(30)
            assert waiting.recv(1024).startswith(b"220 mx.test.example ESMTP PySMTPD")
        finally:
            waiting.close()


def test_pause_and_resume_while_clients_connect_drop_none_of_them(tmp_path: Path) -> None:
    """A pause (or a reload that changes listeners) stops the accept loop at any moment: a client the kernel
    queued meanwhile waits for the resume and gets its banner; none is taken and closed without a word."""
    with SmtpDaemon(tmp_path, "listen on 127.0.0.1 port {port}\n" + LOCAL_RULES) as daemon:
        outcomes: list[bytes] = []
        done = threading.Event()

        def client() -> None:
            while not done.is_set():
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as connection:
                    outcomes.append(connection.makefile("rb").readline()[:4])
                    connection.sendall(b"QUIT\r\n")

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            for _ in range(60):
                assert daemon.request("pause", subsystem="smtp")["ok"]
                assert daemon.request("resume", subsystem="smtp")["ok"]
        finally:
            done.set()
            for thread in clients:
                thread.join(60)
        assert outcomes and set(outcomes) == {b"220 "}, collections.Counter(outcomes)


def test_reload_adds_and_removes_listeners(tmp_path: Path) -> None:
    config = "listen on 127.0.0.1 port {port}\n" + LOCAL_RULES
    with SmtpDaemon(tmp_path, config + "# {port2}\n") as daemon:
        second = daemon.port2
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", second), timeout=5).close()
        daemon.config_path.write_text(f"listen on 127.0.0.1 port {second} hostname second.example\n" + LOCAL_RULES)
        result = smtpctl(daemon, "reload")
        assert result.returncode == 0, result.stdout + result.stderr
        client = LineClient(second)
        try:
            assert client.reply() == ["220 second.example ESMTP PySMTPD"]
        finally:
            client.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=5).close()


def test_inet6_family_and_hostnames_table(tmp_path: Path) -> None:
    config = ('table names { 127.0.0.1 = "four.example" }\n'
              "listen on lo inet6 port {port}\n"
              "listen on 127.0.0.1 port {port2} hostnames <names>\n" + LOCAL_RULES)
    daemon = SmtpDaemon(tmp_path, config)
    daemon.start(wait_port=daemon.port2)  # the first listener is on ::1 only
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=5).close()
        with smtplib.SMTP("::1", daemon.port) as client:
            assert client.ehlo("six.test")[1].split(b"\n")[0] == \
                b"mx.test.example Hello six.test [::1], pleased to meet you"
        client = LineClient(daemon.port2)
        try:
            assert client.reply() == ["220 four.example ESMTP PySMTPD"]
        finally:
            client.close()
    finally:
        daemon.stop()


def test_hostnames_entry_comes_before_hostname(tmp_path: Path) -> None:
    """As OpenSMTPD 6.8: the `hostnames` entry for the local address names the server, `hostname` only where the
    table has none (`hostname` used to win, and the table was never read)."""
    config = ('table names { 127.0.0.1 = "mapped.example" }\n'
              "listen on 127.0.0.1 port {port} hostname fallback.example hostnames <names>\n"
              "listen on 127.0.0.1 port {port2} hostname fallback.example hostnames { 127.0.0.9 = x.example }\n"
              + LOCAL_RULES)
    with SmtpDaemon(tmp_path, config) as daemon:
        daemon.wait_listening(daemon.port2)
        for port, name in ((daemon.port, "mapped.example"), (daemon.port2, "fallback.example")):
            client = LineClient(port)
            try:
                assert client.reply() == [f"220 {name} ESMTP PySMTPD"]
                client.send(b"HELO client.test\r\n")
                assert client.reply() == [f"250 {name} Hello client.test [127.0.0.1], pleased to meet you"]
            finally:
                client.close()


def test_session_counters(tmp_path: Path) -> None:
    with SmtpDaemon(tmp_path, "listen on 127.0.0.1 port {port}\n" + LOCAL_RULES) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port) as client:
            client.noop()
            live = smtpctl(daemon, "show", "stats").stdout

        def stats_after_disconnect() -> str:
            stats = smtpctl(daemon, "show", "stats").stdout
            return stats if "smtp.session=0" in stats else ""

        after = wait_until(stats_after_disconnect, 10)
    assert "smtp.session=1" in live
    assert "smtp.session.inet4=" in after


def test_tls_counters_count_the_secured_sessions_open_now(tmp_path: Path) -> None:
    """As OpenSMTPD: smtp.tls (STARTTLS) and smtp.smtps go up when a session is secured and down when it ends,
    whichever way it ends, like smtp.session."""
    cert, key = make_certificate(tmp_path)
    config = (f'pki mx.test.example cert "{cert}"\npki mx.test.example key "{key}"\n'
              "listen on 127.0.0.1 port {port} tls pki mx.test.example\n"
              "listen on 127.0.0.1 port {port2} smtps pki mx.test.example\n" + LOCAL_RULES)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def stats() -> dict[str, str]:
        return dict(line.split("=", 1) for line in smtpctl(daemon, "show", "stats").stdout.splitlines())

    with SmtpDaemon(tmp_path, config) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port) as starttls, smtplib.SMTP_SSL(
                "127.0.0.1", daemon.port2, context=context) as smtps:
            starttls.starttls(context=context)
            starttls.noop()
            smtps.noop()
            live = stats()
            abrupt = smtplib.SMTP_SSL("127.0.0.1", daemon.port2, context=context)
            abrupt.close()  # without QUIT
        after = wait_until(lambda: (lambda now: now if now.get("smtp.session") == "0" else None)(stats()), 10,
                           explain=lambda: str(stats()))
    assert (live["smtp.session"], live["smtp.tls"], live["smtp.smtps"]) == ("2", "1", "1")
    assert (after["smtp.tls"], after["smtp.smtps"]) == ("0", "0")


def test_shell_characters_in_the_sender_never_reach_a_shell(tmp_path: Path) -> None:
    """CVE-2020-7247's point: a legal but hostile local part is delivered as data, nothing is executed."""
    marker = tmp_path / "pwned"
    mail_root = tmp_path / "mail"
    mail_root.mkdir()
    os.chown(mail_root, 0, grp.getgrnam("mail").gr_gid)
    mail_root.chmod(0o2775)
    config = "listen on 127.0.0.1 port {port}\n" + LOCAL_RULES
    sender = f"`touch${{IFS}}{marker}`|$(touch${{IFS}}{marker})x@sender.test".replace("(", "{").replace(")", "}")
    with SmtpDaemon(tmp_path, config, paused=(), env={"SMTPD_MAILDIR_ROOT": str(mail_root)}) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port) as client:
            client.ehlo("evil.test")
            code, _ = client.mail(sender)
            assert code == 250
            assert client.rcpt("root@example.org")[0] == 250
            assert client.data(b"Subject: hostile sender\r\n\r\nhello\r\n")[0] == 250
        mbox = mail_root / "root"
        wait_until(lambda: mbox.exists() and b"hostile sender" in mbox.read_bytes(), 30, 0.1,
                   explain=lambda: daemon.log()[-3000:])
    assert sender.encode() in mbox.read_bytes()
    assert not marker.exists()


@pytest.mark.parametrize("ptr", ["mail.client.test", None])
def test_reverse_name_from_the_resolver_feeds_received_and_from_rdns(tmp_path: Path, ptr: str | None) -> None:
    from helpers_mta import DnsServer

    records = {"1.0.0.127.in-addr.arpa": [("PTR", f"{ptr}.")]} if ptr else {}
    config = ("listen on 127.0.0.1 port {port}\n" + LOCAL_RULES + 'action "relay" relay\n'
              'match from rdns "mail.client.test" for any action "relay"\n')
    with DnsServer(records) as dns, SmtpDaemon(tmp_path, config, env={"SMTPD_RESOLVER": dns.setting}) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.port) as client:
            client.ehlo("helo.test")
            client.mail("a@b.test")
            relayed = client.rcpt("x@foreign.test")[0]
            assert client.rcpt("root@example.org")[0] == 250
            code, text = client.data(b"Subject: rdns\r\n\r\nx\r\n")
        assert ("1.0.0.127.in-addr.arpa", "PTR") in dns.queries
    msgid = text.split()[1].decode()
    first_line = daemon.message(msgid).decode().split("\n")[0]
    if ptr:
        assert relayed == 250 and first_line == "Received: from helo.test (mail.client.test [127.0.0.1])"
    else:
        assert relayed == 550 and first_line == "Received: from helo.test (<unknown> [127.0.0.1])"


def _presented_certificate_name(port: int) -> str:
    """The CN of the certificate the listener presents after STARTTLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)
    subject = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"], input=der,
                             capture_output=True, check=True).stdout.decode()
    return subject.rpartition("=")[2].strip()


def test_reload_presents_a_certificate_renewed_in_place(tmp_path: Path) -> None:
    """certbot and friends overwrite the certificate and key files, then reload: new sessions must get the new
    certificate although the configuration text did not change; a renewal that left a mismatched pair fails the
    reload and the running certificate stays."""
    renewals = {name: make_certificate(tmp_path, name) for name in ("first.example", "second.example")}
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"

    def install(name: str, *, key_of: str | None = None) -> None:
        cert.write_bytes(renewals[name][0].read_bytes())
        key.write_bytes(renewals[key_of or name][1].read_bytes())
        key.chmod(0o600)

    install("first.example")
    config = (f'pki mx.test.example cert "{cert}"\npki mx.test.example key "{key}"\n'
              "listen on 127.0.0.1 port {port} tls pki mx.test.example\n" + LOCAL_RULES)
    with SmtpDaemon(tmp_path, config) as daemon:
        assert _presented_certificate_name(daemon.port) == "first.example"
        install("second.example")
        result = smtpctl(daemon, "reload")
        assert result.returncode == 0, result.stdout + result.stderr
        assert _presented_certificate_name(daemon.port) == "second.example"
        install("first.example", key_of="second.example")
        result = smtpctl(daemon, "reload")
        assert result.returncode == 78, result.stdout + result.stderr
        assert _presented_certificate_name(daemon.port) == "second.example"


def test_disconnect_reason_of_several_words_is_quoted(tmp_path: Path) -> None:
    """`smtp disconnected reason=...` stays one key=value pair for log parsers: a reason of several words is
    quoted, as OpenSMTPD quotes its `"io-error: ..."` one."""
    with SmtpDaemon(tmp_path, "listen on 127.0.0.1 port {port}\n" + LOCAL_RULES) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as client:
            stream = client.makefile("rb")
            stream.readline()
            client.sendall(b"NOOP " + b"x" * 5000 + b"\r\n")
            assert stream.readline().startswith(b"500 ")
        # (the first session is start()'s probe of the port)
        wait_until(lambda: daemon.log().count("smtp disconnected reason=") >= 2, 10)
        line = [line for line in daemon.log().splitlines() if "smtp disconnected reason=" in line][-1]
    assert line.endswith('reason="command too long"'), line


def test_invalid_smtp_ciphers_stop_the_start_with_openssls_words(tmp_path: Path) -> None:
    """The reason was shown as a Python tuple: `invalid ciphers 'NOSUCH': ('No cipher can be selected.',)`."""
    make_certificate(tmp_path)
    config = ('smtp ciphers "NOSUCH"\npki mx.test.example cert "{dir}/mx.test.example.crt"\n'
              'pki mx.test.example key "{dir}/mx.test.example.key"\n'
              "listen on 127.0.0.1 port {port} tls pki mx.test.example\n" + LOCAL_RULES)
    server = SmtpDaemon(tmp_path, config)
    with pytest.raises(RuntimeError, match="smtpd exited at start"):
        server.start()
    assert "invalid ciphers 'NOSUCH': No cipher can be selected.\n" in server.log()
