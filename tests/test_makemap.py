"""makemap and newaliases (reference §5.6), compared with the real OpenSMTPD 6.8 makemap where they overlap."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpd.lookup.tables.db import dump_db

ROOT = Path(__file__).resolve().parent.parent
REAL_MAKEMAP = "/usr/sbin/makemap"


def run_ours(program: str, *args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Our smtpctl with the given personality, as the makemap/newaliases links run it."""
    code = f"import sys; from smtpctl.cli import main; main(sys.argv[1:], prog={program!r})"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, env=environment)


def run_real(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([REAL_MAKEMAP, *args], cwd=cwd, input=stdin, capture_output=True, text=True)


def real_dump(path: Path) -> list[str]:
    """The real makemap's entries, less the blanks it keeps at the end of a key (set) or value, where ours trims
    them as the daemon's file tables do (test_a_table_built_by_makemap_answers_as_the_same_file_does)."""
    def trimmed(line: str) -> str:
        if line.endswith("\t<set>"):
            return line[:-len("\t<set>")].rstrip(" \t\v\f\r") + "\t<set>"
        key, _, value = line.partition("\t")
        return f"{key}\t{value.rstrip(' \t\v\f\r')}"

    return sorted(trimmed(line) for line in run_real("-U", path.name, cwd=path.parent).stdout.splitlines())


SOURCES = {
    "plain": "Foo: bar, Baz\n# comment\nx:\ty # trailing comment\nlong \\\n  continued\n",
    "escapes": "a: b\\,c\nb: x\\\\y\nc: x\\qy\nd: x\\\\\ne: \\#not-a-comment\n",
    "spacing": "K\tV\n:empty-key\n   indented   value\n",  # (blanks and CR at the end: see the db/file test)
    "comment_eats_continuation": "a: b # c \\\nd e\n",
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_dump_equals_real_makemap(tmp_path: Path, name: str) -> None:
    real_dir, our_dir = tmp_path / "real", tmp_path / "ours"
    real_dir.mkdir()
    our_dir.mkdir()
    for folder in (real_dir, our_dir):
        (folder / name).write_text(SOURCES[name])
    assert run_real(name, cwd=real_dir).returncode == 0
    result = run_ours("makemap", name, cwd=our_dir)
    assert (result.returncode, result.stderr) == (0, "")
    ours = sorted(run_ours("makemap", "-U", f"{name}.db", cwd=our_dir).stdout.splitlines())
    assert ours == real_dump(real_dir / f"{name}.db")


@pytest.mark.parametrize(("args", "text"), [
    ((), "a b\nA c\n"),  # duplicate after lowercasing
    ((), "good value\nlonely\n"),  # no value
    ((), "a   \n"),
    ((), "a : \n"),
    (("-t", "aliases"), "ok: bob\nbad: b, !!nope\n"),
    (("-t", "aliases"), 'q: "x,y"\n'),
    (("-t", "aliases"), "q: bob, , alice\n"),  # makemap refuses empty items
    (("-t", "aliases"), "q: bob,\n"),
    (("-t", "aliases"), "ok: |/bin/true, /var/mail/x, :include:/etc/x, error:550 gone, u@d.test, bob\n"),
    (("-t", "set"), "Abc def\n  x  \ny:\n"),
    (("-d", "foo"), "a b\n"),
    (("-t", "foo"), "a b\n"),
    (("-h",), "a b\n"),
    ((), ""),  # empty map warning
])
def test_messages_and_exit_codes_equal_real_makemap(tmp_path: Path, args: tuple[str, ...], text: str) -> None:
    real_dir, our_dir = tmp_path / "real", tmp_path / "ours"
    real_dir.mkdir()
    our_dir.mkdir()
    for folder in (real_dir, our_dir):
        (folder / "src").write_text(text)
    real = run_real(*args, "src", cwd=real_dir)
    ours = run_ours("makemap", *args, "src", cwd=our_dir)
    assert (ours.returncode, ours.stderr, ours.stdout) == (real.returncode, real.stderr, real.stdout)
    assert (our_dir / "src.db").exists() == (real_dir / "src.db").exists()
    if real.returncode == 0 and text:
        assert sorted(run_ours("makemap", "-U", "src.db", cwd=our_dir).stdout.splitlines()) == \
            real_dump(real_dir / "src.db")


def test_usage_and_missing_file_messages(tmp_path: Path) -> None:
    no_args = run_ours("makemap", cwd=tmp_path)
    assert (no_args.returncode, no_args.stderr) == (1, "usage: makemap [-U] [-d dbtype] [-o dbfile] [-t type] file\n")
    missing = run_ours("makemap", "nonexist", cwd=tmp_path)
    assert (missing.returncode, missing.stderr) == (1, "makemap: stat: nonexist: No such file or directory\n")
    bad_option = run_ours("makemap", "-x", "f", cwd=tmp_path)
    assert bad_option.stderr.splitlines() == ["makemap: invalid option -- 'x'",
                                             "usage: makemap [-U] [-d dbtype] [-o dbfile] [-t type] file"]
    (tmp_path / "text").write_text("a b\n")
    not_db = run_ours("makemap", "-U", "text", cwd=tmp_path)
    assert not_db.returncode == 1 and not_db.stderr.startswith("makemap: dbopen: text: ")


def test_failure_leaves_existing_output_untouched_and_no_temporary_files(tmp_path: Path) -> None:
    source = tmp_path / "aliases"
    source.write_text("root: bob\n")
    assert run_ours("makemap", "aliases", cwd=tmp_path).returncode == 0
    before = (tmp_path / "aliases.db").read_bytes()
    source.write_text("root: bob\nroot: alice\n")
    failed = run_ours("makemap", "aliases", cwd=tmp_path)
    assert failed.stderr == "makemap: aliases:2: duplicate entry for root\n"
    assert (tmp_path / "aliases.db").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["aliases", "aliases.db"]


def test_output_keeps_source_mode_and_owner(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    source = tmp_path / "secrets"
    source.write_text("label user:password\n")
    source.chmod(0o640)
    os.chown(source, nobody.pw_uid, 0)
    assert run_ours("makemap", "-o", "out.db", "secrets", cwd=tmp_path).returncode == 0
    status = (tmp_path / "out.db").stat()
    assert (oct(status.st_mode & 0o7777), status.st_uid, status.st_gid) == ("0o640", nobody.pw_uid, 0)
    assert list(dump_db(str(tmp_path / "out.db"))) == [("label", "user:password")]


def test_sendmail_style_two_arguments_read_stdin(tmp_path: Path) -> None:
    result = run_ours("makemap", "hash", "virtual", cwd=tmp_path, stdin="Bob@Example.org  bob\n")
    assert result.returncode == 0
    assert list(dump_db(str(tmp_path / "virtual.db"))) == [("bob@example.org", "bob")]
    bad = run_ours("makemap", "foo", "virtual", cwd=tmp_path)
    assert (bad.returncode, bad.stderr) == (1, "makemap: unsupported DB type 'foo'\n")


def test_set_type_and_dump(tmp_path: Path) -> None:
    (tmp_path / "domains").write_text("Example.org\nexample.net\n")
    assert run_ours("makemap", "-t", "set", "domains", cwd=tmp_path).returncode == 0
    dumped = run_ours("makemap", "-U", "domains.db", cwd=tmp_path)
    assert dumped.stdout == "example.net\t<set>\nexample.org\t<set>\n"


# -- newaliases --------------------------------------------------------------------------------------------
def write_config(folder: Path, table_line: str) -> Path:
    config = folder / "smtpd.conf"
    config.write_text(f'{table_line}\naction "local" mbox alias <aliases>\nmatch for local action "local"\n')
    return config


@pytest.mark.parametrize("backend", ["file", "db"])
def test_newaliases_builds_the_configured_aliases_table(tmp_path: Path, backend: str) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("root: bob\npostmaster: root\n# note\nabuse: root\n")
    suffix = ".db" if backend == "db" else ""
    if backend == "db":
        shutil.copy(aliases, tmp_path / "seed")
        assert run_ours("makemap", "-o", "aliases.db", "seed", cwd=tmp_path).returncode == 0
    config = write_config(tmp_path, f"table aliases {backend}:{aliases}{suffix}")
    result = run_ours("newaliases", "-f", str(config), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{aliases}: 3 aliases\n", "")
    assert dict(dump_db(str(tmp_path / "aliases.db"))) == {"root": "bob", "postmaster": "root", "abuse": "root"}


def test_newaliases_reads_an_aliases_file_from_postfix_with_continued_lines(tmp_path: Path) -> None:
    """`newaliases` on the /etc/aliases a Postfix or Sendmail system leaves: an indented line continues the
    value before it (a comment may come between). OpenSMTPD 6.8's makemap refused the file (`alice,` ends with
    an empty item) or, with two items on the indented line, made it an alias of its own (`bob,` for `carol`)."""
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nstaff: alice,\n  # the rest of the team\n  bob, carol,\n\tdave\n"
                       "root: admin@example.org\n")
    config = write_config(tmp_path, f"table aliases file:{aliases}")
    result = run_ours("newaliases", "-f", str(config), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{aliases}: 3 aliases\n", "")
    assert dict(dump_db(str(tmp_path / "aliases.db"))) == {
        "postmaster": "root", "staff": "alice, bob, carol, dave", "root": "admin@example.org"}
    aliases.write_text("staff: alice,\nroot: admin\n")  # (a value ending with its comma is still refused)
    refused = run_ours("newaliases", "-f", str(config), cwd=tmp_path)
    assert (refused.returncode, refused.stderr) == (1, f"newaliases: {aliases}:1: invalid entry\n")


def test_newaliases_takes_the_values_the_daemon_reads(tmp_path: Path) -> None:
    """`root: \\root, admin@...` (keep a copy in root's mailbox: the sendmail idiom) and a command with a comma
    in quotes or after a backslash: the daemon reads them, OpenSMTPD 6.8's makemap called each an invalid entry
    (it cuts at every comma and keeps the backslash), and newaliases wrote nothing."""
    from helpers_control import DaemonProcess

    aliases = tmp_path / "aliases"
    aliases.write_text('root: \\root, admin@example.org\nlist: "|/bin/cat -n a,b"\nlog: |/bin/cat -n c\\,d\n')
    config = write_config(tmp_path, f"table aliases file:{aliases}")
    result = run_ours("newaliases", "-f", str(config), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{aliases}: 3 aliases\n", "")
    config.write_text(f"table aliases db:{aliases}.db\naction \"local\" mbox alias <aliases>\n"
                      'action "out" relay\nmatch from local for local action "local"\n'
                      'match from local for any action "out"\n')
    os.chmod(tmp_path, 0o755)
    with DaemonProcess(tmp_path / "daemon", config.read_text()) as daemon:
        explained = daemon.smtpctl("explain", "--to", "root").stdout
        assert "  mda via action local: root@" in explained and "  mta via action out: admin@example.org" in explained
        for name, command in (("list", "|/bin/cat -n a,b"), ("log", "|/bin/cat -n c,d")):
            explained = daemon.smtpctl("explain", "--to", name).stdout
            assert f"  mda via action local: {command} as " in explained, explained


def test_newaliases_reports_file_line_errors_and_usage(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("root: bob\nx: !!\n")
    config = write_config(tmp_path, f"table aliases file:{aliases}")
    result = run_ours("newaliases", "-f", str(config), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, f"newaliases: {aliases}:2: invalid entry\n")
    assert not (tmp_path / "aliases.db").exists()
    usage = run_ours("newaliases", "-x", cwd=tmp_path)
    assert usage.stderr.splitlines() == ["newaliases: invalid option -- 'x'", "usage: newaliases [-f file]"]
    extra = run_ours("newaliases", "some", cwd=tmp_path)
    assert (extra.returncode, extra.stderr) == (1, "usage: newaliases [-f file]\n")


def test_newaliases_with_an_inline_aliases_table_says_there_is_nothing_to_build(tmp_path: Path) -> None:
    """It rebuilt /etc/aliases.db, which such a configuration never reads, and said it had done so."""
    config = write_config(tmp_path, 'table aliases { root = bob }')
    result = run_ours("newaliases", "-f", str(config), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "newaliases: table aliases is inline in the configuration: there is no aliases file to build\n")


@pytest.fixture
def request_cleanup() -> Iterator[list[Path]]:
    folders: list[Path] = []
    yield folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def test_newaliases_without_root_when_the_folder_is_writable(request_cleanup: list[Path]) -> None:
    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path sits under a root-only folder; nobody needs a path it can reach.
    folder = Path(tempfile.mkdtemp(prefix="newaliases-"))
    request_cleanup.append(folder)
    aliases = folder / "aliases"
    aliases.write_text("root: bob\n")
    config = write_config(folder, f"table aliases file:{aliases}")
    for path in (folder, aliases, config):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    # The interpreter lives under /root here, so the process imports everything first and then drops to
    # nobody before newaliases does any work.
    code = ("import os, sys, smtpd.config, smtpd.config.parser, smtpctl.commands.maps, shared.paths; "
            "from smtpctl.cli import main; "
            f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); "
            "main(sys.argv[1:], prog='newaliases')")
    result = subprocess.run([sys.executable, "-c", code, "-f", str(config)], cwd=folder, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stdout) == (0, f"{aliases}: 1 aliases\n"), result.stderr
    assert (folder / "aliases.db").stat().st_uid == nobody.pw_uid


def test_sendmail_bi_is_newaliases(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("root: bob\n")
    config = write_config(tmp_path, f"table aliases file:{aliases}")
    result = run_ours("sendmail", "-bi", "-f", str(config), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"{aliases}: 1 aliases\n"), result.stderr


def test_a_table_built_by_makemap_answers_as_the_same_file_does(tmp_path: Path) -> None:
    """A file edited on Windows (CRLF) or with blanks after a domain or a value: the daemon's `file:` table trims
    each line, but makemap kept the CR and the blanks in the keys and values of the db (as OpenSMTPD 6.8's
    makemap does), so moving the table to `db:` stopped `example.org` matching (mail refused) and made a
    credentials hash `$2b$...\\r` that no password matches. makemap now trims them too."""
    from helpers_control import DaemonProcess

    (tmp_path / "domains").write_bytes(b"example.org \r\nexample.net\t\n# comment\r\nexample.com\n")
    (tmp_path / "virtual").write_bytes(b"bob@example.org  root\r\nalice@example.net: root  \n")
    assert run_ours("makemap", "-t", "set", "domains", cwd=tmp_path).returncode == 0
    assert run_ours("makemap", "virtual", cwd=tmp_path).returncode == 0
    assert run_ours("makemap", "-U", "domains.db", cwd=tmp_path).stdout == (
        "example.com\t<set>\nexample.net\t<set>\nexample.org\t<set>\n")
    assert run_ours("makemap", "-U", "virtual.db", cwd=tmp_path).stdout == (
        "alice@example.net\troot\nbob@example.org\troot\n")
    config = (f"table domains db:{tmp_path}/domains.db\ntable vusers db:{tmp_path}/virtual.db\n"
              'action "local" mbox virtual <vusers>\nmatch from any for domain <domains> action "local"\n')
    os.chmod(tmp_path, 0o755)
    with DaemonProcess(tmp_path / "daemon", config) as daemon:
        for address in ("bob@example.org", "alice@example.net"):
            result = daemon.smtpctl("explain", "--to", address, "--src", "192.0.2.9")
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"  mda via action local: {address} as root" in result.stdout, result.stdout


def test_dump_to_a_reader_that_left_ends_quietly(tmp_path: Path) -> None:
    """`makemap -U big.db | head -1`: once head has its line, the next write fails (EPIPE) and makemap died with
    a BrokenPipeError traceback, exit 1. A reader that leaves is how such a pipe ends: no traceback, exit 0."""
    (tmp_path / "big").write_text("".join(f"key{number} value{number}\n" for number in range(20000)))
    assert run_ours("makemap", "big", cwd=tmp_path).returncode == 0
    code = "import sys; from smtpctl.cli import main; main(sys.argv[1:], prog='makemap')"
    process = subprocess.Popen([sys.executable, "-c", code, "-U", "big.db"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    errors = process.stderr.read()
    process.stderr.close()
    assert (first, process.wait(60), errors) == (b"key0\tvalue0\n", 0, b"")
