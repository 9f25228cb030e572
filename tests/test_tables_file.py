"""File and inline tables: the reference §5.1 format rules, every match function, reload, errors, traces."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers_tables import (
    config_with,
    file_decl,
    inline_list,
    inline_map,
    recorded_lookups,
    tables_with,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpd.config.model import TableShape
from smtpd.lookup.tables import Service, TableError, TableLoadError, Tables
from smtpd.lookup.tables.matching import hostname_match
from smtpd.lookup.tables.static import StaticContent


# -- format ------------------------------------------------------------------------------------------------
def test_mapping_detected_from_first_data_line_keys_lowercased_values_kept(tmp_path: Path) -> None:
    source = write(tmp_path / "aliases", "# comment\n\n  Root:  Bob, Alice  \nPostMaster\troot\nx : :y\n")
    tables = tables_with(file_decl("aliases", source))
    assert tables.shape("aliases") is TableShape.MAPPING
    assert tables.lookup("aliases", Service.ALIAS, "ROOT") == "Bob, Alice"
    assert tables.lookup("aliases", Service.ALIAS, "postmaster") == "root"
    assert tables.lookup("aliases", Service.ALIAS, "x") == ":y"  # `:` then non-space is value
    assert tables.lookup("aliases", Service.ALIAS, "nobody") is None


def test_list_detected_and_hash_later_in_a_line_is_data(tmp_path: Path) -> None:
    source = write(tmp_path / "domains", "Example.ORG\n  # indented comment\nweird#name\n")
    tables = tables_with(file_decl("domains", source))
    assert tables.shape("domains") is TableShape.LIST
    assert tables.match("domains", Service.DOMAIN, "example.org")
    assert tables.match("domains", Service.DOMAIN, "weird#name")
    assert not tables.match("domains", Service.DOMAIN, "# indented comment")


def test_at_list_comment_forces_a_list_so_ipv6_entries_work(tmp_path: Path) -> None:
    forced = write(tmp_path / "forced", "#   @list\n::1\n2001:db8::/32\n")
    tables = tables_with(file_decl("nets", forced))
    assert tables.shape("nets") is TableShape.LIST
    assert tables.match("nets", Service.NETADDR, "::1")
    assert tables.match("nets", Service.NETADDR, "2001:db8::42")


def test_quirk_ipv6_first_line_without_at_list_is_a_mapping(tmp_path: Path) -> None:
    quirk = write(tmp_path / "quirk", "::1\n")
    tables = tables_with(file_decl("nets", quirk))
    assert tables.shape("nets") is TableShape.MAPPING
    assert tables.lookup("nets", Service.STRING, "") == ":1"


def test_only_space_tab_and_colon_make_the_first_line_a_mapping(tmp_path: Path) -> None:
    # 6.8 reads `a<VT>b` as a list entry (its `smtpd -n` accepts it in `for domain`); a loader that called it a
    # mapping refused the file at start after `smtpd -n` had said OK.
    tables = tables_with(file_decl("t", write(tmp_path / "t", "a\vb\nexample.org\n")))
    assert tables.shape("t") is TableShape.LIST
    assert tables.match("t", Service.DOMAIN, "example.org")


@pytest.mark.parametrize("marker", ["# @ list", "#@ list", "# @LIST", "# @list extra"])
def test_at_list_marker_must_be_exact(tmp_path: Path, marker: str) -> None:
    # Only `#`, optional blanks, then exactly `@list` forces a list (6.8: corpus err-table-list-marker-spaced).
    tables = tables_with(file_decl("t", write(tmp_path / "t", f"{marker}\n::1\n")))
    assert tables.shape("t") is TableShape.MAPPING


def test_empty_file_is_a_mapping(tmp_path: Path) -> None:
    tables = tables_with(file_decl("empty", write(tmp_path / "empty", "# nothing\n\n")))
    assert tables.shape("empty") is TableShape.MAPPING
    assert tables.lookup("empty", Service.ALIAS, "x") is None


def test_last_duplicate_wins(tmp_path: Path) -> None:
    source = write(tmp_path / "dups", "bob first\nBOB second\nbob third\n")
    tables = tables_with(file_decl("dups", source))
    assert tables.lookup("dups", Service.ALIAS, "bob") == "third"


def test_map_line_without_value_is_a_file_line_error(tmp_path: Path) -> None:
    source = write(tmp_path / "bad", "good value\n\nlonely\n")
    with pytest.raises(TableLoadError) as caught:
        tables_with(file_decl("bad", source, line=4))
    assert caught.value.lines == [f"{source}:3: invalid map entry line 3",
                                  f"smtpd.conf:4: invalid configuration file {source} for table bad"]


@pytest.mark.parametrize("text", ["a b\nc:\n", "a b\n\tc: \t\n", "a b\nc\t\n"])
def test_value_of_only_separators_is_invalid(tmp_path: Path, text: str) -> None:
    with pytest.raises(TableLoadError, match=r":2: invalid map entry line 2"):
        tables_with(file_decl("bad", write(tmp_path / "bad", text)))


def test_lone_colon_after_a_space_is_a_value_as_in_opensmtpd(tmp_path: Path) -> None:
    # `c :` -> the key ends at the space; the `:` is not followed by whitespace, so it is the value
    # (real OpenSMTPD 6.8 accepts this file).
    tables = tables_with(file_decl("t", write(tmp_path / "t", "a b\nc :\t \n")))
    assert tables.lookup("t", Service.ALIAS, "c") == ":"


def test_unreadable_file_reports_fopen_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(TableLoadError) as caught:
        tables_with(file_decl("t", missing))
    assert caught.value.lines[0] == f"{missing}: fopen: No such file or directory"


def test_non_strict_registry_keeps_going_and_records_errors(tmp_path: Path) -> None:
    good = write(tmp_path / "good", "a b\n")
    config_tables = Tables(config_with(file_decl("good", good), file_decl("bad", tmp_path / "nope")),
                           mailname="mx", addresses=[], strict=False)
    assert config_tables.lookup("good", Service.ALIAS, "a") == "b"
    assert "bad" in config_tables.load_errors and "bad" not in config_tables


def test_binary_junk_does_not_crash(tmp_path: Path) -> None:
    source = tmp_path / "junk"
    source.write_bytes(b"caf\xe9 \xff\xfe\nk v\x00x\n")
    tables = tables_with(file_decl("junk", source))
    assert tables.lookup("junk", Service.ALIAS, "k") == "v\x00x"


def test_inline_tables() -> None:
    tables = tables_with(inline_list("doms", "Example.org", "*.example.net"), inline_map("users", Bob="1:2:/home/b"))
    assert tables.shape("doms") is TableShape.LIST and tables.shape("users") is TableShape.MAPPING
    assert tables.match("doms", Service.DOMAIN, "EXAMPLE.org")
    assert tables.match("doms", Service.DOMAIN, "mx.example.net")
    assert tables.lookup("users", Service.USERINFO, "bob") == "1:2:/home/b"


# -- match functions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("candidate", "expected"), [
    ("example.org", True), ("EXAMPLE.ORG", True), ("www.example.net", True), ("a.b.example.net", False),
    ("example.net", False), ("mx1.other.test", True), ("mx12.other.test", True), ("other.test", False),
    ("example.orgx", False), ("anything.anywhere", False),
])
def test_domain_glob_matches_like_opensmtpd(tmp_path: Path, candidate: str, expected: bool) -> None:
    source = write(tmp_path / "domains", "example.org\n*.example.net\nmx*.other.test\n")
    assert tables_with(file_decl("d", source)).match("d", Service.DOMAIN, candidate) is expected


def test_lone_star_matches_every_domain() -> None:
    tables = tables_with()
    assert tables.match("anydestination", Service.DOMAIN, "whatever.example")


@pytest.mark.parametrize(("candidate", "expected"), [
    ("192.168.1.1", True), ("192.168.1.2", False), ("10.200.3.4", True), ("11.0.0.1", False),
    ("::1", True), ("0:0:0:0:0:0:0:1", True), ("2001:db8:1::9", True), ("2001:db9::1", False),
    ("fe80::1", True), ("local", True), ("LOCAL", True), ("172.16.0.1", False), ("not-an-ip", False),
])
def test_netaddr_exact_cidr_ipv6_forms(tmp_path: Path, candidate: str, expected: bool) -> None:
    source = write(tmp_path / "nets", "# @list\n192.168.1.1\n10.0.0.0/8\nipv6:::1\n[2001:db8:1::]/48\n"
                                      "fe80::/10\nlocal\n")
    assert tables_with(file_decl("n", source)).match("n", Service.NETADDR, candidate) is expected


@pytest.mark.parametrize(("candidate", "expected"), [
    ("bob@example.org", True), ("BOB@Example.ORG", True), ("bob+news@example.org", True),
    ("bob@other.test", False), ("alice@example.org", False),
    ("carol+list@any.test", True), ("carol@any.test", False), ("carol+other@any.test", False),
    ("dave@anywhere.test", True), ("dave+x@else.test", True),
    ("zed@sub.example.com", True), ("zed@example.com", False),
    ("someone@catchall.test", True), ("x@deep.sub.example.com", False),
])
def test_mailaddr_rules_with_subaddress_stripping(tmp_path: Path, candidate: str, expected: bool) -> None:
    source = write(tmp_path / "senders", "bob@example.org\ncarol+list\ndave\n@*.example.com\n@catchall.test\n")
    assert tables_with(file_decl("m", source)).match("m", Service.MAILADDR, candidate) is expected


def test_mailaddr_catch_all_and_custom_delimiter(tmp_path: Path) -> None:
    everyone = write(tmp_path / "all", "@\n")
    tables = tables_with(file_decl("all", everyone), file_decl("bob", write(tmp_path / "bob", "bob\n")),
                         delimiter="-")
    assert tables.match("all", Service.MAILADDR, "") and tables.match("all", Service.MAILADDR, "x@y.z")
    assert tables.match("bob", Service.MAILADDR, "bob-tag@x.test")
    assert not tables.match("bob", Service.MAILADDR, "bob+tag@x.test")


@pytest.mark.parametrize(("candidate", "expected"), [
    ("bob@example.org", True), ("BOBBY@EXAMPLE.ORG", True), ("rob@example.org", False),
    ("mail-42@x.test", True), ("mail-x@x.test", False), ("user@spam.test", True), ("User@SPAM.test", True),
])
def test_regex_posix_classes_case_insensitive_escapes_kept(tmp_path: Path, candidate: str, expected: bool) -> None:
    source = write(tmp_path / "rx", "^bob\n^mail-[[:digit:]]+@\n(?i)@SPAM\\.test$\n")
    assert tables_with(file_decl("r", source)).match("r", Service.REGEX, candidate) is expected


def test_regex_uppercase_escape_keeps_its_meaning(tmp_path: Path) -> None:
    # OpenSMTPD lowercases patterns, turning \S into \s; we do not.
    source = write(tmp_path / "rx", "^a\\Sb$\n")
    tables = tables_with(file_decl("r", source))
    assert tables.match("r", Service.REGEX, "axb")
    assert not tables.match("r", Service.REGEX, "a b")


def test_invalid_regex_never_matches(tmp_path: Path) -> None:
    tables = tables_with(file_decl("r", write(tmp_path / "rx", "([unclosed\n")))
    assert not tables.match("r", Service.REGEX, "([unclosed")


def test_string_is_exact(tmp_path: Path) -> None:
    tables = tables_with(inline_list("tags", "Trusted"))
    assert tables.match("tags", Service.STRING, "TRUSTED")
    assert not tables.match("tags", Service.STRING, "trusted-not")


def test_lookup_with_match_service_returns_first_match_in_sorted_order(tmp_path: Path) -> None:
    source = write(tmp_path / "relays", "*example.org   smtp://second\n*.example.org  smtp://first\n")
    tables = tables_with(file_decl("relays", source))
    assert tables.lookup("relays", Service.DOMAIN, "mx.example.org") == "smtp://first"
    assert tables.lookup("relays", Service.DOMAIN, "nothing.test") is None


def test_fetch_is_round_robin(tmp_path: Path) -> None:
    tables = tables_with(file_decl("src", write(tmp_path / "src", "192.0.2.2\n192.0.2.1\n")))
    fetched = [tables.fetch("src", Service.SOURCE) for _ in range(5)]
    assert fetched == ["192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.2", "192.0.2.1"]


def test_unknown_table_is_a_table_error() -> None:
    with pytest.raises(TableError, match="not found"):
        tables_with().lookup("nope", Service.ALIAS, "x")


# -- builtins ----------------------------------------------------------------------------------------------
def test_builtin_tables() -> None:
    tables = tables_with()
    assert tables.match("localhost", Service.NETADDR, "local")
    assert tables.match("localhost", Service.NETADDR, "192.0.2.7")
    assert not tables.match("localhost", Service.NETADDR, "203.0.113.1")
    assert tables.match("anyhost", Service.NETADDR, "203.0.113.1") and tables.match("anyhost", Service.NETADDR, "2001:db8::1")
    for name in ("localhost", "mx.example.org", "192.0.2.7", "[192.0.2.7]", "::1", "[::1]", "[IPv6:::1]"):
        assert tables.match("localnames", Service.DOMAIN, name), name
    assert not tables.match("localnames", Service.DOMAIN, "example.org")
    assert tables.lookup("getpwnam", Service.USERINFO, "root") == "0:0:/root"
    assert tables.lookup("getpwnam", Service.USERINFO, "no-such-user-here") is None


# -- big tables --------------------------------------------------------------------------------------------
def test_hundred_thousand_entry_file_table(tmp_path: Path) -> None:
    lines = [f"User{index}@Example{index % 100}.org  value-{index}" for index in range(100_000)]
    source = write(tmp_path / "big", "\n".join(lines) + "\n")
    tables = tables_with(file_decl("big", source))
    assert len(tables.backend("big").content) == 100_000
    for index in (0, 1, 4242, 99_999):
        assert tables.lookup("big", Service.ALIAS, f"user{index}@example{index % 100}.org") == f"value-{index}"
    assert tables.lookup("big", Service.ALIAS, "user100000@example0.org") is None
    assert tables.match("big", Service.MAILADDR, "user77+tag@EXAMPLE77.org")
    assert not tables.match("big", Service.MAILADDR, "user77@example78.org")


def test_hundred_thousand_entry_netaddr_list(tmp_path: Path) -> None:
    lines = ["# @list"] + [f"10.{index // 256 % 256}.{index % 256}.0/24" for index in range(100_000)]
    source = write(tmp_path / "nets", "\n".join(lines) + "\n")
    tables = tables_with(file_decl("nets", source))
    assert tables.match("nets", Service.NETADDR, "10.3.7.200")
    assert not tables.match("nets", Service.NETADDR, "11.0.0.1")


# -- reload ------------------------------------------------------------------------------------------------
def test_reload_swaps_content_and_failure_keeps_the_old(tmp_path: Path) -> None:
    source = write(tmp_path / "aliases", "root: bob\n")
    tables = tables_with(file_decl("aliases", source))
    write(source, "root: alice\nnew: carol\n")
    tables.reload("aliases")
    assert tables.lookup("aliases", Service.ALIAS, "root") == "alice"
    write(source, "root: mallory\nbroken\n")
    with pytest.raises(TableLoadError) as caught:
        tables.reload("aliases")
    assert caught.value.lines == [f"{source}:2: invalid map entry line 2"]
    assert tables.lookup("aliases", Service.ALIAS, "root") == "alice"
    assert tables.lookup("aliases", Service.ALIAS, "new") == "carol"
    source.unlink()
    with pytest.raises(TableLoadError, match="fopen"):
        tables.reload("aliases")
    assert tables.lookup("aliases", Service.ALIAS, "root") == "alice"


def test_reload_is_atomic_for_concurrent_readers(tmp_path: Path) -> None:
    old = "\n".join(f"k{index} old" for index in range(2000)) + "\n"
    new = "\n".join(f"k{index} new" for index in range(2000)) + "\n"
    source = write(tmp_path / "t", old)
    tables = tables_with(file_decl("t", source))
    mixed: list[set[str]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            backend = tables.backend("t")
            snapshot = backend.content  # what one lookup sees
            seen = {snapshot.entries[f"k{index}"] for index in range(0, 2000, 97)}
            if len(seen) != 1:
                mixed.append(seen)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for round_number in range(20):
        write(source, new if round_number % 2 == 0 else old)
        tables.reload("t")
    stop.set()
    for thread in threads:
        thread.join()
    assert mixed == []
    assert tables.lookup("t", Service.ALIAS, "k5") == "old"


# -- traces ------------------------------------------------------------------------------------------------
def test_lookup_trace_lines_in_the_reference_format(tmp_path: Path) -> None:
    source = write(tmp_path / "aliases", "root: Bob\n")
    tables = tables_with(file_decl("aliases", source), inline_map("creds", bob="$2b$12$abcdefghijklmnopqrstuuSECRETHASH"))
    with recorded_lookups() as lines:
        tables.lookup("aliases", Service.ALIAS, "Root")
        tables.lookup("aliases", Service.ALIAS, "none")
        tables.match("localnames", Service.DOMAIN, "example.org")
        tables.match("localnames", Service.DOMAIN, "mx.example.org")
        tables.lookup("creds", Service.CREDENTIALS, "bob")
    assert lines == [
        'lookup: lookup "Root" as ALIAS in table static:aliases -> "Bob"',
        'lookup: lookup "none" as ALIAS in table static:aliases -> none',
        'lookup: match "example.org" as DOMAIN in table static:<localnames> -> false',
        'lookup: match "mx.example.org" as DOMAIN in table static:<localnames> -> true',
        'lookup: lookup "bob" as CREDENTIALS in table static:creds -> "********"',
    ]
    assert not any("SECRET" in line or "$2b$" in line for line in lines)


def test_reload_failure_is_traced(tmp_path: Path) -> None:
    source = write(tmp_path / "t", "a b\n")
    tables = tables_with(file_decl("t", source))
    write(source, "a b\nc\n")
    with recorded_lookups() as lines, pytest.raises(TableLoadError):
        tables.reload("t")
    assert lines == ['table: Failed to update table "t"']


# -- the glob is OpenSMTPD's loop, transcribed -------------------------------------------------------------
def c_hostname_match(hostname: str, pattern: str) -> bool:
    """A line-by-line transcription of OpenSMTPD's util.c hostname_match, as the oracle."""
    hostname, pattern = hostname.lower(), pattern.lower()
    h = p = 0
    while p < len(pattern) and h < len(hostname):
        if pattern[p] == "*":
            while p < len(pattern) and pattern[p] == "*":
                p += 1
            following = pattern[p] if p < len(pattern) else ""
            while h < len(hostname) and hostname[h] != following:
                h += 1
            continue
        if pattern[p] != hostname[h]:
            return False
        p += 1
        h += 1
    return h == len(hostname) and p == len(pattern)


@given(st.text(alphabet="ab.*A-", max_size=8), st.text(alphabet="ab.A-\n", max_size=8))
@settings(max_examples=3000, deadline=None)
def test_glob_equals_opensmtpd_loop(pattern: str, hostname: str) -> None:
    assert hostname_match(hostname, pattern) is c_hostname_match(hostname, pattern)
    content = StaticContent(TableShape.LIST, {pattern.lower(): ""})
    assert content.match(Service.DOMAIN, hostname.lower()) is c_hostname_match(hostname, pattern)
