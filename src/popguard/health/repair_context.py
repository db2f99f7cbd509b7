"""What a responder may see and ask of the health engine that runs it.

A responder kind gets this narrow interface, never the engine itself, so that the
repairs depend only on what they use and the engine, which runs them, can import
them. HealthEngine satisfies it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from popguard.directory.directory import Directory, Server
from popguard.health.clock import Clock
from popguard.health.incidents import Incident, Recheck
from popguard.health.results import ProbeResult, ResultsStore
from popguard.net.tls import TlsMaterial
from popguard.paths import ServerFolder


class RepairContext(Protocol):
    @property
    def data(self) -> Path:
        """The host's data folder: its supervisor, popguard.toml."""
        ...

    @property
    def folder(self) -> ServerFolder:
        """This server's own files."""
        ...

    @property
    def tls(self) -> TlsMaterial: ...

    @property
    def server(self) -> Server: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def store(self) -> ResultsStore:
        """The results, the recovery actions and the databases owed back."""
        ...

    @property
    def clock(self) -> Clock: ...

    @property
    def moves_lock(self) -> asyncio.Lock:
        """Held by any move of this server's databases: one at a time."""
        ...

    async def check_again(self, incident: Incident) -> Recheck: ...

    def latest_result(self, incident: Incident) -> ProbeResult | None: ...

    def escalated(self, incident: Incident, component: str, error: str, detail: str) -> str:
        """Store the alert and hand it to the notifier; says what became of it."""
        ...

    async def server_problems(self, ladder_step: bool = True) -> list[str]: ...

    async def databases_fail_here(self, databases: list[str]) -> list[str]: ...
