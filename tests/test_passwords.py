"""Password hashing and checking, against hashes made by the real tools (tests/data/hashes/corpus.tsv)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.passwords import PasswordSchemeError, hash_password, verify_password, verify_password_async

CORPUS = Path(__file__).parent / "data" / "hashes" / "corpus.tsv"
ROOT = Path(__file__).resolve().parent.parent


def corpus_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            tool, password, stored = line.split("\t")
            rows.append((tool, password, stored))
    return rows


def test_corpus_covers_every_tool_and_scheme() -> None:
    rows = corpus_rows()
    tools = {tool for tool, _, _ in rows}
    assert tools == {"opensmtpd-encrypt", "smtpctl-encrypt-stdin", "openssl-passwd-1", "openssl-passwd-5",
                     "openssl-passwd-6", "htpasswd-B", "mkpasswd-yescrypt", "mkpasswd-des",
                     "python-bcrypt-2a", "python-bcrypt-2b"}
    for prefix in ("$6$", "$5$", "$1$", "$2a$", "$2b$", "$2y$", "$y$"):
        assert any(stored.startswith(prefix) for _, _, stored in rows), prefix
    assert any(not stored.startswith("$") and len(stored) == 13 for _, _, stored in rows)  # DES


@pytest.mark.parametrize(("tool", "password", "stored"), corpus_rows(),
                         ids=[f"{row[0]}-{index}" for index, row in enumerate(corpus_rows())])
def test_real_tool_hash_verifies_and_wrong_password_fails(tool: str, password: str, stored: str) -> None:
    assert verify_password(password, stored)
    assert verify_password(password.encode("utf-8"), stored)
    # DES only looks at 8 characters: change the first one so every scheme must notice.
    assert not verify_password("X" + password[1:], stored)
    assert not verify_password("", stored)


def test_bcrypt_default_is_2b_cost_12_and_verifies() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("$2b$12$") and len(stored) == 60
    assert verify_password("correct horse", stored)


def test_sha512_has_the_form_opensmtpd_encrypt_prints() -> None:
    stored = hash_password("secret", scheme="sha512")
    prefix, ident, salt, digest = stored.split("$")
    assert (prefix, ident, len(salt), len(digest)) == ("", "6", 16, 86)
    assert verify_password("secret", stored)


def test_sha512_hash_matches_what_openssl_computes_with_the_same_salt() -> None:
    stored = hash_password("pässwörd", scheme="sha512")
    salt = stored.split("$")[2]
    result = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "pässwörd"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == stored


def test_our_bcrypt_hash_is_accepted_by_htpasswd(tmp_path: Path) -> None:
    stored = hash_password("hunter2", rounds=5)
    passwords = tmp_path / "htpasswd"
    passwords.write_text(f"bob:{stored}\n")
    good = subprocess.run(["htpasswd", "-vb", str(passwords), "bob", "hunter2"], capture_output=True)
    bad = subprocess.run(["htpasswd", "-vb", str(passwords), "bob", "hunter3"], capture_output=True)
    assert good.returncode == 0
    assert bad.returncode != 0


def test_sha512_rounds_and_bcrypt_cost_are_honoured() -> None:
    assert hash_password("x", scheme="sha512", rounds=6000).startswith("$6$rounds=6000$")
    assert hash_password("x", rounds=4).startswith("$2b$04$")
    with pytest.raises(PasswordSchemeError):
        hash_password("x", rounds=3)
    with pytest.raises(PasswordSchemeError):
        hash_password("x", scheme="md5")


def test_empty_stored_hash_accepts_only_the_empty_password() -> None:
    assert verify_password("", "")
    assert not verify_password("something", "")


def test_locked_and_garbage_hashes_never_verify() -> None:
    for stored in ("*", "!", "!$6$abc$def", "$6$", "$2b$12$short", "$9$unknown$scheme", "x"):
        assert not verify_password("", stored)
        assert not verify_password("x", stored)


def test_long_bcrypt_passwords_are_truncated_at_72_bytes_like_every_bcrypt() -> None:
    stored = hash_password("a" * 100, rounds=4)
    assert verify_password("a" * 72, stored)
    assert verify_password("a" * 80, stored)
    assert not verify_password("a" * 71, stored)


def test_async_check_runs_off_the_event_loop() -> None:
    stored = hash_password("pw", rounds=11)

    async def scenario() -> tuple[bool, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        result = await verify_password_async("pw", stored)
        done.set()
        await task
        return result, ticks

    result, ticks = asyncio.run(scenario())
    assert result is True
    assert ticks > 1  # the loop kept running while bcrypt worked in a thread


# -- smtpctl encrypt ---------------------------------------------------------------------------------------
def run_encrypt(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "smtpctl", "encrypt", *args], input=stdin, capture_output=True,
                          env=environment, cwd=ROOT)


def test_encrypt_argument_prints_one_hash_and_warns_about_ps() -> None:
    result = run_encrypt("--rounds", "4", "s3cret")
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("$2b$04$")
    assert verify_password("s3cret", lines[0])
    assert b"ps" in result.stderr and b"warning" in result.stderr


def test_encrypt_stdin_hashes_each_line_stripping_only_the_newline() -> None:
    result = run_encrypt("--scheme", "sha512", stdin=b"one\ntwo \r\n\nlast")
    assert result.returncode == 0
    assert result.stderr == b""
    hashes = result.stdout.decode().splitlines()
    assert len(hashes) == 4
    assert all(stored.startswith("$6$") for stored in hashes)
    assert verify_password("one", hashes[0])
    assert verify_password("two \r", hashes[1]) and not verify_password("two", hashes[1])
    assert verify_password("", hashes[2])
    assert verify_password("last", hashes[3])


def test_encrypt_default_is_bcrypt_cost_12() -> None:
    result = run_encrypt(stdin=b"pw\n")
    assert result.stdout.decode().startswith("$2b$12$")


def test_encrypt_rejects_bad_rounds() -> None:
    result = run_encrypt("--rounds", "99", stdin=b"pw\n")
    assert result.returncode != 0
    assert b"rounds" in result.stderr
    assert result.stdout == b""


# -- acceptance by real OpenSMTPD --------------------------------------------------------------------------
def opensmtpd_crypt():
    """crypt() of the libcrypt that the installed OpenSMTPD links (found with ldd): OpenSMTPD 6.8 checks a
    password with crypt_checkpass, which is `crypt(password, stored) == stored` on Linux."""
    import ctypes

    listing = subprocess.run(["ldd", "/usr/sbin/smtpd"], capture_output=True, text=True, check=True).stdout
    path = next(line.split("=>")[1].split()[0] for line in listing.splitlines() if "libcrypt.so" in line)
    library = ctypes.CDLL(path)
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return lambda password, stored: library.crypt(password.encode(), stored.encode()) == stored.encode()


@pytest.mark.parametrize("args", [("--scheme", "sha512"), ("--rounds", "4")])
def test_hashes_from_our_encrypt_pass_opensmtpd_check(args: tuple[str, ...]) -> None:
    check = opensmtpd_crypt()
    stored = run_encrypt(*args, stdin=b"open sesame\n").stdout.decode().strip()
    assert check("open sesame", stored)
    assert not check("open sesamE", stored)


# -- passwords that are not UTF-8 (a Latin-1 terminal, an old credentials file) ------------------------------
LATIN1_PASSWORD = "été".encode("latin-1")


def test_opensmtpd_encrypt_hash_of_a_latin1_password_verifies() -> None:
    """OpenSMTPD hashes the password's bytes as they are; so must our check (the AUTH path gives it bytes)."""
    made = subprocess.run(["/usr/sbin/smtpctl", "encrypt"], input=LATIN1_PASSWORD + b"\n", capture_output=True,
                          check=True).stdout.decode().strip()
    assert made.startswith("$6$")
    assert verify_password(LATIN1_PASSWORD, made)
    assert verify_password(LATIN1_PASSWORD.decode("utf-8", "surrogateescape"), made)  # as the session passes it
    assert not verify_password("été", made)  # the UTF-8 spelling is another password


def test_encrypt_sha512_of_a_latin1_line_passes_opensmtpd_check() -> None:
    result = run_encrypt("--scheme", "sha512", stdin=LATIN1_PASSWORD + b"\n")
    assert result.returncode == 0, result.stderr
    stored = result.stdout.decode().strip()
    assert verify_password(LATIN1_PASSWORD, stored)
    import ctypes

    listing = subprocess.run(["ldd", "/usr/sbin/smtpd"], capture_output=True, text=True, check=True).stdout
    path = next(line.split("=>")[1].split()[0] for line in listing.splitlines() if "libcrypt.so" in line)
    library = ctypes.CDLL(path)
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    assert library.crypt(LATIN1_PASSWORD, stored.encode()) == stored.encode()


def test_encrypt_sha512_stops_at_a_nul_byte_like_opensmtpd() -> None:
    result = run_encrypt("--scheme", "sha512", stdin=b"pass\0word\n")
    assert result.returncode == 0, result.stderr
    stored = result.stdout.decode().strip()
    assert verify_password("pass", stored)


def test_encrypt_takes_an_argument_that_starts_with_a_dash() -> None:
    """`smtpctl encrypt "$PASSWORD"` with a password such as `-Xy7...` (a generated one often starts so): OpenSMTPD
    6.8 hashes it; ours said `No such option` and exited 255. Our own options (--scheme, --rounds) still work."""
    result = run_encrypt("--rounds", "4", "-Xy7!pw")
    assert result.returncode == 0, result.stderr
    [stored] = result.stdout.decode().splitlines()
    assert verify_password("-Xy7!pw", stored) and stored.startswith("$2b$04$")
    result = run_encrypt("--", "--rounds")
    assert result.returncode == 0 and verify_password("--rounds", result.stdout.decode().strip())
