"""Expansion with the real pieces: a parsed smtpd.conf, the real table registry and the real ruleset."""

from __future__ import annotations

import os

import pytest
from helpers_delivery import open_temp_dir, system_user

from smtpd.config import parse_text
from smtpd.lookup.expand import expand_recipient
from smtpd.lookup.facts import SessionFacts
from smtpd.lookup.tables import Tables
from smtpd.queue.envelope import EnvelopeType

MAILNAME = "mx.example.org"
REMOTE = SessionFacts(address="192.0.2.7", rdns="client.test", helo="client.test")


def setup(text: str):
    result = parse_text(text, "test.conf")
    assert not result.errors, result.errors
    config = result.config
    return config, Tables(config, mailname=MAILNAME, addresses=["127.0.0.1"])


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-expand-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        with system_user(homes, "pxc") as bob:
            yield top, bob


def test_aliases_file_and_remote_forwarding(world) -> None:
    top, bob = world
    aliases = os.path.join(top, "aliases")
    with open(aliases, "w") as handle:
        handle.write(f"# system aliases\npostmaster: root\nroot: {bob.pw_name}\n"
                     f"list: {bob.pw_name}, friend@remote.test, |/usr/bin/true\n")
    config, tables = setup(
        f"table aliases file:{aliases}\n"
        'action "local" mbox alias <aliases>\n'
        'action "out" relay\n'
        'match from any for local action "local"\n'
        'match from local for any action "out"\n')
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", f"postmaster@{MAILNAME}", MAILNAME)
    assert result.refusal is None
    [envelope] = result.deliveries
    assert (envelope.type, envelope.mda_user, envelope.dispatcher) == (EnvelopeType.MDA, bob.pw_name, "local")
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", f"list@{MAILNAME}", MAILNAME)
    kinds = sorted((e.type, e.dest if e.type is EnvelopeType.MTA else e.mda_exec or e.mda_user)
                   for e in result.deliveries)
    assert kinds == sorted([(EnvelopeType.MDA, bob.pw_name), (EnvelopeType.MDA, "|/usr/bin/true"),
                            (EnvelopeType.MTA, "friend@remote.test")])
    # A remote client may not relay: the address is refused by the rules, not by expansion.
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", "x@remote.test", MAILNAME)
    assert result.refusal == (550, "Invalid recipient")


def test_virtual_domains_with_one_delivery_user(world) -> None:
    top, bob = world
    virtuals = os.path.join(top, "virtuals")
    with open(virtuals, "w") as handle:
        handle.write(f"alice@example.net {bob.pw_name}\nsales@example.net alice@example.net, boss@remote.test\n"
                     f"@example.net error:550 5.1.1 no such mailbox here\n")
    config, tables = setup(
        f"table domains {{ example.net }}\n"
        f"table virtuals file:{virtuals}\n"
        f'action "vmail" maildir "/var/vmail/%{{dest.domain}}/%{{dest.user}}" virtual <virtuals> user {bob.pw_name}\n'
        'action "out" relay\n'
        'match from any for domain <domains> action "vmail"\n'
        'match from local for any action "out"\n')
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", "Alice@example.net", MAILNAME)
    [envelope] = result.deliveries
    assert (envelope.dispatcher, envelope.dest, envelope.mda_user) == ("vmail", "Alice@example.net", bob.pw_name)
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", "sales@example.net", MAILNAME)
    assert sorted(e.dest for e in result.deliveries) == ["alice@example.net", "boss@remote.test"]
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", "nobody@example.net", MAILNAME)
    assert result.refusal == (550, "5.1.1 no such mailbox here")


def test_userinfo_table_and_forward_in_its_home(world) -> None:
    top, bob = world
    home = os.path.join(top, "vhome")
    os.mkdir(home, 0o755)
    os.chown(home, bob.pw_uid, bob.pw_gid)
    forward = os.path.join(home, ".forward")
    with open(forward, "w") as handle:
        handle.write("virt, copy@remote.test\n")
    os.chown(forward, bob.pw_uid, bob.pw_gid)
    config, tables = setup(
        f"table users {{ virt = \"{bob.pw_uid}:{bob.pw_gid}:{home}\" }}\n"
        'action "local" maildir userbase <users>\n'
        'action "out" relay\n'
        'match from any for local action "local"\n'
        'match from local for any action "out"\n')
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", f"virt@{MAILNAME}", MAILNAME)
    assert result.refusal is None, result.render_tree()
    assert sorted((e.type, e.dest) for e in result.deliveries) == [
        (EnvelopeType.MDA, f"virt@{MAILNAME}"), (EnvelopeType.MTA, "copy@remote.test")]
    result = expand_recipient(config, tables, REMOTE, "a@remote.test", f"{bob.pw_name}@{MAILNAME}", MAILNAME)
    assert result.refusal == (550, "Invalid recipient")
