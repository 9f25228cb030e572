"""The delivery fork server: a small root process that forks one child per batch of mailbox writes.

Forking the daemon itself for every delivery is slow (its page tables grow with the queue) and blocks the event
loop while it runs; forking a process that has threads is also fragile. So when the daemon runs as root, it
starts this helper once (`python -m smtpd.mda.forkserver FD`), a single-threaded process that imports only the
standard library and smtpd/mda/local.py. The daemon sends it one request per batch over a SOCK_SEQPACKET socket
pair, with the message files' descriptors attached (SCM_RIGHTS, one per item); the helper forks a child that
opens what must be opened as root (root-owned mbox), sets groups, gid and uid, writes every item, and reports
each item's outcome through a pipe. The helper answers each request with the outcomes; it kills children that
run past their time limit (items not reported by then fail, as timed out).

A batch is one method, one identity and one mailbox (mbox path or Maildir): forking costs far more CPU than
writing a 2 KB message (the child's page tables are copied, then its pages copied on write, then torn down), so
several messages for the same mailbox share one child, and a Maildir batch shares its directory fsyncs.

Request (JSON): {"id", "method": "mbox"|"mboxfile"|"maildir", "identity": {"uid","gid","groups","home"},
"path"|"directory", "owner": [uid, gid] | null, "timeout", "items": [{"sender", "prefix" (latin-1 text of the
prefix bytes), "extension", "junk"}, ...]}; a request without "items" is one item made of its own fields.
Reply: {"id", "pid", "status", "timed_out", "results": [[status, text], ...]} (one per item), and before it
{"id", "forked": pid} for the daemon's mproc trace.
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

MAX_REQUEST = 1 << 18
MAX_ITEMS = 64  # items in one request (descriptors in one message: the kernel allows 253)


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


def _child(request: dict[str, Any], message_fds: list[int], result_fd: int) -> None:
    """Deliver every item; write one line per item, `<index> <status> <text>`, once that item is final."""
    items = request.get("items") or [request]
    done: set[int] = set()

    def report(index: int, code: int, text: str) -> None:
        line = f"{index} {code} {text[:1000]}".replace("\n", " ") + "\n"
        local.write_all(result_fd, line.encode("utf-8", "replace"))
        done.add(index)

    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()
        os.umask(0o077)
        messages = [_rewound(fd) for fd in message_fds]
        method = request["method"]
        if method == "mbox":
            owner = request.get("owner")
            mbox_fd = local.open_mbox(request["path"], owner=tuple(owner) if owner else None)
            _drop(request["identity"])
            try:
                _each(items, messages, report, lambda item, message: local.append_mbox(
                    mbox_fd, request["path"], item.get("sender", ""), _prefix(item), message))
            finally:
                os.close(mbox_fd)
        elif method == "mboxfile":
            _drop(request["identity"])
            _each(items, messages, report, lambda item, message: local.deliver_mboxfile(
                request["path"], item.get("sender", ""), _prefix(item), message))
        elif method == "maildir":
            _drop(request["identity"])
            _maildir_batch(request["directory"], items, messages, report)
        else:
            raise local.LocalDeliveryError(f"unknown method {method!r}", temporary=False)
        code = 0
    except BaseException as error:  # noqa: BLE001 — the child always reports and exits
        code, text = _failure(error)
        try:
            for index in range(len(items)):
                if index not in done:
                    report(index, code, text)
        finally:
            os._exit(code)
    os._exit(code)


def _rewound(fd: int) -> Any:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.fdopen(fd, "rb", closefd=False)


def _prefix(item: dict[str, Any]) -> bytes:
    return str(item.get("prefix", "")).encode("latin-1")


def _failure(error: BaseException) -> tuple[int, str]:
    if isinstance(error, local.LocalDeliveryError):
        return (local.EX_TEMPFAIL if error.temporary else local.EX_CANTCREAT), error.text
    return local.EX_TEMPFAIL, f"{type(error).__name__}: {error}"


def _each(items: list[dict[str, Any]], messages: list[Any], report: Any, deliver: Any) -> None:
    """mbox: each item on its own (locks, write, fsync, truncate back on failure): one failure fails one item."""
    for index, (item, message) in enumerate(zip(items, messages, strict=True)):
        try:
            deliver(item, message)
        except Exception as error:  # noqa: BLE001 — that item fails, the others go on
            report(index, *_failure(error))
        else:
            report(index, 0, "")


def _maildir_batch(directory: str, items: list[dict[str, Any]], messages: list[Any], report: Any) -> None:
    """Each file written and fsynced in tmp/ and linked into new/; each new/ folder fsynced once, after its
    last link; an item is reported done only after the fsync of its folder."""
    linked: dict[str, list[int]] = {}  # new/ folder -> items linked there, not yet flushed
    ensured: set[str] = set()
    for index, (item, message) in enumerate(zip(items, messages, strict=True)):
        try:
            final = local.write_maildir_file(directory, _prefix(item), message, item.get("extension", ""),
                                             bool(item.get("junk")), ensured)
        except Exception as error:  # noqa: BLE001 — that item fails, the others go on
            report(index, *_failure(error))
            continue
        linked.setdefault(os.path.dirname(final), []).append(index)
    for folder, indexes in linked.items():
        try:
            local.fsync_directory(folder)
        except OSError as error:
            outcome = (local.EX_TEMPFAIL, f"{folder}: {error.strerror}")
        else:
            outcome = (0, "")
        for index in indexes:
            report(index, *outcome)


class _Running:
    def __init__(self, request_id: Any, pid: int, result_fd: int, deadline: float, items: int) -> None:
        self.request_id = request_id
        self.pid = pid
        self.result_fd = result_fd
        self.deadline = deadline
        self.items = items
        self.text = b""
        self.timed_out = False

    def results(self, exit_status: int) -> list[list[Any]]:
        """One [status, text] per item: what the child reported, else its exit status (killed, crashed)."""
        reported: dict[int, list[Any]] = {}
        for line in self.text.decode("utf-8", "replace").splitlines():
            index, _, rest = line.partition(" ")
            code, _, text = rest.partition(" ")
            try:
                reported[int(index)] = [int(code), text]
            except ValueError:
                continue
        missing = exit_status if exit_status != 0 else local.EX_TEMPFAIL
        return [reported.get(index, [missing, "delivery child ended without a report"])
                for index in range(self.items)]


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
        data, fds, _, _ = socket.recv_fds(channel, MAX_REQUEST, MAX_ITEMS + 1)
    except OSError:
        return False
    if not data:
        return False
    request = json.loads(data)
    items = len(request.get("items") or [request])
    if len(fds) != items:
        return _refuse(channel, request, fds, items, "not one message descriptor per item")
    # Out of descriptors or processes, this batch fails for now; the helper goes on: dying here lost the results
    # of the children still writing, and their messages were delivered again.
    try:
        read_fd, write_fd = os.pipe()
    except OSError as error:
        return _refuse(channel, request, fds, items, f"delivery helper: pipe: {error.strerror}")
    try:
        pid = os.fork()
    except OSError as error:
        os.close(read_fd)
        os.close(write_fd)
        return _refuse(channel, request, fds, items, f"delivery helper: fork: {error.strerror}")
    if pid == 0:
        os.close(read_fd)
        channel.close()
        _child(request, fds, write_fd)
    os.close(write_fd)
    for fd in fds:
        os.close(fd)
    _reply(channel, {"id": request.get("id"), "forked": pid})  # for the daemon's mproc trace
    child = _Running(request.get("id"), pid, read_fd, time.monotonic() + float(request.get("timeout", 300)),
                     items)
    running[read_fd] = child
    selector.register(read_fd, selectors.EVENT_READ, child)
    return True


def _refuse(channel: socket.socket, request: dict[str, Any], fds: list[int], items: int, text: str) -> bool:
    """Fail every item of a request that gets no child (temporarily); True: the helper goes on serving."""
    for fd in fds:
        os.close(fd)
    _reply(channel, {"id": request.get("id"), "status": local.EX_TEMPFAIL, "timed_out": False,
                     "results": [[local.EX_TEMPFAIL, text]] * items})
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
    status = os.waitstatus_to_exitcode(wait_status)
    _reply(channel, {"id": child.request_id, "pid": child.pid, "status": status, "timed_out": child.timed_out,
                     "results": child.results(status)})


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
