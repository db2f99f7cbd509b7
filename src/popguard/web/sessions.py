"""Who is logged in to the web page: sessions in this process's memory (a restart of
the service asks everyone to log in again), each with its own CSRF token, and the
failed-login delays POP3 uses."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from popguard.directory.passwords import LoginDelays

SESSION_COOKIE = "popguard_session"
LOGIN_COOKIE = "popguard_login"  # the CSRF token of the login form, before any session
SESSION_IDLE = 8 * 3600.0  # seconds a session lives without a request
MAX_SESSIONS = 10_000


@dataclass
class Session:
    token: str
    user: str
    role: str
    csrf: str
    last_seen: float

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"

    def csrf_matches(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf.encode())


class Sessions:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self.delays = LoginDelays()

    def create(self, user: str, role: str) -> Session:
        now = time.monotonic()
        if len(self._sessions) >= MAX_SESSIONS:
            self._forget_idle(now)
            if len(self._sessions) >= MAX_SESSIONS:  # the oldest goes: never unbounded
                del self._sessions[min(self._sessions.values(), key=lambda s: s.last_seen).token]
        session = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), now)
        self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._sessions.get(token)
        now = time.monotonic()
        if session is None or now - session.last_seen > SESSION_IDLE:
            self._sessions.pop(token, None)
            return None
        session.last_seen = now
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def _forget_idle(self, now: float) -> None:
        for token in [t for t, s in self._sessions.items() if now - s.last_seen > SESSION_IDLE]:
            del self._sessions[token]
