"""The engine's one source of time, so that a test can walk a 40-minute ladder in
milliseconds: the engine never calls time.time() or asyncio.sleep() directly."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (what results record)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


async def sleep_unless_stopped(clock: Clock, seconds: float, stop: asyncio.Event) -> None:
    """Sleep on the clock, but wake as soon as `stop` is set."""
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (sleeper, stopper):
        task.cancel()


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told: `advance` wakes the sleepers it passes."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, future))
        await future

    async def advance(self, seconds: float, step: float = 1.0) -> None:
        """Move time forward in steps, letting woken tasks run at each step."""
        target = self._now + seconds
        while self._now < target:
            self._now = min(target, self._now + step)
            due = [(t, f) for t, f in self._sleepers if t <= self._now]
            self._sleepers = [(t, f) for t, f in self._sleepers if t > self._now]
            for _, future in due:
                if not future.done():
                    future.set_result(None)
            for _ in range(5):  # let woken tasks run to their next await
                await asyncio.sleep(0)
