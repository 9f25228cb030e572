"""The control plane: the Unix socket smtpctl talks to (server.py) and the command handlers.

``build(daemon)`` creates the ControlServer on the socket path of ``daemon.paths`` and registers the handlers.
The read-only commands are also open to members of the group named by the daemon option ``control_group`` or
the environment variable SMTPD_CONTROL_GROUP.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import TYPE_CHECKING

from smtpd.control.server import ENV_CONTROL_GROUP, ControlServer

if TYPE_CHECKING:
    from smtpd.daemon import Daemon

# Modules whose import registers handlers. The queue's are optional here: the scheduler imports them too.
HANDLER_MODULES = ("smtpd.control.handlers", "smtpd.control.queue_commands")


def build(daemon: Daemon) -> ControlServer:
    importlib.import_module(HANDLER_MODULES[0])
    for module in HANDLER_MODULES[1:]:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    group = getattr(daemon.options, "control_group", None) or os.environ.get(ENV_CONTROL_GROUP)
    server = ControlServer(daemon, daemon.paths.socket, group=group)
    daemon.control = server
    return server
