"""Checking a mailbox's password, as the back end and the front end both do.

One place for the argon2id check, the positive cache, the decoy hash for
unknown users, the growing delay after failures and the bounds on how many
argon2id verifications run at once.

Parallel guesses must cost what guesses one at a time cost: an attempt waits for
the one before it from the same address and for the same user, then for the
failure delay those already earned, and only then runs the KDF. The KDF itself
runs in at most `KDF_SLOTS` threads; attempts whose address and user have no
recent failures take those slots first, so a guesser competes only with itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from popguard.directory.directory import Directory, Mailbox
from popguard.directory.passwords import AuthCache, LoginDelays, hash_password, verify_password
from popguard.services.counters import ServiceCounters

log = logging.getLogger("popguard.auth")

# The client address of a connection on a back end's Unix socket: a front end of the
# same host (services/frontend.py), the only kind of client that socket has.
LOCAL_FRONTEND = "local"

# argon2id is bound by CPU and by memory (64 MiB each, RFC 9106's second option):
# more verifications at once than cores only adds memory and latency.
KDF_SLOTS = os.cpu_count() or 1
# One verification in flight per client address and per user; the rest queue, so
# that each one sees the delay the one before it earned.
KDF_SLOTS_PER_ADDRESS = 1
KDF_SLOTS_PER_USER = 1


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[None]
    first: bool
    failing_grants: int  # the slots' failing-lane grants when this waiter queued


@dataclass
class Slots:
    """A semaphore with two lanes: a waiter in the first lane is served before any
    waiter in the second, each lane in arrival order. Waiting holds no thread."""

    capacity: int
    held: int = 0
    failing_grants: int = 0  # slots given to second-lane waiters, ever
    _lanes: tuple[deque[_Waiter], deque[_Waiter]] = field(
        default_factory=lambda: (deque(), deque())
    )

    @property
    def waiting(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    @property
    def idle(self) -> bool:
        return self.held == 0 and not self.waiting

    async def acquire(self, first: bool) -> bool:
        """Take a slot, queueing if none is free; True when the caller waited and a
        second-lane waiter was served while it did (it queued behind a failing one)."""
        if self.held < self.capacity and not self.waiting:
            self.held += 1
            return False
        waiter = _Waiter(asyncio.get_running_loop().create_future(), first, self.failing_grants)
        lane = self._lanes[0 if first else 1]
        lane.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted, then cancelled before it could run
            elif waiter in lane:  # else a release already passed it over
                lane.remove(waiter)
            raise
        own = 0 if first else 1  # this waiter's own grant counts as a failing one
        return self.failing_grants - own > waiter.failing_grants

    def release(self) -> None:
        self.held -= 1
        while self.held < self.capacity and self.waiting:
            second = not self._lanes[0]
            waiter = self._lanes[1 if second else 0].popleft()
            if waiter.future.done():  # cancelled while queued
                continue
            if second:
                self.failing_grants += 1
            self.held += 1
            waiter.future.set_result(None)


class KeyedSlots:
    """One `Slots` per key (an address, a user), made when first asked for and
    dropped when idle, so the table holds only keys with logins in progress."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._slots: dict[str, Slots] = {}

    async def acquire(self, key: str, first: bool) -> bool:
        slots = self._slots.setdefault(key, Slots(self._capacity))
        try:
            return await slots.acquire(first)
        except asyncio.CancelledError:
            if slots.idle:
                del self._slots[key]
            raise

    def release(self, key: str) -> None:
        slots = self._slots[key]
        slots.release()
        if slots.idle:
            del self._slots[key]


class Authenticator:
    def __init__(
        self,
        directory: Directory,
        counters: ServiceCounters,
        share: Callable[[bool, str, str, bytes | None], None] | None = None,
        cache_secret: bytes | None = None,
    ) -> None:
        self._directory = directory
        self._counters = counters
        # Told every login's outcome (failed, client address, user, and the positive
        # cache's key of a password just verified), for the server's other workers:
        # the failure delays are the server's, not one process's, and a password one
        # worker verified is not verified again by the next (`cache_secret` is theirs).
        self._share = share
        self._cache = AuthCache(secret=cache_secret)
        self._delays = LoginDelays()
        # Checked against when the user does not exist, so that an unknown user
        # costs the same time as a wrong password.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16))
        self._kdf_slots = Slots(KDF_SLOTS)
        self._address_slots = KeyedSlots(KDF_SLOTS_PER_ADDRESS)
        self._user_slots = KeyedSlots(KDF_SLOTS_PER_USER)
        # Verifications running now, per address and per user, for the peaks.
        self._running: dict[str, int] = {}
        self._frontends: frozenset[str] = frozenset()  # see _proxied
        self._frontends_version = -1

    def _proxied(self, client_ip: str) -> bool:
        """Whether the client is a front end: it logs in on a back end for many
        clients, so its address gets no slot of its own (it bounded them itself)."""
        if client_ip == LOCAL_FRONTEND:
            return True
        version = self._directory.change_counter()
        if version != self._frontends_version:
            self._frontends_version = version
            self._frontends = frozenset(
                server.address
                for server in self._directory.list_servers()
                if "frontend" in server.roles
            )
        return client_ip in self._frontends

    async def verify(
        self, user: str, password: str, client_ip: str, client_endpoint: str, mechanism: str
    ) -> Mailbox | None:
        """The mailbox if the password is right; after a failure, None, once the
        failure delay for this address and user has passed."""
        address = user.strip().lower()
        mailbox, delay = await self._check(address, password, client_ip)
        if mailbox is None:
            self._counters.failed_logins += 1
            log.warning(
                "failed login for %r from %s (%s), answering in %.2fs",
                address[:64],
                client_endpoint,
                mechanism,
                delay,
            )
            await asyncio.sleep(delay)
        return mailbox

    def _outcome(
        self,
        mailbox: Mailbox | None,
        verified: bool,
        client_ip: str,
        address: str,
        cache_key: bytes | None = None,
    ) -> tuple[Mailbox | None, float]:
        """Recorded while the address's and user's slots are still held, so the
        next attempt in their queues sees this failure's delay."""
        failed = mailbox is None or not verified
        if self._share is not None:
            self._share(failed, client_ip, address, None if failed else cache_key)
        if failed:
            return None, self._delays.record_failure(client_ip, address)
        self._delays.record_success(client_ip, address)
        return mailbox, 0.0

    def remote_outcome(
        self, failed: bool, client_ip: str, address: str, cache_key: bytes | None = None
    ) -> None:
        """A login another worker of this server decided: its delays count here too, and
        the password it verified is known here too."""
        if cache_key is not None:
            self._cache.remember_key(cache_key)
        if failed:
            self._delays.record_failure(client_ip, address)
        else:
            self._delays.record_success(client_ip, address)

    async def _check(
        self, address: str, password: str, client_ip: str
    ) -> tuple[Mailbox | None, float]:
        """The mailbox if the password is right, else None and the delay this failure
        earned; checked in turn behind the attempts before it from the same address
        and for the same user."""
        counters = self._counters
        address_failing = self._delays.failing_address(client_ip)
        user_failing = self._delays.failing_user(address)
        # In each queue the attempt whose *other* key is clean goes first: another
        # address's login for a user under attack, another user's behind the same NAT.
        queued = [
            (self._address_slots, client_ip, not user_failing),
            (self._user_slots, address, not address_failing),
        ]
        if self._proxied(client_ip):
            del queued[0]
        held: list[tuple[KeyedSlots, str]] = []
        counters.verifications_waiting += 1
        counters.peak_verifications_waiting = max(
            counters.peak_verifications_waiting, counters.verifications_waiting
        )
        waiting = True
        try:
            behind_failing = False
            for keyed, key, first in queued:
                behind_failing |= await keyed.acquire(key, first)
                held.append((keyed, key))
            # The delay the earlier failures earned passes before the KDF runs, so
            # guesses sent in parallel wait as long as guesses sent one by one.
            wait = self._delays.wait_before(client_ip, address)
            if wait > 0:
                counters.delayed_before_verification += 1
                await asyncio.sleep(wait)
            # Looked up only now: a password change made while this login queued counts.
            mailbox = self._directory.find_mailbox(address)
            stored_hash = mailbox.password_hash if mailbox else self._decoy_hash
            # The cache is asked only behind the queues and the delay: otherwise
            # parallel guesses against a cached password would skip both.
            if self._cache.check(address, password, stored_hash):
                return self._outcome(mailbox, True, client_ip, address)
            behind_failing |= await self._kdf_slots.acquire(not (address_failing or user_failing))
            counters.verifications_waiting -= 1
            waiting = False
            if behind_failing and not (address_failing or user_failing):
                counters.logins_queued_behind_failing += 1
            verified = await self._kdf(stored_hash, password, client_ip, address, held)
            cache_key = None
            if verified and mailbox is not None:
                cache_key = self._cache.key(address, password, stored_hash)
                self._cache.remember_key(cache_key)
            return self._outcome(mailbox, verified, client_ip, address, cache_key)
        finally:
            if waiting:
                counters.verifications_waiting -= 1
            for keyed, key in reversed(held):
                keyed.release(key)

    async def _kdf(
        self,
        stored_hash: str,
        password: str,
        client_ip: str,
        address: str,
        held: list[tuple[KeyedSlots, str]],
    ) -> bool:
        """Run argon2id in a thread within the KDF slot already taken, which is given
        back when the thread ends. If this login is cancelled before, the address's
        and user's slots in `held` are given back then too: the thread cannot be
        stopped, so the bounds must count it until it ends."""
        counters = self._counters
        running_keys = (f"ip:{client_ip}", f"user:{address}")
        counters.verifications_in_flight += 1
        counters.kdf_runs += 1
        counters.peak_verifications_in_flight = max(
            counters.peak_verifications_in_flight, counters.verifications_in_flight
        )
        for key in running_keys:
            self._running[key] = self._running.get(key, 0) + 1
        counters.peak_verifications_per_address = max(
            counters.peak_verifications_per_address, self._running[running_keys[0]]
        )
        counters.peak_verifications_per_user = max(
            counters.peak_verifications_per_user, self._running[running_keys[1]]
        )

        def finished(_: object) -> None:
            counters.verifications_in_flight -= 1
            for key in running_keys:
                left = self._running[key] - 1
                if left:
                    self._running[key] = left
                else:
                    del self._running[key]
            self._kdf_slots.release()

        # The KDF takes tens of milliseconds: off the event loop.
        job = asyncio.ensure_future(asyncio.to_thread(verify_password, stored_hash, password))
        job.add_done_callback(finished)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            handed = list(held)
            held.clear()

            def give_back(_: object) -> None:
                for keyed, key in reversed(handed):
                    keyed.release(key)

            job.add_done_callback(give_back)
            raise
