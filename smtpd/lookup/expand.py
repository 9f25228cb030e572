"""Recipient expansion: one RCPT address -> the deliveries it stands for (reference §6.2).

The RCPT address is the root of a tree. Nodes are processed first-in first-out:

* an ADDRESS is matched against the ruleset; a relay action makes it an MTA delivery, a local action with a
  `virtual` table looks it up there, any other local action turns it into a USERNAME (the lowercased local part);
* a USERNAME is looked up in the action's alias (or virtual) table; if that gives entries they become children,
  otherwise the user must exist in the userbase, and then its `~/.forward` (if any) gives children, else it is
  delivered to the user's mailbox by the action;
* a FILENAME or FILTER (|command) becomes an MDA delivery with `mda_exec`, run as the user whose `.forward` named
  it, or as the daemon's unprivileged user when it came from an alias;
* an ERROR refuses the recipient with its text.

Every inserted node is compared with those already present (kind, value, for files and commands the user they
run as, and for everything but addresses the action it descends from), so loops end. A node at depth 10 or an
empty delivery list refuses the recipient with 524 5.2.4.
The first failure ends the expansion; its reply is the RCPT answer (the session appends `: <rcpt>`).

Every step emits an `expand` trace event in the reference's wording, plus our own lines saying which table and
rule answered and into what.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from smtpd import log, trace
from smtpd.config.model import DEFAULT_SUBADDRESS_DELIMITER, Action, Config, MatchRule, Method
from smtpd.lookup.facts import SessionFacts
from smtpd.lookup.forward import ForwardStatus, read_forward
from smtpd.lookup.items import Item, ItemError, ItemKind, parse_items, parse_lines
from smtpd.lookup.tables.base import Service, TableError
from smtpd.lookup.tables.matching import ascii_lower
from smtpd.lookup.userinfo import DEFAULT_USERBASE, UserInfo, UserInfoError, parse_userinfo, unprivileged_user
from smtpd.queue.envelope import Envelope, EnvelopeType, shared_flags

EXPAND_DEPTH = 10
# An :include: file larger than this is refused as a whole (a temporary failure, logged), never cut: a cut list
# drops its last members and may turn the line it cuts into another address ("bob-archive@lists.example" read
# as the local user "bob"). 16 MiB holds some 400,000 addresses.
MAX_INCLUDE_SIZE = 16 << 20

INVALID_RECIPIENT = (550, "Invalid recipient")
TEMPORARY_FAILURE = (451, "Temporary failure")
EXPANSION_PERMFAIL = (524, "5.2.4 Mailing list expansion problem")
EXPANSION_TEMPFAIL = (424, "4.2.4 Mailing list expansion problem")

_log = log.get("expand")


class NodeKind(StrEnum):
    ADDRESS = "address"
    USERNAME = "username"
    FILENAME = "filename"
    FILTER = "filter"
    ERROR = "error"


_ITEM_TO_NODE = {
    ItemKind.ADDRESS: NodeKind.ADDRESS, ItemKind.USERNAME: NodeKind.USERNAME, ItemKind.FILENAME: NodeKind.FILENAME,
    ItemKind.FILTER: NodeKind.FILTER, ItemKind.ERROR: NodeKind.ERROR,
}


@dataclass(eq=False)
class ExpansionNode:
    """One node of the expansion tree, kept for `smtpctl explain` and the traces."""

    number: int
    kind: NodeKind
    value: str
    depth: int
    parent: ExpansionNode | None = None
    source: str = "rcpt"  # where it came from: "rcpt", "alias <t>", "virtual <t>", "/home/bob/.forward", ...
    rule: MatchRule | None = None
    action: Action | None = None
    sameuser: bool = False
    user: UserInfo | None = None  # set once a USERNAME was found in the userbase
    subaddress: str = ""
    forwarded: bool = False  # its ~/.forward was read and gave children
    aliased: bool = False  # it was a key of the alias table, whose entries are its children
    outcome: str = ""  # what became of it: "children", "delivery via X", "duplicate", "refused: ..."

    @property
    def owner(self) -> str | None:
        """The real user a FILENAME/FILTER runs as: its parent's, when that parent was a resolved user."""
        if self.parent is not None and self.parent.kind is NodeKind.USERNAME and self.parent.user is not None:
            return self.parent.user.username
        return None

    def key(self) -> tuple[Any, ...]:
        """What makes two nodes the same. Addresses are the same wherever they appear (so loops through addresses
        end). Any other node is the same only under the same action: `bob` reached through an address of an
        action "local" and through one of an action "archive" is two deliveries, one per action, as OpenSMTPD
        makes them (it keeps nodes apart per destination address, which picks the action); under one action the
        duplicates still make one delivery."""
        if self.kind is NodeKind.ADDRESS:
            return (self.kind, self.value.lower(), self.sameuser, None, None)
        owner = self.owner if self.kind in (NodeKind.FILENAME, NodeKind.FILTER) else None
        return (self.kind, self.value, self.sameuser, owner, self.action.name if self.action else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.number, "parent": self.parent.number if self.parent else None, "type": str(self.kind),
            "value": self.value, "depth": self.depth, "source": self.source,
            "rule": self.rule.number if self.rule else None, "action": self.action.name if self.action else None,
            "sameuser": self.sameuser, "outcome": self.outcome,
        }

    def describe(self) -> str:
        parts = [f"{self.kind}: {self.value}", f"[depth={self.depth}"]
        if self.source:
            parts[-1] += f", from {self.source}"
        if self.rule is not None:
            parts[-1] += f", rule #{self.rule.number}"
        parts[-1] += "]"
        if self.outcome:
            parts.append(f"-> {self.outcome}")
        return " ".join(parts)


@dataclass
class ExpansionResult:
    deliveries: list[Envelope] = field(default_factory=list)
    refusal: tuple[int, str] | None = None
    tree: list[ExpansionNode] = field(default_factory=list)
    why: str = ""  # what made the refusal (a table's error, ...): for the log, never for the client

    @property
    def accepted(self) -> bool:
        return self.refusal is None

    def render_tree(self) -> list[str]:
        """The tree as indented lines, for `smtpctl explain`."""
        return ["  " * node.depth + node.describe() for node in self.tree]


class _Refused(Exception):
    def __init__(self, reply: tuple[int, str], why: str) -> None:
        super().__init__(why)
        self.reply = reply
        self.why = why


# rules.match_rules, resolved on first use so that this module imports even while rules.py is being written.
RuleMatcher = Callable[..., Any]


def _default_matcher() -> RuleMatcher:
    from smtpd.lookup.rules import match_rules

    return match_rules


def expand_recipient(config: Config, tables: Any, facts: SessionFacts, sender: str, rcpt: str,
                     smtpname: str, *, matcher: RuleMatcher | None = None) -> ExpansionResult:
    """Expand one recipient. Synchronous (it reads files and tables): from the event loop only when
    Tables.expansion_is_immediate() says nothing it asks can wait, else with asyncio.to_thread.

    ``rcpt`` is `user@domain` (a missing domain gets ``smtpname``). ``matcher`` replaces rules.match_rules (for
    callers that already hold one, and tests of expansion alone).
    """
    if "@" not in rcpt:
        rcpt = f"{rcpt}@{smtpname}"
    expansion = _Expansion(config, tables, facts, sender, matcher or _default_matcher())
    return expansion.run(rcpt)


class _Expansion:
    def __init__(self, config: Config, tables: Any, facts: SessionFacts, sender: str,
                 matcher: RuleMatcher) -> None:
        self.config = config
        self.tables = tables
        self.facts = facts
        self.sender = sender
        self.matcher = matcher
        self.delimiter = (config.smtp.sub_addr_delim or DEFAULT_SUBADDRESS_DELIMITER)[:1]
        self.pending: deque[ExpansionNode] = deque()
        self.tree: list[ExpansionNode] = []
        self.seen: dict[tuple[Any, ...], ExpansionNode] = {}
        self.deliveries: list[Envelope] = []

    # -- driving --------------------------------------------------------------------------------------
    def run(self, rcpt: str) -> ExpansionResult:
        self._insert(NodeKind.ADDRESS, rcpt, parent=None, source="rcpt")
        try:
            while self.pending:
                self._process(self.pending.popleft())
            if not self.deliveries:
                _emit("lka_done: expanded to empty delivery list")
                raise _Refused(EXPANSION_PERMFAIL, "expanded to an empty delivery list")
        except _Refused as refused:
            _emit(f"refused: {refused.reply[0]} {refused.reply[1]} ({refused.why})")
            return ExpansionResult([], refused.reply, self.tree, refused.why)
        return ExpansionResult(self.deliveries, None, self.tree)

    def _process(self, node: ExpansionNode) -> None:
        if node.depth >= EXPAND_DEPTH:
            _emit("lka_expand: node too deep.")
            node.outcome = "refused: too deep"
            raise _Refused(EXPANSION_PERMFAIL, f"expansion deeper than {EXPAND_DEPTH} levels")
        handlers = {
            NodeKind.ADDRESS: self._expand_address, NodeKind.USERNAME: self._expand_username,
            NodeKind.FILENAME: self._expand_file_or_command, NodeKind.FILTER: self._expand_file_or_command,
            NodeKind.ERROR: self._expand_error,
        }
        handlers[node.kind](node)

    def _insert(self, kind: NodeKind, value: str, parent: ExpansionNode | None, source: str) -> bool:
        node = ExpansionNode(len(self.tree) + 1, kind, value, parent.depth + 1 if parent else 0, parent, source)
        if parent is not None:
            node.rule, node.action = parent.rule, parent.action
            if kind is NodeKind.USERNAME and parent.kind is NodeKind.USERNAME:
                parent_name = parent.user.username if parent.user else parent.value
                node.sameuser = value in (parent.value, parent_name)
        tracing = trace.wants("expand")  # (the messages are built only when someone reads them)
        if tracing:
            _emit(f"{_token(node)}: expand_insert() called for {kind}:{value}"
                  f"[parent={_token(parent)}, rule={_rule_token(node.rule)}, "
                  f"dispatcher={node.action.name if node.action else None}]")
        self.tree.append(node)
        earlier = self.seen.get(node.key())
        if earlier is not None:
            _emit(f"{_token(node)}: node found, discarding")
            node.outcome = "duplicate, discarded"
            owner = self._forward_naming_itself(parent, earlier) if parent is not None else None
            if owner is not None:
                # A .forward line naming its own user by address (`bob@example.org` in bob's .forward, to keep a
                # copy, as with Postfix or sendmail) comes back to where it started: discarded, the user's own
                # copy would silently be lost. It means "my mailbox", as `\bob` does.
                _emit(f"{_token(node)}: names {owner.value} itself, delivering to its mailbox")
                return self._insert(NodeKind.USERNAME, owner.value, owner, source)
            return False
        self.seen[node.key()] = node
        if tracing:
            _emit(f"{_token(parent)}: inserted node {_token(node)}")
        self.pending.append(node)
        return True

    def _forward_naming_itself(self, parent: ExpansionNode, earlier: ExpansionNode) -> ExpansionNode | None:
        """The user node whose `.forward` (or alias entry: `bob: bob@example.org, bob@remote.test`, bob a user) a
        duplicate node (under ``parent``, repeating ``earlier``) came from, when it leads straight back to that same
        user: ``earlier`` is that user's node, or an ancestor reached only through it and addresses that stand for
        nobody else (its address, that address with a +tag, the user under another local domain); never through
        another alias, a virtual entry of several members or another user. None otherwise (an ordinary
        duplicate)."""
        owner: ExpansionNode | None = None
        owner_name = ""
        addresses: list[ExpansionNode] = []
        current: ExpansionNode | None = parent
        while current is not None:
            if current.kind is NodeKind.USERNAME:
                if owner is None:
                    name = self._owner_name(current)
                    if name is None:
                        return None
                    owner, owner_name = current, name
                elif current.user is None or current.user.username != owner_name:
                    return None
            elif current.kind is NodeKind.ADDRESS:
                addresses.append(current)
            else:
                return None
            if current is earlier:
                break
            current = current.parent
        if current is None or owner is None:
            return None
        # (counted last: a long list's duplicates never get here, and the count walks the whole tree)
        return owner if all(self._children(address) <= 1 for address in addresses) else None

    def _owner_name(self, node: ExpansionNode) -> str | None:
        """The user whose own list of targets node's children are: its .forward's, or its alias entry's when the
        alias is named after a user of the userbase (as `bob: bob, bob@remote.test` keeps a copy for bob)."""
        if node.forwarded and node.user is not None:
            return node.user.username
        if not node.aliased or node.action is None:
            return None
        name = self._split_tag(node.value)[0]
        try:
            found = self.tables.lookup(node.action.userbase_table or DEFAULT_USERBASE, Service.USERINFO, name)
        except TableError:
            return None
        return name if found is not None else None

    def _children(self, node: ExpansionNode) -> int:
        return sum(1 for other in self.tree if other.parent is node and other.outcome != "duplicate, discarded")

    def _insert_items(self, items: list[Item], parent: ExpansionNode, source: str) -> None:
        for item in items:
            self._insert(_ITEM_TO_NODE[item.kind], item.value, parent, source)

    # -- ADDRESS --------------------------------------------------------------------------------------
    def _expand_address(self, node: ExpansionNode) -> None:
        self._decode_srs(node)
        user, _, domain = node.value.rpartition("@")
        if trace.wants("expand"):
            _emit(f"lka_expand: address: {user}@{domain} [depth={node.depth}]")
        decision = self.matcher(self.config, self.tables, self.facts, self.sender, node.value,
                                internal=node.parent is not None)
        if decision.tempfail:
            node.outcome = "refused: temporary failure in the rules"
            raise _Refused(TEMPORARY_FAILURE, f"temporary failure matching the rules for {node.value}: "
                                              f"{decision.reasons[-1] if decision.reasons else 'unknown'}")
        if decision.rejected or decision.action is None:
            node.outcome = "refused: rejected" if decision.rejected else "refused: no rule matched"
            raise _Refused(INVALID_RECIPIENT, f"{node.value}: {node.outcome[len('refused: '):]}")
        node.rule, node.action = decision.rule, decision.action
        action = decision.action
        if action.method is Method.RELAY:
            self._submit(node, EnvelopeType.MTA)
        elif action.virtual_table:
            self._expand_virtual_address(node, user, domain, action.virtual_table)
        else:
            node.outcome = f"user {ascii_lower(user)}"
            self._insert(NodeKind.USERNAME, ascii_lower(user), node, source=f"local part, action {action.name}")

    def _decode_srs(self, node: ExpansionNode) -> None:
        """A bounce (null sender) to one of our SRS addresses goes to the address it stands for."""
        srs = self.config.srs
        if not srs.key or self.sender or node.value[:5].upper() not in ("SRS0=", "SRS1="):
            return
        from smtpd.mta.srs import decode  # the scheme lives with the relay code that encodes it

        keys = [key for key in (srs.key, srs.backup_key) if key]
        decoded = decode(node.value, keys, srs.ttl)
        if decoded is None:
            _emit(f"srs: {node.value} is not a valid SRS address of ours, kept as it is")
            return
        _emit(f"srs: {node.value} decoded to {decoded}")
        node.source = f"{node.source}, SRS {node.value}"
        node.value = decoded

    def _expand_virtual_address(self, node: ExpansionNode, user: str, domain: str, table: str) -> None:
        base, tag = self._split_tag(ascii_lower(user))
        domain = ascii_lower(domain)
        keys = [f"{base}{self.delimiter}{tag}@{domain}"] if tag else []
        keys.append(f"{base}@{domain}")
        if tag:
            keys.append(f"{base}{self.delimiter}{tag}")
        keys += [base, f"@{domain}", "@"]
        try:
            found = self._lookup_items(table, keys)
        except _LookupFailure as failure:
            _emit("lka_expand: error in virtual alias lookup")
            node.outcome = f"refused: {failure}"
            raise _Refused(EXPANSION_TEMPFAIL, str(failure)) from None
        if found is None:
            _emit("lka_expand: no aliases for virtual")
            node.outcome = f"refused: no entry in virtual table {table}"
            raise _Refused(EXPANSION_PERMFAIL, f"no entry for {node.value} in virtual table {table}")
        key, items = found
        node.outcome = f"virtual {table}[{key}]"
        self._insert_items(items, node, source=f"virtual <{table}> key {key}")

    # -- USERNAME -------------------------------------------------------------------------------------
    def _expand_username(self, node: ExpansionNode) -> None:
        _emit(f"lka_expand: username: {node.value} [depth={node.depth}, sameuser={int(node.sameuser)}]")
        action = node.action
        assert action is not None  # a username always descends from a matched address
        if not node.sameuser and (action.alias_table or action.virtual_table):
            if self._expand_username_aliases(node, action):
                return
        username, node.subaddress = self._split_tag(node.value)
        node.user = self._userinfo(node, username, action)
        if node.sameuser and node.parent is not None and node.parent.forwarded:
            _emit("lka_expand: same user, submitting")
            self._submit(node, EnvelopeType.MDA)
            return
        if action.user:
            _emit("lka_expand: alternate delivery user mode, submitting")
            self._submit(node, EnvelopeType.MDA)
            return
        self._expand_forward(node, action)

    def _expand_username_aliases(self, node: ExpansionNode, action: Action) -> bool:
        base, tag = self._split_tag(node.value)
        keys = [node.value, base] if tag else [base]
        table = action.alias_table or action.virtual_table
        assert table is not None
        kind = "alias" if action.alias_table else "virtual"
        try:
            found = self._lookup_items(table, keys, includes=True)
        except _LookupFailure as failure:
            _emit("lka_expand: error in alias lookup")
            node.outcome = f"refused: {failure}"
            raise _Refused(EXPANSION_TEMPFAIL, str(failure)) from None
        if found is None:
            return False
        # A key present is the alias, even when its :include: files give nothing (empty, unreadable): the node is
        # done without children, as OpenSMTPD's expansion; it does not fall back to a system user of that name.
        key, items = found
        node.outcome = f"{kind} {table}[{key}]"
        node.aliased = True
        self._insert_items(items, node, source=f"{kind} <{table}> key {key}")
        return True

    def _userinfo(self, node: ExpansionNode, username: str, action: Action) -> UserInfo:
        userbase = action.userbase_table or DEFAULT_USERBASE
        try:
            value = self.tables.lookup(userbase, Service.USERINFO, username)
        except TableError as error:
            _emit("lka_expand: backend error while searching user")
            node.outcome = f"refused: userbase {userbase} failed"
            raise _Refused(TEMPORARY_FAILURE, f"userbase <{userbase}>: {error}") from None
        if value is None:
            _emit("lka_expand: user-part does not match system user")
            node.outcome = f"refused: no user {username} in userbase {userbase}"
            raise _Refused(INVALID_RECIPIENT, f"no user {username} in userbase <{userbase}>")
        try:
            return parse_userinfo(username, value)
        except UserInfoError as error:
            node.outcome = "refused: bad userinfo"
            raise _Refused(TEMPORARY_FAILURE, str(error)) from None

    def _expand_forward(self, node: ExpansionNode, action: Action) -> None:
        assert node.user is not None
        user = node.user
        forward = read_forward(user.directory, user.uid, user.gid)
        if forward.status is ForwardStatus.TEMPFAIL:
            _emit(f"~/.forward failed for user {user.username}", reason=forward.reason)
            _log.warning("%s", forward.reason)
            node.outcome = f"refused: {forward.reason}"
            raise _Refused(EXPANSION_TEMPFAIL, forward.reason)
        if forward.status is ForwardStatus.PERMFAIL:
            _emit(f"~/.forward failed for user {user.username}", reason=forward.reason)
            _log.warning("%s", forward.reason)
            node.outcome = f"refused: {forward.reason}"
            raise _Refused(EXPANSION_PERMFAIL, forward.reason)
        if forward.status is ForwardStatus.MISSING:
            if action.method is Method.FORWARD_ONLY:
                _emit(f"no .forward for user {user.username} on forward-only rule")
                node.outcome = "refused: no .forward on a forward-only action"
                raise _Refused(EXPANSION_TEMPFAIL, f"no usable .forward for {user.username} (forward-only)")
            if action.method is Method.EXPAND_ONLY:
                _emit(f"no .forward for user {user.username} and no default action on rule")
                node.outcome = "refused: no .forward on an expand-only action"
                raise _Refused(EXPANSION_PERMFAIL, f"no usable .forward for {user.username} (expand-only)")
            _emit(f"no .forward for user {user.username}, just deliver")
            self._submit(node, EnvelopeType.MDA)
            return
        node.forwarded = True
        node.outcome = f"forwarded by {forward.path}"
        self._insert_items(forward.items, node, source=forward.path)

    # -- FILENAME / FILTER / ERROR --------------------------------------------------------------------
    def _expand_file_or_command(self, node: ExpansionNode) -> None:
        _emit(f"lka_expand: {node.kind}: {node.value} [depth={node.depth}]")
        if node.action is not None and node.action.method is Method.FORWARD_ONLY:
            node.outcome = f"refused: {node.kind} on a forward-only action"
            raise _Refused(TEMPORARY_FAILURE, f"{node.kind} {node.value} on forward-only action")
        self._submit(node, EnvelopeType.MDA)

    def _expand_error(self, node: ExpansionNode) -> None:
        _emit(f"lka_expand: error: {node.value} [depth={node.depth}]")
        if node.action is not None and node.action.method is Method.FORWARD_ONLY:
            node.outcome = "refused: error item on a forward-only action"
            raise _Refused(TEMPORARY_FAILURE, f"error item on forward-only action: {node.value}")
        code_text, _, text = node.value.partition(" ")
        node.outcome = f"refused: {node.value}"
        raise _Refused((int(code_text), text), f"error item {node.value}")

    # -- deliveries -----------------------------------------------------------------------------------
    def _submit(self, node: ExpansionNode, envelope_type: EnvelopeType) -> None:
        action = node.action
        assert action is not None
        address = _nearest_address(node)
        envelope = Envelope(dispatcher=action.name, type=envelope_type, dest=address.value)
        if address.parent is not None:
            envelope.flags = shared_flags(("internal",))
        if envelope_type is EnvelopeType.MDA:
            if node.kind is NodeKind.USERNAME:
                self._check_mailbox_delivery(node, action)
                envelope.mda_user = node.user.username if node.user else node.value
                envelope.mda_subaddress = node.subaddress
            else:
                envelope.mda_user = node.owner or unprivileged_user()
                envelope.mda_exec = f"|{node.value}" if node.kind is NodeKind.FILTER else node.value
                if node.owner is not None and node.parent is not None:
                    # bob+lists's .forward: its commands learn the sub-address ($EXTENSION), as a mailbox
                    # delivery's do (and as Postfix gives it to .forward commands: `procmail -a $EXTENSION`).
                    envelope.mda_subaddress = node.parent.subaddress
                if node.kind is NodeKind.FILTER and node.owner is None:
                    _log.warning("commands executed from aliases run with %s privileges", envelope.mda_user)
        node.outcome = f"delivery via action {action.name} ({envelope_type})"
        if trace.wants("expand"):
            _emit(f"delivery: {node.kind} {node.value} -> action {action.name}, {envelope_type} to {envelope.dest}"
                  + (f", user {envelope.mda_user}" if envelope.mda_user else ""),
                  dispatcher=action.name, dest=envelope.dest)
        self.deliveries.append(envelope)

    @staticmethod
    def _check_mailbox_delivery(node: ExpansionNode, action: Action) -> None:
        # forward-only and expand-only actions have no mailbox to deliver into.
        if action.method is Method.FORWARD_ONLY:
            node.outcome = "refused: local delivery on a forward-only action"
            raise _Refused(EXPANSION_TEMPFAIL, f"{node.value}: forward-only action would deliver locally")
        if action.method is Method.EXPAND_ONLY:
            node.outcome = "refused: local delivery on an expand-only action"
            raise _Refused(EXPANSION_PERMFAIL, f"{node.value}: expand-only action has no mailbox delivery")

    # -- tables ---------------------------------------------------------------------------------------
    def _split_tag(self, user: str) -> tuple[str, str]:
        base, found, tag = user.partition(self.delimiter)
        return (base, tag) if found else (user, "")

    def _lookup_items(self, table: str, keys: list[str], includes: bool = True) -> tuple[str, list[Item]] | None:
        """The first key present in table and its items (includes read); None if no key is present."""
        for key in keys:
            try:
                value = self.tables.lookup(table, Service.ALIAS, key)
            except TableError as error:
                raise _LookupFailure(f"table <{table}>: {error}") from None
            if value is None:
                continue
            try:
                items = parse_items(value)
            except ItemError as error:
                raise _LookupFailure(f"table <{table}> key {key}: {error}") from None
            _emit(f"lookup {key} in <{table}> -> {value}", table=table, key=key)
            try:
                return key, self._read_includes(items) if includes else items
            except IncludeTooLarge as error:
                _log.warning("%s", error)
                raise _LookupFailure(f"table <{table}> key {key}: {error}") from None
        return None

    def _read_includes(self, items: list[Item]) -> list[Item]:
        expanded: list[Item] = []
        for item in items:
            if item.kind is ItemKind.INCLUDE:
                expanded.extend(_read_include_file(item.value))
            else:
                expanded.append(item)
        return expanded


class _LookupFailure(Exception):
    pass


class IncludeTooLarge(Exception):
    """An :include: file over MAX_INCLUDE_SIZE: the alias fails for now rather than lose part of its list."""


def _read_include_file(path: str) -> list[Item]:
    """The items of an :include: file; nested includes are skipped, an unreadable file gives nothing."""
    try:
        data = _read_include_bytes(path)
    except OSError as error:
        _log.warning("include file %s: %s", path, error.strerror)
        _emit(f"include {path} unreadable: {error.strerror}")
        return []
    items: list[Item] = []
    for line in parse_lines(data.decode("utf-8", errors="surrogateescape"), comments_in_words=False):
        try:
            line_items = parse_items(line)
        except ItemError as error:
            _log.warning("include file %s: %s", path, error)
            continue
        items.extend(item for item in line_items if item.kind is not ItemKind.INCLUDE)
    _emit(f"include {path} -> {', '.join(str(item) for item in items) or 'nothing'}")
    return items


def _read_include_bytes(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_INCLUDE_SIZE (IncludeTooLarge beyond, never a part of it: a cut
    would end in the middle of a line). Anything else is refused (EINVAL) without being read,
    and a FIFO or a device is not even opened for reading: the daemon reads includes as root, often on its event
    loop, and a user who can write on the file's path (a list kept in a home) could otherwise make it a FIFO,
    whose open() blocks until a writer comes, hanging every session of the daemon."""
    probe = os.open(path, os.O_PATH) if hasattr(os, "O_PATH") else -1
    try:
        if probe >= 0 and not stat.S_ISREG(os.fstat(probe).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    finally:
        if probe >= 0:
            os.close(probe)
    link_owners = _symlink_owners(path)
    # O_NONBLOCK: the path may have changed since the look above; the open must not wait whatever it now names.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if any(owner not in (0, info.st_uid) for owner in link_owners):
            # A user who may change a link on the path (a list kept in a home) pointed it at a file of someone
            # else's, which root can read and they cannot: its lines must not route mail.
            raise OSError(errno.EPERM, "a symbolic link on its path belongs to neither root nor the file's owner")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_INCLUDE_SIZE and (chunk := os.read(fd, MAX_INCLUDE_SIZE + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_INCLUDE_SIZE:
            raise IncludeTooLarge(f"include file {path}: larger than {MAX_INCLUDE_SIZE} bytes, not read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _symlink_owners(path: str) -> set[int]:
    """The owners of the symbolic links met while resolving ``path`` (its folders' and its own)."""
    owners: set[int] = set()
    pending = [part for part in os.path.abspath(path).split("/") if part]
    current = "/"
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        info = os.lstat(candidate)
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, "too many levels of symbolic links")
        owners.add(info.st_uid)
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        pending[:0] = [piece for piece in target.split("/") if piece]
    return owners


def _nearest_address(node: ExpansionNode) -> ExpansionNode:
    current: ExpansionNode | None = node
    while current is not None:
        if current.kind is NodeKind.ADDRESS:
            return current
        current = current.parent
    raise AssertionError("every node descends from the RCPT address")


def _token(node: ExpansionNode | None) -> str:
    # The reference prints pointers; a node's number in this expansion is our unique token.
    return "0x0" if node is None else f"0x{node.number:x}"


def _rule_token(rule: MatchRule | None) -> str:
    return "0x0" if rule is None else f"#{rule.number}"


def _emit(message: str, **fields: Any) -> None:
    if trace.wants("expand"):
        trace.emit("expand", message, **fields)
