"""The relay agent in-process against real SMTP servers on loopback: smarthosts, replies, TLS, AUTH, LMTP."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from helpers_mta import (
    CLOSE,
    MemoryTables,
    RawRemote,
    Remote,
    ScriptedHandler,
    make_certificate,
    relay_config,
    standard_script,
)

from smtpd.config.model import Action, Ca, Config, Method, Pki, Relay
from smtpd.delivery import DeliveryResult, Outcome
from smtpd.mta import MtaAgent
from smtpd.mta.mx import Resolver
from smtpd.queue.envelope import Envelope

MESSAGE = b"From: bob@local.test\nTo: alice@remote.test\nSubject: hello\n\nHello Alice.\n.leading dot\n"


def write_message(tmp_path: os.PathLike[str], data: bytes = MESSAGE, name: str = "message") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def envelope(dest: str, sender: str = "bob@local.test", msgid: int = 0x0A0B0C0D, n: int = 1) -> Envelope:
    return Envelope(evpid=(msgid << 32) | n, dispatcher="relay", sender=sender, rcpt=dest, dest=dest)


def agent_for(config: Config, tables: MemoryTables | None = None, **kwargs: object) -> MtaAgent:
    kwargs.setdefault("resolver", Resolver("127.0.0.1:9"))  # never the machine's resolver
    kwargs.setdefault("timeout", 10.0)
    return MtaAgent(config, tables or MemoryTables(), "sender.test", **kwargs)  # type: ignore[arg-type]


def relay_all(agent: MtaAgent, envelopes: list[Envelope], path: str) -> list[DeliveryResult]:
    async def run() -> list[DeliveryResult]:
        await agent.start()
        try:
            return list(await asyncio.gather(*(agent.deliver(item, path) for item in envelopes)))
        finally:
            await agent.stop()
    return asyncio.run(run())


def smarthost(remote: Remote | RawRemote, scheme: str = "smtp", label: str = "") -> str:
    return f"{scheme}://{label}{remote.host}:{remote.port}"


# -- plain smarthost ---------------------------------------------------------------------------------------------
def test_one_message_to_two_recipients_goes_in_one_transaction(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        config = relay_config(Relay(host=smarthost(remote)))
        results = relay_all(agent_for(config), [envelope("alice@remote.test", n=1),
                                                envelope("carol@other.test", n=2)], write_message(tmp_path))
    assert [result.outcome for result in results] == [Outcome.OK, Outcome.OK]
    assert len(remote.received) == 1
    received = remote.received[0]
    assert received.mail_from == "bob@local.test"
    assert sorted(received.rcpt_tos) == ["alice@remote.test", "carol@other.test"]
    assert received.message["Subject"] == "hello"
    assert b"\r\n.leading dot\r\n" in received.data  # dot-stuffing was undone by the receiver, CRLF on the wire


def test_mail_from_rewrites_the_domain_only(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        config = relay_config(Relay(host=smarthost(remote), mail_from="@foo.bar"))
        results = relay_all(agent_for(config), [envelope("alice@remote.test")], write_message(tmp_path))
        bounce = relay_all(agent_for(config), [envelope("alice@remote.test", sender="", msgid=7)],
                           write_message(tmp_path, name="bounce"))
    assert results[0].outcome is Outcome.OK and bounce[0].outcome is Outcome.OK
    assert [item.mail_from for item in remote.received] == ["bob@foo.bar", "<>"]


def test_mail_from_with_a_full_address_replaces_both_parts(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        config = relay_config(Relay(host=smarthost(remote), mail_from="relay@foo.bar"))
        relay_all(agent_for(config), [envelope("alice@remote.test")], write_message(tmp_path))
    assert remote.received[0].mail_from == "relay@foo.bar"


def test_helo_option_is_the_ehlo_name(tmp_path: os.PathLike[str]) -> None:
    with RawRemote(standard_script()) as remote:
        config = relay_config(Relay(host=smarthost(remote), helo="out.example.test"))
        results = relay_all(agent_for(config), [envelope("alice@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK
    assert remote.commands[0] == "EHLO out.example.test"


def test_default_helo_is_the_mailname(tmp_path: os.PathLike[str]) -> None:
    with RawRemote(standard_script()) as remote:
        relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [envelope("a@remote.test")],
                  write_message(tmp_path))
    assert remote.commands[0] == "EHLO sender.test"


def test_helo_src_table_maps_the_source_address(tmp_path: os.PathLike[str]) -> None:
    tables = MemoryTables(maps={"helos": {"127.0.0.1": "mapped.example.test"}})
    with RawRemote(standard_script()) as remote:
        config = relay_config(Relay(host=smarthost(remote), helo_src_table="helos", src="127.0.0.1"))
        relay_all(agent_for(config, tables), [envelope("a@remote.test")], write_message(tmp_path))
    assert remote.commands[0] == "EHLO mapped.example.test"


# -- replies -----------------------------------------------------------------------------------------------------
def test_5xx_multiline_reply_is_a_permanent_failure_with_the_whole_reply(tmp_path: os.PathLike[str]) -> None:
    refusal = "550-5.1.1 The mailbox you tried to reach does not exist.\r\n550-5.1.1 Please check the address\r\n" \
              "550 5.1.1 and try again."
    handler = ScriptedHandler(rcpt_replies={"ghost@remote.test": refusal})
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))),
                            [envelope("ghost@remote.test", n=1), envelope("alice@remote.test", n=2)],
                            write_message(tmp_path))
    assert results[0].outcome is Outcome.PERMFAIL
    assert results[0].text == refusal.replace("\r\n", "\n")
    assert results[0].esc_class == 5 and results[0].esc_code == 11
    assert results[1].outcome is Outcome.OK
    assert remote.received[0].rcpt_tos == ["alice@remote.test"]


def test_4xx_rcpt_reply_is_a_temporary_failure(tmp_path: os.PathLike[str]) -> None:
    handler = ScriptedHandler(rcpt_replies={"busy@remote.test": "451 4.7.1 Greylisted, come back later"})
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))),
                            [envelope("busy@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "451 4.7.1 Greylisted, come back later"
    assert remote.received == []


class _RecipientLimit(ScriptedHandler):
    """A server that takes at most ``limit`` recipients per transaction ("452 4.5.3 Too many recipients")."""

    def __init__(self, limit: int, reply: str = "452 4.5.3 Too many recipients", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit
        self.reply = reply
        self.rcpt_commands: list[str] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        self.rcpt_commands.append(address)
        if len(envelope.rcpt_tos) >= self.limit:
            return self.reply
        return await super().handle_RCPT(server, session, envelope, address, options)


def test_recipients_beyond_the_servers_limit_go_in_a_new_transaction(tmp_path: os.PathLike[str]) -> None:
    # RFC 5321 4.5.3.1.10: a 452 once the server has taken some recipients is its per-transaction limit; the
    # others are sent at once in the next transaction, not deferred for a retry minutes later.
    handler = _RecipientLimit(3, rcpt_replies={"r5@remote.test": "550 5.1.1 No such user"})
    envelopes = [envelope(f"r{n}@remote.test", n=n) for n in range(1, 9)]
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), envelopes,
                            write_message(tmp_path))
    by_rcpt = {item.dest: result for item, result in zip(envelopes, results, strict=True)}
    assert by_rcpt.pop("r5@remote.test").text == "550 5.1.1 No such user"
    assert all(result.outcome is Outcome.OK for result in by_rcpt.values()), by_rcpt
    delivered = [rcpt for received in remote.received for rcpt in received.rcpt_tos]
    assert sorted(delivered) == sorted(by_rcpt)  # each once: nothing lost, nothing twice
    assert [len(received.rcpt_tos) for received in remote.received] == [3, 3, 1]
    assert len(handler.sessions) == 1  # the same session


def test_a_552_for_too_many_recipients_is_taken_as_452(tmp_path: os.PathLike[str]) -> None:
    # RFC 5321 4.5.3.1.10: RFC 821 gave "too many recipients" the code 552, and clients SHOULD take a 552 to RCPT
    # as temporary. It was a permanent failure: the recipients past an old server's limit were bounced.
    handler = _RecipientLimit(2, reply="552 Too many recipients")
    envelopes = [envelope(f"r{n}@remote.test", n=n) for n in range(1, 6)]
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), envelopes,
                            write_message(tmp_path))
    assert [result.outcome for result in results] == [Outcome.OK] * 5, [result.text for result in results]
    assert [len(received.rcpt_tos) for received in remote.received] == [2, 2, 1]
    first = _RecipientLimit(0, reply="552 5.2.2 Mailbox full")
    with Remote(first) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [envelope("a@remote.test")],
                            write_message(tmp_path))
    assert (results[0].outcome, results[0].text) == (Outcome.TEMPFAIL, "552 5.2.2 Mailbox full")


def test_452_to_the_first_recipient_is_still_a_temporary_failure(tmp_path: os.PathLike[str]) -> None:
    handler = _RecipientLimit(0)
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))),
                            [envelope("a@remote.test", n=1), envelope("b@remote.test", n=2)], write_message(tmp_path))
    assert [result.outcome for result in results] == [Outcome.TEMPFAIL, Outcome.TEMPFAIL]
    assert results[0].text == "452 4.5.3 Too many recipients"
    assert remote.received == []


def test_refused_mail_from_fails_every_recipient(tmp_path: os.PathLike[str]) -> None:
    handler = ScriptedHandler(mail_reply="553 5.7.1 Sender address rejected")
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))),
                            [envelope("a@remote.test", n=1), envelope("b@remote.test", n=2)], write_message(tmp_path))
    assert [result.outcome for result in results] == [Outcome.PERMFAIL, Outcome.PERMFAIL]
    assert results[0].text == "553 5.7.1 Sender address rejected"


def test_refused_message_fails_every_accepted_recipient(tmp_path: os.PathLike[str]) -> None:
    handler = ScriptedHandler(data_reply="554 5.6.0 Message content rejected")
    with Remote(handler) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))),
                            [envelope("a@remote.test", n=1), envelope("b@remote.test", n=2)], write_message(tmp_path))
    assert [result.text for result in results] == ["554 5.6.0 Message content rejected"] * 2
    assert all(result.outcome is Outcome.PERMFAIL for result in results)


def test_connection_refused_is_a_temporary_failure(tmp_path: os.PathLike[str]) -> None:
    from helpers_mta import free_port
    config = relay_config(Relay(host=f"smtp://127.0.0.1:{free_port()}"))
    results = relay_all(agent_for(config), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text.startswith("Connection failed: ")


def test_greeting_refusal_is_a_temporary_failure(tmp_path: os.PathLike[str]) -> None:
    with RawRemote(standard_script({"GREETING": b"554 5.3.2 go away\r\n"})) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [envelope("a@remote.test")],
                            write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "554 5.3.2 go away"


@pytest.mark.parametrize("bad_reply", [
    b"25O ok\r\n",  # not a code
    b"250-first line\r\n251 another code\r\n",  # the code changes inside a multi-line reply
    b"250-ok\r\n250\r\n250x\r\n",  # the CVE-2020-8794 shape: a continuation that is not one
    b"250 " + b"x" * 20000 + b"\r\n",  # an oversized line
    b"".join(b"250-line %d\r\n" % number for number in range(200)) + b"250 end\r\n",  # too many lines
])
def test_malformed_or_oversized_reply_fails_that_envelope_only(tmp_path: os.PathLike[str], bad_reply: bytes) -> None:
    with RawRemote(standard_script({"RCPT": bad_reply})) as bad, Remote() as good:
        config = Config(path="<test>", actions={
            "bad": Action("bad", Method.RELAY, relay=Relay(host=smarthost(bad))),
            "relay": Action("relay", Method.RELAY, relay=Relay(host=smarthost(good))),
        })
        victim = envelope("a@remote.test", n=1)
        victim.dispatcher = "bad"
        bystander = envelope("b@remote.test", msgid=0x0B, n=2)
        results = relay_all(agent_for(config), [victim, bystander], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text.startswith("Bad response from remote host")
    assert "\n" not in results[0].text and "\r" not in results[0].text
    assert results[1].outcome is Outcome.OK
    assert good.received[0].rcpt_tos == ["b@remote.test"]


@pytest.mark.parametrize(("overrides", "text"), [
    # a banner of two "220 " lines: read one step late, the RCPT's 250 answered DATA and the message counted as
    # delivered although it was never sent
    ({"GREETING": b"220 raw.test first banner line\r\n220 raw.test second banner line\r\n"}, "out of step"),
    ({"DATA": b"354 go ahead\r\n250 2.0.0 queued before the end\r\n"}, "out of step"),  # an answer too early
    ({"DATA": b"250 2.0.0 no message wanted\r\n"}, "DATA answered with '250 2.0.0 no message wanted'"),
    ({"EOM": b"354 more please\r\n"}, "354 more please"),  # no final answer: not delivered
    ({"MAIL": b"354 what\r\n"}, "354 what"),
])
def test_a_server_out_of_step_gets_no_message_counted_as_delivered(tmp_path: os.PathLike[str],
                                                                   overrides: dict[str, bytes], text: str) -> None:
    with RawRemote(standard_script(overrides)) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [envelope("a@remote.test")],
                            write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL, results[0].text
    assert text in results[0].text


def test_connection_closed_in_the_middle_is_a_temporary_failure(tmp_path: os.PathLike[str]) -> None:
    with RawRemote(standard_script({"DATA": b"451" + CLOSE})) as cut, \
            RawRemote(standard_script({"MAIL": CLOSE})) as gone:
        # "451" without a line end and the server hangs up; the other hangs up instead of answering MAIL
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(cut)))), [envelope("a@remote.test")],
                            write_message(tmp_path))
        results += relay_all(agent_for(relay_config(Relay(host=smarthost(gone)))), [envelope("a@remote.test")],
                             write_message(tmp_path))
    assert [result.outcome for result in results] == [Outcome.TEMPFAIL, Outcome.TEMPFAIL]
    assert results[0].text == "Connection closed unexpectedly (inside a reply line)"
    assert results[1].text == "Connection closed unexpectedly"


# -- several messages per connection ------------------------------------------------------------------------------
def test_consecutive_messages_reuse_the_session(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        agent = agent_for(relay_config(Relay(host=smarthost(remote))))
        paths = [write_message(tmp_path, name=f"m{number}") for number in range(3)]

        async def run() -> list[DeliveryResult]:
            await agent.start()
            results = []
            for number, path in enumerate(paths):
                results.append(await agent.deliver(envelope("a@remote.test", msgid=100 + number), path))
            await agent.stop()
            return results
        results = asyncio.run(run())
    assert [result.outcome for result in results] == [Outcome.OK] * 3
    assert len(remote.received) == 3
    assert len(remote.handler.sessions) == 1


# -- TLS and AUTH ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory):
    return make_certificate(str(tmp_path_factory.mktemp("pki")), "smarthost.test")


def tls_config(remote: Remote, scheme: str, certificate, tls: str | None = None, label: str = "") -> Config:
    relay = Relay(host=f"{scheme}://{label}smarthost.test:{remote.port}", auth_table="secrets" if label else None,
                  ca="smarthost.test" if tls != "no-verify" else None, tls=tls)
    return relay_config(relay, cas={"smarthost.test": Ca("smarthost.test", certificate.cert)})


def tls_agent(config: Config, dns) -> MtaAgent:
    tables = MemoryTables(maps={"secrets": {"lbl": "relayuser:s3cret-pass"}})
    return agent_for(config, tables, resolver=Resolver(dns.setting))


@pytest.fixture()
def dns():
    from helpers_mta import DnsServer
    with DnsServer({"smarthost.test": [("A", "127.0.0.1")]}) as server:
        yield server


def test_starttls_and_auth_against_the_smarthost(tmp_path: os.PathLike[str], certificate, dns) -> None:
    with Remote(tls=certificate, require_starttls=True, credentials={"relayuser": "s3cret-pass"}) as remote:
        config = tls_config(remote, "smtp+tls", certificate, label="lbl@")
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK, results[0].text
    assert remote.received[0].tls is True
    assert remote.received[0].auth_user == "relayuser"


def test_replies_sent_with_the_starttls_answer_are_dropped_before_the_handshake(tmp_path: os.PathLike[str],
                                                                               certificate, dns) -> None:
    """The STARTTLS injection class (CVE-2011-0411, client side): lines a server (or a man in the middle) sends in
    plaintext after its 220 must not be read as answers inside the TLS session. Read, the 250 would answer our
    EHLO, every later answer would come one step late, and the message would not go."""
    import ssl

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate.cert, certificate.key)
    script = standard_script({"EHLO": b"250-raw.test\r\n250 STARTTLS\r\n",
                              "STARTTLS": b"220 2.0.0 go ahead\r\n250 injected\r\n"})
    with RawRemote(script, tls=server_context) as remote:
        config = tls_config(remote, "smtp+tls", certificate)
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK, results[0].text
    assert remote.commands[:3] == ["EHLO " + remote.commands[0].split(" ", 1)[1], "STARTTLS",
                                   remote.commands[0]]  # EHLO again, inside TLS
    assert "<EOM>" in remote.commands


def test_smtps_and_auth_against_the_smarthost(tmp_path: os.PathLike[str], certificate, dns) -> None:
    with Remote(tls=certificate, smtps=True, credentials={"relayuser": "s3cret-pass"}) as remote:
        config = tls_config(remote, "smtps", certificate, label="lbl@")
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK, results[0].text
    assert remote.received[0].auth_user == "relayuser"


class CramOnlyHandler(ScriptedHandler):
    """A smarthost whose only AUTH mechanism is CRAM-MD5 (aiosmtpd finds it by this method's name)."""

    async def auth_CRAM__MD5(self, server: object, args: list[str]) -> object:
        return None  # refused


def test_only_login_offered_authenticates_with_login(tmp_path: os.PathLike[str], certificate, dns) -> None:
    with Remote(tls=certificate, require_starttls=True, credentials={"relayuser": "s3cret-pass"}) as remote:
        remote.controller.SMTP_kwargs["auth_exclude_mechanism"] = ["PLAIN"]
        config = tls_config(remote, "smtp+tls", certificate, label="lbl@")
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK, results[0].text
    assert remote.received[0].auth_user == "relayuser"


def test_no_credentials_for_a_server_offering_neither_plain_nor_login(tmp_path: os.PathLike[str], certificate,
                                                                       dns) -> None:
    handler = CramOnlyHandler()
    with Remote(handler, tls=certificate, require_starttls=True, credentials={"relayuser": "s3cret-pass"}) as remote:
        remote.controller.SMTP_kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        config = tls_config(remote, "smtp+tls", certificate, label="lbl@")
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "no supported AUTH method"  # as OpenSMTPD 6.8; PLAIN was sent anyway (504)
    assert remote.received == []


def test_an_unverifiable_smtps_certificate_is_named_as_for_starttls(tmp_path: os.PathLike[str], certificate,
                                                                     dns) -> None:
    """smtps said `TLS handshake failed: CERTIFICATE_VERIFY_FAILED` where STARTTLS says what failed."""
    with Remote(tls=certificate, smtps=True) as remote:
        config = relay_config(Relay(host=f"smtps://smarthost.test:{remote.port}", tls="tls"))
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text.startswith("TLS certificate verification failed: "), results[0].text


def test_wrong_password_is_a_temporary_failure(tmp_path: os.PathLike[str], certificate, dns) -> None:
    with Remote(tls=certificate, require_starttls=True, credentials={"relayuser": "other"}) as remote:
        config = tls_config(remote, "smtp+tls", certificate, label="lbl@")
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text.startswith("AUTH rejected: 535")
    assert remote.received == []


def test_unverifiable_certificate_is_refused_only_when_the_action_says_tls(tmp_path: os.PathLike[str], certificate,
                                                                           dns) -> None:
    """A smarthost with a certificate nobody vouches for (self-signed, an internal relay): `smtp+tls://` alone
    requires TLS and delivers, as OpenSMTPD 6.8 does (it was refused, and the mail waited until it bounced);
    the action's `tls` has the certificate checked and refused; `tls no-verify` delivers."""
    results = {}
    with Remote(tls=certificate, require_starttls=True) as remote:
        for number, tls in enumerate((None, "tls", "no-verify"), start=1):
            config = relay_config(Relay(host=f"smtp+tls://smarthost.test:{remote.port}", tls=tls))
            results[tls] = relay_all(tls_agent(config, dns), [envelope("a@remote.test", msgid=number)],
                                     write_message(tmp_path, name=f"m{number}"))[0]
    assert results[None].outcome is Outcome.OK
    assert results["tls"].outcome is Outcome.TEMPFAIL
    assert "certificate verification failed" in results["tls"].text
    assert results["no-verify"].outcome is Outcome.OK
    assert len(remote.received) == 2 and all(item.tls for item in remote.received)


def test_a_session_verified_against_one_ca_is_not_reused_for_an_action_trusting_another(
        tmp_path: os.PathLike[str], certificate, dns) -> None:
    # Two actions to one smarthost, each checking it against its own `ca`. The session the first opened (verified
    # against its CA) was reused for the second, whose CA does not vouch for the server: its mail went anyway.
    other = make_certificate(str(tmp_path), "smarthost.test")  # another self-signed certificate, same name
    with Remote(tls=certificate, require_starttls=True) as remote:
        url = f"smtp+tls://smarthost.test:{remote.port}"
        config = Config(path="<test>", cas={"good": Ca("good", certificate.cert), "other": Ca("other", other.cert)},
                        actions={"good": Action("good", Method.RELAY, relay=Relay(host=url, tls="tls", ca="good")),
                                 "relay": Action("relay", Method.RELAY, relay=Relay(host=url, tls="tls", ca="other"))})
        agent = tls_agent(config, dns)
        first = Envelope(evpid=(1 << 32) | 1, dispatcher="good", sender="bob@local.test", rcpt="a@remote.test",
                         dest="a@remote.test")

        async def run() -> list[DeliveryResult]:
            await agent.start()
            results = [await agent.deliver(first, write_message(tmp_path, name="m1")),
                       await agent.deliver(envelope("b@remote.test", msgid=2), write_message(tmp_path, name="m2"))]
            await agent.stop()
            return results
        results = asyncio.run(run())
    assert results[0].outcome is Outcome.OK, results[0].text
    assert results[1].outcome is Outcome.TEMPFAIL and "certificate verification failed" in results[1].text
    assert [item.rcpt_tos for item in remote.received] == [["a@remote.test"]]


def test_a_rejected_certificate_does_not_disable_the_route(tmp_path: os.PathLike[str], certificate, dns) -> None:
    # The action's policy refuses the host; the network path is fine: the route is not penalised for it.
    with Remote(tls=certificate, require_starttls=True) as remote:
        agent = tls_agent(relay_config(Relay(host=f"smtp+tls://smarthost.test:{remote.port}", tls="tls")), dns)

        async def run() -> tuple[list[DeliveryResult], list[dict[str, object]]]:
            await agent.start()
            results = [await agent.deliver(envelope("a@remote.test", msgid=number), write_message(tmp_path))
                       for number in range(1, 6)]
            routes = agent.control_view("routes")
            await agent.stop()
            return results, routes
        results, routes = asyncio.run(run())
    assert all(result.text.startswith("TLS certificate verification failed") for result in results), results
    assert routes[0]["nerror"] == 0 and routes[0]["flags"] == "----"


def test_certificate_for_another_name_is_refused(tmp_path: os.PathLike[str], certificate) -> None:
    from helpers_mta import DnsServer
    with DnsServer({"elsewhere.test": [("A", "127.0.0.1")]}) as dns, \
            Remote(tls=certificate, require_starttls=True) as remote:
        config = relay_config(Relay(host=f"smtp+tls://elsewhere.test:{remote.port}", ca="ca"),
                              cas={"ca": Ca("ca", certificate.cert)})
        results = relay_all(agent_for(config, resolver=Resolver(dns.setting)), [envelope("a@remote.test")],
                            write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert "certificate verification failed" in results[0].text


@pytest.mark.parametrize("scheme", ["smtp+tls", "smtps"])
def test_smarthost_given_as_an_address_is_checked_against_that_address(tmp_path: os.PathLike[str], scheme: str,
                                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    # The certificate names 127.0.0.1 only: a smarthost reached as 127.0.0.2 must not pass the check (the AUTH
    # credentials would go to whoever holds any certificate the CA signed).
    certificate = make_certificate(str(tmp_path_factory.mktemp("pki-ip")), "smarthost.test", ip="127.0.0.1")
    cas = {"ca": Ca("ca", certificate.cert)}
    tables = MemoryTables(maps={"secrets": {"lbl": "relayuser:s3cret-pass"}})
    outcomes = {}
    for number, host in enumerate(("127.0.0.2", "127.0.0.1")):
        with Remote(tls=certificate, require_starttls=scheme == "smtp+tls", smtps=scheme == "smtps", host=host,
                    credentials={"relayuser": "s3cret-pass"}) as remote:
            config = relay_config(Relay(host=f"{scheme}://lbl@{host}:{remote.port}", auth_table="secrets", ca="ca"),
                                  cas=cas)
            results = relay_all(agent_for(config, tables), [envelope("a@remote.test", msgid=number + 1)],
                                write_message(tmp_path, name=f"m{number}"))
            outcomes[host] = (results[0], [item.auth_user for item in remote.received])
    refused, received = outcomes["127.0.0.2"]
    assert refused.outcome is Outcome.TEMPFAIL and received == []
    assert "127.0.0.2" in refused.text or "CERTIFICATE_VERIFY_FAILED" in refused.text, refused.text
    accepted, received = outcomes["127.0.0.1"]
    assert accepted.outcome is Outcome.OK, accepted.text
    assert received == ["relayuser"]


def test_tls_required_but_not_offered(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        config = relay_config(Relay(host=smarthost(remote, "smtp+tls"), tls="no-verify"))
        results = relay_all(agent_for(config), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "TLS required but not supported by remote host"


def test_a_server_hanging_up_in_the_tls_handshake_is_named(tmp_path: os.PathLike[str]) -> None:
    # asyncio reports it as a ConnectionResetError without arguments: the errorline said "TLS handshake failed: "
    script = standard_script({"EHLO": b"250-raw.test\r\n250 STARTTLS\r\n", "STARTTLS": b"220 2.0.0 go ahead\r\n" + CLOSE})
    with RawRemote(script) as remote:
        config = relay_config(Relay(host=smarthost(remote, "smtp+tls"), tls="no-verify"))
        results = relay_all(agent_for(config), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    # (or, as the timing falls, the kernel's "Connection reset by peer")
    assert results[0].text in ("TLS handshake failed: connection closed by the remote host",
                               "TLS handshake failed: Connection reset by peer"), results[0].text


def test_opportunistic_starttls_is_used_when_offered(tmp_path: os.PathLike[str], certificate) -> None:
    with Remote(tls=certificate) as remote:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [envelope("a@remote.test")],
                            write_message(tmp_path))
    assert results[0].outcome is Outcome.OK
    assert remote.received[0].tls is True


def test_notls_scheme_never_starts_tls(tmp_path: os.PathLike[str], certificate) -> None:
    with Remote(tls=certificate) as remote:
        relay_all(agent_for(relay_config(Relay(host=smarthost(remote, "smtp+notls")))),
                  [envelope("a@remote.test")], write_message(tmp_path))
    assert remote.received[0].tls is False


def test_a_plain_text_session_of_smtp_notls_is_not_reused_for_smtp(tmp_path: os.PathLike[str], certificate) -> None:
    # Two actions to one host: `smtp+notls://` and `smtp://` (opportunistic STARTTLS). The session kept open after
    # the first must not carry the second's message in clear text: they are different relays, as in show relays.
    with Remote(tls=certificate) as remote:
        config = Config(path="<test>", actions={
            "plain": Action("plain", Method.RELAY, relay=Relay(host=smarthost(remote, "smtp+notls"))),
            "relay": Action("relay", Method.RELAY, relay=Relay(host=smarthost(remote)))})
        agent = agent_for(config)
        first = Envelope(evpid=(1 << 32) | 1, dispatcher="plain", sender="bob@local.test", rcpt="a@remote.test",
                         dest="a@remote.test")

        async def run() -> tuple[list[DeliveryResult], list[str]]:
            await agent.start()
            results = [await agent.deliver(first, write_message(tmp_path, name="m1")),
                       await agent.deliver(envelope("b@remote.test", msgid=2), write_message(tmp_path, name="m2"))]
            relays = [str(row["relay"]) for row in agent.control_view("relays")]
            await agent.stop()
            return results, relays
        results, relays = asyncio.run(run())
    assert [result.outcome for result in results] == [Outcome.OK, Outcome.OK]
    assert [item.tls for item in remote.received] == [False, True]
    assert sorted(relays) == [f"[relay:127.0.0.1,port={remote.port},smtp+notls]",
                              f"[relay:127.0.0.1,port={remote.port},smtp]"]


def test_the_connecting_log_line_names_the_relay_scheme(tmp_path: os.PathLike[str], certificate, dns,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # As OpenSMTPD logs it: `smtp+notls://` and `smtp+tls://` said `smtp://`, as if STARTTLS were merely optional.
    with Remote(tls=certificate) as remote, caplog.at_level(logging.INFO, logger="smtpd"):
        relay_all(agent_for(relay_config(Relay(host=smarthost(remote, "smtp+notls")))),
                  [envelope("a@remote.test")], write_message(tmp_path))
        relay_all(tls_agent(tls_config(remote, "smtp+tls", certificate), dns), [envelope("b@remote.test", msgid=2)],
                  write_message(tmp_path))
    assert [item.tls for item in remote.received] == [False, True]
    assert f"mta connecting address=smtp+notls://127.0.0.1:{remote.port} host=127.0.0.1" in caplog.text
    assert f"mta connecting address=smtp+tls://127.0.0.1:{remote.port} host=smarthost.test" in caplog.text


def test_auth_over_plain_text_is_refused(tmp_path: os.PathLike[str]) -> None:
    with RawRemote(standard_script({"EHLO": b"250-raw.test\r\n250 AUTH PLAIN LOGIN\r\n"})) as remote:
        config = relay_config(Relay(host=f"smtp+tls://lbl@{remote.host}:{remote.port}", auth_table="secrets",
                                    tls="no-verify"))
        results = relay_all(agent_for(config, MemoryTables(maps={"secrets": {"lbl": "u:p4ss"}})),
                            [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL
    assert results[0].text == "TLS required but not supported by remote host"
    assert not any(command.startswith("AUTH") for command in remote.commands)


def test_client_certificate_from_pki(tmp_path: os.PathLike[str], certificate, dns) -> None:
    client_cert = make_certificate(str(tmp_path), "client.test")
    import ssl

    from helpers_mta import server_context
    seen: list[object] = []
    with Remote(tls=certificate, require_starttls=True) as remote:
        context = server_context(certificate)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_cert.cert)
        remote.controller.SMTP_kwargs["tls_context"] = context
        config = relay_config(Relay(host=f"smtp+tls://smarthost.test:{remote.port}", ca="ca", pki="client"),
                              cas={"ca": Ca("ca", certificate.cert)},
                              pkis={"client": Pki("client", client_cert.cert, client_cert.key)})
        results = relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
        seen.extend(remote.received)
    assert results[0].outcome is Outcome.OK, results[0].text
    assert len(seen) == 1


# -- LMTP ----------------------------------------------------------------------------------------------------------
def test_lmtp_gives_one_result_per_recipient(tmp_path: os.PathLike[str]) -> None:
    script = standard_script({"LHLO": b"250-lmtp.test\r\n250 PIPELINING\r\n",
                              "EOM": b"250 2.0.0 delivered to a\r\n552 5.2.2 b is over quota\r\n"})
    with RawRemote(script) as remote:
        config = relay_config(Relay(host=f"lmtp://{remote.host}:{remote.port}"))
        results = relay_all(agent_for(config), [envelope("a@remote.test", n=1), envelope("b@remote.test", n=2)],
                            write_message(tmp_path))
    assert remote.commands[0] == "LHLO sender.test"
    assert results[0].outcome is Outcome.OK
    assert results[1].outcome is Outcome.PERMFAIL and results[1].text == "552 5.2.2 b is over quota"


# -- 8BITMIME, SMTPUTF8, DSN -----------------------------------------------------------------------------------------
def test_8bit_message_is_sent_with_body_8bitmime(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        path = write_message(tmp_path, "Subject: café\n\nDéjà vu\n".encode())
        relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [envelope("a@remote.test")], path)
    assert "BODY=8BITMIME" in remote.received[0].mail_options
    assert "Déjà vu".encode() in remote.received[0].data


def test_utf8_address_needs_smtputf8(tmp_path: os.PathLike[str]) -> None:
    with Remote(smtputf8=False) as plain, Remote() as modern:
        refused = relay_all(agent_for(relay_config(Relay(host=smarthost(plain)))), [envelope("jürgen@remote.test")],
                            write_message(tmp_path))
        accepted = relay_all(agent_for(relay_config(Relay(host=smarthost(modern)))),
                             [envelope("jürgen@remote.test")], write_message(tmp_path))
    assert refused[0].outcome is Outcome.PERMFAIL and "SMTPUTF8" in refused[0].text
    assert accepted[0].outcome is Outcome.OK
    assert "SMTPUTF8" in modern.received[0].mail_options
    assert modern.received[0].rcpt_tos == ["jürgen@remote.test"]


def test_idn_domain_goes_as_a_labels_to_a_server_without_smtputf8(tmp_path: os.PathLike[str]) -> None:
    """Only a UTF-8 local part needs SMTPUTF8: an internationalized domain is sent in its ASCII form (A-labels,
    the name the MX lookup asked for), as RFC 6531 3.2 allows, instead of bouncing the mail."""
    with Remote(smtputf8=False) as plain:
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(plain)))),
                            [envelope("u@bücher.test", sender="bob@exämple.test", n=1),
                             envelope("jürgen@bücher.test", sender="bob@exämple.test", n=2)], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK
    assert results[1].outcome is Outcome.PERMFAIL and "SMTPUTF8" in results[1].text
    assert plain.received[0].mail_from == "bob@xn--exmple-cua.test"
    assert plain.received[0].rcpt_tos == ["u@xn--bcher-kva.test"]
    assert "SMTPUTF8" not in plain.received[0].mail_options


def test_null_sender_and_config_errors(tmp_path: os.PathLike[str]) -> None:
    config = relay_config(Relay(host="gopher://x.test"))
    results = relay_all(agent_for(config), [envelope("a@remote.test")], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL and "unknown scheme" in results[0].text
    missing = Envelope(evpid=5, dispatcher="nope", sender="", rcpt="a@b.test", dest="a@b.test")
    results = relay_all(agent_for(config), [missing], write_message(tmp_path))
    assert results[0].outcome is Outcome.TEMPFAIL and results[0].text == "no such dispatcher: nope"


# -- trace ------------------------------------------------------------------------------------------------------------
def test_every_step_is_traced(tmp_path: os.PathLike[str], certificate, dns) -> None:
    from smtpd import trace
    subscription = trace.BUS.subscribe(["mta"], capacity=10000)
    try:
        with Remote(tls=certificate, require_starttls=True, credentials={"relayuser": "s3cret-pass"}) as remote:
            config = tls_config(remote, "smtp+tls", certificate, label="lbl@")
            relay_all(tls_agent(config, dns), [envelope("a@remote.test")], write_message(tmp_path))
        events, dropped = subscription.drain()
    finally:
        subscription.close()
    texts = [event.message for event in events]
    assert dropped == 0

    def seen(fragment: str) -> bool:
        return any(fragment in text for text in texts)
    assert seen("queued on [relay:smarthost.test,")
    assert seen(f"connecting to 127.0.0.1:{remote.port} (smarthost.test) starttls, verified")
    assert seen(">>> EHLO sender.test") and seen(">>> STARTTLS") and seen("TLS established")
    assert seen(">>> AUTH PLAIN ...") and not seen("s3cret") and seen("authenticated as relayuser")
    assert seen(">>> MAIL FROM:<bob@local.test>") and seen(">>> RCPT TO:<a@remote.test>")
    assert seen("<<< 250 2.0.0 Ok: queued")
    assert seen("<a@remote.test>: Ok: 250 2.0.0 Ok: queued")


# -- relay domain map, host table, source address, paused routes --------------------------------------------------------
def test_relay_domain_map_picks_the_smarthost_per_domain(tmp_path: os.PathLike[str]) -> None:
    with Remote() as first, Remote() as second:
        tables = MemoryTables(maps={"routes": {"one.test": smarthost(first), "two.test": smarthost(second)}})
        results = relay_all(agent_for(relay_config(Relay(domain_table="routes")), tables),
                            [envelope("a@one.test", n=1), envelope("b@two.test", n=2)], write_message(tmp_path))
    assert [result.outcome for result in results] == [Outcome.OK, Outcome.OK]
    assert [item.rcpt_tos for item in first.received] == [["a@one.test"]]
    assert [item.rcpt_tos for item in second.received] == [["b@two.test"]]


def test_host_table_and_source_address(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        tables = MemoryTables(lists={"hosts": [smarthost(remote)], "sources": ["127.0.0.2"]})
        agent = agent_for(relay_config(Relay(host_table="hosts", src_table="sources")), tables)

        async def run() -> tuple[list[DeliveryResult], list[dict[str, object]]]:
            results = [await agent.deliver(envelope("a@remote.test"), write_message(tmp_path))]
            routes = agent.control_view("routes")
            await agent.stop()
            return results, routes
        results, routes = asyncio.run(run())
    assert results[0].outcome is Outcome.OK
    assert remote.received[0].peer[0] == "127.0.0.2"
    assert routes[0]["route"] == "127.0.0.2 <-> 127.0.0.1"


def test_paused_route_holds_its_mail(tmp_path: os.PathLike[str]) -> None:
    with Remote() as remote:
        agent = agent_for(relay_config(Relay(host=smarthost(remote), src="127.0.0.2")))

        async def run() -> tuple[DeliveryResult, list[dict[str, object]], DeliveryResult]:
            assert agent.pause_route("127.0.0.2", "127.0.0.1")
            assert not agent.pause_route("127.0.0.2", "127.0.0.1")
            held = await agent.deliver(envelope("a@remote.test", n=1), write_message(tmp_path))
            paused = agent.control_view("mta.paused")
            assert agent.resume_route("127.0.0.2", "127.0.0.1")
            sent = await agent.deliver(envelope("a@remote.test", n=2), write_message(tmp_path))
            await agent.stop()
            return held, paused, sent
        held, paused, sent = asyncio.run(run())
    assert held.outcome is Outcome.TEMPFAIL and "paused" in held.text
    assert [row["line"] for row in paused] == ["127.0.0.2 -> 127.0.0.1"]
    assert sent.outcome is Outcome.OK and len(remote.received) == 1


def test_dsn_parameters_are_passed_on_when_offered(tmp_path: os.PathLike[str]) -> None:
    from smtpd.queue.envelope import DsnNotify
    script = standard_script({"EHLO": b"250-raw.test\r\n250-DSN\r\n250 SIZE 1000000\r\n"})
    with RawRemote(script) as with_dsn, RawRemote(standard_script()) as without:
        for remote in (with_dsn, without):
            item = envelope("a@remote.test")
            item.dsn_notify = DsnNotify.SUCCESS | DsnNotify.FAILURE
            item.dsn_orcpt = "rfc822;a@remote.test"
            item.dsn_ret, item.dsn_envid = "HDRS", "xyz123"
            relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [item], write_message(tmp_path))
    mail = next(command for command in with_dsn.commands if command.startswith("MAIL"))
    assert mail.startswith("MAIL FROM:<bob@local.test> SIZE=") and mail.endswith(" RET=HDRS ENVID=xyz123")
    assert "RCPT TO:<a@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@remote.test" in with_dsn.commands
    assert "MAIL FROM:<bob@local.test>" in without.commands and "RCPT TO:<a@remote.test>" in without.commands


def test_orcpt_as_the_smtp_server_stored_it_is_passed_on_with_its_address_type(tmp_path: os.PathLike[str]) -> None:
    """The SMTP server stores ORCPT=rfc822;a+2Bb@remote.test as `a+2Bb@remote.test` (the envelope's
    dsn-orcpt); the next hop must get `ORCPT=rfc822;a+2Bb@remote.test`, not a bare address (RFC 3461 4.2:
    an ORCPT without its address type is a syntax error, e.g. Postfix answers 501 and the recipient bounces)."""
    from smtpd.queue.envelope import DsnNotify
    script = standard_script({"EHLO": b"250-raw.test\r\n250-DSN\r\n250 SIZE 1000000\r\n"})
    with RawRemote(script) as remote:
        item = envelope("a@remote.test")
        item.dsn_notify = DsnNotify.FAILURE
        item.dsn_orcpt = "a+2Bb@remote.test"
        relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [item], write_message(tmp_path))
    assert "RCPT TO:<a@remote.test> NOTIFY=FAILURE ORCPT=rfc822;a+2Bb@remote.test" in remote.commands


def test_orcpt_is_passed_on_without_notify(tmp_path: os.PathLike[str]) -> None:
    """RCPT TO:<a@x> ORCPT=rfc822;a@x (no NOTIFY) is valid (RFC 3461 4.2); a relay passes ORCPT on whenever it was
    given (5.2.2), so that the final server's reports name the address the sender used."""
    script = standard_script({"EHLO": b"250-raw.test\r\n250-DSN\r\n250 SIZE 1000000\r\n"})
    with RawRemote(script) as remote:
        item = envelope("a@remote.test")
        item.dsn_orcpt = "orig+2Buser@remote.test"
        results = relay_all(agent_for(relay_config(Relay(host=smarthost(remote)))), [item], write_message(tmp_path))
    assert results[0].outcome is Outcome.OK
    assert "RCPT TO:<a@remote.test> ORCPT=rfc822;orig+2Buser@remote.test" in remote.commands
