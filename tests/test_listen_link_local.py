"""`listen on IFACE` (and a scoped literal) where the interface has an IPv6 link-local address.

The kernel binds a link-local address only with its scope (the interface); without it bind() fails with EINVAL
and the daemon did not start at all. The daemon runs in a private network namespace (`unshare -n`) whose
loopback gets a link-local address, so the machine's own interfaces are not touched (as root, as the suite runs;
`unshare` from util-linux, `ip` from iproute2, which `make test` installs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINK_LOCAL = "fe80::1234"

INSIDE = r"""
import json, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "-6", "addr", "add", "fe80::1234/64", "dev", "lo"], check=True)
from daemon import SmtpdProcess
from helpers_mta import DnsServer
dns = DnsServer({}).__enter__()
rules = 'action "local" mbox\nmatch from any for any action "local"\n'
results = {}
for name, target in (("interface", "lo"), ("literal", "fe80::1234%lo")):
    # (the client's reverse name is asked of a DNS server of the test's own in this namespace, which knows
    # nothing: the tests' usual one is outside it, and waiting for it took 5 s a daemon)
    daemon = SmtpdProcess(sys.argv[2] + "/" + name, f"listen on {target} port {{port}}\n" + rules, listens=False,
                          env={"SMTPD_RESOLVER": dns.setting})
    try:
        daemon.start()
        info = socket.getaddrinfo("fe80::1234%lo", daemon.port, socket.AF_INET6, socket.SOCK_STREAM)[0]
        with socket.socket(socket.AF_INET6) as client:
            client.settimeout(10)
            client.connect(info[4])
            results[name] = client.makefile("rb").readline().decode()
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
    finally:
        daemon.stop()
print(json.dumps(results))
"""


def test_link_local_addresses_are_bound_with_their_scope(tmp_path: Path) -> None:
    completed = subprocess.run(["unshare", "-n", sys.executable, "-c", INSIDE, str(HERE), str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["interface"].startswith("220 "), results["interface"]
    assert results["literal"].startswith("220 "), results["literal"]
