"""A `.forward` naming its own user by address (`bob@example.org` in bob's .forward, beside another target) keeps
a copy in bob's mailbox, as `\\bob` does; it used to be discarded as a repeat of the RCPT address, and bob's own
copy was silently lost (OpenSMTPD 6.8 goes round to depth 10 and refuses the recipient with 524). So does an alias
entry of user bob naming bob's own address."""

from __future__ import annotations

import os
import pwd

import pytest
from helpers_delivery import (
    DictTables,
    local_action,
    make_config,
    open_temp_dir,
    relay_action,
    rule_for_domain,
    system_user,
)
from test_expand import domain_matcher

from smtpd.config.model import Method
from smtpd.lookup.expand import expand_recipient
from smtpd.lookup.facts import SessionFacts
from smtpd.queue.envelope import EnvelopeType

LOCAL, OTHER_LOCAL, REMOTE = "example.org", "example.net", "remote.test"


@pytest.fixture()
def users():
    with open_temp_dir("pysmtpd-fwself-") as top, system_user(top, "pfs") as bob, system_user(top, "pft") as alice:
        yield bob, alice


def write_forward(user: pwd.struct_passwd, text: str) -> None:
    path = os.path.join(user.pw_dir, ".forward")
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o644)
    os.chown(path, user.pw_uid, user.pw_gid)


def expand(rcpt: str, virtual: dict[str, str] | None = None, aliases: dict[str, str] | None = None):
    tables = DictTables(maps={"locals": {LOCAL: "", OTHER_LOCAL: ""}, "remotes": {REMOTE: ""}})
    options = {}
    if virtual is not None:
        tables.maps["virt"] = virtual
        options["virtual_table"] = "virt"
    if aliases is not None:
        tables.maps["aliases"] = aliases
        options["alias_table"] = "aliases"
    config = make_config([local_action("local", Method.MAILDIR, **options), relay_action("out")],
                         [rule_for_domain(1, "locals", "local"), rule_for_domain(2, "remotes", "out")])
    return expand_recipient(config, tables, SessionFacts(), "s@client.test", rcpt, "mx.example.org",
                            matcher=domain_matcher)


def mailboxes(result) -> list[str]:
    assert result.refusal is None, result.refusal
    return sorted(e.mda_user for e in result.deliveries if e.type is EnvelopeType.MDA and not e.mda_exec)


def relayed(result) -> list[str]:
    return [e.dest for e in result.deliveries if e.type is EnvelopeType.MTA]


@pytest.mark.parametrize("own", ["{b}@example.org", "{B}@EXAMPLE.ORG", "{b}@example.net"])
def test_own_address_in_forward_keeps_a_copy(users, own: str) -> None:
    bob, alice = users
    b = bob.pw_name
    write_forward(bob, own.format(b=b, B=b.upper()) + f", {alice.pw_name}, friend@{REMOTE}\n")
    for rcpt in (f"{b}@{LOCAL}", f"{b}+news@{LOCAL}"):
        result = expand(rcpt)
        assert mailboxes(result) == sorted([b, alice.pw_name]), rcpt
        assert relayed(result) == [f"friend@{REMOTE}"]


def test_own_address_in_forward_keeps_a_copy_under_a_virtual_table(users) -> None:
    bob, _ = users
    b = bob.pw_name
    write_forward(bob, f"{b}@{LOCAL}, friend@{REMOTE}\n")
    result = expand(f"{b}+news@{LOCAL}", virtual={f"{b}@{LOCAL}": b})
    assert mailboxes(result) == [b]
    assert relayed(result) == [f"friend@{REMOTE}"]


def test_a_list_named_in_a_members_forward_is_still_an_ordinary_repeat(users) -> None:
    bob, alice = users
    b, a = bob.pw_name, alice.pw_name
    # bob forwards to the list he is on: the list was delivered already (alice), and bob's mailbox is not his
    # choice here, he sent his mail away: nothing more.
    write_forward(bob, f"team@{LOCAL}\n")
    result = expand(f"team@{LOCAL}", virtual={f"team@{LOCAL}": f"{b}, {a}"})
    assert mailboxes(result) == [a]


def test_an_alias_of_a_user_naming_that_users_own_address_keeps_a_copy(users) -> None:
    bob, alice = users
    b, a = bob.pw_name, alice.pw_name
    # As `bob: bob, ...` does; the address form used to be discarded as a repeat of the RCPT, bob's copy lost.
    aliases = {b: f"{b}@{LOCAL}, {a}, friend@{REMOTE}", "team-x": f"team-x@{LOCAL}, {a}"}
    result = expand(f"{b}@{LOCAL}", aliases=aliases)
    assert mailboxes(result) == sorted([a, b])
    assert relayed(result) == [f"friend@{REMOTE}"]
    # An alias that is no user has no mailbox to keep a copy in: its own address is an ordinary repeat.
    assert mailboxes(expand(f"team-x@{LOCAL}", aliases=aliases)) == [a]
