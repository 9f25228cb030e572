"""Recipient expansion (reference §6): every item type, virtual lookups, .forward, loops, depth, catch-alls."""

from __future__ import annotations

import os
import pwd
from types import SimpleNamespace
from typing import Any

import pytest
from helpers_delivery import (
    DictTables,
    local_action,
    make_config,
    relay_action,
    rule_for_domain,
    system_user,
)

from smtpd import trace
from smtpd.config.model import Config, Method
from smtpd.lookup.expand import expand_recipient
from smtpd.lookup.facts import SessionFacts
from smtpd.lookup.items import ItemKind, classify_item, parse_items, parse_lines, split_items
from smtpd.lookup.tables.base import Service, TableError
from smtpd.queue.envelope import EnvelopeType

LOCAL_DOMAIN = "example.org"
REMOTE_DOMAIN = "remote.test"


def domain_matcher(config: Config, tables: Any, facts: SessionFacts, sender: str, rcpt: str,
                   internal: bool = False) -> SimpleNamespace:
    """A small stand-in for rules.match_rules that understands `for domain <t>` rules only."""
    domain = rcpt.rpartition("@")[2]
    for rule in config.rules:
        condition = rule.condition("for")
        try:
            matched = condition is None or tables.match(condition.table, Service.DOMAIN, domain)
        except TableError:
            return SimpleNamespace(rule=rule, action=None, rejected=False, tempfail=True, reasons=[])
        if matched:
            action = None if rule.reject else config.actions[rule.action]
            return SimpleNamespace(rule=rule, action=action, rejected=rule.reject, tempfail=False, reasons=[])
    return SimpleNamespace(rule=None, action=None, rejected=False, tempfail=False, reasons=[])


def setup(tables: DictTables, **action_options: Any) -> Config:
    tables.maps.setdefault("locals", {LOCAL_DOMAIN: ""})
    tables.maps.setdefault("remotes", {REMOTE_DOMAIN: ""})
    method = action_options.pop("method", Method.MBOX)
    return make_config(
        [local_action("local", method, **action_options), relay_action("out")],
        [rule_for_domain(1, "locals", "local"), rule_for_domain(2, "remotes", "out")],
    )


def expand(config: Config, tables: DictTables, rcpt: str):
    return expand_recipient(config, tables, SessionFacts(), "sender@else.test", rcpt, "mx.example.org",
                            matcher=domain_matcher)


def mailbox_users(result) -> list[str]:
    return sorted(e.mda_user for e in result.deliveries if e.type is EnvelopeType.MDA and not e.mda_exec)


# -- items ----------------------------------------------------------------------------------------------

def test_items_are_classified_in_reference_order() -> None:
    cases = {
        "error:550 no such list": (ItemKind.ERROR, "550 no such list"),
        ":error:451 try later": (ItemKind.ERROR, "451 try later"),
        ":include:/etc/lists/staff": (ItemKind.INCLUDE, "/etc/lists/staff"),
        "include:/x": (ItemKind.INCLUDE, "/x"),
        "|/usr/bin/vacation bob": (ItemKind.FILTER, "/usr/bin/vacation bob"),
        '"|/bin/cat > /dev/null"': (ItemKind.FILTER, "/bin/cat > /dev/null"),
        "/var/mail/archive": (ItemKind.FILENAME, "/var/mail/archive"),
        "bob@example.org": (ItemKind.ADDRESS, "bob@example.org"),
        "Bob.Smith+x": (ItemKind.USERNAME, "bob.smith+x"),
    }
    for text, (kind, value) in cases.items():
        item = classify_item(text)
        assert item is not None, text
        assert (item.kind, item.value) == (kind, value), text
    # An include names an absolute path, as OpenSMTPD's makemap requires (a relative one is an invalid entry).
    for bad in ("error:600 nope", "error:55 x", "a b", "@example.org", "bob@", "x:y", "|", ":include:lists/staff",
                "include:staff.txt"):
        assert classify_item(bad) is None, bad


def test_values_split_on_commas_outside_quotes() -> None:
    assert split_items(' bob , "|/bin/echo a, b" ,, alice@x.org ') == ["bob", '"|/bin/echo a, b"', "alice@x.org"]
    assert [item.kind for item in parse_items("bob, /tmp/f, |cmd")] == [
        ItemKind.USERNAME, ItemKind.FILENAME, ItemKind.FILTER]


def test_forward_lines_follow_fparseln() -> None:
    text = "# comment\nbob, \\\n alice # trailing\n\n  carol@x.org\n"
    assert parse_lines(text) == ["bob,  alice", "carol@x.org"]


# -- local users, aliases ------------------------------------------------------------------------------------

@pytest.fixture()
def homes(tmp_path):
    root = tmp_path / "homes"
    root.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(root, 0o755)
    return root


@pytest.fixture()
def bob(homes):
    with system_user(str(homes), "pyb") as entry:
        yield entry


@pytest.fixture()
def alice(homes):
    with system_user(str(homes), "pya") as entry:
        yield entry


def test_system_user_gets_one_mailbox_delivery(bob) -> None:
    tables = DictTables()
    config = setup(tables)
    result = expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}")
    assert result.refusal is None
    [envelope] = result.deliveries
    assert envelope.type is EnvelopeType.MDA
    assert envelope.dispatcher == "local"
    assert envelope.dest == f"{bob.pw_name}@{LOCAL_DOMAIN}"
    assert envelope.mda_user == bob.pw_name
    assert "internal" not in envelope.flags
    assert ("getpwnam", bob.pw_name) in tables.asked


def test_unknown_user_is_invalid_recipient() -> None:
    tables = DictTables()
    result = expand(setup(tables), tables, f"nosuchuser-xyz@{LOCAL_DOMAIN}")
    assert result.refusal == (550, "Invalid recipient")
    assert result.deliveries == []


def test_no_matching_rule_and_reject_and_rule_tempfail() -> None:
    tables = DictTables()
    config = setup(tables)
    assert expand(config, tables, "x@unrouted.test").refusal == (550, "Invalid recipient")
    tables.broken.add("locals")
    assert expand(config, tables, f"x@{LOCAL_DOMAIN}").refusal == (451, "Temporary failure")


def test_uppercase_local_part_resolves_lowercased(bob) -> None:
    tables = DictTables()
    result = expand(setup(tables), tables, f"{bob.pw_name.upper()}@{LOCAL_DOMAIN}")
    assert mailbox_users(result) == [bob.pw_name]
    assert result.deliveries[0].dest == f"{bob.pw_name.upper()}@{LOCAL_DOMAIN}"


def test_alias_list_nested_file_command_and_remote(bob, alice) -> None:
    tables = DictTables(maps={"aliases": {
        "staff": f"{bob.pw_name}, team",
        "team": f"{alice.pw_name}, /var/mail/archive-test, |/usr/bin/logger -t x, carol@{REMOTE_DOMAIN}",
    }})
    config = setup(tables, alias_table="aliases")
    result = expand(config, tables, f"staff@{LOCAL_DOMAIN}")
    assert result.refusal is None
    assert mailbox_users(result) == sorted([bob.pw_name, alice.pw_name])
    by_exec = {e.mda_exec: e for e in result.deliveries if e.mda_exec}
    assert set(by_exec) == {"/var/mail/archive-test", "|/usr/bin/logger -t x"}
    # Files and commands from aliases do not run as a recipient, but as the unprivileged user.
    assert by_exec["/var/mail/archive-test"].mda_user not in ("root", bob.pw_name, alice.pw_name)
    [remote] = [e for e in result.deliveries if e.type is EnvelopeType.MTA]
    assert (remote.dest, remote.dispatcher) == (f"carol@{REMOTE_DOMAIN}", "out")
    assert "internal" in remote.flags
    assert all(e.dest == f"staff@{LOCAL_DOMAIN}" for e in result.deliveries if e.type is EnvelopeType.MDA)


def test_alias_to_address_is_matched_against_rules_again(bob) -> None:
    tables = DictTables(maps={"aliases": {"postmaster": f"{bob.pw_name}@{LOCAL_DOMAIN}"}})
    result = expand(setup(tables, alias_table="aliases"), tables, f"postmaster@{LOCAL_DOMAIN}")
    [envelope] = result.deliveries
    assert envelope.mda_user == bob.pw_name
    assert envelope.dest == f"{bob.pw_name}@{LOCAL_DOMAIN}"
    assert "internal" in envelope.flags


def test_error_items_refuse_with_their_text() -> None:
    tables = DictTables(maps={"aliases": {"gone": "error:550 5.1.1 moved away", "later": ":error:451 busy now"}})
    config = setup(tables, alias_table="aliases")
    assert expand(config, tables, f"gone@{LOCAL_DOMAIN}").refusal == (550, "5.1.1 moved away")
    assert expand(config, tables, f"later@{LOCAL_DOMAIN}").refusal == (451, "busy now")


def test_include_files(bob, alice, tmp_path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# members\n{bob.pw_name}\n{alice.pw_name}, :include:/etc/passwd\n")
    tables = DictTables(maps={"aliases": {
        "list": f":include:{listing}",
        "broken": f":include:{tmp_path}/missing",
    }})
    config = setup(tables, alias_table="aliases")
    result = expand(config, tables, f"list@{LOCAL_DOMAIN}")
    assert mailbox_users(result) == sorted([bob.pw_name, alice.pw_name])
    # An unreadable include contributes nothing: the alias is found but expands to no one (reference §6.2: an
    # empty delivery list is 524), and an alias named like a user is not delivered to that user instead.
    assert expand(config, tables, f"broken@{LOCAL_DOMAIN}").refusal == (524, "5.2.4 Mailing list expansion problem")
    tables.maps["aliases"][bob.pw_name] = f":include:{tmp_path}/empty"
    (tmp_path / "empty").write_text("")
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").refusal == (
        524, "5.2.4 Mailing list expansion problem")


def test_alias_table_errors_and_bad_values_are_temporary(bob) -> None:
    tables = DictTables(maps={"aliases": {"bad": "bob, no good item!"}})
    config = setup(tables, alias_table="aliases")
    assert expand(config, tables, f"bad@{LOCAL_DOMAIN}").refusal == (424, "4.2.4 Mailing list expansion problem")
    tables.broken.add("aliases")
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").refusal == (
        424, "4.2.4 Mailing list expansion problem")


def test_subaddress_alias_order_and_extension(bob) -> None:
    name = bob.pw_name
    tables = DictTables(maps={"aliases": {"sales+eu": name}})
    config = setup(tables, alias_table="aliases")
    [tagged] = expand(config, tables, f"sales+eu@{LOCAL_DOMAIN}").deliveries
    assert tagged.mda_user == name
    result = expand(config, tables, f"{name}+lists@{LOCAL_DOMAIN}")
    [envelope] = result.deliveries
    assert (envelope.mda_user, envelope.mda_subaddress) == (name, "lists")
    assert ("aliases", f"{name}+lists") in tables.asked and ("aliases", name) in tables.asked


def test_custom_delimiter(bob) -> None:
    tables = DictTables()
    config = setup(tables)
    config = make_config(list(config.actions.values()), list(config.rules), delimiter="-")
    [envelope] = expand(config, tables, f"{bob.pw_name}-news@{LOCAL_DOMAIN}").deliveries
    assert (envelope.mda_user, envelope.mda_subaddress) == (bob.pw_name, "news")


def test_loops_terminate_and_sameuser_delivers(bob, alice) -> None:
    tables = DictTables(maps={"aliases": {"a": "b", "b": "a", bob.pw_name: f"{bob.pw_name}, {alice.pw_name}"}})
    config = setup(tables, alias_table="aliases")
    looping = expand(config, tables, f"a@{LOCAL_DOMAIN}")
    assert looping.refusal == (524, "5.2.4 Mailing list expansion problem")
    assert any(node.outcome.startswith("duplicate") for node in looping.tree)
    result = expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}")
    assert mailbox_users(result) == sorted([bob.pw_name, alice.pw_name])


def test_depth_limit() -> None:
    chain = {f"hop{n}": f"hop{n + 1}" for n in range(12)}
    tables = DictTables(maps={"aliases": chain})
    result = expand(setup(tables, alias_table="aliases"), tables, f"hop0@{LOCAL_DOMAIN}")
    assert result.refusal == (524, "5.2.4 Mailing list expansion problem")
    assert max(node.depth for node in result.tree) == 10


def test_duplicates_are_delivered_once(bob) -> None:
    name = bob.pw_name
    tables = DictTables(maps={"aliases": {"all": f"{name}, {name}, {name}@{LOCAL_DOMAIN}, x", "x": name}})
    result = expand(setup(tables, alias_table="aliases"), tables, f"all@{LOCAL_DOMAIN}")
    assert mailbox_users(result) == [name]


# -- virtual -----------------------------------------------------------------------------------------------

def test_virtual_lookup_order_and_catch_alls(bob, alice) -> None:
    virtuals = {
        f"info+tag@{LOCAL_DOMAIN}": bob.pw_name,
        f"info@{LOCAL_DOMAIN}": alice.pw_name,
        "sales+tag": bob.pw_name,
        "sales": alice.pw_name,
        f"@{LOCAL_DOMAIN}": bob.pw_name,
    }
    tables = DictTables(maps={"virtuals": virtuals, "locals": {LOCAL_DOMAIN: "", "other.test": ""}})
    config = setup(tables, virtual_table="virtuals")
    cases = {
        f"info+tag@{LOCAL_DOMAIN}": bob.pw_name,
        f"info+else@{LOCAL_DOMAIN}": alice.pw_name,
        f"Info@{LOCAL_DOMAIN.upper()}": alice.pw_name,
        f"sales+tag@{LOCAL_DOMAIN}": bob.pw_name,
        f"sales@{LOCAL_DOMAIN}": alice.pw_name,
        f"whoever@{LOCAL_DOMAIN}": bob.pw_name,
    }
    for rcpt, user in cases.items():
        result = expand(config, tables, rcpt)
        assert mailbox_users(result) == [user], rcpt
        # The tag is not carried to the result.
        assert result.deliveries[0].mda_subaddress == "", rcpt
    assert expand(config, tables, "whoever@other.test").refusal == (524, "5.2.4 Mailing list expansion problem")
    virtuals["@"] = f"postmaster@{REMOTE_DOMAIN}"
    [relayed] = expand(config, tables, "whoever@other.test").deliveries
    assert (relayed.type, relayed.dest) == (EnvelopeType.MTA, f"postmaster@{REMOTE_DOMAIN}")
    tables.broken.add("virtuals")
    assert expand(config, tables, f"info@{LOCAL_DOMAIN}").refusal == (424, "4.2.4 Mailing list expansion problem")


def test_virtual_user_with_delivery_user(tmp_path) -> None:
    """The common virtual-hosting setup: every mailbox belongs to one system account (`user vmail`)."""
    vmail = pwd.getpwuid(os.getuid()).pw_name
    tables = DictTables(maps={"virtuals": {f"bob@{LOCAL_DOMAIN}": vmail, f"eve@{LOCAL_DOMAIN}": vmail}})
    config = setup(tables, method=Method.MAILDIR, virtual_table="virtuals", user=vmail)
    result = expand(config, tables, f"bob@{LOCAL_DOMAIN}")
    [envelope] = result.deliveries
    assert (envelope.mda_user, envelope.dest) == (vmail, f"bob@{LOCAL_DOMAIN}")


# -- userbase table --------------------------------------------------------------------------------------------

def test_userinfo_table_replaces_system_users(tmp_path) -> None:
    home = tmp_path / "v"
    home.mkdir()
    tables = DictTables(maps={"users": {"virt": f"5000:5000:{home}"}})
    config = setup(tables, userbase_table="users")
    [envelope] = expand(config, tables, f"virt@{LOCAL_DOMAIN}").deliveries
    assert envelope.mda_user == "virt"
    assert expand(config, tables, f"root@{LOCAL_DOMAIN}").refusal == (550, "Invalid recipient")
    tables.broken.add("users")
    assert expand(config, tables, f"virt@{LOCAL_DOMAIN}").refusal == (451, "Temporary failure")


# -- .forward ----------------------------------------------------------------------------------------------------

def write_forward(user: pwd.struct_passwd, text: str, mode: int = 0o644, owner: int | None = None) -> str:
    path = os.path.join(user.pw_dir, ".forward")
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)
    os.chown(path, user.pw_uid if owner is None else owner, user.pw_gid)
    return path


def test_forward_redirects_and_keeps_a_copy(bob, alice) -> None:
    write_forward(bob, f"# keep a copy\n{bob.pw_name}, {alice.pw_name}\nfriend@{REMOTE_DOMAIN}\n"
                       f"|/usr/bin/procmail\n")
    tables = DictTables()
    result = expand(setup(tables), tables, f"{bob.pw_name}@{LOCAL_DOMAIN}")
    assert result.refusal is None
    assert mailbox_users(result) == sorted([bob.pw_name, alice.pw_name])
    [command] = [e for e in result.deliveries if e.mda_exec]
    assert (command.mda_exec, command.mda_user) == ("|/usr/bin/procmail", bob.pw_name)
    assert [e.dest for e in result.deliveries if e.type is EnvelopeType.MTA] == [f"friend@{REMOTE_DOMAIN}"]


def test_empty_or_missing_forward_delivers(bob) -> None:
    tables = DictTables()
    config = setup(tables)
    write_forward(bob, "")
    assert mailbox_users(expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}")) == [bob.pw_name]


@pytest.mark.parametrize("problem", ["group-writable", "world-writable", "other-owner", "symlink", "home-writable"])
def test_insecure_forward_is_refused(bob, alice, problem) -> None:
    text = f"friend@{REMOTE_DOMAIN}\n"
    if problem == "group-writable":
        write_forward(bob, text, mode=0o664)
    elif problem == "world-writable":
        write_forward(bob, text, mode=0o646)
    elif problem == "other-owner":
        write_forward(bob, text, owner=alice.pw_uid)
    elif problem == "symlink":
        target = write_forward(alice, text)
        os.symlink(target, os.path.join(bob.pw_dir, ".forward"))
    else:
        write_forward(bob, text)
        os.chmod(bob.pw_dir, 0o777)
    tables = DictTables()
    result = expand(setup(tables), tables, f"{bob.pw_name}@{LOCAL_DOMAIN}")
    assert result.refusal == (524, "5.2.4 Mailing list expansion problem")
    assert result.deliveries == []


def test_forward_temporary_failures(bob) -> None:
    tables = DictTables()
    config = setup(tables)
    write_forward(bob, "x" * 5000)
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").refusal == (
        424, "4.2.4 Mailing list expansion problem")
    write_forward(bob, "not an item!\n")
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").refusal[0] == 424
    write_forward(bob, f"friend@{REMOTE_DOMAIN}\n")
    os.chmod(bob.pw_dir, 0o1755)
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").refusal[0] == 424


def test_forward_include_items_are_skipped(bob, tmp_path) -> None:
    listing = tmp_path / "l"
    listing.write_text(f"friend@{REMOTE_DOMAIN}\n")
    write_forward(bob, f":include:{listing}\n{bob.pw_name}\n")
    tables = DictTables()
    result = expand(setup(tables), tables, f"{bob.pw_name}@{LOCAL_DOMAIN}")
    assert mailbox_users(result) == [bob.pw_name]
    assert all(e.type is EnvelopeType.MDA for e in result.deliveries)


def test_delivery_user_skips_forward(bob) -> None:
    write_forward(bob, f"friend@{REMOTE_DOMAIN}\n")
    tables = DictTables()
    config = setup(tables, method=Method.MAILDIR, user=bob.pw_name)
    [envelope] = expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").deliveries
    assert envelope.type is EnvelopeType.MDA


# -- forward-only / expand-only ------------------------------------------------------------------------------

def test_forward_only(bob) -> None:
    tables = DictTables(maps={"aliases": {"arch": "/var/mail/arch", "out": f"x@{REMOTE_DOMAIN}"}})
    config = setup(tables, method=Method.FORWARD_ONLY, alias_table="aliases")
    rcpt = f"{bob.pw_name}@{LOCAL_DOMAIN}"
    assert expand(config, tables, rcpt).refusal == (424, "4.2.4 Mailing list expansion problem")
    write_forward(bob, f"friend@{REMOTE_DOMAIN}\n")
    [relayed] = expand(config, tables, rcpt).deliveries
    assert (relayed.type, relayed.dest) == (EnvelopeType.MTA, f"friend@{REMOTE_DOMAIN}")
    assert expand(config, tables, f"arch@{LOCAL_DOMAIN}").refusal == (451, "Temporary failure")
    assert expand(config, tables, f"out@{LOCAL_DOMAIN}").deliveries[0].type is EnvelopeType.MTA
    write_forward(bob, f"{bob.pw_name}\n")
    assert expand(config, tables, rcpt).refusal[0] == 424


def test_expand_only(bob) -> None:
    tables = DictTables(maps={"aliases": {"arch": "/var/mail/arch"}})
    config = setup(tables, method=Method.EXPAND_ONLY, alias_table="aliases")
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").refusal == (
        524, "5.2.4 Mailing list expansion problem")
    [archive] = expand(config, tables, f"arch@{LOCAL_DOMAIN}").deliveries
    assert archive.mda_exec == "/var/mail/arch"
    write_forward(bob, f"friend@{REMOTE_DOMAIN}\n")
    assert expand(config, tables, f"{bob.pw_name}@{LOCAL_DOMAIN}").deliveries[0].type is EnvelopeType.MTA


# -- traces and tree ----------------------------------------------------------------------------------------------

def test_trace_events_say_what_went_where(bob) -> None:
    tables = DictTables(maps={"aliases": {"staff": bob.pw_name}})
    config = setup(tables, alias_table="aliases")
    subscription = trace.BUS.subscribe(["expand"])
    try:
        result = expand(config, tables, f"staff@{LOCAL_DOMAIN}")
    finally:
        events, _ = subscription.drain()
        subscription.close()
    lines = [event.message for event in events]
    assert f"lka_expand: address: staff@{LOCAL_DOMAIN} [depth=0]" in lines
    assert "lka_expand: username: staff [depth=1, sameuser=0]" in lines
    assert f"lka_expand: username: {bob.pw_name} [depth=2, sameuser=0]" in lines
    assert any(line.startswith("lookup staff in <aliases>") for line in lines)
    assert f"no .forward for user {bob.pw_name}, just deliver" in lines
    assert any("expand_insert() called for username:staff" in line for line in lines)
    rendered = result.render_tree()
    assert rendered[0].startswith(f"address: staff@{LOCAL_DOMAIN}")
    assert any("alias aliases[staff]" in line for line in rendered)


def test_bounces_to_srs_addresses_go_back_to_the_original_sender() -> None:
    from dataclasses import replace

    from smtpd.config.model import SrsOptions
    from smtpd.mta.srs import encode

    tables = DictTables()
    config = replace(setup(tables), srs=SrsOptions(key="secret-key"))
    rewritten = encode(f"carol@{REMOTE_DOMAIN}", "secret-key", LOCAL_DOMAIN)
    assert rewritten.startswith("SRS0=") and rewritten.endswith(f"@{LOCAL_DOMAIN}")
    result = expand_recipient(config, tables, SessionFacts(), "", rewritten, "mx.example.org",
                              matcher=domain_matcher)
    [envelope] = result.deliveries
    assert (envelope.type, envelope.dest) == (EnvelopeType.MTA, f"carol@{REMOTE_DOMAIN}")
    # Only bounces are decoded; a forged hash is not.
    assert expand_recipient(config, tables, SessionFacts(), "x@y.test", rewritten, "mx.example.org",
                            matcher=domain_matcher).refusal == (550, "Invalid recipient")
    forged = "SRS0=XXXX" + rewritten[9:]
    assert expand_recipient(config, tables, SessionFacts(), "", forged, "mx.example.org",
                            matcher=domain_matcher).refusal == (550, "Invalid recipient")


def test_a_hash_inside_double_quotes_is_no_comment() -> None:
    line = "\"|IFS=' ' && exec /usr/bin/procmail -f- || exit 75 #bob\""
    assert parse_lines(f"{line} # a comment\n") == [line]
    assert parse_lines(f"{line}\n", comments_in_words=False) == [line]
    assert parse_lines("o'brien@x.org # single quotes do not quote\n") == ["o'brien@x.org"]


def test_an_apostrophe_inside_an_address_is_no_quote(bob) -> None:
    # O'Brien's address in a list: taken for an opening quote, the apostrophe hid every comma after it, and the
    # whole alias was an invalid value (424, retried until it bounced) for everyone on it.
    assert split_items("seamus.o'brien@x.ie, mary@x.ie") == ["seamus.o'brien@x.ie", "mary@x.ie"]
    assert split_items("|/bin/echo 'a, b', bob") == ["|/bin/echo 'a, b'", "bob"]
    assert split_items("|cmd --tag='a,b', bob") == ["|cmd --tag='a,b'", "bob"]
    tables = DictTables(maps={"aliases": {"team": f"seamus.o'brien@{REMOTE_DOMAIN}, {bob.pw_name}"}})
    result = expand(setup(tables, alias_table="aliases"), tables, f"team@{LOCAL_DOMAIN}")
    assert result.refusal is None
    assert mailbox_users(result) == [bob.pw_name]
    assert [e.dest for e in result.deliveries if e.type is EnvelopeType.MTA] == [f"seamus.o'brien@{REMOTE_DOMAIN}"]
