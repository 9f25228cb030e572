"""`passwd:` tables (table-passwd's format, read natively): parsing, the two services, reload, `smtpd -n`.

The end-to-end tests (AUTH PLAIN, userbase delivery, reload and start against the real daemon) are in
tests/test_tables_passwd_e2e.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers_config import run_smtpd
from helpers_tables import file_decl, tables_with, write

from shared.passwords import hash_password
from smtpd.lookup.tables import Service, TableError, TableLoadError
from smtpd.lookup.tables.credentials import AuthResult, check_credentials

TABLE_PASSWD = "/usr/libexec/opensmtpd/table-passwd"
REAL_SMTPD = "/usr/sbin/smtpd"
HASH = "$6$saltsaltsaltsalt$" + "x" * 86


def passwd_tables(path: Path):
    return tables_with(file_decl("users", path, backend="passwd"))


# -- format ------------------------------------------------------------------------------------------------
def test_blank_lines_comments_extra_fields_and_case(tmp_path: Path) -> None:
    source = write(tmp_path / "passwd", (
        "# virtual users\n"
        "\n"
        "   \n"
        "    # an indented comment\n"
        f"alice:{HASH}:5000:5000:Alice:/var/vmail/alice:/sbin/nologin\n"
        f"bob:{HASH}:5001:5001::/var/vmail/bob  # the boss\n"  # a comment ends the line; no shell field
        f"carol:{HASH}:5002:5002::/var/vmail/carol::userdb_quota_rule=*:storage=1G:more\n"  # Dovecot extras
        f"Dave:{HASH}:5003:5003::/var/vmail/dave:\r\n"  # CRLF; capitals in the name
        f"alice:{HASH}:6000:6000::/var/vmail/alice2:\n"  # the last line for a user wins
        "no-eol:*:1:1::/x:"))
    tables = passwd_tables(source)
    assert tables.lookup("users", Service.USERINFO, "alice") == "6000:6000:/var/vmail/alice2"
    assert tables.lookup("users", Service.USERINFO, "bob") == "5001:5001:/var/vmail/bob"
    assert tables.lookup("users", Service.USERINFO, "carol") == "5002:5002:/var/vmail/carol"
    assert tables.lookup("users", Service.USERINFO, "DAVE") == "5003:5003:/var/vmail/dave"
    assert tables.lookup("users", Service.CREDENTIALS, "dave") == f"Dave:{HASH}"
    assert tables.lookup("users", Service.USERINFO, "no-eol") == "1:1:/x"
    assert tables.lookup("users", Service.USERINFO, "nobody-here") is None
    assert tables.lookup("users", Service.CREDENTIALS, "nobody-here") is None


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("bob\n", 1, "invalid passwd entry: 1 field, at least 6 needed"),
    ("ok:*:1:1::/h:\nbob:HASH:1000:1000\n", 2, "invalid passwd entry: 4 fields, at least 6 needed"),
    ("ok:*:1:1::/h:\n\n:HASH:1000:1000::/home/x:\n", 3, "invalid passwd entry: empty user name"),
    # `#` starts a comment anywhere, as in table-passwd: a gecos with `#` cuts the line short.
    ("bob:*:1000:1000:Room #12:/home/bob:/bin/sh\n", 1, "invalid passwd entry: 5 fields, at least 6 needed"),
])
def test_a_malformed_line_refuses_the_whole_file_with_file_and_line(tmp_path: Path, text: str, line: int,
                                                                    problem: str) -> None:
    source = write(tmp_path / "passwd", text)
    with pytest.raises(TableLoadError) as caught:
        passwd_tables(source)
    first, second = caught.value.lines
    assert first.startswith(f"{source}:{line}: {problem}"), first
    assert second == f"smtpd.conf:1: invalid configuration file {source} for table users"


def test_missing_file_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TableLoadError) as caught:
        passwd_tables(tmp_path / "absent")
    assert caught.value.lines[0] == f"{tmp_path / 'absent'}: fopen: No such file or directory"
    from smtpd.config.model import TableDecl

    with pytest.raises(TableLoadError) as caught:
        tables_with(TableDecl("users", "passwd", None))
    assert caught.value.lines == ["table users: the passwd backend needs a file path"]


# -- what it answers ---------------------------------------------------------------------------------------
def test_fields_are_checked_for_the_service_that_needs_them(tmp_path: Path) -> None:
    """A credentials-only entry (no uid, gid, home) loads and authenticates; as a userbase it is a temporary
    failure naming its line. An entry without a password cannot log in (unknown to CREDENTIALS)."""
    source = write(tmp_path / "passwd", (
        f"authonly:{HASH}::::\n"
        "mailonly::5000:5000::/var/vmail/mailonly:\n"
        f"baduid:{HASH}:12x:5000::/var/vmail/b:\n"
        f"relhome:{HASH}:5000:5000::var/vmail/r:\n"))
    tables = passwd_tables(source)
    assert tables.lookup("users", Service.CREDENTIALS, "authonly") == f"authonly:{HASH}"
    assert tables.lookup("users", Service.CREDENTIALS, "mailonly") is None
    assert tables.lookup("users", Service.USERINFO, "mailonly") == "5000:5000:/var/vmail/mailonly"
    for user, line, problem in (("authonly", 1, "no uid"), ("baduid", 3, "invalid uid '12x'"),
                                ("relhome", 4, "invalid home directory 'var/vmail/r'")):
        with pytest.raises(TableError) as caught:
            tables.lookup("users", Service.USERINFO, user)
        assert str(caught.value) == f"{source}:{line}: user {user}: {problem}"


def test_other_services_are_a_temporary_failure(tmp_path: Path) -> None:
    tables = passwd_tables(write(tmp_path / "passwd", f"bob:{HASH}:1:1::/h:\n"))
    for service in (Service.ALIAS, Service.STRING, Service.MAILADDRMAP):
        with pytest.raises(TableError, match="credentials and userinfo lookups only"):
            tables.lookup("users", service, "bob")
    with pytest.raises(TableError):
        tables.match("users", Service.DOMAIN, "example.org")
    with pytest.raises(TableError):
        tables.fetch("users", Service.SOURCE)


def test_dovecot_crypt_scheme_prefix_and_named_uid_gid(tmp_path: Path) -> None:
    ours = hash_password("dovecot pw", "sha512")
    source = write(tmp_path / "passwd", (
        f"bob:{{SHA512-CRYPT}}{ours}:root:root::/var/vmail/bob::userdb_mail=maildir:~/Maildir\n"
        "plain:{PLAIN}secret:1:1::/h::\n"
        "ghost:*:no-such-user-pysmtpd:1::/h::\n"))
    tables = passwd_tables(source)
    assert tables.lookup("users", Service.CREDENTIALS, "bob") == f"bob:{ours}"
    assert tables.lookup("users", Service.USERINFO, "bob") == "0:0:/var/vmail/bob"
    assert check_credentials(tables, "users", "bob", "dovecot pw") is AuthResult.OK
    assert check_credentials(tables, "users", "plain", "secret") is AuthResult.PERMFAIL  # not a crypt scheme
    with pytest.raises(TableError, match="invalid uid 'no-such-user-pysmtpd'"):
        tables.lookup("users", Service.USERINFO, "ghost")


def test_passwords_made_by_opensmtpd_and_by_us_are_verified(tmp_path: Path) -> None:
    theirs = subprocess.run(["/usr/sbin/smtpctl", "encrypt", "their pw"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.strip()
    ours = hash_password("our pw", rounds=4)
    source = write(tmp_path / "passwd", f"alice:{theirs}:1:1::/h:\nbob:{ours}:2:2::/h:\ncarol::3:3::/h:\n")
    tables = passwd_tables(source)
    assert check_credentials(tables, "users", "alice", "their pw") is AuthResult.OK
    assert check_credentials(tables, "users", "ALICE", "their pw") is AuthResult.OK
    assert check_credentials(tables, "users", "bob", "our pw") is AuthResult.OK
    assert check_credentials(tables, "users", "bob", "their pw") is AuthResult.PERMFAIL
    assert check_credentials(tables, "users", "carol", "") is AuthResult.PERMFAIL  # no password: no login
    assert check_credentials(tables, "users", "nobody", "x") is AuthResult.PERMFAIL


def test_reload_swaps_content_and_a_broken_file_keeps_the_old(tmp_path: Path) -> None:
    source = write(tmp_path / "passwd", f"bob:{HASH}:1:1::/home/bob:\n")
    tables = passwd_tables(source)
    write(source, f"bob:{HASH}:2:2::/home/bob2:\ncarol:{HASH}:3:3::/home/carol:\n")
    tables.reload("users")
    assert tables.lookup("users", Service.USERINFO, "bob") == "2:2:/home/bob2"
    assert tables.lookup("users", Service.USERINFO, "carol") == "3:3:/home/carol"
    write(source, f"bob:{HASH}:4:4::/home/bob4:\ndave:{HASH}\n")
    with pytest.raises(TableLoadError) as caught:
        tables.reload("users")
    assert caught.value.lines[0].startswith(f"{source}:2: invalid passwd entry")
    assert tables.lookup("users", Service.USERINFO, "bob") == "2:2:/home/bob2"
    assert tables.lookup("users", Service.USERINFO, "dave") is None


def test_a_passwd_table_answers_from_memory(tmp_path: Path) -> None:
    """It never makes the SMTP session hand recipient expansion to a worker thread (unlike db or getpwnam)."""
    tables = passwd_tables(write(tmp_path / "passwd", f"bob:{HASH}:1:1::/h:\n"))
    assert not tables.lookups_may_block()


# -- the same verdicts as OpenSMTPD's table-passwd -------------------------------------------------------------
VERDICTS = [
    ("bob:x:1000:1000::/home/bob:/bin/sh\n", True),
    ("# comment\n\nbob:x:1000:1000::/home/bob:/bin/sh # trailing\n", True),
    ("bob:x:1000:1000::/home/bob\n", True),  # the shell may be left out
    ("bob:x:1000:1000::/home/bob:/bin/sh:extra:fields\n", True),
    ("bob:x:abc:::/home/bob:\n", True),  # uid/gid are checked only by userinfo lookups
    ("bob::::::\n", True),
    ("", True),
    ("bob:x:1000:1000:\n", False),
    ("bob:x\n", False),
    ("bob\n", False),
    (":x:1000:1000::/home/bob:\n", False),
    ("ok:x:1:1::/h:\nbob:x:1000:1000::/home/bob:\nbad\n", False),
]


@pytest.mark.parametrize(("text", "accepted"), VERDICTS)
def test_files_are_accepted_or_refused_as_table_passwd_does(tmp_path: Path, text: str, accepted: bool) -> None:
    source = write(tmp_path / "passwd", text)
    try:
        passwd_tables(source)
    except TableLoadError:
        ours = False
    else:
        ours = True
    assert ours is accepted
    # The real program (opensmtpd-extras, installed by `make test`) parses its file first; then it waits for the
    # daemon on stdin (here: nothing).
    real = subprocess.run([TABLE_PASSWD, str(source)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30, check=False)
    assert ("error parsing config file" not in real.stderr) is accepted, real.stderr


# -- smtpd -n ----------------------------------------------------------------------------------------------
def check_config(tmp_path: Path, body: str, passwd_text: str = f"bob:{HASH}:5000:5000::/var/vmail/bob:\n",
                 compare: bool = False) -> tuple[int, list[str]]:
    users = write(tmp_path / "passwd", passwd_text)
    cert, key = tmp_path / "mx.crt", tmp_path / "mx.key"
    if not key.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=mx.test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        key.chmod(0o600)
    config = write(tmp_path / "smtpd.conf", (f'pki mx.test cert "{cert}"\npki mx.test key "{key}"\n'
                                             f"table users passwd:{users}\n{body}"))
    result = run_smtpd("-n", "-f", str(config))
    if compare:  # (OpenSMTPD and opensmtpd-extras: installed by `make test`)
        real = subprocess.run([REAL_SMTPD, "-n", "-f", str(config)], capture_output=True, text=True, timeout=60,
                              check=False)
        assert real.returncode == result.returncode, (real.stderr, result.stderr)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def test_dovecot_style_config_is_ok(tmp_path: Path) -> None:
    code, output = check_config(tmp_path, (
        "listen on 127.0.0.1 port 25 tls pki mx.test auth <users>\n"
        'action "virtual" maildir userbase <users>\n'
        'match from any for domain "example.org" action "virtual"\n'
        'match from any auth for any action "virtual"\n'), compare=True)
    assert (code, output) == (0, ["configuration OK"])


@pytest.mark.parametrize(("body", "use"), [
    ('action "x" maildir alias <users>\nmatch from any for local action "x"\n', "alias"),
    ('action "x" maildir virtual <users>\nmatch from any for local action "x"\n', "virtual"),
    ('action "x" maildir\nmatch from any for domain <users> action "x"\n', "match for domain"),
    ('action "x" maildir\nmatch from any auth <users> for local action "x"\n', "match auth"),
    ('action "x" relay host <users>\nmatch from any for any action "x"\n', "relay host"),
    ("listen on 127.0.0.1 port 25 tls pki mx.test auth senders <users>\n"
     'action "x" maildir\nmatch from any for local action "x"\n', "senders"),
])
def test_uses_6_8_accepts_pass_with_a_warning_when_passwd_cannot_answer(tmp_path: Path, body: str,
                                                                       use: str) -> None:
    code, output = check_config(tmp_path, body, compare=True)
    assert code == 0
    assert output == [f'{tmp_path}/smtpd.conf:3: warning: table "users" (passwd) answers only auth and userbase '
                      f"lookups; every lookup of its use as {use} fails (a temporary failure)",
                      "configuration OK"]


def test_entries_are_checked_against_auth_and_userbase_with_file_and_line(tmp_path: Path) -> None:
    code, output = check_config(tmp_path, (
        "listen on 127.0.0.1 port 25 tls pki mx.test auth <users>\n"
        'action "virtual" maildir userbase <users>\n'
        'match from any for local action "virtual"\n'),
        passwd_text=(f"good:{HASH}:5000:5000::/var/vmail/good:\n"
                     "plain:secret:5000:5000::/var/vmail/plain:\n"
                     "locked:*:5000:5000::/var/vmail/locked:\n"
                     f"nohome:{HASH}:5000:5000:::\n"))
    path = tmp_path / "passwd"
    assert code == 0
    assert output == [
        f"{path}:2: warning: credentials for plain: the password field is not a password hash "
        "(make one with `smtpctl encrypt`)",
        f"{path}:4: warning: userinfo for nohome: no home directory (needed by userbase)",
        "configuration OK",
    ]


def test_broken_or_missing_file_fails_the_check_with_file_and_line(tmp_path: Path) -> None:
    """OpenSMTPD 6.8's -n does not run table-passwd (it says OK; the file is read at start); we check the file."""
    code, output = check_config(tmp_path, 'action "x" maildir userbase <users>\nmatch for local action "x"\n',
                                passwd_text=f"bob:{HASH}:5000:5000::/var/vmail/bob:\nalice:{HASH}:5000\n")
    assert code == 1
    assert output == [f"{tmp_path}/passwd:2: invalid passwd entry: 3 fields, at least 6 needed "
                      "(user:password:uid:gid:gecos:home[:shell])",
                      f"{tmp_path}/smtpd.conf:3: invalid configuration file {tmp_path}/passwd for table users"]
    (tmp_path / "passwd").unlink()
    config = tmp_path / "smtpd.conf"
    result = run_smtpd("-n", "-f", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{tmp_path}/passwd: fopen: No such file or directory",
        f"{config}:3: invalid configuration file {tmp_path}/passwd for table users"]


def test_a_path_is_needed_and_other_external_backends_stay_refused(tmp_path: Path) -> None:
    config = write(tmp_path / "smtpd.conf", 'table users passwd\naction "x" maildir userbase <users>\n'
                                            'match for local action "x"\n')
    result = run_smtpd("-n", "-f", str(config))
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        "passwd: a file is needed (table NAME passwd:/path/to/file)",
        f"{config}:1: invalid configuration file (null) for table users"])
    config.write_text('table prog proc:/usr/local/bin/mytable\naction "x" maildir userbase <prog>\n'
                      'match for local action "x"\n')
    result = run_smtpd("-n", "-f", str(config))
    # Every table program of opensmtpd-extras is answered natively (tests/test_tables_*.py); a `proc:` program,
    # speaking OpenSMTPD's internal protocol, is not (6.8's -n takes it).
    expected = ['table_create: backend "proc" is not supported',
                f"{config}:1: invalid configuration file /usr/local/bin/mytable for table prog"]
    assert (result.returncode, result.stderr.splitlines()) == (1, expected)
