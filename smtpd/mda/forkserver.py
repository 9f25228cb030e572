"""The delivery fork server: a small root process that forks one child per mailbox write.

Forking the daemon itself for every delivery is slow (its page tables grow with the queue) and blocks the event
loop while it runs; forking a process that has threads is also fragile. So when the daemon runs as root, it
starts this helper once (`python -m smtpd.mda.forkserver FD`), a single-threaded process that imports only the
standard library and smtpd/mda/local.py. The daemon sends it one request per delivery over a SOCK_SEQPACKET
socket pair, with the message file's descriptor attached (SCM_RIGHTS); the helper forks a child that opens what
must be opened as root (root-owned mbox), sets groups, gid and uid, writes, and reports through a pipe. The
helper answers each request with its status and error text; it kills children that run past their time limit.

Request (JSON): {"id", "method": "mbox"|"mboxfile"|"maildir", "identity": {"uid","gid","groups","home"},
"sender", "prefix" (latin-1 text of the prefix bytes), "path"|"directory", "owner": [uid, gid] | null,
"extension", "junk", "timeout"}. Reply: {"id", "status", "text", "timed_out"}.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from smtpd.mda import local  # noqa: E402 — after the path fix when run as a script

MAX_REQUEST = 1 << 16


def _drop(identity: dict[str, Any]) -> None:
    os.setgroups([int(group) for group in identity.get("groups") or [identity["gid"]]])
    os.setgid(int(identity["gid"]))
    os.setuid(int(identity["uid"]))
    if os.getuid() != int(identity["uid"]) or (int(identity["uid"]) != 0 and os.geteuid() == 0):
        raise local.LocalDeliveryError("privilege drop failed")
    try:
        os.chdir(identity.get("home") or "/")
    except OSError:
        os.chdir("/")


def _child(request: dict[str, Any], message_fd: int, result_fd: int) -> None:
    code, text = 0, ""
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()
        os.umask(0o077)
        os.lseek(message_fd, 0, os.SEEK_SET)
        message = os.fdopen(message_fd, "rb", closefd=False)
        prefix = request.get("prefix", "").encode("latin-1")
        sender = request.get("sender", "")
        method = request["method"]
        if method == "mbox":
            owner = request.get("owner")
            mbox_fd = local.open_mbox(request["path"], owner=tuple(owner) if owner else None)
            _drop(request["identity"])
            try:
                local.append_mbox(mbox_fd, request["path"], sender, prefix, message)
            finally:
                os.close(mbox_fd)
        elif method == "mboxfile":
            _drop(request["identity"])
            local.deliver_mbox(request["path"], sender, prefix, message)
        elif method == "maildir":
            _drop(request["identity"])
            local.deliver_maildir(request["directory"], prefix, message, request.get("extension", ""),
                                  bool(request.get("junk")))
        else:
            raise local.LocalDeliveryError(f"unknown method {method!r}", temporary=False)
    except local.LocalDeliveryError as error:
        code, text = (local.EX_TEMPFAIL if error.temporary else local.EX_CANTCREAT), error.text
    except BaseException as error:  # noqa: BLE001 — the child always reports and exits
        code, text = local.EX_TEMPFAIL, f"{type(error).__name__}: {error}"
    try:
        os.write(result_fd, text.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(code)


class _Running:
    def __init__(self, request_id: Any, pid: int, result_fd: int, deadline: float) -> None:
        self.request_id = request_id
        self.pid = pid
        self.result_fd = result_fd
        self.deadline = deadline
        self.text = b""
        self.timed_out = False


def serve(channel: socket.socket) -> None:
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ, None)
    running: dict[int, _Running] = {}
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.data is None:
                if not _accept_request(channel, selector, running):
                    _shutdown(running)
                    return
            else:
                _collect(key.data, channel, selector, running)
        now = time.monotonic()
        for child in list(running.values()):
            if now > child.deadline and not child.timed_out:
                child.timed_out = True
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except OSError:
                    pass


def _accept_request(channel: socket.socket, selector: selectors.BaseSelector,
                    running: dict[int, _Running]) -> bool:
    try:
        data, fds, _, _ = socket.recv_fds(channel, MAX_REQUEST, 4)
    except OSError:
        return False
    if not data:
        return False
    request = json.loads(data)
    if not fds:
        _reply(channel, {"id": request.get("id"), "status": local.EX_TEMPFAIL, "text": "no message descriptor",
                         "timed_out": False})
        return True
    message_fd = fds[0]
    for extra in fds[1:]:
        os.close(extra)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        channel.close()
        _child(request, message_fd, write_fd)
    os.close(write_fd)
    os.close(message_fd)
    _reply(channel, {"id": request.get("id"), "forked": pid})  # for the daemon's mproc trace
    child = _Running(request.get("id"), pid, read_fd, time.monotonic() + float(request.get("timeout", 300)))
    running[read_fd] = child
    selector.register(read_fd, selectors.EVENT_READ, child)
    return True


def _collect(child: _Running, channel: socket.socket, selector: selectors.BaseSelector,
             running: dict[int, _Running]) -> None:
    chunk = os.read(child.result_fd, 65536)
    if chunk:
        child.text += chunk
        return
    selector.unregister(child.result_fd)
    os.close(child.result_fd)
    del running[child.result_fd]
    _, wait_status = os.waitpid(child.pid, 0)
    _reply(channel, {"id": child.request_id, "pid": child.pid, "status": os.waitstatus_to_exitcode(wait_status),
                     "text": child.text.decode("utf-8", "replace"), "timed_out": child.timed_out})


def _reply(channel: socket.socket, reply: dict[str, Any]) -> None:
    try:
        channel.send(json.dumps(reply).encode())
    except OSError:
        pass


def _shutdown(running: dict[int, _Running]) -> None:
    # The daemon went away: let running writes finish (they are short), then leave.
    for child in running.values():
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:
            pass


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's Ctrl-C is for the daemon; we end on EOF
    serve(channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
