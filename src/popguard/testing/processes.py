"""Stopping the processes a test or a benchmark started, whatever happens."""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

STOP_TIMEOUT = 15.0  # seconds a server gets to stop before it is killed


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL whatever has not stopped within 10 seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_or_kill_group(process: subprocess.Popen[bytes]) -> None:
    """Wait for a process asked to stop; SIGKILL its group if it lingers. The process
    leads a session of its own (start_new_session), so the group is only its own."""
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


def remove_unless_kept(folder: Path) -> None:
    """Remove a run's folder; BENCH_KEEP in the environment keeps it (logs, config)."""
    if folder != Path() and folder.exists() and not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(folder, ignore_errors=True)


class Started(abc.ABC):
    """A server that a `with` block starts and always stops."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
