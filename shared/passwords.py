"""Hashing and checking credentials.

Checking accepts every hash a credentials table may hold: bcrypt (`$2a$`, `$2b$`, `$2y$` — htpasswd's) through the
bcrypt package, and everything the system's crypt(3) knows (libxcrypt: `$6$` as OpenSMTPD's encrypt makes on
Linux, `$5$`, `$1$`, `$y$` yescrypt as Debian's /etc/shadow holds, traditional DES) through libxcrypt's crypt_rn,
called with the password's bytes as OpenSMTPD does (a Latin-1 password is not UTF-8; the crypt_r binding, which
takes only UTF-8 text, is the fallback without crypt_rn and makes the salts).
No hashing code of our own. A check computes the hash of the candidate with the stored salt and compares the two
strings in constant time.

bcrypt at cost 12 takes about a quarter of a second, so a daemon calls ``verify_password_async``, which runs the
check in a worker thread and keeps the event loop free.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
from typing import Any

import bcrypt
import crypt_r

DEFAULT_SCHEME = "bcrypt"
DEFAULT_BCRYPT_ROUNDS = 12
SCHEMES = ("bcrypt", "sha512")
# bcrypt only looks at the first 72 bytes of a password; every implementation (OpenBSD's, htpasswd) truncates,
# the bcrypt package refuses instead, so we truncate the same way before handing it over.
BCRYPT_MAX_PASSWORD_BYTES = 72
_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
# A fixed hash to spend the same time on when a user does not exist (see ``dummy_verify``).
_DUMMY_BCRYPT = b"$2b$12$Y.Lsq2OEi5.VOEFIzVohpun.yEcpnozXqEN9rrLP611sYteqFIIpm"


def _load_crypt_rn() -> Any:
    """libxcrypt's reentrant crypt_rn(phrase, setting, data, size), which takes the password as bytes."""
    name = ctypes.util.find_library("crypt")
    try:
        function = ctypes.CDLL(name or "libcrypt.so.1").crypt_rn
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    return function


_CRYPT_RN = _load_crypt_rn()
_CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt


def system_crypt(secret: bytes, setting: str) -> str | None:
    """crypt(3) of a password given as bytes, as OpenSMTPD's C code hashes it: any bytes, up to the first NUL.

    crypt_r's binding only takes str and encodes it as strict UTF-8, so a Latin-1 password could be neither
    hashed nor checked through it. None when the system refuses the setting.
    """
    if _CRYPT_RN is not None:
        data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
        result = _CRYPT_RN(secret, setting.encode("utf-8", "surrogateescape"), data, _CRYPT_DATA_SIZE)
        return result.decode("utf-8", "surrogateescape") if result else None
    try:  # without libxcrypt's crypt_rn: the binding, for passwords that are UTF-8
        return crypt_r.crypt(secret.split(b"\0", 1)[0].decode("utf-8"), setting)
    except (OSError, ValueError):
        return None


class PasswordSchemeError(ValueError):
    """An unknown scheme, or rounds out of range for it."""


def _as_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def hash_password(password: str | bytes, scheme: str = DEFAULT_SCHEME, rounds: int | None = None) -> str:
    """A new hash of password: bcrypt `$2b$` (cost ``rounds``, default 12) or SHA-512 crypt `$6$`.

    For sha512, ``rounds`` None gives the plain `$6$<16 salt chars>$...` form OpenSMTPD's encrypt prints;
    a number gives `$6$rounds=N$...`.
    """
    secret = _as_bytes(password)
    if scheme == "bcrypt":
        cost = DEFAULT_BCRYPT_ROUNDS if rounds is None else rounds
        if not 4 <= cost <= 31:
            raise PasswordSchemeError(f"bcrypt rounds must be between 4 and 31, not {cost}")
        salt = bcrypt.gensalt(rounds=cost, prefix=b"2b")
        return bcrypt.hashpw(secret[:BCRYPT_MAX_PASSWORD_BYTES], salt).decode("ascii")
    if scheme == "sha512":
        if rounds is not None and not 1000 <= rounds <= 999_999_999:
            raise PasswordSchemeError(f"sha512 rounds must be between 1000 and 999999999, not {rounds}")
        salt = crypt_r.mksalt(crypt_r.METHOD_SHA512, rounds=rounds)
        result = system_crypt(secret, salt)
        if not result or result.startswith("*"):
            raise PasswordSchemeError("the system crypt(3) cannot make SHA-512 hashes")
        return result
    raise PasswordSchemeError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")


def _bcrypt_matches(secret: bytes, stored: bytes) -> bool:
    # $2y$ (PHP, htpasswd) and $2a$ are the same algorithm as $2b$ for any password we can be given.
    normalised = b"$2b$" + stored[4:]
    try:
        computed = bcrypt.hashpw(secret[:BCRYPT_MAX_PASSWORD_BYTES], normalised)
    except ValueError:
        return False
    return hmac.compare_digest(computed, normalised)


def _crypt_matches(secret: bytes, stored: str) -> bool:
    computed = system_crypt(secret, stored)
    # libxcrypt returns a failure token starting with "*" (never a valid hash) for a salt it does not know.
    if not computed or computed.startswith("*"):
        return False
    return hmac.compare_digest(computed.encode("utf-8", "surrogateescape"), stored.encode("utf-8", "surrogateescape"))


def verify_password(password: str | bytes, stored: str | bytes) -> bool:
    """Whether password matches the stored hash. An empty stored hash accepts only the empty password."""
    secret = _as_bytes(password)
    stored_bytes = _as_bytes(stored)
    if not stored_bytes:
        return not secret
    if stored_bytes[:4] in _BCRYPT_PREFIXES:
        return _bcrypt_matches(secret, stored_bytes)
    return _crypt_matches(secret, stored_bytes.decode("utf-8", "surrogateescape"))


def dummy_verify(password: str | bytes) -> None:
    """Spend the time a real check takes, so that an unknown user cannot be told from a wrong password."""
    _bcrypt_matches(_as_bytes(password), _DUMMY_BCRYPT)


async def verify_password_async(password: str | bytes, stored: str | bytes) -> bool:
    """``verify_password`` in the default thread pool, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, verify_password, password, stored)
