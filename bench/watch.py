"""A look at something every few seconds, in a thread of its own, for as long as a
`with` block runs: what the benchmarks watch while they load or break the servers."""

from __future__ import annotations

import abc
import threading
import time
from typing import Self


class Watch(abc.ABC):
    def __init__(self, every: float, join_timeout: float) -> None:
        self.every, self.join_timeout = every, join_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @abc.abstractmethod
    def look(self) -> None:
        """One look; it must not raise (the watch would end unnoticed)."""

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.join_timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.look()
            self._stop.wait(max(0.0, self.every - (time.monotonic() - began)))
