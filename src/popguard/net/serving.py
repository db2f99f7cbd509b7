"""What every long-running popguard service shares: logging, signals, tickers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from popguard.errors import UserError

T = TypeVar("T")

log = logging.getLogger("popguard")


def setup_logging(service: str, server: str) -> None:
    # A worker's lines say which worker wrote them (the master's name none).
    worker = os.environ.get("POPGUARD_WORKER")
    slot = f"[{json.loads(worker)['slot']}]" if worker else ""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {server}/{service}{slot} %(levelname)s %(message)s",
    )
    # aiosmtpd logs every LMTP command at INFO; keep its warnings only.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # httpx logs every request at INFO: replication's long polls would fill the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_until_stopped(
    main: Callable[[asyncio.Event], Awaitable[None]], fast_loop: bool = True
) -> None:
    """Run `main(stop)` until SIGTERM or SIGINT sets `stop` (on uvloop if `fast_loop`)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await main(stop)

    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=_loop_factory() if fast_loop else None) as run,
    ):
        run.run(runner())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it roughly halves the per-connection cost), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def listen(factory: Callable[[], Awaitable[T]], what: str, address: str, port: int) -> T:
    """Start a listener; a port in use is the operator's problem to fix, said in one line."""
    try:
        return await factory()
    except OSError as exc:
        raise UserError(f"cannot listen for {what} on {address}:{port}: {exc.strerror}") from None


async def every(interval: float, action: Callable[[], None], stop: asyncio.Event) -> None:
    """Call `action` every `interval` seconds until `stop`; errors are logged, not fatal."""
    while not stop.is_set():
        try:
            action()
        except Exception:
            log.exception("periodic task %s failed", getattr(action, "__name__", action))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
