"""Checking a mailbox's password, as the back end and the front end both do.

One place for the argon2id check, the positive cache, the decoy hash for
unknown users and the growing delay after failures.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from popguard.directory.directory import Directory, Mailbox
from popguard.directory.passwords import AuthCache, LoginDelays, hash_password, verify_password
from popguard.services.counters import ServiceCounters

log = logging.getLogger("popguard.auth")


class Authenticator:
    def __init__(self, directory: Directory, counters: ServiceCounters) -> None:
        self._directory = directory
        self._counters = counters
        self._cache = AuthCache()
        self._delays = LoginDelays()
        # Checked against when the user does not exist, so that an unknown user
        # costs the same time as a wrong password.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16))

    async def verify(
        self, user: str, password: str, client_ip: str, client_endpoint: str, mechanism: str
    ) -> Mailbox | None:
        """The mailbox if the password is right; after a failure, None, once the
        failure delay for this address and user has passed."""
        address = user.strip().lower()
        mailbox = self._directory.find_mailbox(address)
        stored_hash = mailbox.password_hash if mailbox else self._decoy_hash
        verified = self._cache.check(address, password, stored_hash)
        if not verified:
            # The KDF takes tens of milliseconds: off the event loop.
            verified = await asyncio.to_thread(verify_password, stored_hash, password)
            if verified and mailbox is not None:
                self._cache.remember(address, password, stored_hash)
        if mailbox is None or not verified:
            self._counters.failed_logins += 1
            delay = self._delays.record_failure(client_ip, address)
            log.warning(
                "failed login for %r from %s (%s), answering in %.2fs",
                address[:64],
                client_endpoint,
                mechanism,
                delay,
            )
            await asyncio.sleep(delay)
            return None
        self._delays.record_success(client_ip, address)
        return mailbox
