"""The spool on disk: layout, paths, recovery after a crash, loading, moving corrupt files aside.

Layout (under the spool root; reference §8.2, docs/queue.md):

    temporary/<msgid>          the message while it is being received
    incoming/<msgid>/          message + envelopes being made durable by a commit
    queue/<XX>/<msgid>/message the committed message (XX = %02x of msgid >> 24)
    queue/<XX>/<msgid>/<evpid> one envelope file per recipient
    corrupt/                   unreadable files moved aside (with a ``.why`` file saying why)
    offline/                   sendmail submissions written while the daemon is down
    purge/                     message directories moved here before they are deleted
    journal.a, journal.b       the commit journal (smtpd/queue/journal.py)

A directory appears under queue/ only by a rename done after everything inside it is durable, either in its
own files or in the commit journal, which a start replays before it reads anything else: so whatever is under
queue/ then is complete. A folder left in incoming/ is placed when its
commit had completed, and dropped otherwise; temporary/ holds nothing acknowledged (Spool.recover).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shared.ids import format_evpid, format_msgid
from smtpd.queue import codec
from smtpd.queue.durable import fsync_directory, replace_file, write_new_file
from smtpd.queue.envelope import Envelope
from smtpd.queue.format import (
    MAX_ENVELOPE_BYTES,
    MAX_STORED_ENVELOPE_BYTES,
    EnvelopeFormatError,
    load_envelope,
)

MESSAGE_FILE = "message"
SUBDIRS = ("temporary", "incoming", "queue", "corrupt", "offline", "purge")
_MODES = {"temporary": 0o700, "incoming": 0o700, "queue": 0o700, "corrupt": 0o700, "purge": 0o700,
          "offline": 0o1733}  # offline: anyone may drop a file, nobody but us may list or take others'
_HEX = frozenset("0123456789abcdef")
REWRITE_THREADS = 8  # envelope files rewritten at the same time by rewrite_envelopes


def is_hex_name(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


# A delivered message's folder is kept in purge/ for reuse (SpoolWriter.retire) only when its message file is at
# most this big: a kept folder holds its old files until it is reused, and the space of big ones is given back
# at once (256 kept folders hold 32 MiB at most).
RETIRE_MAX_BYTES = 128 * 1024
# Why an acknowledged commit went to corrupt/: it could not go under queue/ (at start, or when it was placed).
MESSAGE_COPY_SUFFIX = ".message"  # corrupt/<msgid>.message: a message kept beside envelopes of it moved aside
# Written encrypted by the first start with `queue encryption`, checked by the next ones (check_encryption_key).
KEY_CHECK_FILE = "encryption-check"
KEY_CHECK_TEXT = b"PySMTPD queue encryption key check\n"
ID_TAKEN = "an acknowledged message whose id a folder under queue/ has already"
# A commit a crash left in incoming/ whose files are encrypted, found by a start without the key.
INCOMING_NO_KEY = (f"{codec.NO_KEY}: a commit left in incoming/ by a crash, maybe acknowledged; move it back "
                   "to incoming/ and start with the key to have it checked")
# Why a whole message went aside because not one of its envelopes could be read (followed by each file's reason).
UNLOADABLE = "no envelope of the message can be loaded"


class SpoolPermissionError(Exception):
    """A folder of the spool that others than the daemon's user could write into."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


OPENSMTPD_QUEUE_USERS = ("_smtpq", "opensmtpq")  # OpenSMTPD's queue account (OpenBSD's name, Debian's)


def _opensmtpd_queue_uid() -> int | None:
    for name in OPENSMTPD_QUEUE_USERS:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    return None


def _permission_problem(path: str, sharable: bool = False) -> str:
    """"" if only the daemon's user can change what is in the folder; else why not. A sharable folder (offline/,
    where anyone drops a file) may be writable by all if it is sticky (nobody takes or renames another's)."""
    info = os.stat(path)
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by the daemon's (uid {os.geteuid()})"
    if info.st_mode & 0o022 and not (sharable and info.st_mode & stat.S_ISVTX):
        return f"writable by others than its owner (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


@dataclass
class CorruptEntry:
    name: str  # the name under corrupt/
    reason: str
    moved: int  # unix time


@dataclass
class LoadedMessage:
    msgid: int
    envelopes: list[Envelope]
    corrupt: list[CorruptEntry]


class Spool:
    def __init__(self, root: str) -> None:
        self.root = root
        self.temporary = os.path.join(root, "temporary")
        self.incoming = os.path.join(root, "incoming")
        self.queue = os.path.join(root, "queue")
        self.corrupt = os.path.join(root, "corrupt")
        self.offline = os.path.join(root, "offline")
        self.taken_over = 0  # entries of OpenSMTPD's queue account given to us at start (create_layout)
        self.purge = os.path.join(root, "purge")

    # -- paths ----------------------------------------------------------------------------------------
    def bucket(self, msgid: int) -> str:
        return os.path.join(self.queue, f"{msgid >> 24:02x}")

    def message_dir(self, msgid: int) -> str:
        return os.path.join(self.bucket(msgid), format_msgid(msgid))

    def message_path(self, msgid: int) -> str:
        return os.path.join(self.message_dir(msgid), MESSAGE_FILE)

    def envelope_path(self, evpid: int) -> str:
        return os.path.join(self.message_dir(evpid >> 32), format_evpid(evpid))

    def temporary_path(self, msgid: int) -> str:
        return os.path.join(self.temporary, format_msgid(msgid))

    def incoming_dir(self, msgid: int) -> str:
        return os.path.join(self.incoming, format_msgid(msgid))

    # -- setup and recovery -----------------------------------------------------------------------------
    def check_encryption_key(self, queue_codec: codec.QueueCodec) -> str:
        """Whether the key of `queue encryption` is the one the spool's queue was encrypted with: the first
        start with a key leaves KEY_CHECK_FILE, a known text encrypted with it, and every later start with a key
        decrypts it. QueueCodecError when that fails: a mistyped key must stop the start, not have the whole
        queue moved aside as undecodable. Returns a warning, or "".

        A missing or damaged check file is judged by the queue itself: its first encrypted envelope must decrypt
        with the key before the file is written (again). Writing it for whatever key came would take a wrong key
        for the right one, move the queue aside, and then refuse the right key."""
        path = os.path.join(self.root, KEY_CHECK_FILE)
        if queue_codec.key is None:
            return (f"queue: this spool was used with queue encryption ({path}): messages stored encrypted "
                    "cannot be read without its key, and are moved to corrupt/") if os.path.exists(path) else ""
        key_only = codec.QueueCodec(key=queue_codec.key)
        try:
            with open(path, "rb") as handle:
                stored_check = handle.read(4096)
        except FileNotFoundError:
            stored_check = None
        if stored_check is not None and _decrypts(key_only, stored_check, KEY_CHECK_TEXT):
            return ""
        queued = self._first_encrypted_envelope()
        if queued is not None and not _decrypts(key_only, queued[1]):
            raise _wrong_key(queued[0])
        if stored_check is None:
            replace_file(path, key_only.encode(KEY_CHECK_TEXT))
            return f"queue: {path} was missing: written for this key, which decrypts the queue" if queued else ""
        if queued is None:  # nothing queued tells a damaged check file from a mistyped key: refuse
            raise _wrong_key(path)
        replace_file(path, key_only.encode(KEY_CHECK_TEXT))
        return f"queue: {path} was damaged: written again, since the queue decrypts with this key"

    def _first_encrypted_envelope(self) -> tuple[str, bytes] | None:
        """(path, content) of the first envelope file under queue/ stored encrypted, or None."""
        for msgid in self.message_ids():
            directory = self.message_dir(msgid)
            for name in _listdir(directory):
                if name == MESSAGE_FILE or not is_hex_name(name, 16):
                    continue
                path = os.path.join(directory, name)
                try:
                    data = _read_regular_file(path, MAX_STORED_ENVELOPE_BYTES)
                except OSError:
                    continue
                if data and data[:1] == codec.ENCRYPTED_MARK:
                    return path, data
        return None

    def create_layout(self) -> None:
        """Create the folders that are missing (and the 256 buckets), flushing each new entry once."""
        created = False
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o711, exist_ok=True)
            created = True
        for name in SUBDIRS:
            path = os.path.join(self.root, name)
            if not os.path.isdir(path):
                os.mkdir(path, _MODES[name])
                os.chmod(path, _MODES[name])  # mkdir's mode is filtered by the umask
                created = True
        new_buckets = False
        for bucket in range(256):
            path = os.path.join(self.queue, f"{bucket:02x}")
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
                new_buckets = True
        if new_buckets:
            fsync_directory(self.queue)
        if created:
            fsync_directory(self.root)
        self.taken_over = self._take_over_from_opensmtpd()
        self._check_owners()

    def _take_over_from_opensmtpd(self) -> int:
        """OpenSMTPD 6.8's spool, left by a switch to us (docs/queue.md, "Coming from OpenSMTPD"): its folders
        and files belong to its queue account, which could then still write envelopes into ours. As root, they
        are given to us, and offline/ gets our mode (6.8's sendmail writes there as its group, ours as the
        user). Only that account's entries: a folder of any other user stays refused. Returns how many."""
        owner = _opensmtpd_queue_uid()
        if os.geteuid() != 0 or owner is None or os.stat(self.queue).st_uid != owner:
            return 0
        given = 0
        for folder, names, files in os.walk(self.root):
            for path in (folder, *(os.path.join(folder, name) for name in names + files)):
                info = os.lstat(path)
                if info.st_uid == owner:
                    os.lchown(path, 0, 0)
                    given += 1
        if os.stat(self.offline).st_mode & 0o7777 == 0o770:  # (6.8's: root, group opensmtpq)
            os.chown(self.offline, 0, 0)
            os.chmod(self.offline, _MODES["offline"])
        return given

    def _check_owners(self) -> None:
        """Refuse a spool that others could write into: whoever can put a file under queue/ (or rename a folder
        of the spool) gets an envelope delivered, a command run as any user its `mda-user` names. OpenSMTPD
        refuses such a spool at start too. Raises SpoolPermissionError naming the folder."""
        folders = [self.root, *(os.path.join(self.root, name) for name in SUBDIRS),
                   *(os.path.join(self.queue, f"{bucket:02x}") for bucket in range(256))]
        for path in folders:
            problem = _permission_problem(path, sharable=path == self.offline)
            if problem:
                raise SpoolPermissionError(path, problem)

    def recover(self) -> tuple[int, int, int, list[CorruptEntry]]:
        """Deal with what a crash left behind. Returns (unacknowledged messages dropped, acknowledged messages
        placed under queue/, half-purged folders removed, acknowledged messages moved aside).

        temporary/ holds messages whose DATA never ended: dropped. A folder in incoming/ is either a commit
        that did not finish its flushes (never acknowledged: dropped) or one that did, crashed before it was
        moved under queue/ (acknowledged: placed). They are told apart by what each envelope recorded at
        commit: the message's size and CRC-32 and the number of envelopes. An acknowledged one whose id a
        folder under queue/ has already (one put there by hand, in the moment between the id's check and the
        commit) is moved aside to corrupt/, never dropped: the mail is kept for the administrator.
        """
        dropped = placed = 0
        aside: list[CorruptEntry] = []
        for name in _listdir(self.temporary):
            remove_path(os.path.join(self.temporary, name))
            # (Empty folders the queue made ahead are no message, and a big message being encoded for `queue
            # encryption` or `compression` has a second file, <msgid>.stored, beside its clear one.)
            if not name.startswith("folder-") and not name.endswith(".stored"):
                dropped += 1
        for name in _listdir(self.incoming):
            path = os.path.join(self.incoming, name)
            msgid = int(name, 16) if is_hex_name(name, 8) else 0
            if msgid and not os.path.islink(path) and _encrypted_without_key(path):
                # Its envelopes cannot be read, so whether it was acknowledged cannot be told: kept, never dropped.
                aside.append(self.set_aside(path, format_msgid(msgid), INCOMING_NO_KEY))
                continue
            # Only a real folder can be a commit: anything else under that name (a symbolic link, a file) is
            # not one of ours, and is dropped like an incomplete commit without being followed.
            if msgid and not os.path.islink(path) and complete_commit(path, msgid):
                if os.path.lexists(self.message_dir(msgid)):
                    aside.append(self.set_aside(path, format_msgid(msgid), ID_TAKEN))
                    continue
                try:
                    os.rename(path, self.message_dir(msgid))
                    fsync_directory(self.bucket(msgid))
                except OSError as error:  # acknowledged mail: kept aside, never dropped, and the start goes on
                    aside.append(self.set_aside(path, format_msgid(msgid),
                                                f"an acknowledged message that could not be placed: {error.strerror}"))
                    continue
                placed += 1
            else:
                remove_path(path)
                dropped += 1
        purged = 0
        for name in _listdir(self.purge):
            remove_path(os.path.join(self.purge, name))
            purged += 1
        return dropped, placed, purged, aside

    def restore_message(self, msgid: int, message: bytes, envelopes: list[tuple[int, bytes]]) -> None:
        """Write a message back from the commit journal after a crash: its folder under queue/ as the commit
        wrote it, durable before this returns. Whatever is there or in incoming/ under its id is replaced (the
        commit had written those files, but they may not have reached the disk whole)."""
        staging = self.incoming_dir(msgid)
        remove_path(staging)
        os.mkdir(staging, 0o700)
        write_new_file(os.path.join(staging, MESSAGE_FILE), message)
        for evpid, data in envelopes:
            write_new_file(os.path.join(staging, format_evpid(evpid)), data)
        fsync_directory(staging)
        fsync_directory(self.incoming)
        self.purge_message(msgid)
        os.rename(staging, self.message_dir(msgid))
        fsync_directory(self.bucket(msgid))

    # -- reading --------------------------------------------------------------------------------------
    def message_ids(self) -> Iterator[int]:
        """Every committed message id, bucket by bucket."""
        for bucket in sorted(_listdir(self.queue)):
            if not is_hex_name(bucket, 2):
                continue
            try:
                names = os.listdir(os.path.join(self.queue, bucket))
            except OSError:
                continue  # (not a folder, or unreadable: nothing of it can be loaded)
            for name in names:
                if is_hex_name(name, 8) and int(name, 16):
                    yield int(name, 16)

    def message_entries(self) -> list[tuple[int, int]]:
        """(inode, msgid) of every committed message: the inode comes with the listing (no stat) and, sorted
        by it, a cold cache reads neighbouring disk blocks one after the other."""
        found = []
        for bucket in sorted(_listdir(self.queue)):
            if not is_hex_name(bucket, 2):
                continue
            try:
                with os.scandir(os.path.join(self.queue, bucket)) as entries:
                    for entry in entries:
                        if is_hex_name(entry.name, 8) and int(entry.name, 16):
                            found.append((entry.inode(), int(entry.name, 16)))
            except OSError:
                continue  # (not a folder, or unreadable: nothing of it can be loaded)
        return found

    def load_message(self, msgid: int, move_corrupt: bool = True) -> LoadedMessage:
        """The envelopes of one committed message. Unreadable files are moved aside (unless told not to)."""
        directory = self.message_dir(msgid)
        loaded = LoadedMessage(msgid, [], [])
        try:
            names = os.listdir(directory)
        except OSError as error:
            # Gone (delivered or removed meanwhile): nothing to load. Anything else under its name (a file, a
            # symbolic link that loops or leads nowhere, a folder that cannot be read) is moved aside: an
            # error here must not stop the loading of the other messages.
            problem = _folder_problem(directory, error)
            if problem:
                loaded.corrupt.append(self._aside(directory, format_msgid(msgid), problem, move_corrupt))
            return loaded
        if MESSAGE_FILE not in names:
            if os.path.isdir(directory):
                loaded.corrupt.append(self._aside(directory, format_msgid(msgid), "message file missing",
                                                  move_corrupt))
            return loaded
        problem = message_file_problem(os.path.join(directory, MESSAGE_FILE))
        if problem:  # nothing of it can be delivered: the whole folder goes aside, envelopes included
            loaded.corrupt.append(self._aside(directory, format_msgid(msgid), problem, move_corrupt))
            return loaded
        bad: list[tuple[str, str]] = []  # (file name, reason)
        for name in names:
            if name == MESSAGE_FILE:
                continue
            path = os.path.join(directory, name)
            if name.startswith(".") and name.endswith(".tmp"):
                if move_corrupt:  # (smtpctl reading offline changes nothing)
                    remove_path(path)  # an envelope rewrite interrupted by a crash; the old file is intact
                continue
            envelope, reason = read_envelope_file(path, msgid, name)
            if envelope is not None:
                loaded.envelopes.append(envelope)
            else:
                bad.append((name, reason))
        if bad and not loaded.envelopes:
            # Not one envelope can be loaded (e.g. all of a newer format): the message goes aside with them,
            # whole. Moving the envelopes alone left a folder with no envelope, which the next start deletes as
            # a delivered message's: the message was lost, and the envelopes kept in corrupt/ were of no use.
            reasons = "; ".join(f"{name}: {reason}" for name, reason in sorted(bad))
            loaded.corrupt.append(self._aside(directory, format_msgid(msgid),
                                              f"{UNLOADABLE} ({reasons})", move_corrupt))
            return loaded
        if bad and move_corrupt:
            # The good envelopes will be delivered and the folder purged with its message: a copy of the message
            # stays beside the envelopes moved aside, or they could never be repaired and delivered.
            kept = self._keep_message_copy(msgid, directory)
            bad = [(name, f"{reason}; {kept}") for name, reason in bad]
        for name, reason in bad:
            label = f"{format_msgid(msgid)}.{name}"
            loaded.corrupt.append(self._aside(os.path.join(directory, name), label, reason, move_corrupt))
        if not loaded.envelopes and not loaded.corrupt and move_corrupt:
            self.purge_message(msgid)  # every envelope was done; the crash came before the folder went
        return loaded

    def envelopes_from_files(self, msgid: int, files: list[tuple[str, bytes]]) -> list[Envelope] | None:
        """The envelopes of a message from the content of its envelope files (read by the spool reader, which
        sends only the plain case: the message file is there, nothing else odd in the folder); None if any
        file is not a valid envelope of this message: load_message then decides, and moves it aside."""
        envelopes = []
        for name, data in files:
            if not is_hex_name(name, 16) or int(name[:8], 16) != msgid or not int(name[8:], 16):
                return None
            envelope, _ = envelope_from_data(data, name)
            if envelope is None:
                return None
            envelopes.append(envelope)
        return envelopes

    def read_envelope(self, evpid: int) -> Envelope | None:
        envelope, _ = read_envelope_file(self.envelope_path(evpid), evpid >> 32, format_evpid(evpid))
        return envelope

    def corrupt_entries(self) -> list[CorruptEntry]:
        entries = []
        for name in sorted(_listdir(self.corrupt)):
            if name.endswith(".why") or _is_message_copy(name):
                continue  # (a reason, or the copy of a message kept beside its envelopes: not corrupt itself)
            path = os.path.join(self.corrupt, name)
            try:
                with open(path + ".why", encoding="utf-8", errors="replace") as handle:
                    reason = handle.read().strip()
            except OSError:
                reason = "unknown"
            try:
                moved = int(os.lstat(path).st_mtime)
            except OSError:
                moved = 0
            entries.append(CorruptEntry(name, reason, moved))
        return entries

    # -- changing ---------------------------------------------------------------------------------------
    def _keep_message_copy(self, msgid: int, directory: str) -> str:
        """Copy a message file to corrupt/<msgid>.message (a copy, not a link: the file of a delivered message
        may be reused for the next one), flushed. Returns what became of it, for the envelopes' reasons."""
        name = f"{format_msgid(msgid)}{MESSAGE_COPY_SUFFIX}"
        target = os.path.join(self.corrupt, name)
        if not os.path.lexists(target):  # (else kept when another envelope of it went aside before)
            try:
                with open(os.path.join(directory, MESSAGE_FILE), "rb") as source:
                    write_new_file(target, source.read())
            except OSError as error:
                return f"no copy of the message could be kept: {error.strerror}"
        return f"the message is kept as corrupt/{name}"

    def set_aside(self, path: str, label: str, reason: str) -> CorruptEntry:
        """Move a file or folder to corrupt/<label> (or <label>.N), with a .why file giving the reason."""
        return self._aside(path, label, reason, True)

    def _aside(self, path: str, label: str, reason: str, move: bool) -> CorruptEntry:
        if not move:
            return CorruptEntry(label, reason, int(time.time()))
        target = os.path.join(self.corrupt, label)
        suffix = 0
        while os.path.lexists(target):
            suffix += 1
            target = os.path.join(self.corrupt, f"{label}.{suffix}")
        try:
            os.rename(path, target)
        except OSError as error:  # reported where it is; loading goes on with the rest
            return CorruptEntry(label, f"{reason} (not moved aside: {error.strerror})", int(time.time()))
        try:
            write_new_file(target + ".why", reason.encode() + b"\n")
            fsync_directory(self.corrupt)
        except OSError:
            pass  # the file is aside already; the reason is also in the log
        return CorruptEntry(os.path.basename(target), reason, int(time.time()))

    def rewrite_envelopes(self, files: list[tuple[int, bytes]], workers: int = REWRITE_THREADS
                          ) -> list[tuple[int, OSError]]:
        """Durably replace envelope files (e.g. the suspend flag of `smtpctl pause envelope`), each through
        durable.replace_file, several at a time (concurrent flushes share the disk's round trips); each message
        folder is flushed once at the end. An envelope whose file is gone (delivered or removed meanwhile) is
        skipped, not resurrected. Returns the (evpid, error) of those that failed."""

        def rewrite(item: tuple[int, bytes]) -> OSError | None:
            path = self.envelope_path(item[0])
            if not os.path.exists(path):
                return None
            try:
                replace_file(path, item[1], sync_directory=False)
            except OSError as error:
                return error
            return None

        if len(files) > 1 and workers > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(files)),
                                    thread_name_prefix="queue-rewrite") as pool:
                errors = list(pool.map(rewrite, files))
        else:
            errors = [rewrite(item) for item in files]
        failures = [(evpid, error) for (evpid, _), error in zip(files, errors, strict=True) if error is not None]
        failed = {evpid for evpid, _ in failures}
        folders = {os.path.dirname(self.envelope_path(evpid)) for evpid, _ in files if evpid not in failed}
        for folder in sorted(folders):
            try:
                fsync_directory(folder)
            except FileNotFoundError:
                pass  # the message went meanwhile (its last envelope removed)
            except OSError as error:
                failures.extend((evpid, error) for evpid, _ in files
                                if os.path.dirname(self.envelope_path(evpid)) == folder)
        return failures

    def remove_envelope_file(self, evpid: int, retired: list[tuple[str, str]] | None = None) -> bool:
        """Delete one envelope; delete the message too when it was the last one. False if it was not there.

        With ``retired`` given, the folder of a message whose last envelope this is leaves the queue whole, by one
        rename into purge/, its files kept, and (folder, envelope file name) is added to ``retired``: the queue
        makes it a new message's folder (SpoolWriter.retire)."""
        if retired is not None and self._retire(evpid, retired):
            return True
        try:
            os.unlink(self.envelope_path(evpid))
        except FileNotFoundError:
            return False
        msgid = evpid >> 32
        if not any(name != MESSAGE_FILE and not name.startswith(".") for name in _listdir(self.message_dir(msgid))):
            self.purge_message(msgid)
        return True

    def _retire(self, evpid: int, retired: list[tuple[str, str]]) -> bool:
        msgid = evpid >> 32
        directory = self.message_dir(msgid)
        name = format_evpid(evpid)
        names = _listdir(directory)
        if len(names) != 2 or set(names) != {MESSAGE_FILE, name}:
            return False
        try:
            if os.stat(os.path.join(directory, MESSAGE_FILE)).st_size > RETIRE_MAX_BYTES:
                return False  # (its space is given back at once; the kept folders hold little)
        except OSError:
            return False
        target = self.purge_dir(msgid)
        try:
            os.rename(directory, target)
        except OSError:
            return False  # (e.g. a leftover of the same name in purge/: removed the usual way)
        retired.append((target, name))
        return True

    def purge_dir(self, msgid: int) -> str:
        """Where a message's folder goes when it leaves the queue."""
        return os.path.join(self.purge, format_msgid(msgid))

    def purge_message(self, msgid: int) -> None:
        directory = self.message_dir(msgid)
        target = self.purge_dir(msgid)
        try:
            os.rename(directory, target)
        except FileNotFoundError:
            return
        except OSError:
            target = directory  # e.g. a leftover of the same name in purge/: delete in place
        try:  # the usual folder: the message file alone (rmtree's walk costs more than the deletion itself)
            os.unlink(os.path.join(target, MESSAGE_FILE))
            os.rmdir(target)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)


def _wrong_key(path: str) -> codec.QueueCodecError:
    return codec.QueueCodecError(
        f"the queue encryption key is not the one this spool's queue was encrypted with ({path} does not decrypt "
        "with it); nothing was read or changed: start with that key, or move the spool aside")


def _decrypts(key_only: codec.QueueCodec, data: bytes, expected: bytes | None = None) -> bool:
    """Whether ``data`` decrypts with the codec's key (to ``expected``, when given)."""
    try:
        clear = key_only.decode(data, MAX_ENVELOPE_BYTES)
    except codec.QueueCodecError:
        return False
    return expected is None or clear == expected


def _encrypted_without_key(directory: str) -> bool:
    """Whether this process has no queue encryption key and the folder holds a file stored encrypted."""
    if codec.current().key is not None:
        return False
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    for name in names:
        try:
            head = _read_regular_file(os.path.join(directory, name), 1)
        except OSError:
            continue
        if head == codec.ENCRYPTED_MARK:
            return True
    return False


def complete_commit(directory: str, msgid: int) -> bool:
    """Whether a message folder holds everything its commit wrote (see Spool.recover)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False  # (not a folder, or unreadable: no commit can be read from it)
    if MESSAGE_FILE not in names or len(names) < 2:
        return False
    envelopes = []
    for name in names:
        if name == MESSAGE_FILE:
            continue
        envelope, _ = read_envelope_file(os.path.join(directory, name), msgid, name)
        if envelope is None:
            return False
        envelopes.append(envelope)
    first = envelopes[0]
    if any((envelope.commit_envelopes, envelope.commit_size, envelope.commit_crc32) !=
           (len(envelopes), first.commit_size, first.commit_crc32) for envelope in envelopes):
        return False
    try:
        with open(os.path.join(directory, MESSAGE_FILE), "rb") as handle:
            data = handle.read(first.commit_size + 1)
    except OSError:
        return False
    return len(data) == first.commit_size and zlib.crc32(data) == first.commit_crc32


def read_envelope_file(path: str, msgid: int, name: str) -> tuple[Envelope | None, str]:
    """(envelope, "") or (None, reason). The file name must be the evpid, of this message."""
    if not is_hex_name(name, 16) or int(name[:8], 16) != msgid or not int(name[8:], 16):
        return None, "file name is not an envelope id of this message"
    try:
        data = _read_regular_file(path, MAX_STORED_ENVELOPE_BYTES + 1)
    except OSError as error:
        return None, f"unreadable: {error.strerror}"
    if data is None:
        return None, "not a regular file"
    return envelope_from_data(data, name)


def envelope_from_data(data: bytes, name: str) -> tuple[Envelope | None, str]:
    """(envelope, "") or (None, reason) for the content of the envelope file ``name`` (a checked evpid), as
    stored: compressed or encrypted content is decoded first (smtpd/queue/codec.py)."""
    if len(data) > MAX_STORED_ENVELOPE_BYTES:
        return None, "envelope file too large"
    try:
        envelope = load_envelope(codec.clear(data, MAX_ENVELOPE_BYTES))
    except (EnvelopeFormatError, codec.QueueCodecError) as error:
        return None, str(error)
    evpid = int(name, 16)
    if envelope.evpid and envelope.evpid != evpid:
        return None, "evpid inside the file differs from its name"
    envelope.evpid = evpid
    return envelope, ""


def _read_regular_file(path: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a regular file; None if it is something else. Opened without blocking, so
    that a FIFO or a device dropped into the spool cannot stall the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size >= info.st_size:  # all of it (one read, usually): spare the call that would find the end
                break
        return b"".join(chunks)
    finally:
        os.close(fd)


def message_file_problem(path: str) -> str:
    """"" when the message file is a regular file that can be opened for reading, else what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        return f"message file unreadable: {error.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "message file is not a regular file"
    finally:
        os.close(fd)
    return ""


def message_size_problem(path: str, envelope: Envelope) -> str:
    """"" when the message file has the size its commit wrote, else what is wrong. A file cut short or grown
    since (a damaged disk, a hand edit) must not be delivered as if whole; a stat catches that at every delivery
    (its CRC-32 would need the whole file read each time)."""
    if not envelope.commit_envelopes:
        return ""  # (an envelope that no commit wrote: nothing to compare with)
    try:
        size = os.stat(path).st_size
    except OSError:
        return ""  # (gone or unreadable: the delivery agent says so and the envelope waits, as before)
    if size == envelope.commit_size:
        return ""
    return f"message file has {size} bytes where its commit wrote {envelope.commit_size}"


def _is_message_copy(name: str) -> bool:
    return name.endswith(MESSAGE_COPY_SUFFIX) and is_hex_name(name[:-len(MESSAGE_COPY_SUFFIX)], 8)


def _folder_problem(directory: str, error: OSError) -> str:
    """Why a message folder whose listing failed with ``error`` is corrupt; "" if it is simply not there."""
    if isinstance(error, FileNotFoundError):
        return "message folder is a symbolic link to nothing" if os.path.islink(directory) else ""
    if isinstance(error, NotADirectoryError):
        return "message folder is not a folder"
    return f"message folder unreadable: {error.strerror}"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
