"""The directory on SQLite beside the directory on PostgreSQL: logins/s through the
front end and LMTP deliveries/s, one run, same machine, same load generator.

    .venv/bin/python -m bench.directory_engines      # as root, from the repository root

Two organizations run side by side, each started as an operator starts one
(`popguard up --detach --config FILE`): cas1 (front end), mbx1 and mbx2, DB01 active
on mbx1 with a copy on mbx2, `--users` mailboxes in DB01, each server on loopback
addresses of its own. One has no `[directory]` section (SQLite in its data folder),
the other points at a PostgreSQL this script starts (Debian's server, through
popguard.testing.postgres, with pg_stat_statements loaded).

Figures, the two organizations taking turns for each one (the first of a pair
alternates from one repeat to the next):

- logins/s through cas1's plain POP3 port (connect, USER, PASS, STAT, QUIT) with
  popguard.testing.loadgen at `--login-clients`; every user logged in once before
  (both the front end and the back end remember a verified password for 5 minutes),
  and logged in again before a figure could outlast that: no figure contains a cold
  argon2id login.
- LMTP deliveries/s to mbx1 at `--lmtp-senders`: each sender keeps one LMTP connection
  and sends small messages (`--message-size`), one recipient each, round the users.

Then, on the PostgreSQL organization alone, what one login and one delivery read from
the directory: pg_stat_statements (off during the figures) counts every statement
of the directory's database during `--count` logins (then deliveries), one client at a
time, and during an idle window before it (health probes, copy-status reports), whose
calls are subtracted in proportion to time. The directory sends the same SQL text to
both engines, so the statements are SQLite's too.

Writes bench/results/directory_engines-DATE.json and .md (a BENCHMARKS.md snippet).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import machine_sample, tree_cpu
from bench.mail import DOMAIN, make_message, user_names
from bench.preflight import cold_login_cost, prime_logins
from bench.report import RESULTS, machine, percentile
from popguard.testing.loadgen import LoadConfig, resolve_loop, run_load
from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard_output, three_server_topology
from popguard.testing.postgres import PostgresServer

ENGINES = ("sqlite", "postgresql")
GOAL = 0.90  # PostgreSQL's logins/s at least this share of SQLite's (issue 12)
PASSWORD = "directory bench password"
FRONTEND_PORTS = (10110, 10995, 8480)
MAILBOX_PORTS = (1110, 1995, 2424, 64327, 8480)
CACHE_MARGIN = 5.0  # seconds: log every user in again this long before the cache could expire
LMTP_TIMEOUT = 10.0  # seconds for one LMTP step
IDLE_WINDOW = 10.0  # seconds of background directory traffic measured before a counted run


def topology(addresses: Sequence[str], directory_section: str) -> str:
    cas1, mbx1, mbx2 = addresses
    return three_server_topology(cas1, mbx1, mbx2, directory_section)


@dataclass
class Organization:
    """One organization from `popguard up --detach --config FILE`, in a folder of its own."""

    engine: str
    folder: Path
    addresses: dict[str, str] = field(default_factory=dict)
    ports: dict[str, dict[str, int]] = field(default_factory=dict)
    primed_first: float | None = None  # when the oldest cached login was made, at the latest
    primed_last: float = 0.0
    reprimes: int = 0
    up_seconds: float = 0.0
    setup_seconds: float = 0.0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def cli(self, *args: str, stdin: str | None = None) -> str:
        return popguard_output(self.data, *args, stdin=stdin)

    def up(self, directory_section: str) -> None:
        self.addresses = {
            "cas1": free_loopback_address(FRONTEND_PORTS),
            "mbx1": free_loopback_address(MAILBOX_PORTS),
            "mbx2": free_loopback_address(MAILBOX_PORTS),
        }
        config = self.folder / "organization.toml"
        config.write_text(topology(list(self.addresses.values()), directory_section))
        config.chmod(0o600)
        self.data.mkdir(mode=0o700)
        started = time.monotonic()
        self.cli("up", "--detach", "--config", str(config))
        self.up_seconds = time.monotonic() - started
        for server in self.addresses:
            (row,) = json.loads(self.cli("get-server", server, "--format", "json"))
            self.ports[server] = {str(k): int(v) for k, v in row["Ports"].items()}

    def configure(self, users: Sequence[str]) -> None:
        """Plain logins on cas1 (no TLS to the client: the figure is about the
        directory, not the handshake), limits above the load, and the mailboxes."""
        started = time.monotonic()
        for server in ("cas1", "mbx1"):
            self.cli(
                "set-popsettings",
                "--server",
                server,
                "--login-type",
                "PlainTextLogin",
                "--max-connections",
                "1000",
                "--max-connection-from-single-ip",
                "1000",
                "--max-connections-per-user",
                "16",
            )

        def new_mailbox(user: str) -> str:
            return self.cli(
                "new-mailbox", user, "--database", "DB01", "--password-stdin", stdin=PASSWORD
            )

        # Two at a time: each command is a Python start-up and one argon2id hash.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(new_mailbox, users))
        self.setup_seconds = time.monotonic() - started

    def wait_copy_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            (row,) = json.loads(
                self.cli(
                    "get-mailboxdatabasecopystatus", "--identity", "DB01\\mbx2", "--format", "json"
                )
            )
            if row.get("Status") == "Healthy":
                return
            time.sleep(1.0)
        raise RuntimeError(f"{self.engine}: DB01\\mbx2 never became Healthy: {row}")

    @property
    def pop3(self) -> tuple[str, int]:
        return self.addresses["cas1"], self.ports["cas1"]["pop3"]

    @property
    def lmtp(self) -> tuple[str, int]:
        return self.addresses["mbx1"], self.ports["mbx1"]["lmtp"]

    def supervisor_pid(self) -> int:
        return int((self.data / "supervisor" / "supervisord.pid").read_text().split()[0])

    def down(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "popguard", "--data", str(self.data), "down"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            print(f"{self.engine}: down failed: {done.stderr.strip()}", file=sys.stderr)


class Postgres:
    """The PostgreSQL directory's server, with pg_stat_statements for the counts."""

    def __init__(self) -> None:
        self.server = PostgresServer.start()
        with (self.server.data_dir / "postgresql.conf").open("a") as conf:
            # Loaded at start; it counts nothing until `track` is set (see counting).
            conf.write(
                "shared_preload_libraries = 'pg_stat_statements'\n"
                "pg_stat_statements.track = 'none'\n"
            )
        self.server.pg_ctl("restart")
        self.server.admin("CREATE EXTENSION pg_stat_statements")
        self.database = ""

    def new_database(self) -> str:
        url = self.server.new_database()
        self.database = url.rsplit("/", 1)[1]
        return url

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(
            host=str(self.server.folder),
            port=self.server.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        ) as connection:
            return list(connection.execute(sql.encode()).fetchall())

    def postmaster_pid(self) -> int:
        return int((self.server.data_dir / "postmaster.pid").read_text().split()[0])

    def counting(self, on: bool) -> None:
        self.server.admin(
            f"ALTER SYSTEM SET pg_stat_statements.track = '{'top' if on else 'none'}'"
        )
        self.server.admin("SELECT pg_reload_conf()")
        time.sleep(0.5)  # every backend takes the new value at its next statement

    def reset(self) -> None:
        self.query("SELECT pg_stat_statements_reset()")

    def statements(self) -> dict[str, tuple[int, float]]:
        """query -> (calls, total ms) in the directory's database since the reset."""
        rows = self.query(
            "SELECT s.query, s.calls, s.total_exec_time FROM pg_stat_statements s "
            f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{self.database}'"
        )
        found: dict[str, tuple[int, float]] = {}
        for text, calls, total in rows:
            key = " ".join(str(text).split())
            old = found.get(key, (0, 0.0))
            found[key] = (old[0] + int(calls), old[1] + float(total))
        return found

    def remove(self) -> None:
        self.server.remove()


# LMTP load -----------------------------------------------------------------------------


class LmtpError(Exception):
    """A reply that is not the one a delivery needs."""


async def _reply(reader: asyncio.StreamReader, expect: str) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise LmtpError("connection closed by server")
        if line[3:4] != b"-":
            break
    if not line.startswith(expect.encode()):
        raise LmtpError(line.decode("latin-1").strip()[:200])


@dataclass
class LmtpRun:
    senders: int
    ops: int
    errors: int
    error_samples: list[str]
    window: float
    ops_per_s: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    gen_cores: float


async def _lmtp_load(
    host: str,
    port: int,
    senders: int,
    users: Sequence[str],
    message: bytes,
    warmup: float,
    duration: float,
    max_ops: int,
) -> LmtpRun:
    loop = asyncio.get_running_loop()
    start = loop.time()
    t0, t1 = start + warmup, start + warmup + duration
    state = {"ops": 0, "errors": 0, "stop": False, "end": t1}
    samples: list[str] = []
    latencies: list[float] = []
    cpu0: list[float] = []
    data = message + b".\r\n"

    async def sender(index: int) -> None:
        n = index
        while not state["stop"] and loop.time() < t1:
            try:
                async with asyncio.timeout(LMTP_TIMEOUT):
                    reader, writer = await asyncio.open_connection(host, port)
                    await _reply(reader, "220")
                    writer.write(b"LHLO bench.test\r\n")
                    await _reply(reader, "250")
                while not state["stop"] and loop.time() < t1:
                    user = users[n % len(users)]
                    n += senders
                    began = loop.time()
                    async with asyncio.timeout(LMTP_TIMEOUT):
                        writer.write(f"MAIL FROM:<sender@{DOMAIN}>\r\n".encode())
                        await _reply(reader, "250")
                        writer.write(f"RCPT TO:<{user}>\r\n".encode())
                        await _reply(reader, "250")
                        writer.write(b"DATA\r\n")
                        await _reply(reader, "354")
                        writer.write(data)
                        await _reply(reader, "250")  # one reply: one recipient
                    done = loop.time()
                    if t0 <= began and done <= t1 and not state["stop"]:
                        state["ops"] += 1
                        latencies.append(done - began)
                        if state["ops"] >= max_ops:
                            state["stop"], state["end"] = True, done
                writer.write(b"QUIT\r\n")
                with contextlib.suppress(LmtpError, OSError, TimeoutError):
                    async with asyncio.timeout(LMTP_TIMEOUT):
                        await _reply(reader, "221")
                writer.close()
            except (OSError, LmtpError, TimeoutError) as exc:
                state["errors"] += 1
                text = f"{type(exc).__name__}: {exc}"
                if len(samples) < 5 and text not in samples:
                    samples.append(text)
                await asyncio.sleep(0.05)

    async def cpu_at_t0() -> None:
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0.append(usage.ru_utime + usage.ru_stime)

    await asyncio.gather(cpu_at_t0(), *(sender(i) for i in range(senders)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    window = max(1e-9, min(float(state["end"]), t1) - t0)
    ops = int(state["ops"])
    return LmtpRun(
        senders=senders,
        ops=ops,
        errors=int(state["errors"]),
        error_samples=samples,
        window=window,
        ops_per_s=ops / window,
        latency_ms_p50=_ms(percentile(latencies, 0.50)),
        latency_ms_p99=_ms(percentile(latencies, 0.99)),
        # Until the last sender ended (it may finish its step after t1): an upper bound.
        gen_cores=(usage.ru_utime + usage.ru_stime - cpu0[0]) / window,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def lmtp_load(
    org: Organization,
    senders: int,
    users: Sequence[str],
    message: bytes,
    warmup: float,
    duration: float,
    max_ops: int,
) -> LmtpRun:
    host, port = org.lmtp
    return asyncio.run(_lmtp_load(host, port, senders, users, message, warmup, duration, max_ops))


# Figures -------------------------------------------------------------------------------


@dataclass
class Figure:
    kind: str  # logins | deliveries
    engine: str
    concurrency: int
    repeat: int
    ops: int
    errors: int
    error_samples: list[str]
    window: float
    ops_per_s: float
    gen_cores: float
    org_cores: float  # every popguard process of the organization (supervisord's tree)
    pg_cores: float  # PostgreSQL's processes (0 for SQLite)
    machine_cores: float
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None

    @property
    def org_ms_per_op(self) -> float:
        return 1000.0 * self.org_cores / max(self.ops_per_s, 1e-9)

    @property
    def pg_ms_per_op(self) -> float:
        return 1000.0 * self.pg_cores / max(self.ops_per_s, 1e-9)


class CpuWindow:
    """CPU seconds of the organization's and PostgreSQL's process trees and the machine."""

    def __init__(self, org: Organization, pg: Postgres | None) -> None:
        self.roots = {"org": org.supervisor_pid()}
        if pg is not None:
            self.roots["pg"] = pg.postmaster_pid()

    def sample(self) -> dict[str, float]:
        values = {name: tree_cpu(pid) for name, pid in self.roots.items()}
        values["machine"] = machine_sample().busy
        values["clock"] = time.monotonic()
        return values

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        wall = max(1e-9, after["clock"] - before["clock"])
        return {k: (after[k] - before[k]) / wall for k in before if k != "clock"}


def ensure_primed(org: Organization, users: Sequence[str], budget: float, ttl: float) -> None:
    """Every user logged in within the cache's lifetime for the next `budget` seconds."""
    if org.primed_first is not None and time.monotonic() + budget < (
        org.primed_first + ttl - CACHE_MARGIN
    ):
        return
    if org.primed_first is not None:
        # An entry is not renewed by use: wait until the newest has gone, then log in anew.
        wait = max(0.0, org.primed_last + ttl + 1.0 - time.monotonic())
        print(
            f"  {org.engine}: the login cache runs out; waiting {wait:.0f} s, priming again",
            flush=True,
        )
        time.sleep(wait)
        org.reprimes += 1
    started = time.monotonic()
    host, port = org.pop3
    problems = prime_logins(host, port, users, PASSWORD)
    if problems:
        raise RuntimeError(f"{org.engine}: {problems[0]} ({len(problems)} problems)")
    org.primed_first, org.primed_last = started, time.monotonic()


def login_figure(
    org: Organization,
    pg: Postgres | None,
    clients: int,
    repeat: int,
    users: Sequence[str],
    args: argparse.Namespace,
) -> Figure:
    host, port = org.pop3
    config = LoadConfig(
        host=host,
        port=port,
        mode="logins",
        clients=clients,
        users=tuple(users),
        password=PASSWORD,
        duration=args.duration,
        warmup=args.warmup,
        max_ops=args.max_ops,
        loop=resolve_loop("auto"),
    )
    cpu = CpuWindow(org, pg)
    result = run_load(config, probe=cpu.sample)
    # run_load hands back the probe's deltas over the measured window.
    wall = max(1e-9, result.probes.get("clock", result.window))
    cores = {k: v / wall for k, v in result.probes.items() if k != "clock"}
    return Figure(
        kind="logins",
        engine=org.engine,
        concurrency=clients,
        repeat=repeat,
        ops=result.ops,
        errors=result.errors,
        error_samples=result.error_samples,
        window=result.window,
        ops_per_s=result.ops_per_s,
        gen_cores=result.gen_cores,
        org_cores=cores.get("org", 0.0),
        pg_cores=cores.get("pg", 0.0),
        machine_cores=cores.get("machine", 0.0),
    )


def delivery_figure(
    org: Organization,
    pg: Postgres | None,
    senders: int,
    repeat: int,
    users: Sequence[str],
    message: bytes,
    args: argparse.Namespace,
) -> Figure:
    cpu = CpuWindow(org, pg)
    # The window's CPU: sampled around the whole run, then scaled to the window (the
    # warm-up and the last steps are in it; both sides alike).
    before = cpu.sample()
    run = lmtp_load(org, senders, users, message, args.warmup, args.duration, args.max_ops)
    cores = CpuWindow.cores(before, cpu.sample())
    return Figure(
        kind="deliveries",
        engine=org.engine,
        concurrency=senders,
        repeat=repeat,
        ops=run.ops,
        errors=run.errors,
        error_samples=run.error_samples,
        window=run.window,
        ops_per_s=run.ops_per_s,
        gen_cores=run.gen_cores,
        org_cores=cores.get("org", 0.0),
        pg_cores=cores.get("pg", 0.0),
        machine_cores=cores.get("machine", 0.0),
        latency_ms_p50=run.latency_ms_p50,
        latency_ms_p99=run.latency_ms_p99,
    )


def describe(figure: Figure) -> str:
    what = "clients" if figure.kind == "logins" else "senders"
    line = (
        f"  {figure.kind:10} {figure.engine:10} {what}={figure.concurrency:<2} "
        f"{figure.ops_per_s:8.1f}/s  ops={figure.ops} errors={figure.errors}  "
        f"popguard {figure.org_cores:.2f} cores ({figure.org_ms_per_op:.2f} ms/op)"
    )
    if figure.engine == "postgresql":
        line += f", PostgreSQL {figure.pg_cores:.2f} cores ({figure.pg_ms_per_op:.2f} ms/op)"
    line += f", generator {figure.gen_cores:.2f}, machine {figure.machine_cores:.2f}"
    if figure.latency_ms_p50 is not None:
        line += f", p50 {figure.latency_ms_p50} ms p99 {figure.latency_ms_p99} ms"
    return line


# Counting the directory's statements -----------------------------------------------------


@dataclass
class Counted:
    what: str  # login | delivery
    operations: int
    seconds: float
    idle_seconds: float
    statements_per_op: float
    by_statement: list[dict[str, Any]]  # query, per op, calls, idle calls, mean ms


def count_statements(pg: Postgres, what: str, operations: int, run: Any) -> Counted:
    pg.counting(True)
    try:
        pg.reset()
        time.sleep(IDLE_WINDOW)
        idle = pg.statements()
        pg.reset()
        started = time.monotonic()
        done = run()
        seconds = time.monotonic() - started
        busy = pg.statements()
    finally:
        pg.counting(False)
    if done != operations:
        raise RuntimeError(f"counted {what}s: {done} of {operations} done")
    scale = seconds / IDLE_WINDOW
    rows: list[dict[str, Any]] = []
    for query in sorted(set(busy) | set(idle)):
        calls, total_ms = busy.get(query, (0, 0.0))
        idle_calls = idle.get(query, (0, 0.0))[0]
        net = (calls - idle_calls * scale) / operations
        rows.append(
            {
                "query": query,
                "per_op": round(net, 3),
                "calls": calls,
                "idle_calls_in_10s": idle_calls,
                "mean_ms": round(total_ms / calls, 4) if calls else None,
            }
        )
    rows.sort(key=lambda r: -float(r["per_op"]))
    return Counted(
        what=what,
        operations=operations,
        seconds=round(seconds, 2),
        idle_seconds=IDLE_WINDOW,
        statements_per_op=round(sum(max(0.0, float(r["per_op"])) for r in rows), 3),
        by_statement=rows,
    )


def counted_logins(org: Organization, users: Sequence[str], count: int) -> int:
    host, port = org.pop3
    config = LoadConfig(
        host=host,
        port=port,
        mode="logins",
        clients=1,
        users=tuple(users),
        password=PASSWORD,
        duration=120.0,
        warmup=0.0,
        max_ops=count,
        loop=resolve_loop("auto"),
    )
    result = run_load(config)
    if result.errors:
        raise RuntimeError(f"counted logins: {result.error_samples}")
    # One client stops at exactly max_ops: nothing before the window (no warm-up).
    return result.ops


def counted_deliveries(org: Organization, users: Sequence[str], count: int, message: bytes) -> int:
    run = lmtp_load(org, 1, users, message, 0.0, 120.0, count)
    if run.errors:
        raise RuntimeError(f"counted deliveries: {run.error_samples}")
    return run.ops


def read_latency(org: Organization, user: str, reads: int) -> dict[str, float | None]:
    """Microseconds of one directory read as a popguard process makes it (the same
    Directory class, its engine, its pool), nothing else running: what each statement
    of a login or a delivery costs its service's event loop."""
    from popguard.directory.directory import Directory

    out: dict[str, float | None] = {}
    with Directory(org.data) as directory:
        for name, read in (
            ("find_mailbox", lambda: directory.find_mailbox(user)),
            ("active_server", lambda: directory.active_server("DB01")),
        ):
            for _ in range(20):  # psycopg prepares a statement after a few runs
                read()
            times = []
            for _ in range(reads):
                began = time.perf_counter()
                read()
                times.append(time.perf_counter() - began)
            out[f"{name}_us_p50"] = _us(percentile(times, 0.50))
            out[f"{name}_us_p99"] = _us(percentile(times, 0.99))
            out[f"{name}_us_mean"] = _us(sum(times) / len(times))
    return out


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


# The run -------------------------------------------------------------------------------


def pairs(figures: list[Figure], kind: str) -> list[dict[str, Any]]:
    out = []
    for level in sorted({f.concurrency for f in figures if f.kind == kind}):
        rates: dict[str, list[float]] = {engine: [] for engine in ENGINES}
        for f in figures:
            if f.kind == kind and f.concurrency == level:
                rates[f.engine].append(f.ops_per_s)
        best = {engine: max(values) if values else 0.0 for engine, values in rates.items()}
        mean = {e: sum(v) / len(v) if v else 0.0 for e, v in rates.items()}
        out.append(
            {
                "kind": kind,
                "concurrency": level,
                "runs": rates,
                "best": best,
                "mean": mean,
                "ratio_best": best["postgresql"] / best["sqlite"] if best["sqlite"] else 0.0,
                "ratio_mean": mean["postgresql"] / mean["sqlite"] if mean["sqlite"] else 0.0,
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"### Directory engines: SQLite vs PostgreSQL ({report['date']})",
        "",
        f"Commit `{m['commit']}`, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"PostgreSQL {report['postgresql_version']}; {report['users']} users, "
        f"{report['args']['duration']:.0f} s per figure, {report['args']['repeat']} turns "
        "each engine (alternating), best of them (mean in brackets). Logins: warm password "
        "caches, no cold argon2id login in any figure. Deliveries: "
        f"{report['args']['message_size']} octets, one recipient each, to mbx1 (DB01 "
        "replicated to mbx2).",
        "",
        "| figure | SQLite /s | PostgreSQL /s | PostgreSQL / SQLite | goal |",
        "|---|---:|---:|---:|---|",
    ]
    for row in report["summary"]:
        label = "logins, clients" if row["kind"] == "logins" else "deliveries, senders"
        goal = f">= {GOAL:.2f}" if row["kind"] == "logins" else "(none set)"
        lines.append(
            f"| {label} {row['concurrency']} | {row['best']['sqlite']:.0f} "
            f"({row['mean']['sqlite']:.0f}) | {row['best']['postgresql']:.0f} "
            f"({row['mean']['postgresql']:.0f}) | {row['ratio_best']:.2f} "
            f"({row['ratio_mean']:.2f}) | {goal} |"
        )
    lines += [
        "",
        "CPU per operation (ms, mean over the turns): popguard's processes; "
        "PostgreSQL's for the PostgreSQL figures.",
        "",
        "| figure | SQLite: popguard | PostgreSQL: popguard | PostgreSQL: server |",
        "|---|---:|---:|---:|",
    ]
    for row in report["cpu_per_op"]:
        lines.append(
            f"| {row['figure']} | {row['sqlite_org_ms']:.2f} | "
            f"{row['postgresql_org_ms']:.2f} | {row['postgresql_pg_ms']:.2f} |"
        )
    sqlite_us = report["read_latency"]["sqlite"]["find_mailbox_us_p50"]
    pg_us = report["read_latency"]["postgresql"]["find_mailbox_us_p50"]
    lines += [
        "",
        "One directory read (find_mailbox, in a process of its own through popguard's "
        f"Directory, no load): SQLite {sqlite_us} µs, PostgreSQL {pg_us} µs (p50); "
        f"active_server: SQLite {report['read_latency']['sqlite']['active_server_us_p50']} "
        f"µs, PostgreSQL {report['read_latency']['postgresql']['active_server_us_p50']} µs.",
    ]
    for counted in report["counted"]:
        added = counted["statements_per_op"] * ((pg_us or 0.0) - (sqlite_us or 0.0)) / 1000.0
        lines += [
            "",
            f"Directory statements per {counted['what']} ({counted['operations']} counted, "
            f"one at a time, background subtracted): {counted['statements_per_op']:.2f} "
            "statements; mean ms is PostgreSQL's own execution time. At the read latency "
            f"above that is about {added:.2f} ms more per {counted['what']} on PostgreSQL, "
            "spent waiting in the service's event loop.",
            "",
            "| per op | mean ms | statement |",
            "|---:|---:|---|",
        ]
        for row in counted["by_statement"]:
            if float(row["per_op"]) >= 0.05:
                text = row["query"] if len(row["query"]) <= 110 else row["query"][:107] + "..."
                mean = "" if row["mean_ms"] is None else f"{row['mean_ms']:.3f}"
                lines.append(f"| {row['per_op']:.2f} | {mean} | `{text}` |")
    return "\n".join(lines) + "\n"


def cpu_table(figures: list[Figure]) -> list[dict[str, Any]]:
    out = []
    for kind in ("logins", "deliveries"):
        for level in sorted({f.concurrency for f in figures if f.kind == kind}):

            def mean(engine: str, attr: str, kind: str = kind, level: int = level) -> float:
                values = [
                    getattr(f, attr)
                    for f in figures
                    if f.kind == kind and f.concurrency == level and f.engine == engine
                ]
                return sum(values) / len(values) if values else 0.0

            out.append(
                {
                    "figure": f"{kind} x{level}",
                    "sqlite_org_ms": mean("sqlite", "org_ms_per_op"),
                    "postgresql_org_ms": mean("postgresql", "org_ms_per_op"),
                    "postgresql_pg_ms": mean("postgresql", "pg_ms_per_op"),
                }
            )
    return out


@contextlib.contextmanager
def organizations(args: argparse.Namespace) -> Iterator[tuple[dict[str, Organization], Postgres]]:
    folder = Path(tempfile.mkdtemp(prefix="popbench-directory-"))
    pg: Postgres | None = None
    orgs: dict[str, Organization] = {}
    try:
        print("starting PostgreSQL", flush=True)
        pg = Postgres()
        for engine in ENGINES:
            org = Organization(engine, folder / engine)
            org.folder.mkdir()
            orgs[engine] = org
            section = pg.server.directory_section(pg.new_database()) if engine != "sqlite" else ""
            print(f"{engine}: popguard up --detach", flush=True)
            org.up(section)
            print(f"{engine}: up in {org.up_seconds:.0f} s; {args.users} mailboxes", flush=True)
            org.configure(user_names(args.users))
        for org in orgs.values():
            org.wait_copy_healthy()
        yield orgs, pg
    finally:
        for org in orgs.values():
            org.down()
        if pg is not None:
            pg.remove()
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per figure")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-ops", type=int, default=50_000, help="per figure, at most")
    parser.add_argument("--login-clients", default="1,16")
    parser.add_argument("--lmtp-senders", default="1,8")
    parser.add_argument("--repeat", type=int, default=2, help="turns per engine and figure")
    parser.add_argument(
        "--count", type=int, default=200, help="logins and deliveries whose statements are counted"
    )
    parser.add_argument("--message-size", type=int, default=2048)
    parser.add_argument("--reads", type=int, default=2000, help="timed reads per engine")
    parser.add_argument("--keep", action="store_true", help="keep the data folders")
    args = parser.parse_args(argv)
    from popguard.directory.passwords import AUTH_CACHE_TTL

    started = time.monotonic()
    users = user_names(args.users)
    message = make_message("directory-bench", args.message_size).data
    login_levels = [int(x) for x in args.login_clients.split(",") if x]
    lmtp_levels = [int(x) for x in args.lmtp_senders.split(",") if x]
    figures: list[Figure] = []
    counted: list[Counted] = []
    cold_ms = cold_login_cost()
    with organizations(args) as (orgs, pg):
        (version,) = pg.query("SHOW server_version")[0]
        budget = 2.0 + args.warmup + args.duration + 5.0

        def engine_of(org: Organization) -> Postgres | None:
            return pg if org.engine == "postgresql" else None

        def turns(repeat: int) -> list[Organization]:
            order = [orgs[e] for e in ENGINES]
            return order if repeat % 2 == 0 else order[::-1]

        latency = {e: read_latency(orgs[e], users[0], args.reads) for e in ENGINES}
        for engine, values in latency.items():
            print(
                f"one directory read, {engine}: "
                + ", ".join(f"{k} {v}" for k, v in values.items()),
                flush=True,
            )
        print("logins/s through cas1 (warm caches)", flush=True)
        for repeat in range(args.repeat):
            for clients in login_levels:
                for org in turns(repeat):
                    ensure_primed(org, users, budget, AUTH_CACHE_TTL)
                    figure = login_figure(org, engine_of(org), clients, repeat, users, args)
                    figures.append(figure)
                    print(describe(figure), flush=True)
        print(f"counting the directory statements of {args.count} logins", flush=True)
        ensure_primed(orgs["postgresql"], users, 2 * IDLE_WINDOW + 60.0, AUTH_CACHE_TTL)
        counted.append(
            count_statements(
                pg,
                "login",
                args.count,
                lambda: counted_logins(orgs["postgresql"], users, args.count),
            )
        )
        print("LMTP deliveries/s to mbx1", flush=True)
        for repeat in range(args.repeat):
            for senders in lmtp_levels:
                for org in turns(repeat):
                    figure = delivery_figure(
                        org, engine_of(org), senders, repeat, users, message, args
                    )
                    figures.append(figure)
                    print(describe(figure), flush=True)
        print(f"counting the directory statements of {args.count} deliveries", flush=True)
        counted.append(
            count_statements(
                pg,
                "delivery",
                args.count,
                lambda: counted_deliveries(orgs["postgresql"], users, args.count, message),
            )
        )
        setup = {
            o.engine: {
                "up_s": round(o.up_seconds, 1),
                "mailboxes_s": round(o.setup_seconds, 1),
                "reprimes": o.reprimes,
            }
            for o in orgs.values()
        }

    summary = pairs(figures, "logins") + pairs(figures, "deliveries")
    now = datetime.datetime.now()
    report: dict[str, Any] = {
        "benchmark": "directory_engines",
        "date": f"{now:%Y-%m-%d}",
        "machine": machine(),
        "postgresql_version": version,
        "users": args.users,
        "args": vars(args),
        "cold_argon2id_ms": round(cold_ms, 1),
        "cold_logins_in_figures": False,
        "setup": setup,
        "figures": [
            asdict(f) | {"org_ms_per_op": f.org_ms_per_op, "pg_ms_per_op": f.pg_ms_per_op}
            for f in figures
        ],
        "summary": summary,
        "cpu_per_op": cpu_table(figures),
        "goal": {"logins_ratio_at_least": GOAL},
        "counted": [asdict(c) for c in counted],
        "read_latency": latency,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print()
    for row in summary:
        verdict = ""
        if row["kind"] == "logins":
            verdict = "  goal met" if row["ratio_best"] >= GOAL else f"  BELOW the goal {GOAL:.2f}"
        print(
            f"{row['kind']:10} x{row['concurrency']:<2}  SQLite {row['best']['sqlite']:8.1f}/s"
            f"  PostgreSQL {row['best']['postgresql']:8.1f}/s  ratio {row['ratio_best']:.2f} "
            f"(means: {row['ratio_mean']:.2f}){verdict}"
        )
    for c in counted:
        print(
            f"per {c.what}: {c.statements_per_op:.2f} directory statements "
            "(per op, statement, PostgreSQL's mean execution ms)"
        )
        for row in c.by_statement:
            if float(row["per_op"]) >= 0.05:
                print(f"  {row['per_op']:6.2f}  {row['query'][:100]}  {row['mean_ms']}")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"directory_engines-{now:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"\nwrote {stem}.json and .md ({report['wall_seconds']:.0f} s)")
    errors = sum(f.errors for f in figures)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
