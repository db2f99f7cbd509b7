"""`popguard serve web --server NAME`: the operator's web page, on a front end.

It listens on the front end's own address when that is a loopback address (the
default organization's cas1), else on 127.0.0.1, unless `--listen` names another;
anywhere but loopback it speaks HTTPS with the organization's certificates, so that
passwords and session cookies never cross a network in clear.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aiohttp import web

from popguard.net.serving import listen
from popguard.net.tls import server_context
from popguard.services.context import ServerContext
from popguard.web.address import is_loopback, listen_address, page_url
from popguard.web.app import WebPage, look
from popguard.web.events import EventLog, Watcher
from popguard.web.sessions import Sessions

log = logging.getLogger("popguard.web")

WEB_UNIT = "popguard web"


async def run_web(data: Path, server_name: str, wanted: str | None, stop: asyncio.Event) -> None:
    context = ServerContext.open(data, server_name, "frontend")
    try:
        server = context.server
        address, port = listen_address(server.address, wanted), server.port("web")
        tls = None
        if not is_loopback(address):
            pair = context.tls.ensure_server_certificate(
                server.name, [server.name.lower()], [address], purpose="web", unit=WEB_UNIT
            )
            tls = server_context(pair)
        events = EventLog()
        page = WebPage(data, events, secure=tls is not None, sessions=Sessions())
        # Open event streams never end by themselves: they are cut after a second.
        runner = web.AppRunner(page.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)  # fmt: skip
        await runner.setup()
        site = web.TCPSite(runner, address, port, reuse_address=True, ssl_context=tls)
        await listen(site.start, "the web page", address, port)
        log.info("web page on %s, pid %d", page_url(address, port), os.getpid())
        watcher = Watcher(lambda seen: look(data, seen), events)
        try:
            await watcher.run(stop)
        finally:
            await runner.shutdown()
            await runner.cleanup()
    finally:
        context.close()


def serve(data: Path, server_name: str, wanted: str | None = None) -> None:
    from popguard.net.serving import run_until_stopped, setup_logging

    setup_logging("web", server_name)
    run_until_stopped(lambda stop: run_web(data, server_name, wanted, stop))
