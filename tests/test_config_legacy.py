"""The legacy (pre-6.4) grammar: the configs of the old guides run, as the model of their modern equivalent."""

from __future__ import annotations

from pathlib import Path

from helpers_config import COMMON, lines, parse, write

from smtpd.config import load
from smtpd.config.dump import comparable
from smtpd.config.model import Method, TlsMode

ALIASES = COMMON / "aliases"


def same_model(legacy_text: str, modern_text: str, path: str = "/etc/smtpd.conf") -> None:
    legacy = parse(legacy_text, path)
    modern = parse(modern_text, path)
    assert legacy.ok, legacy.lines()
    assert modern.ok, modern.lines()
    assert not modern.warnings, modern.lines()  # the modern equivalent is warning-free
    assert comparable(legacy.config) == comparable(modern.config)
    assert legacy.config.legacy and not modern.config.legacy


def test_issue_minimal_config_is_the_modern_one() -> None:
    same_model(
        f'table aliases file:{ALIASES}\nlisten on localhost\n'
        'accept for local alias <aliases> deliver to mbox\n'
        'accept for any relay via "smtp://smtp.foo.bar" as "@foo.bar"\n',
        f'table aliases file:{ALIASES}\nlisten on localhost\n'
        'action "local" mbox alias <aliases>\n'
        'action "relay" relay host "smtp://smtp.foo.bar" mail-from "@foo.bar"\n'
        'match from local for local action "local"\n'
        'match from any auth for local action "local"\n'
        'match from local for any action "relay"\n'
        'match from any auth for any action "relay"\n',
    )


def test_issue_submission_config_is_the_modern_one(tmp_path: Path) -> None:
    cert, key = COMMON / "cert.pem", write(tmp_path, "key.pem", (COMMON / "key.pem").read_text())
    common = (f'table creds "{COMMON}/creds"\ntable vdoms "{COMMON}/domains"\ntable vusers "{COMMON}/vusers"\n'
              'listen on lo tls pki mx.domain.tld\n'
              'listen on lo port 587 tls-require pki mx.domain.tld auth <creds>\n')
    legacy = (f'pki mx.domain.tld certificate "{cert}"\npki mx.domain.tld key "{key}"\n' + common
              + 'accept from any for domain <vdoms> virtual <vusers> deliver to mbox\naccept for any relay\n')
    modern = (f'pki mx.domain.tld cert "{cert}"\npki mx.domain.tld key "{key}"\n' + common
              + 'action "virtual" mbox virtual <vusers>\naction "relay" relay\n'
              'match from any for domain <vdoms> action "virtual"\n'
              'match from local for any action "relay"\nmatch from any auth for any action "relay"\n')
    same_model(legacy, modern)
    # And through the real entry point, with the pki files checked, as `smtpd -n` does.
    legacy_file = write(tmp_path, "legacy.conf", legacy)
    result = load(str(legacy_file))
    assert result.ok, result.lines()
    assert [d.location.line for d in result.warnings] == [1, 8, 9]


def test_one_warning_per_legacy_line_showing_the_modern_lines() -> None:
    result = parse(f'table aliases file:{ALIASES}\nlisten on localhost\n'
                   'accept for local alias <aliases> deliver to mbox\n', "F")
    assert result.ok
    assert [str(w) for w in result.warnings] == [
        'F:3: warning: legacy (pre-6.4) syntax; in OpenSMTPD 6.8 write: action "local" mbox alias <aliases> ; '
        'match from local for local action "local" ; match from any for local auth action "local"'
    ]


def test_legacy_globals_translate() -> None:
    same_model(
        'expire 3d\nmax-message-size 20M\nbounce-warn 1h, 6h\nsubaddressing-delimiter "-"\nciphers "HIGH"\n'
        'max-mta-deferred 50\nlimit session max-rcpt 500\nlimit mta inet4 max-conn-per-host 3\n'
        'queue encryption key 0123456789abcdef0123456789abcdef\nlisten on lo mask-source\n'
        'accept for local deliver to maildir\n',
        'queue ttl 3d\nsmtp max-message-size 20M\nbounce warn-interval 1h, 6h\nsmtp sub-addr-delim "-"\n'
        'smtp ciphers "HIGH"\nmta max-deferred 50\nsmtp limit max-rcpt 500\nmta limit inet4 max-conn-per-host 3\n'
        'queue encryption 0123456789abcdef0123456789abcdef\nlisten on lo mask-src\n'
        'action "local" maildir\nmatch from local for local action "local"\n'
        'match from any auth for local action "local"\n',
    )


def test_legacy_rule_options_translate() -> None:
    same_model(
        'table nets { 10.0.0.0/8 }\ntable maddrs { "@example.org" }\ntable ub { vmail = "2000:2000:/v" }\n'
        'table vusers { "@example.org" = vmail }\n'
        'reject from any for domain "spam.example"\n'
        'accept tagged MSA sender <maddrs> for any relay tls verify as "@example.org" hostname mx.example.org\n'
        'accept from ! source <nets> for ! local relay backup mx1.example.org\n'
        'accept from any for domain example.org recipient <maddrs> virtual <vusers> userbase <ub> '
        'deliver to lmtp "/run/lmtp" rcpt-to as vmail expire 2d\n'
        'accept authenticated from any for any deliver to mda "/usr/bin/procmail -f -" as mail\n'
        'accept for local forward-only\n',
        'table nets { 10.0.0.0/8 }\ntable maddrs { "@example.org" }\ntable ub { vmail = "2000:2000:/v" }\n'
        'table vusers { "@example.org" = vmail }\n'
        'action "relay" relay tls mail-from "@example.org" helo mx.example.org\n'
        'action "relay-2" relay backup mx mx1.example.org\n'
        'action "virtual" lmtp "/run/lmtp" rcpt-to virtual <vusers> userbase <ub> user vmail ttl 2d\n'
        'action "local" mda "/usr/bin/procmail -f -" user mail\n'
        'action "local-2" forward-only\n'
        'match from any for domain "spam.example" reject\n'
        'match tag MSA mail-from <maddrs> for any action "relay"\n'
        'match from any auth tag MSA mail-from <maddrs> for any action "relay"\n'
        'match ! from src <nets> ! for local action "relay-2"\n'
        'match from any for domain example.org rcpt-to <maddrs> action "virtual"\n'
        'match auth from any for any action "local"\n'
        'match for local action "local-2"\n'
        'match from any auth for local action "local-2"\n',
    )


def test_identical_legacy_actions_share_one_dispatcher() -> None:
    result = parse('accept from any for domain a.example deliver to mbox\n'
                   'accept for local deliver to mbox\naccept for any relay\n')
    assert result.ok
    assert sorted(result.config.actions) == ["local", "relay"]
    assert [rule.action for rule in result.config.rules] == ["local", "local", "local", "relay", "relay"]


def test_relay_via_schemes() -> None:
    def host(url: str, extra: str = "") -> tuple[str | None, str | None]:
        result = parse(f'table secrets {{ lbl = "u:p" }}\naccept for any relay via "{url}" {extra}\n')
        assert result.ok, result.lines()
        relay = result.config.actions["relay"].relay
        return relay.host, relay.tls

    assert host("tls+auth://lbl@smtp.example.com:587", "auth <secrets>") == (
        "smtp+tls://lbl@smtp.example.com:587", None)
    assert host("smtps+auth://lbl@smtp.example.com", "auth <secrets>") == ("smtps://lbl@smtp.example.com", None)
    assert host("tls://smtp.example.com") == ("smtp+tls://smtp.example.com", None)
    assert host("smtp+tls://smtp.example.com") == ("smtp://smtp.example.com", None)
    assert host("smtp://smtp.example.com", "verify") == ("smtp://smtp.example.com", "tls")


def test_legacy_errors() -> None:
    assert lines('accept for any relay via "tls+auth://lbl@smtp.example.com"\n')[0].startswith(
        "F:1: auth without auth table")
    assert lines('accept for any relay via "foo://smtp.example.com"\n')[0] == \
        "F:1: invalid url: foo://smtp.example.com"
    assert lines('accept for local deliver to mbox forward-only\n')[0] == \
        "F:1: forward-only may not be used with a default action"
    assert lines('accept for any alias { a = b } relay\n')[0] == \
        "F:1: aliases/virtual may not be used with a relay rule"


def test_secure_listener_is_two_listeners() -> None:
    result = parse('pki "*" cert "/c"\npki "*" key "/k"\nlisten on lo secure\naccept for local deliver to mbox\n')
    assert result.ok, result.lines()
    modes = [(listener.tls, listener.port) for listener in result.config.network_listeners]
    assert modes == [(TlsMode.SMTPS, 465), (TlsMode.STARTTLS, 25)]
    assert lines('listen on lo secure port 25\naccept for local deliver to mbox\n') == [
        "smtpd: invalid listen option: tls/smtps on same port"]


def test_mixing_grammars_is_an_error_that_says_so() -> None:
    modern_first = lines('action "local" mbox\nmatch for local action "local"\naccept for any relay\n')
    assert modern_first[0].startswith("F:3: legacy and modern grammar cannot be mixed")
    legacy_first = lines('accept for local deliver to mbox\naction "relay" relay\nmatch for any action "relay"\n')
    assert legacy_first[0].startswith("F:1: warning: legacy")
    assert legacy_first[1].startswith("F:2: legacy and modern grammar cannot be mixed")
    statement = lines('expire 3d\naction "local" mbox\nmatch for local action "local"\n')
    assert statement[0].startswith("F:1: legacy and modern grammar cannot be mixed")
    assert "queue ttl 3d" in statement[0]


def test_legacy_statement_without_rules_is_a_syntax_error_as_in_opensmtpd() -> None:
    assert lines('pki mail.example.org certificate "/x"\n') == ["F:1: syntax error", "warn: no rules, nothing to do"]


def test_no_method_is_expand_only() -> None:
    result = parse(f'table aliases file:{ALIASES}\naccept for local alias <aliases>\n')
    assert result.ok
    assert result.config.actions["local"].method is Method.EXPAND_ONLY
