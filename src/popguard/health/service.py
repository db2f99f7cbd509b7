"""`popguard serve health --server NAME`: the health engine and its API (MSExchangeHM)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aiohttp import web

from popguard.errors import UserError
from popguard.health.api import HealthApi, ensure_token
from popguard.health.clock import SystemClock
from popguard.health.engine import HealthEngine
from popguard.health.loader import load_folder, shipped_health_sets
from popguard.net.serving import listen
from popguard.net.tls import server_context
from popguard.services.context import ServerContext

log = logging.getLogger("popguard.health")


def extra_sets_folder(data: Path) -> Path:
    """Health sets of the operator's own (for another protocol, say), beside popguard's."""
    return data / "health" / "sets"


async def run_health(data: Path, server_name: str, profile: str, stop: asyncio.Event) -> None:
    sets = shipped_health_sets(profile) + load_folder(extra_sets_folder(data), profile)
    names = [s.name.lower() for s in sets]
    if len(names) != len(set(names)):
        raise UserError(f"two health sets have the same name in {extra_sets_folder(data)}")
    context = ServerContext.open(data, server_name)
    engine = HealthEngine(context, SystemClock(), sets)
    try:
        # HTTPS always, with the organization's certificates: the bearer token and the
        # transcripts never cross a network (or a loopback) in clear, and a command on
        # another host verifies the server with the CA alone.
        address, port = engine.server.address, engine.server.port("health")
        tls_context = server_context(context.tls.health_identity(engine.server.name, address))
        # Argon2 hashing and directory writes: off the event loop.
        await asyncio.to_thread(_prepare_mailboxes, data, server_name)
        api = HealthApi(engine, ensure_token(data))
        runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, address, port, reuse_address=True, ssl_context=tls_context)
        await listen(site.start, "the health API", address, port)
        log.info(
            "health engine (profile %s) running %d probes; API on %s:%d, pid %d",
            profile, len(engine.probes()), address, port, os.getpid(),
        )  # fmt: skip
        try:
            await engine.run(stop)
        finally:
            await runner.cleanup()
    finally:
        engine.close()


def _prepare_mailboxes(data: Path, server_name: str) -> None:
    from popguard.directory.directory import Directory
    from popguard.health.health_mailboxes import ensure_health_mailboxes

    with Directory(data) as directory:
        ensure_health_mailboxes(directory, data)


def serve(data: Path, server_name: str, profile: str) -> None:
    from popguard.net.serving import run_until_stopped, setup_logging

    setup_logging("health", server_name)
    run_until_stopped(lambda stop: run_health(data, server_name, profile, stop))
