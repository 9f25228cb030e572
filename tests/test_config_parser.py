"""The modern grammar: lexical rules, macros, includes, tables, and the model each statement gives."""

from __future__ import annotations

from pathlib import Path

from helpers_config import lines, parse, write

from smtpd.config import load
from smtpd.config.model import AuthMode, Method, TableShape, TlsMode

RULE = 'action "a" mbox\nmatch for local action "a"\n'


# -- lexical rules ------------------------------------------------------------------------------------------
def test_comments_continuations_and_quotes() -> None:
    result = parse('# a comment\nlisten on lo # trailing\naction "a" \\\n  maildir \'~/My Mail\' # c\n'
                   'match from local \\\n for local action "a"\n')
    assert result.ok, result.lines()
    assert result.config is not None
    assert result.config.actions["a"].maildir_path == "~/My Mail"
    assert result.config.rules[0].location is not None and result.config.rules[0].location.line == 5


def test_line_numbers_count_continued_lines() -> None:
    assert lines('action "a" \\\n mbox\nmatch for local action "b"\n') == [
        "F:3: no such dispatcher: b", "warn: no rules, nothing to do"]


def test_crlf_line_endings_are_accepted() -> None:
    result = parse('listen on lo\r\naction "a" mbox\r\nmatch for local action "a"\r\n')
    assert result.ok, result.lines()


def test_a_lone_carriage_return_is_still_a_syntax_error() -> None:
    assert lines('action "a" mbox\r \nmatch for local action "a"\n') == ["F:1: syntax error"]


def test_unquoted_path_and_dollar_hash_must_be_quoted() -> None:
    assert lines('pki x cert /etc/x.crt\n' + RULE) == ["F:1: syntax error"]
    assert lines('table t { a = $6$x }\n' + RULE)[0] == "F:1: macro '6' not defined"


def test_numbers_and_words() -> None:
    """`10M` is a word (size), `-25` a number (so an invalid port), `10.0.0.0/8` a word."""
    assert parse('smtp max-message-size 10M\n' + RULE).config.smtp.max_message_size == 10 * 1024 * 1024
    assert lines('listen on lo port -25\n' + RULE) == ["F:1: invalid port: -25"]
    config = parse('action "a" mbox\nmatch from src 10.0.0.0/8 for local action "a"\n').config
    assert config is not None
    table = config.rules[0].condition("from").table
    assert config.tables[table].items == ("10.0.0.0/8",)


def test_keywords_must_be_quoted_to_be_names() -> None:
    assert lines('action relay relay\nmatch for any action relay\n')[:2] == ["F:1: syntax error", "F:2: syntax error"]
    result = parse('action "relay" relay\nmatch for any action "relay"\n')
    assert result.ok and result.config is not None and "relay" in result.config.actions


def test_unterminated_string_reports_end_of_file() -> None:
    assert lines(RULE + 'action "b" maildir "~/Mail') == [
        "F:3: reached end of file while parsing quoted string", "F:3: syntax error"]


def test_yacc_quiet_period_after_a_syntax_error() -> None:
    """After `{` and newline OpenSMTPD reports one syntax error, not one per following line."""
    text = 'table nets {\n 127.0.0.1,\n 10.0.0.0/8\n}\naction "a" mbox\nmatch from src <nets> for local action "a"\n'
    assert lines(text) == ["F:1: syntax error", 'F:6: table "nets" may not be used for from lookups',
                           "warn: no rules, nothing to do"]


# -- macros and includes -------------------------------------------------------------------------------------
def test_macros_are_expanded_outside_quotes_and_relexed() -> None:
    result = parse('p = "2525"\nh = "mx.example.org"\nlisten on lo port $p hostname "$h"\n' + RULE)
    assert result.ok, result.lines()
    listener = result.config.network_listeners[0]
    assert listener.port == 2525 and listener.hostname == "$h"


def test_macro_errors() -> None:
    assert lines('p = 25\n' + RULE) == ["F:1: syntax error"]
    assert lines('"my macro" = "x"\n' + RULE) == ["F:1: macro name cannot contain whitespace"]
    assert lines('listen on $iface\n' + RULE)[0] == "F:1: macro 'iface' not defined"


def test_command_line_macros_override_the_file() -> None:
    text = 'iface = "nosuchif0"\nlisten on $iface\n' + RULE
    assert lines(text) == ["smtpd: invalid virtual ip or interface: nosuchif0"]
    result = parse(text, macros={"iface": "lo"})
    assert result.ok, result.lines()
    assert result.config.network_listeners[0].interface == "lo"


def test_include(tmp_path: Path) -> None:
    write(tmp_path, "rules.conf", 'action "a" mbox\nmatch for local action "b"\n')
    main = write(tmp_path, "smtpd.conf", f'include "{tmp_path}/rules.conf"\nmatch for local action "a"\n')
    result = load(str(main))
    assert result.lines() == [f"{tmp_path}/rules.conf:2: no such dispatcher: b"]
    assert not result.ok


def test_include_missing(tmp_path: Path) -> None:
    main = write(tmp_path, "smtpd.conf", f'include "{tmp_path}/nope.conf"\n' + RULE)
    assert load(str(main)).lines() == [
        f"pushfile: {tmp_path}/nope.conf: No such file or directory",
        f"{main}:1: failed to include file {tmp_path}/nope.conf",
    ]


def test_missing_config_file(tmp_path: Path) -> None:
    result = load(str(tmp_path / "nope.conf"))
    assert result.lines() == [f"pushfile: {tmp_path}/nope.conf: No such file or directory"]
    assert not result.ok


# -- tables --------------------------------------------------------------------------------------------------
def test_inline_tables_and_anonymous_tables() -> None:
    result = parse('table nets { 127.0.0.1\n 10.0.0.0/8 }\ntable al { Root => alice, postmaster = root }\n'
                   'action "a" mbox alias <al> virtual { x = y }\nmatch from src <nets> for domain example.org '
                   'action "a"\n')
    assert lines('action "a" mbox virtual { alice, bob }\n' + RULE)[0] == \
        'F:1: table "<dynamic:0>" may not be used for virtual lookups'
    assert result.lines() == ["/etc/smtpd.conf:4: alias mapping already specified for this dispatcher",
                              "/etc/smtpd.conf:5: no such dispatcher: a", "warn: no rules, nothing to do"]
    good = parse('table nets { 127.0.0.1\n 10.0.0.0/8 }\ntable al { Root => alice, postmaster = root }\n'
                 'action "a" mbox alias <al>\nmatch from src <nets> for domain example.org action "a"\n')
    assert good.ok, good.lines()
    config = good.config
    assert config.tables["nets"].shape is TableShape.LIST
    assert config.tables["nets"].items == ("127.0.0.1", "10.0.0.0/8")
    assert dict(config.tables["al"].mapping) == {"root": "alice", "postmaster": "root"}
    domain = config.rules[0].condition("for")
    assert domain.variant == "domain" and config.tables[domain.table].items == ("example.org",)
    assert domain.table == "<dynamic:0>"


def test_table_errors(tmp_path: Path) -> None:
    assert lines('table t { }\n' + RULE) == ["F:1: syntax error"]
    assert lines('table t { a = b, c }\n' + RULE) == ["F:1: syntax error"]
    assert lines('table t file:relative\n' + RULE) == ["F:1: invalid backend parameter for table: t"]
    assert lines('table t nosuch:/x\n' + RULE) == ['smtpd: table_create: backend "nosuch" does not exist']
    assert lines('table t { a }\ntable t { b }\n' + RULE) == ['smtpd: table_create: table "t" already defined']
    missing = tmp_path / "nope"
    assert lines(f'table t file:{missing}\n' + RULE) == [
        f"{missing}: fopen: No such file or directory", f"F:1: invalid configuration file {missing} for table t"]
    assert lines('action "a" mbox userbase <getpwnam>\nmatch for local action "a"\n')[0] == \
        "F:1: no such table: getpwnam"


def test_file_table_shape_comes_from_the_content(tmp_path: Path) -> None:
    domains = write(tmp_path, "domains", "example.org\n*.example.net\n")
    aliases = write(tmp_path, "aliases", "# comment\nroot: alice\n")
    v6 = write(tmp_path, "v6", "# @list\n::1\n")
    bad = write(tmp_path, "bad", "alice:\n")
    config = parse(f'table d "{domains}"\ntable a file:{aliases}\ntable v file:{v6}\n'
                   'action "x" mbox alias <a>\nmatch from src <v> for domain <d> action "x"\n').config
    assert config is not None
    assert (config.tables["d"].shape, config.tables["a"].shape, config.tables["v"].shape) == (
        TableShape.LIST, TableShape.MAPPING, TableShape.LIST)
    assert config.tables["d"].source == str(domains) and config.tables["d"].backend == "file"
    assert lines(f'table d file:{domains}\naction "x" mbox alias <d>\nmatch for local action "x"\n')[0] == \
        'F:2: table "d" may not be used for alias lookups'
    assert lines(f'table b file:{bad}\n' + RULE)[:2] == [
        f"{bad}: invalid map entry line 1", f"F:1: invalid configuration file {bad} for table b"]


def test_builtin_tables_are_in_the_model() -> None:
    config = parse(RULE).config
    assert config is not None
    for name in ("<localhost>", "<anyhost>", "<localnames>", "<anydestination>", "<getpwnam>"):
        assert config.tables[name].builtin


# -- listen --------------------------------------------------------------------------------------------------
def test_listen_defaults_and_socket_listener() -> None:
    config = parse('pki "*" cert "/c"\npki "*" key "/k"\nlisten on lo\nlisten on 127.0.0.1 smtps\n'
                   'listen on ::1 port 2525 tls\n' + RULE).config
    assert config is not None
    plain, smtps, starttls = config.network_listeners
    assert plain.port == 25 and not plain.port_explicit and plain.addresses == ("127.0.0.1", "::1")
    assert smtps.port == 465 and smtps.tls is TlsMode.SMTPS
    assert starttls.port == 2525 and starttls.tls is TlsMode.STARTTLS and starttls.addresses == ("::1",)
    assert config.socket_listener.is_socket and config.socket_listener.location is None
    assert all(listener.is_local for listener in config.listeners)


def test_listen_every_option() -> None:
    text = ('pki mail cert "/c"\npki mail key "/k"\nca mail cert "/ca"\ntable creds { alice = "$2b$x" }\n'
            'table names { 127.0.0.1 = mx.example.org }\ntable snd { alice = "alice@example.org" }\n'
            'filter f phase connect match rdns junk\n'
            'listen on 127.0.0.1 inet4 port 2587 tls-require verify pki mail ca MAIL auth <creds> tag SUB '
            'hostname mx.example.org hostnames <names> mask-src no-dsn received-auth senders <snd> masquerade '
            'proxy-v2 filter f\nlisten on socket filter { f } mask-src tag LOCAL\n' + RULE)
    result = parse(text)
    assert result.ok, result.lines()
    listener = result.config.network_listeners[0]
    assert (listener.family, listener.port, listener.tls, listener.verify, listener.pki, listener.ca) == (
        "inet4", 2587, TlsMode.REQUIRE, True, ("mail",), "mail")
    assert (listener.auth, listener.auth_table, listener.tag, listener.hostname) == (
        AuthMode.REQUIRED, "creds", "SUB", "mx.example.org")
    assert listener.hostnames_table == "names" and listener.senders_table == "snd" and listener.masquerade
    assert listener.mask_src and listener.no_dsn and listener.received_auth and listener.proxy_v2
    assert listener.filter == "f"
    socket_listener = result.config.socket_listener
    assert socket_listener.location is not None and socket_listener.tag == "LOCAL" and socket_listener.mask_src
    assert result.config.filters[socket_listener.filter].chain == ("f",)


def test_listen_errors() -> None:
    assert lines('listen on nosuchif0\n' + RULE) == ["smtpd: invalid virtual ip or interface: nosuchif0"]
    assert lines('listen on lo auth\n' + RULE) == ["smtpd: invalid listen option: auth requires tls/smtps"]
    assert lines('listen on lo tls pki x\n' + RULE) == ["pki name not found: x", "smtpd"]
    assert lines('listen on lo port 25 port 26\n' + RULE) == ["F:1: port already specified"]
    assert lines('listen on lo tag A tag\n' + RULE) == ["F:1: syntax error"]
    assert lines('listen on lo tls smtps\n' + RULE) == ["F:1: TLS mode already specified"]
    assert lines('listen on socket\nlisten on socket\n' + RULE) == ["F:2: socket listener already configured"]
    assert lines('listen on socket port 25\n' + RULE) == ["F:1: syntax error"]
    assert lines('listen on lo tag ' + "x" * 33 + '\n' + RULE) == ["F:1: tag name too long"]
    # The listener is made before trailing junk is noticed, as in OpenSMTPD.
    assert lines('listen on nosuchif0 junk\n' + RULE) == ["smtpd: invalid virtual ip or interface: nosuchif0"]


def test_listener_warnings() -> None:
    warned = parse('listen on lo tls\nlisten on lo\n' + RULE)
    assert warned.ok
    texts = sorted(str(w) for w in warned.warnings)
    assert texts[0].startswith("/etc/smtpd.conf:1: warning: tls listener on lo has no pki")
    assert texts[1].startswith("/etc/smtpd.conf:2: warning: listener on 127.0.0.1 port 25 duplicates")


def test_options_taken_but_not_used_are_said() -> None:
    """An administrator must not believe a tuning or DH setting took effect: each line that we take without using
    gets a warning; max-session, the one mda limit we use, gets none."""
    warned = parse('pki mx.example dhe auto\nmda limit max-session 4 task-lowat 3\nmda limit max-session 5\n'
                   'scheduler limit max-inflight 10\n'
                   'filter "f" phase mail-from match mail-from regex "^x" reject "550 no"\naction "r" relay filter "f"\n'
                   + RULE)
    assert warned.ok
    assert [str(w) for w in warned.warnings] == [
        "/etc/smtpd.conf:1: warning: pki mx.example dhe: not used: key exchange is ECDHE (or TLS 1.3's)",
        "/etc/smtpd.conf:2: warning: mda limit task-lowat: not used (of the mda limits, only max-session is)",
        "/etc/smtpd.conf:4: warning: scheduler limit: not used (our scheduler sizes its own batches, docs/queue.md)",
        "/etc/smtpd.conf:6: warning: relay filter: not used (a relay action's filter only reports the relay "
        "sessions to its filter processes, and this one runs none, docs/filters.md)",
    ]


def test_no_pki_warning_only_when_the_listener_has_no_certificate() -> None:
    pki = 'pki {name} cert "/x/{name}.crt"\npki {name} key "/x/{name}.key"\n'

    def warnings(text: str) -> list[str]:
        result = parse(text + RULE, mailname="mx.example.org")
        assert result.ok, result.lines()
        return [str(w) for w in result.warnings if "has no pki" in str(w)]

    # the only pki declared is used whatever its name (smtpd.smtp.tls.listener_pkis)
    assert warnings(pki.format(name="other.example") + "listen on lo tls\n") == []
    # a pki named after the mailname, or `*`, declared after the listener
    assert warnings("listen on lo smtps\n" + pki.format(name="a.example") + pki.format(name="mx.example.org")) == []
    assert warnings("listen on lo tls\n" + pki.format(name="a.example") + 'pki "*" cert "/x/any.crt"\n'
                    'pki "*" key "/x/any.key"\n') == []
    # two pkis, neither of them the listener's: TLS cannot start
    assert warnings(pki.format(name="a.example") + pki.format(name="b.example") + "listen on lo tls\n") == [
        "/etc/smtpd.conf:5: warning: tls listener on lo has no pki: TLS cannot start (add `pki NAME` and declare "
        "that pki)"]


# -- actions -------------------------------------------------------------------------------------------------
def test_local_actions() -> None:
    result = parse('mda wrapper w "/bin/w %{mda}"\ntable al { root = alice }\n'
                   'action "m" maildir "~/Mail" junk alias <al> user mail ttl 6h\n'
                   'action "l" lmtp "/run/lmtp" rcpt-to virtual { "@x" = y }\n'
                   'action "d" mda "/usr/bin/procmail -f -" wrapper w\naction "e" expand-only\n'
                   'action "f" forward-only\naction "b" mbox\n' + 'match for local action "m"\n')
    assert result.ok, result.lines()
    actions = result.config.actions
    assert (actions["m"].method, actions["m"].maildir_path, actions["m"].junk, actions["m"].user,
            actions["m"].ttl, actions["m"].alias_table) == (Method.MAILDIR, "~/Mail", True, "mail", 21600, "al")
    assert actions["l"].lmtp_destination == "/run/lmtp" and actions["l"].lmtp_rcpt_to
    assert actions["d"].mda_command == "/usr/bin/procmail -f -" and actions["d"].wrapper == "w"
    assert actions["e"].method is Method.EXPAND_ONLY and actions["f"].method is Method.FORWARD_ONLY
    assert actions["b"].userbase_table is None and actions["b"].is_local


def test_relay_action() -> None:
    result = parse('srs key "k"\ntable sec { lbl = "u:p" }\ntable helos { 127.0.0.1 = mx.example.org }\n'
                   'action "r" relay host "smtp+tls://lbl@mx.example.net:587" tls no-verify auth <sec> '
                   'helo mx.example.org helo-src <helos> src 127.0.0.1 pki x ca X mail-from "@example.org" '
                   'srs ttl 1d\naction "b" relay backup mx mx1.example.org\n' + 'match for any action "r"\n')
    assert result.ok, result.lines()
    relay = result.config.actions["r"].relay
    assert relay.host == "smtp+tls://lbl@mx.example.net:587" and relay.tls == "no-verify"
    assert (relay.auth_table, relay.helo, relay.helo_src_table, relay.src, relay.pki, relay.ca) == (
        "sec", "mx.example.org", "helos", "127.0.0.1", "x", "x")
    assert relay.mail_from == "@example.org" and relay.srs and result.config.actions["r"].ttl == 86400
    backup = result.config.actions["b"].relay
    assert backup.backup and backup.backup_mx == "mx1.example.org"


def test_action_errors() -> None:
    assert lines('action "a" mbox user mail\n' + RULE)[0] == "F:1: user may not be specified for this dispatcher"
    assert lines('action "a" maildir ttl 1d ttl 2d\n' + RULE)[0] == "F:1: ttl already specified for this dispatcher"
    assert lines('action "a" maildir ttl 0s\n' + RULE)[0] == 'F:1: ttl delay "0" is invalid'
    assert lines('action "r" relay ttl 2d helo x\n' + RULE) == ["F:1: syntax error"]
    assert lines('action "r" relay backup host smtp://x\n' + RULE)[0] == \
        "F:1: backup and host are mutually exclusive"
    assert lines('action "r" relay srs\n' + RULE)[0] == \
        "F:1: an srs key is required for srs to be specified in an action"
    assert lines('action "a" mbox\naction "a" maildir\nmatch for local action "a"\n') == [
        "F:2: dispatcher already declared with that name: a"]


def test_relay_warnings() -> None:
    result = parse('action "r" relay host "foo://x" src "nothing"\nmatch for any action "r"\n')
    assert result.ok
    texts = [str(w) for w in result.warnings]
    assert any('unknown scheme "foo"' in text for text in texts)
    assert any('relay src "nothing" is not an IP address' in text for text in texts)


# -- match ---------------------------------------------------------------------------------------------------
def test_match_conditions_defaults_and_negation() -> None:
    result = parse('action "a" mbox\nmatch ! from src { 10.0.0.0/8 } ! for domain regex "x$" tag T '
                   'helo h ! auth tls mail-from m rcpt-to regex r action "a"\nmatch action "a"\n'
                   'match from auth <users> for rcpt-to r reject\n'.replace("<users>", "u"))
    assert result.ok, result.lines()
    first, second, third = result.config.rules
    families = [c.family for c in first.conditions]
    assert families == ["from", "for", "tag", "helo", "auth", "tls", "mail-from", "rcpt-to"]
    assert first.condition("from").negated and first.condition("for").regex and first.condition("auth").negated
    assert [(c.family, c.variant) for c in second.conditions] == [("from", "local"), ("for", "local")]
    assert third.reject and third.action is None
    assert (third.condition("from").variant, third.condition("for").variant) == ("auth", "rcpt-to")
    assert [rule.number for rule in result.config.rules] == [1, 2, 3]


def test_match_errors() -> None:
    assert lines('action "a" mbox\nmatch from ! any for local action "a"\n') == [
        "F:2: syntax error", "warn: no rules, nothing to do"]
    assert lines('action "a" mbox\nmatch from auth auth action "a"\n')[0] == \
        "F:2: auth already specified for this rule"
    assert lines('action "a" mbox\nmatch for local action "a" reject\n') == ["F:2: syntax error"]
    assert lines('listen on lo\nmatch for local action "x"\naction "x" mbox\n') == [
        "F:2: no such dispatcher: x", "warn: no rules, nothing to do"]


def test_no_rules_and_empty_file() -> None:
    assert lines("") == ["warn: no rules, nothing to do"]
    assert lines('action "a" mbox\n') == ["warn: no rules, nothing to do"]


# -- globals -------------------------------------------------------------------------------------------------
def test_global_statements() -> None:
    result = parse('admd "mx"\nbounce warn-interval 1h, 4h, 1d, 3d, 5d\nsmtp max-message-size 1.5M\n'
                   'smtp sub-addr-delim "-"\nsmtp ciphers "HIGH"\nsmtp limit max-rcpt 10 max-mails 5\n'
                   'queue compression\nqueue encryption 0123456789abcdef0123456789abcdef\nqueue ttl 2d\n'
                   'srs key "s"\nsrs key backup "t"\nsrs ttl 7d\nmda limit max-session 3\n'
                   'mta max-deferred 5\nmta limit for domain x.org inet6 max-conn-per-host 2\n'
                   'scheduler limit max-inflight 9\n' + RULE)
    assert result.ok, result.lines()
    config = result.config
    assert config.admd == "mx" and config.bounce_warn_intervals == (3600, 14400, 86400, 259200)
    assert config.smtp.max_message_size == 1572864 and config.smtp.sub_addr_delim == "-"
    assert (config.smtp.ciphers, config.smtp.max_rcpt, config.smtp.max_mails) == ("HIGH", 10, 5)
    assert config.queue.compression and config.queue.encryption and config.queue.ttl == 172800
    assert (config.srs.key, config.srs.backup_key, config.srs.ttl) == ("s", "t", 604800)
    assert config.mda_limits == (("max-session", 3),) and config.mta_max_deferred == 5
    assert config.mta_limits[0].domain == "x.org" and config.mta_limits[0].family == "inet6"
    assert config.scheduler_limits == (("max-inflight", 9),)


def test_global_errors() -> None:
    assert lines('srs key "k"\nsrs ttl 12h\n' + RULE) == ['F:2: ttl delay "12" is too short']
    assert lines('smtp sub-addr-delim "@"\n' + RULE) == ["F:1: sub-addr-delim uses invalid character"]
    assert lines('smtp max-message-size 10Q\n' + RULE) == ["F:1: invalid size: 10Q"]
    assert lines('mda limit max-parallel 5\n' + RULE) == ["F:1: invalid scheduler limit keyword: max-parallel"]
    assert lines('queue ttl 4w\n' + RULE) == ["F:1: invalid ttl delay: 4w"]
    assert lines('pki mx cert "/c"\n' + RULE) == ["F:1: syntax error"]  # mx is a keyword
    assert lines('pki x dhe strong\n' + RULE) == ["F:1: invalid DHE keyword: strong"]
    assert lines('ca "bad name!" cert "/x"\n' + RULE) == ["F:1: not a valid domain name: bad name!"]


def test_filters() -> None:
    result = parse('proc p "/bin/p" user u\nfilter a proc p\nfilter b proc-exec "/bin/b" group g\n'
                   'filter c phase mail-from match !mail-from regex "x" reject "550 no"\n'
                   'filter ch chain { a, b, c }\nlisten on lo filter ch\n' + RULE)
    assert result.ok, result.lines()
    filters = result.config.filters
    assert filters["a"].proc == "p" and filters["b"].command == "/bin/b" and filters["b"].group == "g"
    assert filters["c"].phase == "mail-from" and filters["c"].decision == "reject"
    assert filters["c"].decision_arg == "550 no" and filters["c"].conditions[0].negated
    assert filters["ch"].chain == ("a", "b", "c")
    assert lines('filter f phase commit match rdns junk\n' + RULE) == ["F:1: syntax error"]
    assert lines('filter f phase connect match !fcrdns rdns junk\n' + RULE) == ["F:1: syntax error"]
    assert lines('filter f proc nope\n' + RULE) == ["F:1: no processor exist with that name: nope"]


def test_pki_and_queue_checks(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert.pem", (Path(__file__).parent / "config_corpus/common/cert.pem").read_text())
    key = write(tmp_path, "key.pem", (Path(__file__).parent / "config_corpus/common/key.pem").read_text())
    loose = write(tmp_path, "loose.pem", key.read_text(), mode=0o644)
    good = write(tmp_path, "good.conf", f'pki mail cert "{cert}"\npki mail key "{key}"\nlisten on lo tls pki mail\n'
                 + RULE)
    assert load(str(good)).ok
    assert load(str(good), check_files=False).ok
    insecure = write(tmp_path, "bad.conf", f'pki mail cert "{cert}"\npki mail key "{loose}"\n' + RULE)
    assert load(str(insecure)).lines() == [
        f"warn:  {loose}: insecure permissions: must be at most rwxr----- ",
        "smtpd: load_pki_keys: failed to load key file"]
    nokey = write(tmp_path, "nokey.conf", f'pki mail cert "{cert}"\n' + RULE)
    assert load(str(nokey)).lines() == ["smtpd: load_pki_tree: missing key file"]
    badkey = write(tmp_path, "q.conf", 'queue encryption "short"\n' + RULE)
    assert load(str(badkey)).lines() == ["smtpd: crypto_setup:invalid key for queue encryption"]


def test_include_loop_is_an_error(tmp_path: Path) -> None:
    main = tmp_path / "smtpd.conf"
    write(tmp_path, "smtpd.conf", f'include "{main}"\n' + RULE)
    assert load(str(main)).lines() == [
        f"pushfile: {main}: include loop (the file is already being read)",
        f"{main}:1: failed to include file {main}",
    ]


def test_listen_address_of_the_other_family_makes_no_listener() -> None:
    """OpenSMTPD's resolver refuses `::1` as IPv4: a `warn:` line, no listener, and parsing goes on."""
    result = parse('listen on ::1 inet4\n' + RULE)
    assert result.lines() == ['warn: host_dns: could not parse "::1": Address family for hostname not supported']
    assert result.ok and result.config.network_listeners == ()


def test_pki_names_are_case_insensitive() -> None:
    result = parse('pki mail.example.org cert "/c"\npki mail.example.org key "/k"\n'
                   'listen on lo tls pki MAIL.Example.org\n' + RULE)
    assert result.ok, result.lines()
    assert result.config.network_listeners[0].pki == ("mail.example.org",)


def test_a_db_table_that_fails_to_load_keeps_its_type(tmp_path: Path) -> None:
    """A db table is a mapping to OpenSMTPD 6.8 (verified), loaded or not."""
    missing = tmp_path / "nope.db"
    assert lines(f'table t db:{missing}\naction "a" mbox\nmatch tag <t> for local action "a"\n')[1] == \
        'F:3: table "t" may not be used for tag lookups'
    assert lines(f'table t db:{missing}\naction "a" mbox alias <t> wrapper w\nmatch for local action "a"\n') == [
        f"F:1: invalid configuration file {missing} for table t", "F:2: no mda wrapper with that name: w",
        "F:3: no such dispatcher: a", "warn: no rules, nothing to do"]
