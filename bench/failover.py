"""Active Manager's failover, on three hosts in network namespaces: how long from a
mailbox host's death to the first good POP3 login through the front end on a mailbox
of its database, and how long a cut-off host takes to fence itself.

    .venv/bin/python -m bench.failover [--runs 5] [--partition-runs 3]

Each run builds the organization of testing/three_hosts.py afresh (PostgreSQL, cas1,
mbx1 and mbx2 on four namespaces, `[active_manager] enabled = true`), waits until
DB01's copy on mbx2 is Healthy, then:
- death: SIGKILL to every process of mbx1's host; then a new POP3S RETR of the demo
  mailbox through cas1 every 0.2 s (each in a thread of its own, as new clients
  arrive) until one works (at most 120 s);
- partition: mbx1's link cut; then a new LMTP delivery to mbx1 every 0.2 s until mbx1
  refuses one (fenced), and new RETRs through cas1 until one works (failed over).
Prints median and worst of each, beside Exchange's and Patroni's figures, and writes
bench/results/failover-DATE.json. Run as root (namespaces).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.report import machine, write_results
from popguard.testing.three_hosts import kill_host, lmtp_code, three_hosts

ACTIVE_MANAGER = "\n[active_manager]\nenabled = true\n"
BOUND = 120.0  # seconds a run may wait for anything
ATTEMPTS_AT_ONCE = 150  # at most, each bounded by curl's or LMTP's own time-out
# Exchange 2013: cluster heartbeats every 1 s, 5 missed = about 5 s to detect, then
# the mount (Microsoft quotes under 30 s for a failover); Patroni's defaults: ttl 30 s,
# loop_wait 10 s: up to about 30-40 s.
REFERENCE = {"exchange_detection_s": 5.0, "patroni_default_ttl_s": 30.0}


def until(what: str, check: Callable[[], bool], started: float) -> float:
    """Seconds from `started` until an attempt of `check` succeeds. A new attempt starts
    every 0.2 s whatever the earlier ones are doing, as new clients arrive: one that
    hangs on an unreachable server (until its own time-out) does not hide when the
    service came back. The first attempt to succeed ends it, at its end."""
    succeeded: list[float] = []

    def attempt() -> None:
        try:
            if check():
                succeeded.append(time.monotonic() - started)
        except (AssertionError, RuntimeError, OSError):
            pass

    with ThreadPoolExecutor(max_workers=ATTEMPTS_AT_ONCE) as pool:
        while not succeeded and time.monotonic() - started < BOUND:
            pool.submit(attempt)
            time.sleep(0.2)
        pool.shutdown(wait=False, cancel_futures=True)
    if not succeeded:
        raise RuntimeError(f"{what}: not within {BOUND:g} s")
    return min(succeeded)


def death_run(folder: Path) -> float:
    with three_hosts(folder, ACTIVE_MANAGER) as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        time.sleep(3)
        started = time.monotonic()
        kill_host(org.hosts["mbx1"])
        return until("a login after the host died", lambda: "Welcome" in org.retr(1), started)


def partition_run(folder: Path) -> tuple[float, float]:
    with three_hosts(folder, ACTIVE_MANAGER) as org:
        assert "Welcome to popguard" in org.retr(1)
        org.wait_healthy("DB01\\mbx2")
        mbx1 = org.hosts["mbx1"]
        time.sleep(3)
        started = time.monotonic()
        org.network.cut("mbx1")
        try:
            fenced = until(
                "mbx1 to fence", lambda: lmtp_code(mbx1, mbx1.address, org.user) != 250, started
            )
            served = until("a login on the other side", lambda: "Welcome" in org.retr(1), started)
        finally:
            org.network.mend("mbx1")
        return fenced, served


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(samples), 1),
        "worst_s": round(max(samples), 1),
        "runs_s": [round(s, 1) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="host deaths (at most 10)")
    parser.add_argument("--partition-runs", type=int, default=3, help="cut links (at most 10)")
    args = parser.parse_args(argv)
    os.umask(0o077)  # the data folders hold mail: popguard refuses them open to others
    ran_on = machine()
    deaths, fences, partitions = [], [], []
    for number in range(min(args.runs, 10)):
        with tempfile.TemporaryDirectory(prefix="popguard-bench-failover-") as folder:
            deaths.append(death_run(Path(folder)))
        print(f"death run {number + 1}: served again after {deaths[-1]:.1f} s", flush=True)
    for number in range(min(args.partition_runs, 10)):
        with tempfile.TemporaryDirectory(prefix="popguard-bench-partition-") as folder:
            fenced, served = partition_run(Path(folder))
        fences.append(fenced)
        partitions.append(served)
        print(f"partition run {number + 1}: fenced after {fenced:.1f} s, served on the "
              f"other side after {served:.1f} s", flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": ran_on["commit"],
        "machine": ran_on,
        "reference": REFERENCE,
    }
    if deaths:
        report["host_death_to_login"] = summary(deaths)
    if fences:
        report["partition_to_fence"] = summary(fences)
        report["partition_to_login"] = summary(partitions)
    print(json.dumps({k: report[k] for k in report if k != "machine"}, indent=2))
    print(f"wrote {write_results('failover', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
