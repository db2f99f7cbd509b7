"""A POP3 load generator that should never be the slowest part of a benchmark.

Why it is built this way:

- poplib is blocking and does a lot of per-line work in Python; here each client is a
  coroutine on raw asyncio streams, and a RETR reply is read in large chunks, only
  its last five bytes being looked at for the "CRLF . CRLF" terminator.
- One Python process can use one core at most, so the clients are spread over
  worker processes (multiprocessing, "spawn" so that no state of the parent leaks
  in), each with its own event loop. How many by default depends on the mode
  (see LoadConfig.worker_count): the generator shares the machine with the server
  and should take as little of it as it can without holding the server back.
- The event loop is asyncio's own, or uvloop when it is installed (optional, same
  streams API): on loopback, uvloop halves the generator's CPU per login, and on a
  2-core machine every cycle the generator saves is one the server can use.
- Every worker reports the CPU seconds it used during the measured window
  (getrusage), so a report can show whether any worker came close to a full core,
  the sign that the generator rather than the server set the pace.

A run has a start barrier on the wall clock shared by all workers, a warm-up (whose
operations are not counted), then a measured window that ends after `duration`
seconds or when `max_ops` operations have been counted, whichever comes first.
Nothing loops without both a count and a time bound: each network step also has a
timeout.

Modes:
- logins: each client loops connect, greeting, USER, PASS, STAT, QUIT, close; an
  operation is one whole cycle.
- retr: each client logs in once, lists its mailbox, then RETRs the large messages
  in turn (never DELE), counting the bytes; QUIT at the end. An operation is one
  message read in full.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import ssl
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Mode = Literal["logins", "retr"]
Loop = Literal["asyncio", "uvloop"]
Probe = Callable[[], dict[str, float]]

_TERMINATOR = b"\r\n.\r\n"
_READ_CHUNK = 1 << 20  # RETR replies are read in large chunks: fewer loop turns
_STREAM_LIMIT = 1 << 20  # lets the stream buffer up to ~2 MiB before pausing reads
_MAX_ERROR_SAMPLES = 5
_START_DELAY = 1.5  # seconds between launching workers and the shared start barrier


@dataclass(frozen=True)
class LoadConfig:
    """What to run: one mode at one concurrency against one server."""

    host: str
    port: int
    mode: Mode
    clients: int
    users: tuple[str, ...]
    password: str
    duration: float = 5.0
    warmup: float = 1.0
    max_ops: int = 1_000_000
    workers: int = 0  # 0: chosen by mode (see worker_count), never more than clients
    tls_ca: str | None = None  # implicit TLS (POP3S) verified against this CA file
    retr_min_size: int = 512 * 1024  # RETR only messages at least this large
    op_timeout: float = 10.0  # per login cycle / per RETR
    loop: Loop = "asyncio"  # "uvloop": same streams API, about half the CPU per login

    def worker_count(self) -> int:
        """Worker processes: as asked, or by default what measured best on 2 cores.

        The generator runs on the server's machine, so every cycle it spends is taken
        from the server. Against Dovecot high-perf on 2 cores (uvloop):
        - logins, 16 clients: 1 worker ~2,050/s, 2 workers ~1,800/s, 4 ~1,550/s, for the
          same generator CPU: more processes only add context switches. So one worker
          per two cores.
        - RETR, 4 clients: 1 worker ~890 MB/s (at ~70% of a core), 2 workers
          ~1,100 MB/s; at 16 and 64 clients both the same. Reading is per-byte work
          (much of it kernel copies) that spreads over cores. So one worker per core.
        """
        cores = os.cpu_count() or 1
        default = cores if self.mode == "retr" else max(1, cores // 2)
        wanted = self.workers if self.workers > 0 else default
        return max(1, min(wanted, self.clients))


@dataclass
class WorkerResult:
    """What one worker process measured."""

    worker: int
    clients: int
    ops: int = 0
    bytes: int = 0
    reads: int = 0  # socket reads that returned data (RETR mode)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    window: float = 0.0  # seconds actually measured
    cpu_window: float = 0.0  # CPU seconds used by this worker during the window
    cpu_window_sys: float = 0.0  # the part of it spent in the kernel (loopback TCP)
    cpu_total: float = 0.0  # CPU seconds used by this worker over its whole life
    started_late: bool = False  # reached the start barrier after the warm-up had ended
    hit_max_ops: bool = False


@dataclass
class LoadResult:
    """The run as a whole: sums over workers plus the generator's own CPU use."""

    config: LoadConfig
    workers: list[WorkerResult]
    ops: int
    bytes: int
    errors: int
    error_samples: list[str]
    ops_per_s: float
    mb_per_s: float  # MB = 10**6 bytes
    bytes_per_read: float  # RETR: how large the pieces the server's data arrived in were
    window: float  # the longest worker window, seconds
    gen_cpu_window: float  # CPU seconds of all workers during the window
    gen_cores: float  # gen_cpu_window / window: cores the generator kept busy
    gen_sys_share: float  # share of the generator's window CPU spent in the kernel
    gen_max_worker_share: float  # busiest worker's CPU / its window (1.0 = a full core)
    gen_children_cpu: float  # RUSAGE_CHILDREN delta: workers' CPU over their whole life
    wall: float  # wall seconds of the whole run, spawn to join
    probes: dict[str, float]  # deltas of the caller's probe over the window

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"]["users"] = f"{len(self.config.users)} users"
        data["config"]["password"] = "(redacted)"
        return data


class Pop3Error(Exception):
    """The server answered -ERR, or something that is not POP3, or closed early."""


class _Stats:
    """Counters of one worker, shared by its client coroutines (one thread: no locks)."""

    def __init__(self, t0: float, t1: float, max_ops: int) -> None:
        self.t0 = t0  # monotonic time at which counting starts
        self.t1 = t1  # monotonic time at which counting stops at the latest
        self.max_ops = max_ops
        self.ops = 0
        self.bytes = 0
        self.reads = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.stopped = False
        self.end: float | None = None
        self.hit_max = False
        self.done = asyncio.Event()

    def add_bytes(self, n: int) -> None:
        now = time.monotonic()
        if self.t0 <= now and not self.stopped:
            self.bytes += n
            self.reads += 1

    def op_done(self) -> None:
        now = time.monotonic()
        if self.t0 <= now and not self.stopped:
            self.ops += 1
            if self.ops >= self.max_ops:
                self.hit_max = True
                self.stop()

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        text = f"{type(exc).__name__}: {exc}"
        if len(self.error_samples) < _MAX_ERROR_SAMPLES and text not in self.error_samples:
            self.error_samples.append(text)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.end = min(time.monotonic(), self.t1)
            self.done.set()


async def _ok(reader: asyncio.StreamReader) -> bytes:
    """Read one status line and insist on +OK."""
    line = await reader.readline()
    if not line:
        raise Pop3Error("connection closed by server")
    if not line.startswith(b"+OK"):
        raise Pop3Error(line.decode("latin-1").strip()[:200])
    return line


async def _connect(
    cfg: LoadConfig, ssl_ctx: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if ssl_ctx is None:
        return await asyncio.open_connection(cfg.host, cfg.port, limit=_STREAM_LIMIT)
    return await asyncio.open_connection(
        cfg.host, cfg.port, ssl=ssl_ctx, server_hostname=cfg.host, limit=_STREAM_LIMIT
    )


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # The server may already have closed after QUIT; a reset here is not an error.
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _login(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: bytes, password: bytes
) -> None:
    await _ok(reader)  # greeting
    writer.write(b"USER " + user + b"\r\n")
    await _ok(reader)
    writer.write(b"PASS " + password + b"\r\n")
    await _ok(reader)


async def _login_cycle(
    cfg: LoadConfig, ssl_ctx: ssl.SSLContext | None, user: bytes, password: bytes
) -> None:
    """One logins-mode operation: connect, log in, STAT, QUIT, close."""
    reader, writer = await _connect(cfg, ssl_ctx)
    try:
        await _login(reader, writer, user, password)
        writer.write(b"STAT\r\n")
        await _ok(reader)
        writer.write(b"QUIT\r\n")
        await _ok(reader)
    finally:
        await _close(writer)


async def _login_session(
    cfg: LoadConfig, ssl_ctx: ssl.SSLContext | None, user: str, stats: _Stats
) -> None:
    async with asyncio.timeout(cfg.op_timeout):
        await _login_cycle(cfg, ssl_ctx, user.encode(), cfg.password.encode())
    stats.op_done()


async def _list_big(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, min_size: int
) -> list[int]:
    """LIST the mailbox and return the numbers of the messages worth RETRing."""
    writer.write(b"LIST\r\n")
    await _ok(reader)
    numbers: list[int] = []
    while True:
        line = await reader.readline()
        if not line:
            raise Pop3Error("connection closed during LIST")
        if line == b".\r\n":
            return numbers
        num, size = line.split()[:2]
        if int(size) >= min_size:
            numbers.append(int(num))


async def _retr(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, num: int, stats: _Stats
) -> None:
    """RETR one message and read the reply to its end, counting bytes."""
    writer.write(b"RETR %d\r\n" % num)
    status = await _ok(reader)
    stats.add_bytes(len(status))
    # Dot-stuffing guarantees CRLF "." CRLF appears only at the end of the reply, and
    # the server sends nothing more until our next command, so it suffices to look at
    # the last five bytes seen. The status line's CRLF counts for an empty body.
    tail = b"\r\n"
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            raise Pop3Error("connection closed during RETR")
        stats.add_bytes(len(chunk))
        end = (tail + chunk[-5:])[-5:]
        if end == _TERMINATOR:
            return
        tail = end[-4:]


async def _retr_session(
    cfg: LoadConfig, ssl_ctx: ssl.SSLContext | None, user: str, stats: _Stats
) -> None:
    async with asyncio.timeout(cfg.op_timeout):
        reader, writer = await _connect(cfg, ssl_ctx)
    try:
        async with asyncio.timeout(cfg.op_timeout):
            await _login(reader, writer, user.encode(), cfg.password.encode())
            numbers = await _list_big(reader, writer, cfg.retr_min_size)
        if not numbers:
            raise Pop3Error(f"no message of at least {cfg.retr_min_size} bytes for {user}")
        for num in itertools.cycle(numbers):
            if stats.stopped:
                break
            async with asyncio.timeout(cfg.op_timeout):
                await _retr(reader, writer, num, stats)
            stats.op_done()
        async with asyncio.timeout(cfg.op_timeout):
            writer.write(b"QUIT\r\n")
            await _ok(reader)
    finally:
        await _close(writer)


Session = Callable[[LoadConfig, ssl.SSLContext | None, str, _Stats], Awaitable[None]]


async def _client(
    session: Session, cfg: LoadConfig, ssl_ctx: ssl.SSLContext | None, user: str, stats: _Stats
) -> None:
    """Sessions back to back until the window closes; a failed one is counted."""
    while not stats.stopped:
        try:
            await session(cfg, ssl_ctx, user, stats)
        except (OSError, EOFError, Pop3Error, ValueError) as exc:  # TimeoutError is an OSError
            stats.error(exc)
            await asyncio.sleep(0.05)  # do not spin on a server that refuses us


def _ssl_context(cfg: LoadConfig) -> ssl.SSLContext | None:
    if cfg.tls_ca is None:
        return None
    return ssl.create_default_context(cafile=cfg.tls_ca)


def resolve_loop(wanted: str) -> Loop:
    """'auto' means uvloop when it is installed (it is optional), asyncio otherwise."""
    if wanted == "uvloop" or (wanted == "auto" and importlib.util.find_spec("uvloop")):
        return "uvloop"
    return "asyncio"


def _cpu_self() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def _run_worker(
    cfg: LoadConfig,
    index: int,
    client_ids: list[int],
    start_wall: float,
    max_ops: int,
    on_measured: Callable[[], None],
) -> WorkerResult:
    # Turn the shared wall-clock barrier into this process's monotonic clock.
    now_wall, now_mono = time.time(), time.monotonic()
    start = now_mono + (start_wall - now_wall)
    t0 = start + cfg.warmup
    t1 = t0 + cfg.duration
    result = WorkerResult(worker=index, clients=len(client_ids))
    stats = _Stats(t0, t1, max_ops)
    ssl_ctx = _ssl_context(cfg)
    session = _login_session if cfg.mode == "logins" else _retr_session

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    result.started_late = time.monotonic() > t0
    tasks = [
        asyncio.create_task(_client(session, cfg, ssl_ctx, cfg.users[i % len(cfg.users)], stats))
        for i in client_ids
    ]

    # Sample our own CPU exactly at the window's start and end.
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    user0, sys0 = _cpu_self()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stats.done.wait(), timeout=max(0.0, t1 - time.monotonic()))
    stats.stop()
    user1, sys1 = _cpu_self()
    on_measured()

    # Let clients finish their current step and QUIT, but not forever.
    _, pending = await asyncio.wait(tasks, timeout=cfg.op_timeout + 5.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        stats.error(TimeoutError(f"{len(pending)} clients did not finish in time"))

    result.ops, result.bytes, result.errors = stats.ops, stats.bytes, stats.errors
    result.reads = stats.reads
    result.error_samples = stats.error_samples
    result.window = max(1e-9, (stats.end if stats.end is not None else t1) - t0)
    result.cpu_window = (user1 - user0) + (sys1 - sys0)
    result.cpu_window_sys = sys1 - sys0
    result.cpu_total = sum(_cpu_self())
    result.hit_max_ops = stats.hit_max
    return result


def _worker_main(
    cfg: LoadConfig,
    index: int,
    client_ids: list[int],
    start_wall: float,
    max_ops: int,
    out: mp.Queue[tuple[str, int, Any]],
) -> None:
    """Entry point of a worker process: run its clients, send back the result."""
    try:
        work = _run_worker(
            cfg,
            index,
            client_ids,
            start_wall,
            max_ops,
            lambda: out.put(("measured", index, None)),
        )
        if cfg.loop == "uvloop":
            # Imported by name: uvloop is optional and not a dependency of the project.
            result: WorkerResult = importlib.import_module("uvloop").run(work)
        else:
            result = asyncio.run(work)
        out.put(("result", index, result))
    except BaseException:
        out.put(("failed", index, traceback.format_exc()))
        raise


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _probe_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before if key in after}


def run_load(cfg: LoadConfig, probe: Probe | None = None) -> LoadResult:
    """Run one measurement and return its figures.

    `probe`, when given, is called at the start and at the end of the measured window
    (in this process) and the differences of its values are returned in `probes`;
    the benchmark uses it to read the machine's and the server's CPU counters.
    """
    if cfg.clients < 1 or not cfg.users:
        raise ValueError("need at least one client and one user")
    nworkers = cfg.worker_count()
    share = math.ceil(cfg.max_ops / nworkers)
    ctx = mp.get_context("spawn")
    out: mp.Queue[tuple[str, int, Any]] = ctx.Queue()
    wall0 = time.monotonic()
    cpu_children0 = _children_cpu()
    start_wall = time.time() + _START_DELAY
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(cfg, w, list(range(w, cfg.clients, nworkers)), start_wall, share, out),
            name=f"loadgen-{w}",
            daemon=True,
        )
        for w in range(nworkers)
    ]
    for proc in procs:
        proc.start()

    time.sleep(max(0.0, start_wall + cfg.warmup - time.time()))
    before = probe() if probe else {}
    after: dict[str, float] = {}
    measured: set[int] = set()
    results: dict[int, WorkerResult] = {}
    failures: list[str] = []
    # Hard bound on how long we wait for the workers, whatever happens to them.
    deadline = time.monotonic() + cfg.duration + 2 * cfg.op_timeout + 20.0
    while len(results) + len(failures) < nworkers and time.monotonic() < deadline:
        try:
            kind, index, payload = out.get(timeout=0.5)
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs) and out.empty():
                break
            continue
        if kind == "measured":
            measured.add(index)
            if len(measured) == nworkers and probe:
                after = probe()
        elif kind == "result":
            results[index] = payload
        else:
            failures.append(str(payload))
    if probe and not after:
        after = probe()  # some worker never reported its window's end
    for proc in procs:
        proc.join(timeout=5.0)
        if proc.is_alive():  # our own child, stuck: end it
            proc.kill()
            proc.join(timeout=5.0)
    wall = time.monotonic() - wall0
    if failures or len(results) < nworkers:
        detail = "\n".join(failures) or f"only {len(results)} of {nworkers} workers reported"
        raise RuntimeError(f"load generator failed:\n{detail}")

    workers = [results[i] for i in sorted(results)]
    window = max(w.window for w in workers)
    gen_cpu = sum(w.cpu_window for w in workers)
    samples: list[str] = []
    for w in workers:
        samples.extend(s for s in w.error_samples if s not in samples)
    return LoadResult(
        config=cfg,
        workers=workers,
        ops=sum(w.ops for w in workers),
        bytes=sum(w.bytes for w in workers),
        errors=sum(w.errors for w in workers),
        error_samples=samples[:_MAX_ERROR_SAMPLES],
        # Each worker's rate over its own window, added up: exact when a worker stops
        # early on max_ops, the same as total/window otherwise.
        ops_per_s=sum(w.ops / w.window for w in workers),
        mb_per_s=sum(w.bytes / w.window for w in workers) / 1e6,
        bytes_per_read=sum(w.bytes for w in workers) / max(1, sum(w.reads for w in workers)),
        window=window,
        gen_cpu_window=gen_cpu,
        gen_cores=gen_cpu / window,
        gen_sys_share=sum(w.cpu_window_sys for w in workers) / max(gen_cpu, 1e-9),
        gen_max_worker_share=max(w.cpu_window / w.window for w in workers),
        gen_children_cpu=_children_cpu() - cpu_children0,
        wall=wall,
        probes=_probe_delta(before, after),
    )


def format_result(res: LoadResult) -> str:
    """One human-readable line per run."""
    cfg = res.config
    rate = f"{res.ops_per_s:9.1f} ops/s"
    if cfg.mode == "retr":
        rate += f" {res.mb_per_s:8.1f} MB/s ({res.bytes_per_read / 1024:.0f} KiB per read)"
    return (
        f"{cfg.mode:6} c={cfg.clients:<3} {rate}  ops={res.ops} errors={res.errors} "
        f"window={res.window:.2f}s generator: {res.gen_cores:.2f} cores "
        f"(busiest worker {100 * res.gen_max_worker_share:.0f}% of a core, "
        f"{len(res.workers)} workers, {cfg.loop}, {100 * res.gen_sys_share:.0f}% in kernel)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=110)
    parser.add_argument("--mode", choices=["logins", "retr"], default="logins")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--users", type=int, default=128, help="user0001@DOMAIN ... userNNNN")
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--password", default="benchpass")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-ops", type=int, default=1_000_000)
    parser.add_argument(
        "--workers", type=int, default=0, help="0: by mode, see LoadConfig.worker_count"
    )
    parser.add_argument("--tls-ca", help="use implicit TLS, verifying against this CA file")
    parser.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop of the workers (auto: uvloop if installed)",
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    users = tuple(f"user{i + 1:04d}@{args.domain}" for i in range(args.users))
    cfg = LoadConfig(
        host=args.host,
        port=args.port,
        mode=args.mode,
        clients=args.clients,
        users=users,
        password=args.password,
        duration=args.duration,
        warmup=args.warmup,
        max_ops=args.max_ops,
        workers=args.workers,
        tls_ca=args.tls_ca,
        loop=resolve_loop(args.loop),
    )
    res = run_load(cfg)
    print(json.dumps(res.to_json(), indent=2) if args.json else format_result(res))
    for sample in res.error_samples:
        print(f"  error: {sample}", file=sys.stderr)
    return 0 if res.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
