"""A home that root may not read (on NFS exported with root_squash, mode 0700): its `.forward` is read as the
user could. Every RCPT to such a user used to be refused with 524 (`.forward: Permission denied`), whether or not
there was a .forward. Root's lack of access is made here by running without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (setpriv), as root_squash makes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers_delivery import open_temp_dir, system_user

REPO = Path(__file__).resolve().parent.parent

READ = """
import ctypes, sys
from helpers_delivery import DictTables
from smtpd.lookup.expand import expand_recipient
from smtpd.lookup.facts import SessionFacts
from test_expand import domain_matcher, setup
tables = DictTables()
result = expand_recipient(setup(tables), tables, SessionFacts(), "s@client.test", sys.argv[1] + "@example.org",
                          "mx.example.org", matcher=domain_matcher)
print(result.refusal, [(str(e.type), e.dest) for e in result.deliveries])
libc = ctypes.CDLL(None)
print("fsuid", libc.setfsuid(-1), "fsgid", libc.setfsgid(-1))  # root's again afterwards
"""


def read_as_root_without_access(user: str) -> list[str]:
    environment = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", READ,
                           user], capture_output=True, text=True, env=environment, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_forward_in_a_home_root_may_not_read_is_read_as_the_user() -> None:
    with open_temp_dir("pysmtpd-fwdnfs-") as top, system_user(top, "pfn") as bob:
        home = Path(bob.pw_dir)
        os.chmod(home, 0o700)
        b = bob.pw_name
        assert read_as_root_without_access(b) == [f"None [('mda', '{b}@example.org')]", "fsuid 0 fsgid 0"]
        forward = home / ".forward"
        forward.write_text("friend@remote.test\n")
        os.chown(forward, bob.pw_uid, bob.pw_gid)
        assert read_as_root_without_access(b) == ["None [('mta', 'friend@remote.test')]", "fsuid 0 fsgid 0"]
