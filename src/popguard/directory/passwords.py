"""Password hashing (argon2id), a positive authentication cache, and login delays."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# argon2-cffi's defaults follow RFC 9106's second recommended option (64 MiB, t=3).
_hasher = PasswordHasher()

GENERATED_PASSWORD_BYTES = 15  # 20 characters of URL-safe base64, 120 bits


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    """A random URL-safe password that does not begin with "-": users paste it after
    an option (`--password`, `-p`), and getopt and argparse would take it for one."""
    while True:
        password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        if not password.startswith("-"):
            return password


# A KDF costs tens of milliseconds on purpose; the cache lets a mailbox that just
# proved its password log in again without paying that, for a short time.
AUTH_CACHE_TTL = 300.0
AUTH_CACHE_MAX_ENTRIES = 100_000


class AuthCache:
    """Remembers successful (address, password) checks against one stored hash.

    The key includes the stored hash itself, so a changed password (a new hash in
    the directory) misses at once. Passwords are never kept: only a keyed digest
    under a secret that lives in this process's memory alone.
    """

    def __init__(
        self,
        ttl: float = AUTH_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
        secret: bytes | None = None,
    ):
        self._ttl = ttl
        self._clock = clock
        # A service's worker processes share one secret (their master's), so that a
        # check one of them made is remembered by all (`remember_key`).
        self._secret = secret or secrets.token_bytes(32)
        self._entries: dict[bytes, float] = {}

    def key(self, address: str, password: str, password_hash: str) -> bytes:
        """The digest under which a verified (address, password, hash) is remembered."""
        return self._key(address, password, password_hash)

    def _key(self, address: str, password: str, password_hash: str) -> bytes:
        material = "\0".join((address, password, password_hash)).encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, material, hashlib.sha256).digest()

    def check(self, address: str, password: str, password_hash: str) -> bool:
        key = self._key(address, password, password_hash)
        expires = self._entries.get(key)
        if expires is None:
            return False
        if expires < self._clock():
            del self._entries[key]
            return False
        return True

    def remember(self, address: str, password: str, password_hash: str) -> None:
        self.remember_key(self._key(address, password, password_hash))

    def remember_key(self, key: bytes) -> None:
        """Remember a check made elsewhere under the same secret (another worker)."""
        if len(self._entries) >= AUTH_CACHE_MAX_ENTRIES:
            now = self._clock()
            self._entries = {k: v for k, v in self._entries.items() if v >= now}
            if len(self._entries) >= AUTH_CACHE_MAX_ENTRIES:
                self._entries.clear()
        self._entries[key] = self._clock() + self._ttl


# Failed logins: each one doubles the wait before the next "-ERR [AUTH]" for the
# same client address and for the same user, up to a ceiling, and is forgotten
# after a quiet period. This slows a guesser without locking a user out.
FAILED_LOGIN_BASE_DELAY = 0.25
FAILED_LOGIN_MAX_DELAY = 8.0
FAILED_LOGIN_FORGET_AFTER = 900.0
FAILED_LOGIN_MAX_TRACKED = 100_000


def _delay(failures: int) -> float:
    return min(FAILED_LOGIN_BASE_DELAY * 2.0 ** (failures - 1), FAILED_LOGIN_MAX_DELAY)


@dataclass
class _Failures:
    count: int
    last: float


class LoginDelays:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, _Failures] = {}

    def _count(self, key: str) -> int:
        entry = self._failures.get(key)
        if entry is None:
            return 0
        if self._clock() - entry.last > FAILED_LOGIN_FORGET_AFTER:
            del self._failures[key]
            return 0
        return entry.count

    def record_failure(self, client_ip: str, user: str) -> float:
        """Count a failed login; returns how long to wait before answering it."""
        now = self._clock()
        if len(self._failures) >= FAILED_LOGIN_MAX_TRACKED:
            # Forget the least recently failing tenth, never everyone: spraying many
            # user names must not wipe the sprayer's own address's count.
            for key in list(itertools.islice(self._failures, FAILED_LOGIN_MAX_TRACKED // 10)):
                del self._failures[key]
        worst = 0
        for key in (f"ip:{client_ip}", f"user:{user.lower()}"):
            count = self._count(key) + 1
            # Re-inserted so that the dict's order is the order of last failure.
            self._failures.pop(key, None)
            self._failures[key] = _Failures(count, now)
            worst = max(worst, count)
        return _delay(worst)

    def failing_address(self, client_ip: str) -> bool:
        """Whether logins from this address failed recently."""
        return self._count(f"ip:{client_ip}") > 0

    def failing_user(self, user: str) -> bool:
        """Whether logins as this user failed recently."""
        return self._count(f"user:{user.lower()}") > 0

    def wait_before(self, client_ip: str, user: str) -> float:
        """How long from now until the delay that the last failure of this address or
        of this user earned has passed: the next check of a password waits that long,
        so guesses sent in parallel are answered no faster than guesses in turn."""
        now = self._clock()
        wait = 0.0
        for key in (f"ip:{client_ip}", f"user:{user.lower()}"):
            if self._count(key):
                entry = self._failures[key]
                wait = max(wait, entry.last + _delay(entry.count) - now)
        return wait

    def record_success(self, client_ip: str, user: str) -> None:
        # The address's count is left to decay: one known password must not buy a
        # guesser on the same address a fresh budget for other users.
        self._failures.pop(f"user:{user.lower()}", None)
