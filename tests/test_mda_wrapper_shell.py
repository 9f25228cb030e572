"""`mda wrapper` lines written with the shell's syntax (OpenSMTPD runs every wrapper with /bin/sh -c): limits set
with `ulimit` then `exec %{mda}`, a filter piped into `%{mda}`. The real daemon over a real socket, delivering as
a real user; envelope data stays data."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest
from helpers_delivery import make_mail_root, open_temp_dir, running, system_user
from test_mda_e2e import wait_for

SENDER = "`touch${IFS}/tmp/pysmtpd-wrapper-pwned`$HOME'x@client.test"


@pytest.fixture()
def world():
    with open_temp_dir("pysmtpd-wrapsh-") as top:
        homes = os.path.join(top, "homes")
        os.mkdir(homes, 0o755)
        mail_root = make_mail_root(top)
        with system_user(homes, "pws") as bob:
            yield Path(top), mail_root, bob


def test_wrappers_with_shell_syntax_run_in_a_shell(world) -> None:
    top, mail_root, bob = world
    with running(top, mail_root, 'mda wrapper limits "ulimit -t 60; echo %{sender:raw} > ~/wrapper.sender; exec %{mda}"\n'
                                 'mda wrapper sedit "sed -e s/hello/HELLO/ | %{mda}"\n'
                                 'action "cmd" mda "/bin/sh -c \'cat > ~/command.out\'" wrapper limits\n'
                                 'action "box" mbox wrapper sedit\n'
                                 'match from any for domain "cmd.test" action "cmd"\n'
                                 'match from any for domain "box.test" action "box"\n') as (daemon, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            refused = client.sendmail(SENDER, [f"{bob.pw_name}@cmd.test", f"{bob.pw_name}@box.test"],
                                      b"Subject: wrapped\r\n\r\nhello world\r\n")
            assert refused == {}
        home = Path(bob.pw_dir)
        out = wait_for(lambda: (home / "command.out").exists() and (home / "command.out").read_text())
        assert "hello world" in out
        assert (home / "command.out").stat().st_uid == bob.pw_uid
        assert (home / "wrapper.sender").read_text() == SENDER + "\n"
        box = Path(mail_root) / bob.pw_name
        assert "HELLO world" in wait_for(lambda: box.exists() and box.read_text())
        assert not os.path.exists("/tmp/pysmtpd-wrapper-pwned")
        assert "result=PermFail" not in daemon.log()
