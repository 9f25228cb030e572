"""The Tables registry built from a parsed smtpd.conf; value parsing per use; -n checks; authentication."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers_tables import recorded_lookups, write

import smtpd.config
from shared.passwords import hash_password
from smtpctl.commands.maps import makemap_main
from smtpd.config.errors import Severity
from smtpd.lookup.items import ItemKind
from smtpd.lookup.tables import Service, Tables, validate_tables, values
from smtpd.lookup.tables.credentials import AuthResult, authenticate, check_credentials
from smtpd.lookup.tables.passwd import system_users_are_local

CORPUS = Path(__file__).parent / "data" / "hashes" / "corpus.tsv"


def parse(text: str):
    result = smtpd.config.parse_text(text, check_files=False)
    assert result.config is not None, result.lines()
    return result.config


def test_registry_from_a_parsed_config(tmp_path: Path) -> None:
    aliases = write(tmp_path / "aliases", "root: bob\n")
    users = write(tmp_path / "users", "# @list\nbob\n")
    make = write(tmp_path / "virtual", "bob@example.org  bob\n")
    assert makemap_main([str(make)], "makemap") == 0
    config = parse(f"""
table aliases file:{aliases}
table users "{users}"
table virt db:{tmp_path}/virtual.db
table doms {{ example.org, "*.example.net" }}
table map {{ k = V, k2 => v2 }}
action "local" mbox alias <aliases>
match from local for domain {{ other.test }} action "local"
match for domain <doms> action "local"
""")
    tables = Tables(config, mailname="mx.example.org", addresses=["127.0.0.1"])
    assert tables.lookup("aliases", Service.ALIAS, "root") == "bob"
    assert tables.match("users", Service.MAILADDR, "bob@anything.test")
    assert tables.lookup("virt", Service.ALIAS, "bob@example.org") == "bob"
    assert tables.match("doms", Service.DOMAIN, "www.example.net")
    assert tables.lookup("map", Service.STRING, "K2") == "v2"
    dynamic = [name for name in tables.names() if "dynamic" in name]
    assert dynamic and tables.match(dynamic[0], Service.DOMAIN, "other.test")
    # built-ins under both spellings; traces use OpenSMTPD's names
    with recorded_lookups() as lines:
        assert tables.match("<localhost>", Service.NETADDR, "127.0.0.1")
        assert tables.match("localnames", Service.DOMAIN, "MX.example.org")
        assert tables.lookup("getpwnam", Service.USERINFO, "root") == "0:0:/root"
        tables.match(dynamic[0], Service.DOMAIN, "nope.test")
    assert lines == [
        'lookup: match "127.0.0.1" as NETADDR in table static:<localhost> -> true',
        'lookup: match "MX.example.org" as DOMAIN in table static:<localnames> -> true',
        'lookup: lookup "root" as USERINFO in table getpwnam:<getpwnam> -> "0:0:/root"',
        f'lookup: match "nope.test" as DOMAIN in table static:{dynamic[0]} -> false',
    ]


# -- values ------------------------------------------------------------------------------------------------
def test_alias_values_parse_into_items() -> None:
    items = values.aliases('bob, "|/usr/bin/vacation bob", /var/mail/x, carol@example.org, error:550 gone')
    assert [item.kind for item in items] == [ItemKind.USERNAME, ItemKind.FILTER, ItemKind.FILENAME,
                                             ItemKind.ADDRESS, ItemKind.ERROR]
    with pytest.raises(ValueError):
        values.aliases("bob, !!bad")


def test_credentials_values() -> None:
    assert values.credentials("bob", "$6$salt$hash") == values.Credentials("bob", "$6$salt$hash")
    assert values.credentials("bob", "robert:$2b$x") == values.Credentials("robert", "$2b$x")
    for bad in ("ab", ":hash", "name:", "x" * 2048):
        with pytest.raises(ValueError):
            values.credentials("bob", bad)
    assert "hash" not in repr(values.credentials("bob", "robert:secrethash"))


def test_relay_secret_userinfo_addrname_source_relayhost() -> None:
    assert values.relay_secret("lbl", "user:pa:ss") == values.Credentials("user", "pa:ss")
    for bad in ("nouser", ":pw", "user:"):
        with pytest.raises(ValueError):
            values.relay_secret("lbl", bad)
    info = values.userinfo("vmail", "5000:5000:/var/vmail")
    assert (info.uid, info.gid, info.directory) == (5000, 5000, "/var/vmail")
    with pytest.raises(ValueError):
        values.userinfo("x", "5000:/var/vmail")
    assert values.addrname("192.0.2.1", "mx.example.org") == ("192.0.2.1", "mx.example.org")
    assert values.addrname("[IPv6:2001:db8::1]", "mx6") == ("2001:db8::1", "mx6")
    with pytest.raises(ValueError):
        values.addrname("mx.example.org", "name")
    assert values.source("ipv6:::1") == "::1"
    assert values.relayhost(" smtp+tls://lbl@mx.example.net ") == "smtp+tls://lbl@mx.example.net"


def test_mailaddrmap_senders() -> None:
    value = "bob@example.org, @lists.example.org , Carol"
    assert values.mailaddr_list(value) == ["bob@example.org", "@lists.example.org", "carol"]
    assert values.mailaddrmap_allows(value, "bob+x@example.org")
    assert values.mailaddrmap_allows(value, "anyone@LISTS.example.org")
    assert values.mailaddrmap_allows(value, "carol@elsewhere.test")
    assert not values.mailaddrmap_allows(value, "mallory@example.org")


# -- smtpd -n checks ---------------------------------------------------------------------------------------
def test_validate_reports_bad_entries_with_file_line(tmp_path: Path) -> None:
    aliases = write(tmp_path / "aliases", "root: bob\n# x\nbad: bob, !!nope\n")
    creds = write(tmp_path / "creds", f"bob {hash_password('pw', rounds=4)}\neve plaintext-password\n")
    users = write(tmp_path / "users", "vmail 5000:5000:/var/vmail\nbroken 5000\n")
    secrets = write(tmp_path / "secrets", "lbl user:pass\nbad nocolon\n")
    config = parse(f"""
pki mail cert "/etc/ssl/certs/ssl-cert-snakeoil.pem"
pki mail key "/etc/ssl/private/ssl-cert-snakeoil.key"
table aliases file:{aliases}
table creds file:{creds}
table users file:{users}
table secrets file:{secrets}
listen on lo port 2525 tls pki mail auth <creds>
action "local" mbox alias <aliases> userbase <users>
action "out" relay host smtp+tls://lbl@mx.example.org auth <secrets>
match for local action "local"
match for any action "out"
""")
    found = [str(diagnostic) for diagnostic in validate_tables(config)]
    assert f"{aliases}:3: warning: alias entry bad: invalid expansion item: '!!nope'" in found
    assert any(line.startswith(f"{creds}:2: warning: credentials for eve: the value is not a password hash")
               for line in found)
    assert any(line.startswith(f"{users}:2: warning: invalid userinfo for broken") for line in found)
    assert any(line.startswith(f"{secrets}:2: warning: invalid relay secret for label bad") for line in found)
    assert len(found) == 4
    assert all(diagnostic.severity is Severity.WARNING for diagnostic in validate_tables(config))


def test_validate_reports_unopenable_db_as_error(tmp_path: Path) -> None:
    not_db = write(tmp_path / "aliases.db", "root: bob\n")
    config = parse(f'table aliases db:{not_db}\naction "l" mbox alias <aliases>\nmatch for local action "l"\n')
    found = validate_tables(config)
    assert [str(item) for item in found] == [
        f"{not_db}: dbopen: not a table database made by makemap",
        f"smtpd.conf:1: invalid configuration file {not_db} for table aliases",
    ]
    assert found[-1].is_error


def test_validate_checks_regexes_used_as_regex(tmp_path: Path) -> None:
    patterns = write(tmp_path / "rx", "^ok$\n([broken\n")
    config = parse(f'table rx file:{patterns}\naction "l" mbox\nmatch mail-from regex <rx> for local action "l"\n')
    found = [str(item) for item in validate_tables(config)]
    assert len(found) == 1 and found[0].startswith(f'{patterns}:2: warning: invalid regular expression "([broken"')


# -- authentication ----------------------------------------------------------------------------------------
def corpus_credentials(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    users: list[tuple[str, str]] = []
    lines = []
    for index, line in enumerate(CORPUS.read_text(encoding="utf-8").splitlines()):
        if line and not line.startswith("#"):
            _tool, password, stored = line.split("\t")
            users.append((f"user{index}", password))
            lines.append(f"user{index}  {stored}" if index % 2 else f"user{index}  login{index}:{stored}")
    return write(tmp_path / "creds", "\n".join(lines) + "\n"), users


def test_authenticate_against_every_real_tool_hash(tmp_path: Path) -> None:
    creds, users = corpus_credentials(tmp_path)
    config = parse(f"table creds file:{creds}\naction \"l\" mbox\nmatch for local action \"l\"\n")
    tables = Tables(config, mailname="mx", addresses=[])
    with recorded_lookups() as lines:
        for user, password in users:
            assert check_credentials(tables, "creds", user.upper(), password) is AuthResult.OK, user
            assert check_credentials(tables, "creds", user, "X" + password[1:]) is AuthResult.PERMFAIL, user
    assert check_credentials(tables, "creds", "nobody-here", "pw") is AuthResult.PERMFAIL
    assert not any("$" in line for line in lines)  # no hash reaches a trace


def test_authenticate_async_and_tempfail(tmp_path: Path) -> None:
    creds = write(tmp_path / "creds", f"bob {hash_password('pw', rounds=4)}\nshort ab\n")
    tables = Tables(parse(f"table creds file:{creds}\naction \"l\" mbox\nmatch for local action \"l\"\n"),
                    mailname="mx", addresses=[])
    assert asyncio.run(authenticate(tables, "creds", "bob", "pw")) is AuthResult.OK
    assert asyncio.run(authenticate(tables, "creds", "bob", "wrong")) is AuthResult.PERMFAIL
    assert asyncio.run(authenticate(tables, "creds", "short", "ab")) is AuthResult.TEMPFAIL
    assert asyncio.run(authenticate(tables, "missing-table", "bob", "pw")) is AuthResult.TEMPFAIL


def test_authenticate_against_the_system_shadow_file(tmp_path: Path) -> None:
    # Root reads /etc/shadow; a locked account (`*` or `!`) never authenticates.
    assert check_credentials(None, None, "daemon", "") is AuthResult.PERMFAIL
    assert check_credentials(None, None, "no-such-account-x", "pw") is AuthResult.PERMFAIL


@pytest.mark.parametrize(("passwd_line", "local"), [
    ("passwd:         files systemd", True),
    ("passwd: compat", True),
    ("passwd: files [NOTFOUND=return] systemd  # comment", True),
    ("passwd: files ldap", False),
    ("passwd: sss files", False),
    ("passwd: nis", False),
])
def test_local_recipients_are_expanded_on_the_loop_only_with_a_local_user_database(
        tmp_path: Path, passwd_line: str, local: bool) -> None:
    """With LDAP, NIS or sss in nsswitch.conf a getpwnam may wait on the network: expansion then stays in a
    worker thread (the event loop must not wait)."""
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text(f"# test\ngroup: files\n{passwd_line}\nhosts: files dns\n")
    assert system_users_are_local(str(nsswitch)) is local
    assert system_users_are_local(str(tmp_path / "missing")) is True  # the C library's default: files


def test_expansion_in_a_thread_can_be_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("passwd: files\n")
    assert system_users_are_local(str(nsswitch))
    monkeypatch.setenv("SMTPD_EXPAND_IN_THREAD", "1")
    assert not system_users_are_local(str(nsswitch))


def test_system_accounts_found_are_remembered_for_a_second_and_missing_ones_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message is looked up at RCPT and again at delivery: the second answer comes from memory. An account
    not found is asked for again every time, so a user added a moment ago receives mail at once."""
    import pwd
    import types

    from smtpd.lookup.tables.passwd import GetpwnamTable

    accounts: dict[str, types.SimpleNamespace] = {}

    def getpwnam(name: str) -> types.SimpleNamespace:
        if name not in accounts:
            raise KeyError(name)
        return accounts[name]

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    table = GetpwnamTable()
    assert table.lookup(Service.USERINFO, "carol") is None
    accounts["carol"] = types.SimpleNamespace(pw_uid=1234, pw_gid=1234, pw_dir="/home/carol")
    assert table.lookup(Service.USERINFO, "carol") == "1234:1234:/home/carol"
    del accounts["carol"]
    assert table.lookup(Service.USERINFO, "carol") == "1234:1234:/home/carol"  # within the second
    table.reload()
    assert table.lookup(Service.USERINFO, "carol") is None
