"""`ldap:` tables, the configuration files of table-ldap (opensmtpd-extras), against a slapd the tests start
(tests/helpers_ldap.py): side by side with OpenSMTPD 6.8 running the real table-ldap on the same file and
directory (virtual domains, virtual users with their uid, gid and home, aliases with several values), and ours
alone where 6.8 cannot be asked (AUTH needs TLS, which its Debian build cannot do) or where table-ldap is broken
(a key is pasted into the filter unescaped; a server that goes away turns into permanent refusals, then kills
OpenSMTPD)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import ROOT, SmtpdProcess, free_port
from helpers_ldap import Slapd, table_config
from helpers_mta import OpenSmtpd, maildir_messages, wait_until
from helpers_smtp import SmtpDaemon, auth_plain_codes, make_certificate
from helpers_tables import (
    auth_listener_config,
    checked_domains_table,
    domains_relay_config,
    rcpt_code,
    starttls_client,
)

from shared.passwords import hash_password
from smtpd.lookup.tables.base import Service, TableError, TableLoadError
from smtpd.lookup.tables.ldap import LdapTable

VIRTUAL_UID = 4242  # in no passwd file: the deliveries run as the uid the directory gives


def person(uid: str, *mails: str, password: str) -> str:
    return "\n".join([f"dn: uid={uid},ou=people,dc=example,dc=com", "objectClass: inetOrgPerson",
                      "objectClass: posixAccount", f"uid: {uid}", f"cn: {uid}", f"sn: {uid}",
                      *(f"mail: {mail}" for mail in mails), f"uidNumber: {VIRTUAL_UID}", f"gidNumber: {VIRTUAL_UID}",
                      "homeDirectory: /nonexistent", f"userPassword: {password}"]) + "\n"


def alias(name: str, *members: str, more_names: tuple[str, ...] = ()) -> str:
    rdn = more_names[0] if more_names else name
    return "\n".join([f"dn: cn={rdn},ou=aliases,dc=example,dc=com", "objectClass: nisMailAlias",
                      *(f"cn: {cn}" for cn in (*more_names, name)),
                      *(f"rfc822MailMember: {member}" for member in members)]) + "\n"


def directory() -> str:
    entries = [
        "dn: dc=example,dc=com\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        *(f"dn: ou={unit},dc=example,dc=com\nobjectClass: organizationalUnit\nou: {unit}\n"
          for unit in ("domains", "people", "aliases")),
        *(f"dn: dc={domain},ou=domains,dc=example,dc=com\nobjectClass: domain\ndc: {domain}\n"
          for domain in ("example.com", "example.net")),
        # bob's hash carries RFC 2307's {CRYPT} marker, as OpenLDAP stores crypt(3) hashes; alice's is bare.
        person("bob", "bob@example.com", "bob.builder@example.com",
               password="{CRYPT}" + hash_password("secret", "bcrypt")),
        person("alice", "alice@example.net", password=hash_password("alice-secret", "sha512")),
        person("carol", "carol@example.org", password="x"),
        alias("abuse@example.com", "bob@example.com"),
        alias("postmaster@example.com", "bob@example.com"),
        alias("team@example.com", "bob@example.com", "alice@example.net"),  # one entry, several values
        alias("bob@example.com", "bob"),
        alias("alice@example.net", "alice"),
        alias("a*b@example.com", "alice@example.net"),  # a `*` of its own, not a wildcard
        # sales@ is named by two entries: every entry found counts with us (table-ldap answers the last one's)
        alias("sales@example.com", "bob@example.com", more_names=("sales-eu",)),
        alias("sales@example.com", "alice@example.net", more_names=("sales-us",)),
        alias("empty@example.net"),  # no member at all
    ]
    return "\n".join(entries)


SERVICES = """domain_filter (&(objectClass=domain)(dc=%s))
domain_attributes dc
alias_filter (&(objectClass=nisMailAlias)(cn=%s))
alias_attributes rfc822MailMember
userinfo_filter (&(objectClass=posixAccount)(uid=%s))
userinfo_attributes uidNumber,gidNumber,homeDirectory
credentials_filter (&(objectClass=posixAccount)(uid=%s))
credentials_attributes uid,userPassword
mailaddrmap_filter (&(objectClass=posixAccount)(uid=%s))
mailaddrmap_attributes mail
""".splitlines()


def made_folder(prefix: str) -> Path:
    # Outside pytest's private (0700) tree: OpenSMTPD's table-ldap and deliveries run as unprivileged users.
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(folder, 0o755)
    return folder


@pytest.fixture(scope="module")
def server() -> Iterator[Slapd]:
    folder = made_folder("pysmtpd-slapd-")
    try:
        with Slapd(folder, directory()) as slapd:
            yield slapd
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def folder(server: Slapd) -> Iterator[Path]:
    made = made_folder("pysmtpd-ldap-")
    try:
        (made / "ldap.conf").write_text(table_config(server.url, *SERVICES))
        for side in ("ours", "theirs"):
            (made / side).mkdir()
            (made / side).chmod(0o1777)  # (the virtual users make their maildirs in it)
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def virtual_config(folder: Path, side: str, port: int) -> str:
    conf = folder / "ldap.conf"
    return (f"table domains ldap:{conf}\ntable virtuals ldap:{conf}\ntable users ldap:{conf}\n"
            f"listen on 127.0.0.1 port {port}\n"
            f'action "vmail{port}" maildir "{folder}/{side}/%{{user.username}}" virtual <virtuals> '
            "userbase <users>\n"
            f'match from any for domain <domains> action "vmail{port}"\n')


def started(folder: Path, side: str, text: str, port: int, traces: bool = False) -> SmtpdProcess | OpenSmtpd:
    if side == "ours":
        return SmtpdProcess(folder / "daemon", text, port=port, traces=("lookup",) if traces else ())
    return OpenSmtpd(str(folder), text, port, args=("-T", "lookup") if traces else ())


RECIPIENTS = ["abuse@example.com", "bob@example.com", "alice@example.net", "team@example.com",
              "nobody@example.com", "someone@example.org", "postmaster@example.com"]


def mailboxes(folder: Path) -> dict[str, list[str]]:
    return {user.name: sorted(message["Delivered-To"] for message in maildir_messages(str(user)))
            for user in sorted(folder.iterdir())}


def test_virtual_domains_users_and_aliases_in_ldap_answer_as_under_opensmtpd(folder: Path) -> None:
    results = {}
    for side in ("ours", "theirs"):
        port = free_port()
        daemon = started(folder, side, virtual_config(folder, side, port), port, traces=True)
        with daemon:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("sender@example.org")
                replies = [client.rcpt(rcpt) for rcpt in RECIPIENTS]
                client.data(b"Subject: through ldap tables\r\n\r\nhello\r\n")
            wait_until(lambda: sum(map(len, mailboxes(folder / side).values())) >= 6, 20)  # noqa: B023 — at once
        lookups = [re.sub(r" in table (proc|ldap):", " in table ldap:", line[line.index("lookup: "):])
                   for line in daemon.log().splitlines() if re.search(r"lookup: .* in table (proc|ldap):", line)]
        results[side] = (replies, mailboxes(folder / side), lookups)
    ours, theirs = results["ours"], results["theirs"]
    assert ours[0] == theirs[0]
    assert ours[0][:4] == [(250, b"2.1.5 Destination address valid: Recipient ok")] * 4
    assert [code for code, _ in ours[0][4:6]] == [524, 550]  # (nobody@: no alias, no catch-all, no user)
    # The same users got the same messages in their own maildirs, delivered as the directory's uidNumber.
    assert {path.stat().st_uid for side in ("ours", "theirs") for path in (folder / side).iterdir()} == {VIRTUAL_UID}
    assert ours[1] == theirs[1] == {
        "alice": ["alice@example.net", "team@example.com"],
        "bob": ["abuse@example.com", "bob@example.com", "postmaster@example.com", "team@example.com"]}
    # Every question we asked got table-ldap's answer (6.8 asks more: `bob@` before `bob`).
    assert ours[2] and set(ours[2]) <= set(theirs[2])
    assert 'lookup: lookup "team@example.com" as ALIAS in table ldap:virtuals -> ' \
           '"bob@example.com, alice@example.net"' in ours[2]
    assert 'lookup: lookup "bob" as USERINFO in table ldap:users -> "4242:4242:/nonexistent"' in ours[2]


def test_a_key_is_escaped_and_every_entry_found_counts_unlike_table_ldap(folder: Path) -> None:
    """table-ldap pastes the key into the filter as it comes: under 6.8 a recipient `*@example.com` is a
    wildcard that finds every alias of the domain, and is accepted. Ours escapes it (RFC 4515): `*` is a star,
    so only the entry named with one answers. And where two entries name sales@, table-ldap answers with the
    last one's members only; we answer with both entries'."""
    results = {}
    for side in ("ours", "theirs"):
        port = free_port()
        with started(folder, side, virtual_config(folder, side, port), port, traces=True) as daemon, \
                smtplib.SMTP("127.0.0.1", port, timeout=30) as client:  # (no message: none left queued)
            client.ehlo("client.test")
            client.mail("sender@example.org")
            codes = [client.rcpt(rcpt)[0] for rcpt in ("*@example.com", "a*b@example.com", "a*@example.com",
                                                        "sales@example.com")]
            client.quit()
            sales = [line[line.index("-> "):] for line in daemon.log().splitlines()
                     if 'lookup "sales@example.com" as ALIAS' in line]
        results[side] = (codes, sales)
    assert results["theirs"] == ([250, 250, 250, 250], ['-> "alice@example.net"'])
    assert results["ours"] == ([524, 250, 524, 250], ['-> "bob@example.com, alice@example.net"'])
    table = LdapTable("virtuals", str(folder / "ldap.conf"))
    try:
        assert table.lookup(Service.ALIAS, "a*b@example.com") == "alice@example.net"
        for key in ("*", "*@example.com", "bob@example.com)(cn=*", "x)(|(cn=*)", "*)(objectClass=*", "\\2a",
                    "team@example.com\\29", "(cn=team@example.com)"):
            assert table.lookup(Service.ALIAS, key) is None, key
        assert not table.match(Service.DOMAIN, "*")
        assert not table.match(Service.DOMAIN, "example.com)(dc=*")
        assert table.match(Service.DOMAIN, "example.com")
    finally:
        table.close()


def test_answers_from_several_entries_attributes_with_blanks_and_crypt_markers(folder: Path, server: Slapd) -> None:
    """Two entries answer sales@: we join both entries' values; an entry without the attribute adds nothing
    (table-ldap fails the whole question). `uidNumber, gidNumber, homeDirectory` (table-ldap's own example puts
    blanks after the commas, and then fails every question) reads as `uidNumber,gidNumber,homeDirectory`. The
    `{CRYPT}` marker is dropped from a hash."""
    conf = folder / "spaced.conf"
    conf.write_text(table_config(server.url, *SERVICES).replace("uidNumber,gidNumber,homeDirectory",
                                                                "uidNumber, gidNumber, homeDirectory"))
    table = LdapTable("t", str(conf))
    try:
        assert table.lookup(Service.ALIAS, "sales@example.com") == "bob@example.com, alice@example.net"
        assert table.lookup(Service.ALIAS, "empty@example.net") is None
        assert table.lookup(Service.USERINFO, "alice") == "4242:4242:/nonexistent"
        assert table.lookup(Service.CREDENTIALS, "bob").startswith("bob:$2b$12$")  # type: ignore[union-attr]
        assert table.lookup(Service.MAILADDRMAP, "bob") == "bob@example.com, bob.builder@example.com"
        assert table.lookup(Service.USERINFO, "nosuchuser") is None
        assert table.lookup(Service.DOMAIN, "example.net") == "example.net"
        with pytest.raises(TableError, match="has no netaddr_filter"):
            table.match(Service.NETADDR, "127.0.0.1")
    finally:
        table.close()


def test_credentials_and_senders_from_ldap(folder: Path, tmp_path: Path) -> None:
    """AUTH against credentials_filter (bob's hash with its {CRYPT} marker, alice's without) and `senders`
    against mailaddrmap_filter (6.8 cannot be asked: its STARTTLS fails on Debian 12, and table-ldap has no
    mailaddrmap)."""
    make_certificate(tmp_path)
    conf = folder / "ldap.conf"
    text = auth_listener_config(f"ldap:{conf}", tmp_path)
    with SmtpDaemon(tmp_path / "daemon", text) as daemon:
        for user, password in (("bob", "wrong"), ("nosuchuser", "secret")):
            with starttls_client(daemon.port) as client:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.login(user, password)
        with starttls_client(daemon.port) as client:
            assert client.login("alice", "alice-secret")[0] == 235
        with starttls_client(daemon.port) as client:
            assert client.login("Bob", "secret")[0] == 235
            assert client.mail("bob.builder@example.com")[0] == 250  # bob's second mail value
            client.rset()
            assert client.mail("alice@example.net") == (530, b"Sender rejected")


MISTAKES = [
    ("alias_filters (cn=%s)\n", "{conf}:5: unknown key 'alias_filters'"),
    ("alias_filter (cn=%s)\nalias_attributes rfc822MailMember\nalias_filter (uid=%s)\n",
     "{conf}:7: alias_filter given twice (first on line 5)"),
    ("alias_filter (&(objectClass=nisMailAlias)(cn=%s)\nalias_attributes rfc822MailMember\n",
     "{conf}:5: alias_filter: not an LDAP filter"),
    ("alias_filter (cn=%d)\nalias_attributes rfc822MailMember\n",
     "{conf}:5: alias_filter: %d in the filter: only %s (the key) and %% (a %)"),
    ("alias_filter (cn=%s)\n", "{conf}:5: alias_filter without alias_attributes"),
    ("credentials_filter (uid=%s)\ncredentials_attributes userPassword\n",
     "{conf}:6: credentials_attributes: 2 attributes expected (user, password hash), comma-separated"),
    ("userinfo_attributes uidNumber,gidNumber,homeDirectory\n",
     "{conf}:5: userinfo_attributes without userinfo_filter"),
]


@pytest.mark.parametrize(("lines", "message"), MISTAKES)
def test_mistakes_in_the_file_are_said_with_their_line(folder: Path, server: Slapd, lines: str, message: str) -> None:
    conf = folder / "broken.conf"
    conf.write_text(table_config(server.url) + lines)
    with pytest.raises(TableLoadError) as raised:
        LdapTable("t", str(conf))
    assert str(raised.value).startswith(message.format(conf=conf))


def test_a_refused_bind_or_a_base_the_server_lacks_stops_smtpd_n_with_the_line(folder: Path, server: Slapd) -> None:
    """Checked with the server when the file is loaded (`smtpd -n`, the start, a reload): a wrong password or
    basedn is said with its line, where table-ldap exits ("failed to connect") or answers nothing."""
    conf = folder / "broken.conf"
    smtpd_conf = folder / "smtpd.conf"
    smtpd_conf.write_text(f'table domains ldap:{conf}\naction "out" relay\n'
                          'match from any for domain <domains> action "out"\n')
    good = table_config(server.url, *SERVICES)
    for text, message in (
            (good.replace("password ldap-secret", "password wrong"),
             f"{conf}:3: the server at {server.url} refuses the bind as cn=admin,dc=example,dc=com: "
             "invalidCredentials"),
            (good.replace("basedn dc=example,dc=com", "basedn ou=nowhere,dc=example,dc=com"),
             f"{conf}:4: basedn 'ou=nowhere,dc=example,dc=com': no such entry on the server at {server.url}"),
            (good.replace("url ldap://", "url ldaps://"), f"{conf}:1: url 'ldaps://")):
        conf.write_text(text)
        result = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(smtpd_conf)], capture_output=True,
                                text=True, cwd=ROOT, timeout=60, check=False)
        assert result.returncode != 0
        assert message in result.stderr + result.stdout


def test_a_server_gone_is_a_temporary_failure_and_is_asked_again_once_back(folder: Path) -> None:
    """With the server stopped, ours answers 4xx at RCPT and the same recipient is accepted once the server
    is back (the broken connection is opened again). 6.8's table-ldap finds nothing on the dead connection:
    permanent 550s while the server is down, and then it crashes, and OpenSMTPD with it."""
    slapd_folder = made_folder("pysmtpd-slapd-")
    codes = {}
    try:
        with Slapd(slapd_folder, directory()) as slapd:
            conf = folder / "own.conf"
            conf.write_text(table_config(slapd.url, *SERVICES))
            for side in ("theirs", "ours"):
                port = free_port()
                text = (f"table domains ldap:{conf}\nlisten on 127.0.0.1 port {port}\n"
                        f'action "out{port}" relay\nmatch from any for domain <domains> action "out{port}"\n')
                with started(folder, side, text, port) as daemon:
                    codes[side] = [rcpt_code(port)]
                    slapd.stop()
                    codes[side] += [rcpt_code(port), rcpt_code(port)]
                    slapd.start()
                    codes[side] += [rcpt_code(port), rcpt_code(port)]
                    if isinstance(daemon, OpenSmtpd):
                        assert daemon.process is not None
                        assert wait_until(lambda: daemon.process.poll() is not None, 10)  # type: ignore[union-attr]
    finally:
        shutil.rmtree(slapd_folder, ignore_errors=True)
    assert codes["ours"] == [250, 451, 451, 250, 250]
    assert codes["theirs"][:3] == [250, 550, 550]
    assert 250 not in codes["theirs"][3:]


def test_update_table_reads_the_file_again_and_keeps_the_table_on_a_mistake(folder: Path, tmp_path: Path) -> None:
    conf = folder / "ldap.conf"
    with SmtpdProcess(tmp_path / "daemon", domains_relay_config(f"ldap:{conf}")) as daemon:
        assert rcpt_code(daemon.port, "x@example.com") == 250
        assert rcpt_code(daemon.port, "x@example.org") == 550
        good = conf.read_text()
        conf.write_text(good.replace("domain_filter (&(objectClass=domain)(dc=%s))",
                                     "domain_filter (&(objectClass=domain)(dc=%s)"))
        result = daemon.smtpctl("update", "table", "domains")
        assert result.returncode != 0
        assert f"{conf}:5: domain_filter: not an LDAP filter" in result.stderr
        assert rcpt_code(daemon.port, "x@example.com") == 250  # the table as it was
        # Every `%s` is the key: a domain is also one that somebody's mail address is at.
        conf.write_text(good.replace(
            "domain_filter (&(objectClass=domain)(dc=%s))",
            "domain_filter (|(&(objectClass=domain)(dc=%s))(&(objectClass=inetOrgPerson)(mail=*@%s)))"))
        assert daemon.smtpctl("update", "table", "domains").returncode == 0
        assert rcpt_code(daemon.port, "x@example.org") == 250
        assert rcpt_code(daemon.port, "x@example.com") == 250
        assert rcpt_code(daemon.port, "x@example.edu") == 550


def test_sessions_asking_a_server_that_stopped_answering_each_get_a_451_in_bounded_time(folder: Path) -> None:
    """The server takes connections and answers nothing (hung; stopped here with SIGSTOP) while several sessions
    ask: each gets its 451 within a question's wait for the one before it and its own bind (ANSWER_TIMEOUT each),
    not after every question before it in turn; the daemon answers again as soon as the server does."""
    from smtpd.lookup.tables.ldap import ANSWER_TIMEOUT

    slapd_folder = made_folder("pysmtpd-slapd-")
    try:
        with Slapd(slapd_folder, directory()) as slapd:
            conf = folder / "own.conf"
            conf.write_text(table_config(slapd.url, *SERVICES))
            text = (f"table domains ldap:{conf}\nlisten on 127.0.0.1 port {{port}}\n"
                    'action "out" relay\nmatch from any for domain <domains> action "out"\n')
            with SmtpdProcess(folder / "daemon", text) as daemon:
                assert rcpt_code(daemon.port) == 250
                assert slapd.process is not None
                outcomes: list[tuple[int | str, float]] = []

                def session() -> None:
                    started = time.monotonic()
                    code = rcpt_code(daemon.port)
                    outcomes.append((code, time.monotonic() - started))

                sessions = [threading.Thread(target=session) for _ in range(4)]
                os.kill(slapd.process.pid, signal.SIGSTOP)
                try:
                    for thread in sessions:
                        thread.start()
                    for thread in sessions:
                        thread.join(120)
                finally:
                    os.kill(slapd.process.pid, signal.SIGCONT)
                assert rcpt_code(daemon.port) == 250
    finally:
        shutil.rmtree(slapd_folder, ignore_errors=True)
    assert [code for code, _ in outcomes] == [451] * 4
    assert max(took for _, took in outcomes) < 2 * ANSWER_TIMEOUT + 3, outcomes


def banner_delay(port: int) -> float:
    """Seconds from connecting to the daemon's greeting: how long its event loop takes to turn to a new client."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.recv(512)
    return time.monotonic() - started


def test_a_reload_while_a_delivery_asks_a_hung_server_does_not_stall_the_daemon(folder: Path) -> None:
    """A delivery asks the userbase (off the event loop) while the server hangs, and `smtpctl reload` replaces the
    table meanwhile: the replaced table is closed on the event loop, which must not wait for that question (it
    did, up to the question's 10 s, and no client was greeted meanwhile)."""
    slapd_folder = made_folder("pysmtpd-slapd-")
    try:
        with Slapd(slapd_folder, directory()) as slapd:
            conf = folder / "own.conf"
            conf.write_text(table_config(slapd.url, *SERVICES))
            action = f'action "local" maildir "{folder}/ours/%{{user.username}}" userbase <users>\n'
            rule = 'match from any for domain "example.org" action "local"\n'
            text = f"table users ldap:{conf}\nlisten on 127.0.0.1 port {{port}}\n{action}{rule}"
            with SmtpdProcess(folder / "daemon", text, paused=("mda",)) as daemon:
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    client.sendmail("sender@example.net", ["bob@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
                assert slapd.process is not None
                os.kill(slapd.process.pid, signal.SIGSTOP)
                try:
                    assert daemon.smtpctl("resume", "mda").returncode == 0
                    time.sleep(1)  # (the delivery is waiting for its userinfo)
                    daemon.config_path.write_text(
                        f"table users {{ bob = {VIRTUAL_UID}:{VIRTUAL_UID}:/nonexistent }}\n"
                        f"listen on 127.0.0.1 port {daemon.port}\n{action}{rule}")
                    reload = threading.Thread(target=daemon.smtpctl, args=("reload",))
                    reload.start()
                    delays = []
                    while reload.is_alive() or len(delays) < 5:
                        delays.append(banner_delay(daemon.port))
                        time.sleep(0.1)
                    reload.join()
                finally:
                    os.kill(slapd.process.pid, signal.SIGCONT)
                assert max(delays) < 2, delays
                assert daemon.alive()
    finally:
        shutil.rmtree(slapd_folder, ignore_errors=True)


def test_a_user_name_that_is_not_utf8_is_refused_as_unknown(folder: Path, tmp_path: Path) -> None:
    """An AUTH user name in Latin-1 (an old client's `jörg`): its bytes are escaped into the filter (`\\f6`) and
    the directory, whose names are UTF-8, finds no such user: 535, and the session goes on (it was dropped with
    `421 Internal server error`)."""
    make_certificate(tmp_path)
    text = auth_listener_config(f"ldap:{folder}/ldap.conf", tmp_path)
    with SmtpDaemon(tmp_path / "daemon", text) as daemon:
        assert auth_plain_codes(daemon.port, "jörg".encode("latin-1"), b"secret") == (535, 250)
        assert auth_plain_codes(daemon.port, b"alice", b"alice-secret") == (235, 250)
        assert "Traceback" not in daemon.log()


def test_smtpd_n_warns_about_a_server_that_cannot_be_reached(folder: Path) -> None:
    """The file is fine, the server is not running: the configuration is accepted (the server may come up later)
    and smtpd -n says why the bind and basedn could not be checked, as for an SQL table (it said only
    `configuration OK`)."""
    port = free_port()
    conf = folder / "down.conf"
    conf.write_text(table_config(f"ldap://127.0.0.1:{port}", *SERVICES))
    result = checked_domains_table(folder, f"ldap:{conf}")
    assert result.returncode == 0, result.stderr
    assert f"{conf}:1: warning: cannot reach 127.0.0.1:{port} (" in result.stderr
