"""Health engine benchmark: CPU and scheduling jitter with many probe definitions, and
the load the shipped probes put on a busy back end.

    .venv/bin/python -m bench.health_engine [--probes 1000] [--duration 60]

1. Engine: a health set of `--probes` probe definitions (pop3-capabilities over plain
   TCP, every `--recurrence` seconds, each with a monitor) against a real
   `popguard serve pop3be` on a loopback address; the engine runs in this process on
   its real clock for `--duration` seconds. Reports this process's CPU (user+system
   over wall time), probe runs per second, and the start delay of every run (how
   late it began against its schedule: start_0 + k * recurrence), p50/p99/max.
2. Shipped probes on a busy back end: the back end's CPU with the load generator
   alone, then with the shipped POP.Protocol probes (default profile) running beside
   it, and the logins/s the generator got in each case; then the probes alone, which
   less the back end's idle CPU is what they cost it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.cpu import tree_cpu
from bench.replication import MAILBOX_PORTS, popguard
from bench.report import machine, write_results
from popguard.health.clock import SystemClock
from popguard.health.engine import HealthEngine
from popguard.health.loader import load_health_set, shipped_health_sets
from popguard.services.context import ServerContext
from popguard.testing.net import free_loopback_address, wait_port
from popguard.testing.organization import serve


def health_set_text(probes: int, recurrence: float) -> str:
    parts = ['name = "Bench"\nhealth_group = "ServiceComponents"\nrole = "mailbox"\n']
    for n in range(probes):
        parts.append(
            f'[[probes]]\nname = "Probe{n}"\nkind = "pop3-capabilities"\nendpoint = "pop3be"\n'
            f'tls = "plain"\nrecurrence = {recurrence}\ntimeout = {min(5.0, recurrence)}\n'
        )
        parts.append(
            f'[[monitors]]\nname = "Monitor{n}"\nkind = "consecutive-failures"\n'
            f'probe = "Probe{n}"\nthreshold = 3\nladder = [{{ state = "Degraded", after = 0 }}]\n'
        )
    return "\n".join(parts)


@contextlib.contextmanager
def back_end() -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    folder = Path(tempfile.mkdtemp(prefix="popguard-health-bench-"))
    data = folder / "data"
    address = free_loopback_address(MAILBOX_PORTS)
    popguard(data, "new-server", "mbx1", "--role", "mailbox", "--address", address)
    popguard(data, "new-mailboxdatabase", "DB01", "--server", "mbx1")
    popguard(data, "set-popsettings", "--server", "mbx1", "--login-type", "PlainTextLogin",
             "--max-connections", "5000", "--max-connection-from-single-ip", "5000")  # fmt: skip
    process = serve(data, "pop3be", "mbx1", folder / "pop3be.log")
    try:
        wait_port(address, 1110, timeout=30, process=process)
        yield data, address, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        shutil.rmtree(folder, ignore_errors=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_engine(data: Path, probes: int, recurrence: float, duration: float) -> dict[str, Any]:
    health_set = load_health_set(health_set_text(probes, recurrence), "bench.toml")
    engine = HealthEngine(ServerContext.open(data, "mbx1"), SystemClock(), [health_set])
    stop = asyncio.Event()
    cpu_before, wall_before = cpu_seconds(), time.monotonic()
    runner = asyncio.create_task(engine.run(stop))
    await asyncio.sleep(duration)
    cpu = cpu_seconds() - cpu_before
    wall = time.monotonic() - wall_before
    stop.set()
    await runner
    starts: dict[str, list[float]] = defaultdict(list)
    failed = 0
    for n in range(probes):
        for result in reversed(engine.store.recent(f"Bench\\Probe{n}", "pop3be", 100_000)):
            starts[result.probe].append(result.started)
            failed += not result.succeeded
    engine.close()
    delays = sorted(
        (start - times[0] - k * recurrence) * 1000
        for times in starts.values()
        for k, start in enumerate(times)
    )
    runs = sum(len(t) for t in starts.values())

    def pct(q: float) -> float:
        return round(delays[min(len(delays) - 1, int(q * len(delays)))], 1) if delays else 0.0

    return {
        "probes": probes,
        "recurrence_s": recurrence,
        "seconds": round(wall, 1),
        "engine_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "runs": runs,
        "runs_per_s": round(runs / wall, 1),
        "failed_runs": failed,
        "start_delay_ms_p50": pct(0.5),
        "start_delay_ms_p99": pct(0.99),
        "start_delay_ms_max": pct(1.0),
    }


def login_load(address: str, seconds: float) -> float:
    """Logins/s from 4 threads of poplib over plain TCP (a busy back end's clients)."""
    import poplib
    import threading

    done = [0]
    stop = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < stop:
            client = poplib.POP3(address, 1110, timeout=10)
            with contextlib.suppress(poplib.error_proto):
                client.user("load@popguard.test")
                client.pass_("load password")
                client.stat()
            client.quit()
            done[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / seconds


async def shipped_probe_load(
    data: Path, address: str, process: subprocess.Popen[bytes], seconds: float
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    phases = (("load only", False, True), ("load + shipped probes", True, True),
              ("idle", False, False), ("shipped probes only", True, False))  # fmt: skip
    for label, with_probes, with_load in phases:
        stop = asyncio.Event()
        runner = None
        if with_probes:
            protocol = [s for s in shipped_health_sets() if s.name == "POP.Protocol"]
            engine = HealthEngine(ServerContext.open(data, "mbx1"), SystemClock(), protocol)
            engine.ensure_health_mailboxes()  # before the clock starts
            runner = asyncio.create_task(engine.run(stop))
        before = tree_cpu(process.pid)
        if with_load:
            logins = await asyncio.to_thread(login_load, address, seconds)
        else:
            await asyncio.sleep(seconds)
            logins = 0.0
        cpu = tree_cpu(process.pid) - before
        if runner is not None:
            stop.set()
            await runner
            engine.close()
        figures[label] = {
            "logins_per_s": round(logins, 1),
            "back_end_cpu_percent": round(100 * cpu / seconds, 1),
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--recurrence", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    with back_end() as (data, address, process):
        report["engine"] = asyncio.run(
            run_engine(data, args.probes, args.recurrence, args.duration)
        )
        print(json.dumps(report["engine"]), flush=True)
        popguard(data, "new-mailbox", "load@popguard.test", "--database", "DB01",
                 "--password-stdin", stdin="load password\n")  # fmt: skip
        report["shipped_probes_on_busy_back_end"] = asyncio.run(
            shipped_probe_load(data, address, process, args.load_seconds)
        )
        print(json.dumps(report["shipped_probes_on_busy_back_end"]), flush=True)
    print(f"wrote {write_results('health_engine', report)} (pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
