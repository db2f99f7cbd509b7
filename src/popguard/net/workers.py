"""A master and its worker processes: how `pop3`, `pop3be` and `delivery` use every core.

`popguard serve SERVICE` starts the master. It binds the service's listening sockets
itself, then starts N workers (the same command line, told by `POPGUARD_WORKER` in
their environment that they are workers) that inherit those sockets and accept on
them; the kernel wakes one worker per connection. The supervisor sees one process
per service, the master, as before.

Why a master that owns the sockets rather than SO_REUSEPORT per worker:

- A SO_REUSEPORT socket has its own accept queue: when a worker closes it (a restart,
  a crash), the connections queued on it are reset, and new ones are hashed to it
  until it is gone. With one socket owned by the master, the queue outlives every
  worker: a worker that dies or is replaced loses only the sessions it held, and a
  connection that arrives while no worker is up waits in the queue, never refused.
- SO_REUSEPORT spreads connections by a hash of the 4-tuple, blind to load: a worker
  that is busy (or stopped with SIGSTOP) keeps being fed its share. On one shared
  socket only a worker that is in accept() takes a connection, so a busy one takes
  fewer and a hung one takes none.
- The master is also where the server's promises that no one worker can keep live:
  the connection limits of the whole server and the failed-login delays go through
  it (a small request over a Unix socket per connection and per login), and it sums
  the workers' counters. Whatever a worker held is given back when its channel
  closes, however it died. A worker silent on its channel for WORKER_HANG_LIMIT
  (stopped, its event loop blocked) is killed and replaced.

The channel is a Unix socket pair per worker carrying one JSON object per line:
requests with an `id` (answered with `re`), and notes without.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from popguard.errors import UserError

log = logging.getLogger("popguard.workers")

WORKER_ENV = "POPGUARD_WORKER"
# The accept queue of each listening socket: connections wait here while every worker
# is busy, or while workers are being replaced.
LISTEN_BACKLOG = 1024
# A port still held by the workers of a master that just died: they close their
# copies as soon as they see the master gone.
BIND_PATIENCE = 10.0
# A worker that dies this soon after it started is restarted after a growing pause,
# so a worker that cannot start does not spin the CPU.
QUICK_DEATH = 2.0
MAX_RESPAWN_PAUSE = 5.0
# How long a stopping worker gets to finish its sessions before it is killed: less
# than the supervisor gives the master (stopwaitsecs=8), so the master outlives them.
WORKER_STOP_PATIENCE = 7.0
# New workers of a graceful restart must be accepting within this.
READY_PATIENCE = 30.0
TICK = 1.0
PR_SET_PDEATHSIG = 1
# A ready worker writes to its channel at least every second (its counters). One that
# has said nothing for this long is hung (stopped, or its event loop blocked) and its
# sessions with it: it is killed and replaced, as gunicorn's arbiter does at its
# default timeout. Long enough for a loop held up by a directory that answers slowly
# (a PostgreSQL connect gives up after 5 s) never to be taken for hung.
WORKER_HANG_LIMIT = 30.0


# The host's default for a server whose WorkerProcesses is 0, as gunicorn's
# WEB_CONCURRENCY is: an operator sharing a host (or a test suite starting dozens of
# organizations on two cores) sets it; unset, one worker per core this process may use.
WORKER_COUNT_VARIABLE = "POPGUARD_WORKER_PROCESSES"
MAX_WORKERS = 256


def default_worker_count() -> int:
    value = os.environ.get(WORKER_COUNT_VARIABLE, "").strip()
    if not value:
        return len(os.sched_getaffinity(0)) or 1
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise UserError(
            f"{WORKER_COUNT_VARIABLE}={value!r}: expected a whole number from 1 to {MAX_WORKERS}"
        )
    return int(value)


# The worker's side --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is told by its master in its environment."""

    slot: int  # 0..N-1: which of the N workers this is
    ident: int  # unique among the master's workers, restarts included
    master: int  # the master's process id
    channel: int  # file descriptor of the channel to the master
    sockets: dict[str, int]  # endpoint name -> file descriptor of its listening socket
    # What the workers' positive authentication caches key their entries with: the
    # same in every worker of a master, so that they can share entries. Readable by
    # this user only (/proc/PID/environ), as the processes' memory is.
    cache_secret: str = ""


def worker_setup() -> WorkerSetup | None:
    """This process's setup as a worker, or None when it is a master (or alone)."""
    raw = os.environ.get(WORKER_ENV)
    if not raw:
        return None
    loaded = json.loads(raw)
    return WorkerSetup(
        slot=int(loaded["slot"]),
        ident=int(loaded["ident"]),
        master=int(loaded["master"]),
        channel=int(loaded["channel"]),
        sockets={str(k): int(v) for k, v in loaded["sockets"].items()},
        cache_secret=str(loaded.get("cache_secret", "")),
    )


def die_with_master(setup: WorkerSetup) -> None:
    """SIGKILL this worker when its master dies (Linux): the master is the service, and
    one killed (a hung service's repair) must leave no worker holding its ports, not
    even a hung one that would never see a gentler signal. A master that stops in
    good order stops its workers first. Elsewhere the channel's end stops the worker."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != setup.master:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def listening_socket(setup: WorkerSetup, endpoint: str) -> socket.socket:
    return socket.socket(fileno=setup.sockets[endpoint])


Push = Callable[[dict[str, Any]], None]


class WorkerChannel:
    """The worker's end of its channel to the master."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self._handlers: dict[str, Push] = {}
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()  # the master has gone

    def on(self, op: str, handler: Push) -> None:
        """Call `handler` with every note `op` the master sends."""
        self._handlers[op] = handler

    async def open(self) -> None:
        sock = socket.socket(fileno=self.setup.channel)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                answered = message.get("re")
                if answered is not None:
                    future = self._replies.pop(int(answered), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                handler = self._handlers.get(str(message.get("op")))
                if handler is not None:
                    try:
                        handler(message)
                    except Exception:
                        log.exception("note %s from the master failed", message.get("op"))
        except (ConnectionError, OSError, ValueError) as exc:
            log.error("channel to the master broken: %s", exc)
        finally:
            self.lost.set()
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(ConnectionError("the master has gone"))
            self._replies.clear()

    def notify(self, message: dict[str, Any]) -> None:
        if self._writer is None or self.lost.is_set():
            return
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """The master's answer to `message`; ConnectionError once the master is gone."""
        if self.lost.is_set():
            raise ConnectionError("the master has gone")
        self._next_id += 1
        ident = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ident] = future
        self.notify(message | {"id": ident})
        try:
            return await future
        finally:
            self._replies.pop(ident, None)

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                await self._writer.drain()
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


async def stop_or_master_gone(stop: asyncio.Event, channel: WorkerChannel) -> None:
    """Return once `stop` is set or the master has gone (then `stop` is set too)."""
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(channel.lost.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    if not stop.is_set():
        log.warning("the master has gone: stopping")
        stop.set()


# The master's side --------------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    """One worker process as its master sees it."""

    ident: int
    slot: int
    generation: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    retiring: bool = False  # asked to stop: its exit is no death to repair
    heard: float = field(default_factory=time.monotonic)  # its last line on the channel
    hung: bool = False  # killed for its silence

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class Coordinator(Protocol):
    """What a service keeps in its master across its workers."""

    def handle(self, worker: Worker, message: dict[str, Any]) -> dict[str, Any] | None:
        """Answer (or just take note of) a message from `worker`."""

    def worker_gone(self, worker: Worker) -> None:
        """`worker` has exited or lost its channel: give back what it held."""

    def tick(self, workers: list[Worker]) -> None:
        """Called every second (publish the summed counters, follow settings)."""

    def worker_hung(self, worker: Worker, silent: float) -> None:
        """`worker` said nothing for `silent` seconds and was killed (then replaced)."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    address: str
    port: int


def bind(endpoint: Endpoint, patience: float = BIND_PATIENCE) -> socket.socket:
    """The socket of `endpoint`, bound but not yet listening: the first worker's server
    starts it listening, so the port opens when a worker serves it (whoever waits for
    the port to open may talk at once), and from then on it stays open for as long as
    the master runs, through every worker's death and restart.

    A port held elsewhere is the operator's to free, said in one line (an OSError
    whose text names the endpoint)."""
    deadline = time.monotonic() + patience
    family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((endpoint.address, endpoint.port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise OSError(
                    exc.errno,
                    f"cannot listen for {endpoint.name} on {endpoint.address}:{endpoint.port}: "
                    f"{exc.strerror}",
                ) from None
            time.sleep(0.2)


# The name of a LocalSocket among a worker's sockets.
LOCAL_ENDPOINT = "local"
# A Unix socket's path must fit sun_path: 108 bytes with the terminating NUL.
UNIX_PATH_MAX = 107


@dataclass
class LocalSocket:
    """A Unix socket the master serves beside its ports, for this host's own clients."""

    path: Path
    sock: socket.socket
    inode: int  # of the file bind() made: removed at exit only while still ours

    def remove(self) -> None:
        """Remove the socket's file, unless a newer master has replaced it since."""
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()


def bind_local(path: Path) -> LocalSocket | None:
    """A Unix socket at `path`, bound but not yet listening (as `bind`), or None when
    the path is too long for one: then this host's clients use the ports instead.

    A file left there by a master that was killed is replaced: the folder is the
    service user's alone, so whatever is there is ours."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        log.warning("not serving %s: its path is longer than a Unix socket allows", path)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        return LocalSocket(path, sock, path.stat().st_ino)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None


class Master:
    """Starts `count()` workers, keeps that many running, stops them with itself.

    SIGHUP restarts the workers without closing the sockets: the new ones start and
    accept first, then the old ones are asked to stop and finish their sessions.
    """

    def __init__(
        self,
        service: str,
        sockets: dict[str, socket.socket],
        count: Callable[[], int],
        coordinator: Coordinator,
        command: list[str] | None = None,
    ) -> None:
        self.service = service
        self.sockets = sockets
        self.count = count
        self.coordinator = coordinator
        self.command = command or list(sys.orig_argv)
        self.workers: dict[int, Worker] = {}
        self._next_ident = 0
        self._generation = 0
        self._pause = 0.0  # before the next replacement of a worker that died quickly
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._restart = asyncio.Event()
        self._spawning: set[int] = set()  # slots whose worker is being started
        self._cache_secret = secrets.token_hex(32)

    # Starting and watching --------------------------------------------------------------

    async def _spawn(self, slot: int) -> Worker:
        self._spawning.add(slot)
        try:
            return await self._start(slot)
        finally:
            self._spawning.discard(slot)

    async def _start(self, slot: int) -> Worker:
        self._next_ident += 1
        ident = self._next_ident
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        setup = {
            "slot": slot,
            "ident": ident,
            "master": os.getpid(),
            "channel": theirs.fileno(),
            "sockets": {name: s.fileno() for name, s in self.sockets.items()},
            "cache_secret": self._cache_secret,
        }
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                pass_fds=(theirs.fileno(), *(s.fileno() for s in self.sockets.values())),
                env=os.environ | {WORKER_ENV: json.dumps(setup)},
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
        worker = Worker(ident, slot, self._generation, process, writer)
        self.workers[ident] = worker
        self._watch(self._listen(worker, reader))
        self._watch(self._wait(worker))
        log.info("%s worker %d started, pid %d", self.service, slot, process.pid)
        return worker

    def _watch(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                worker.heard = time.monotonic()
                message = json.loads(line)
                if message.get("op") == "ready":
                    worker.ready.set()
                    self._pause = 0.0
                    continue
                try:
                    reply = self.coordinator.handle(worker, message)
                except Exception:
                    log.exception("message %s from worker %d failed", message, worker.slot)
                    reply = {"error": "internal error in the master"}
                if "id" in message:
                    worker.send((reply or {}) | {"re": message["id"]})
        except (ConnectionError, OSError, ValueError) as exc:
            log.warning("channel of worker %d (pid %d) broken: %s", worker.slot, worker.pid, exc)
        finally:
            # A worker that closed its channel is gone to us even before it exits:
            # nothing it held may keep counting.
            worker.writer.close()
            if self.workers.pop(worker.ident, None) is not None:
                self.coordinator.worker_gone(worker)

    async def _wait(self, worker: Worker) -> None:
        code = await worker.process.wait()
        if self.workers.pop(worker.ident, None) is not None:
            self.coordinator.worker_gone(worker)
        worker.writer.close()
        if worker.retiring or self.stopping:
            log.info("%s worker %d (pid %d) stopped", self.service, worker.slot, worker.pid)
            return
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        log.error(
            "%s worker %d (pid %d) died (%s); starting another",
            self.service,
            worker.slot,
            worker.pid,
            how,
        )
        if time.monotonic() - worker.started < QUICK_DEATH:
            self._pause = min(max(self._pause * 2, 0.1), MAX_RESPAWN_PAUSE)
            await asyncio.sleep(self._pause)
        if not self.stopping and self._slot_free(worker.slot):
            await self._spawn(worker.slot)

    def _slot_free(self, slot: int) -> bool:
        return (
            slot < self.count()
            and slot not in self._spawning
            and not any(w.slot == slot and not w.retiring for w in self.workers.values())
        )

    def _kill_hung(self) -> None:
        """Kill every serving worker that has been silent too long: SIGKILL ends a
        stopped process too, and its death is then repaired as any other's."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent = now - worker.heard
            if worker.retiring or worker.hung or not worker.ready.is_set():
                continue
            if silent < WORKER_HANG_LIMIT:
                continue
            worker.hung = True
            log.error(
                "%s worker %d (pid %d) said nothing for %.0f s: hung, killed",
                self.service,
                worker.slot,
                worker.pid,
                silent,
            )
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            self.coordinator.worker_hung(worker, silent)

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGTERM)
        self._watch(self._kill_if_lingering(worker))

    async def _kill_if_lingering(self, worker: Worker) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.process.wait(), WORKER_STOP_PATIENCE)
            return
        log.warning(
            "%s worker %d (pid %d) did not stop: killed", self.service, worker.slot, worker.pid
        )
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()

    async def _follow_count(self) -> None:
        """Start or stop workers until their number is the setting's."""
        wanted = self.count()
        serving = [w for w in self.workers.values() if not w.retiring]
        for worker in serving:
            if worker.slot >= wanted:
                log.info(
                    "%s worker %d retired: %d workers wanted", self.service, worker.slot, wanted
                )
                self._retire(worker)
        for slot in range(wanted):
            if self._slot_free(slot):
                await self._spawn(slot)

    async def _restart_workers(self) -> None:
        """New workers first; the old ones stop once the new ones accept."""
        self._generation += 1
        old = [w for w in self.workers.values() if not w.retiring]
        log.info("%s restarting its %d workers", self.service, len(old))
        for worker in old:
            worker.retiring = True  # their slots are the new workers' now
        fresh = [await self._spawn(slot) for slot in range(self.count())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in fresh)), READY_PATIENCE)
        for worker in old:
            self._retire(worker)

    # The lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._restart.set)
        await self._follow_count()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
            if stop.is_set():
                break
            try:
                if self._restart.is_set():
                    self._restart.clear()
                    await self._restart_workers()
                self._kill_hung()
                await self._follow_count()
                self.coordinator.tick(list(self.workers.values()))
            except Exception:
                log.exception("%s master's tick failed", self.service)
        await self.stop()

    async def stop(self) -> None:
        self.stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            self._retire(worker)
        # The sockets close only now: no connection was refused while workers ran.
        processes = [w.process.wait() for w in workers]
        if processes:
            with contextlib.suppress(TimeoutError):  # each was killed after its patience
                await asyncio.wait_for(asyncio.gather(*processes), WORKER_STOP_PATIENCE + 1)
        for sock in self.sockets.values():
            sock.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.coordinator.tick([])
