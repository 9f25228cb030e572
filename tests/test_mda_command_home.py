"""An mda command runs in the recipient's home even when root may not enter it (a home on NFS exported with
root_squash, mode 0700): the directory change was made as root, before the switch to the user, and failed, and
every delivery to that user bounced as `<program>: Permission denied`. Root's lack of access is made here by
running the delivery without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), as root_squash makes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_delivery import open_temp_dir, system_user

REPO = Path(__file__).resolve().parent.parent

DELIVER = """
import asyncio, sys
from helpers_delivery import DictTables, local_action, make_config, mda_envelope, write_message
from smtpd.config.model import Method
from smtpd.mda import MdaAgent

user, message = sys.argv[1], sys.argv[2]
config = make_config([local_action("cmd", Method.MDA, mda_command="pwd > where.txt; cat > message.txt")], [])
agent = MdaAgent(config, DictTables(), "mx.example.org")
result = asyncio.run(agent.deliver(mda_envelope("cmd", user + "@example.org", user), message))
print(result.outcome, result.text)
"""


@pytest.mark.parametrize("closed", ["home", "its folder"])
def test_mda_command_runs_in_a_home_that_root_may_not_enter(closed: str) -> None:
    with open_temp_dir("pysmtpd-cmdhome-") as top:
        os.mkdir(os.path.join(top, "nfs"), 0o755)
        with system_user(os.path.join(top, "nfs"), "pch") as bob:
            run_in_a_closed_home(top, bob, closed)


def run_in_a_closed_home(top: str, bob, closed: str) -> None:  # noqa: ANN001
    home = Path(bob.pw_dir)
    os.chmod(home, 0o700)
    if closed == "its folder":  # root may not even look at the home (stat: Permission denied)
        os.chown(home.parent, bob.pw_uid, bob.pw_gid)
        os.chmod(home.parent, 0o700)
    message = Path(top) / "message"
    message.write_text("Subject: nfs\n\nbody\n")
    environment = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                           DELIVER, bob.pw_name, str(message)],
                          capture_output=True, text=True, env=environment, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok Delivered", done.stdout + done.stderr
    assert (home / "where.txt").read_text() == f"{home}\n"
    assert "Subject: nfs" in (home / "message.txt").read_text()
    assert (home / "message.txt").stat().st_uid == bob.pw_uid
