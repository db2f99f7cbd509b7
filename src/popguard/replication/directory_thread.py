"""The replication service's directory, read and written off its event loop.

A directory whose host is cut off silently (no refusal, no reset) holds a read for up
to the engine's connect timeout (5 s). On the service's event loop that would hold up
everything else the service answers, among them `GET /v1/failsafe`: the question whose
quick answer keeps every mailbox server serving while none of them reaches the
directory. So every directory call of the service goes through one of these: a thread
of its own, with a handle opened in that thread (a SQLite connection belongs to the
thread that made it), the calls in the order they were made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from popguard.directory.directory import Directory

T = TypeVar("T")


class DirectoryThread:
    def __init__(self, open_directory: Callable[[], Directory], name: str) -> None:
        self._open_directory = open_directory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._directory: Directory | None = None

    def _on_thread(self, call: Callable[[Directory], T]) -> T:
        if self._directory is None:
            self._directory = self._open_directory()
        return call(self._directory)

    async def __call__(self, call: Callable[[Directory], T]) -> T:
        """`call(directory)` on the thread, awaited without holding up the loop."""
        return await self.submit(call)

    def submit(self, call: Callable[[Directory], T]) -> asyncio.Future[T]:
        """`call(directory)` on the thread, as a future the caller may stop waiting for
        (the call itself goes on until the directory answers or gives up)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._on_thread, call)

    def _close_on_thread(self) -> None:
        if self._directory is not None:
            self._directory.close()
            self._directory = None

    def close(self) -> None:
        """Close the handle on its thread, once the calls queued before have run."""
        self._executor.submit(self._close_on_thread).result()
        self._executor.shutdown()
