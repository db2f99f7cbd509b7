"""What a synchronous passive copy costs a delivery: a 250 that waits until a passive
copy holds the message, beside one that waits for the active copy's disk only.

    .venv/bin/python -m bench.synchronous_copy [--messages 300] [--size 4096] [--warmup 20]

Two fresh data folders, set up through the `popguard` command and identical but for
`[active_manager] synchronous_copy` (true, the default; false): mbx1 and mbx2 on
loopback addresses of their own, DB01 active on mbx1 with a passive copy on mbx2, one
mailbox in DB01; `serve delivery` on mbx1 and `serve replication` on both. Messages go
one at a time on a kept LMTP connection to each mbx1, the two organizations in turn so
both see the same machine, timed from MAIL to the reply after DATA (p50/p99). Then
deliveries/s with 4 connections at once per organization, one after the other. Writes
bench/results/synchronous_copy-DATE.json. At most `--messages` per organization.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.lmtp_forward import deliver, in_turn, message, summary
from bench.report import machine, write_results
from popguard.directory.directory import Directory
from popguard.testing.net import free_loopback_address, wait_port
from popguard.testing.organization import popguard_output, serve, wait_until
from popguard.testing.processes import stop_processes

USER = "forwarded@popguard.test"  # bench.lmtp_forward.deliver's recipient
LMTP_PORT = 2424
REPLICATION_PORT = 64327
MAILBOX_PORTS = (2424, 2425, 64327)
MAX_MESSAGES = 5_000
CONNECTIONS = 4


@contextlib.contextmanager
def organization(synchronous: bool, keep: bool) -> Iterator[str]:
    """mbx1 and mbx2, DB01 on mbx1 with a copy on mbx2; mbx1's LMTP address."""
    folder = Path(tempfile.mkdtemp(prefix="popguard-bench-sync-"))
    data = folder / "data"
    data.mkdir(mode=0o700)
    (data / "popguard.toml").write_text(
        f"[active_manager]\nsynchronous_copy = {str(synchronous).lower()}\n"
    )
    processes: list[subprocess.Popen[bytes]] = []
    addresses: dict[str, str] = {}
    try:
        for name in ("mbx1", "mbx2"):
            address = free_loopback_address(MAILBOX_PORTS)
            popguard_output(data, "new-server", name, "--role", "mailbox", "--address", address)
            addresses[name] = address
        popguard_output(data, "new-mailboxdatabase", "DB01", "--server", "mbx1")
        popguard_output(data, "add-mailboxdatabasecopy", "DB01", "--server", "mbx2")
        popguard_output(data, "new-mailbox", USER, "--database", "DB01", "--password-stdin",
                        stdin="bench password\n")  # fmt: skip
        for name, service, port in (
            ("mbx2", "replication", REPLICATION_PORT),
            ("mbx1", "replication", REPLICATION_PORT),
            ("mbx1", "delivery", LMTP_PORT),
        ):
            process = serve(data, service, name, data / f"{name}-{service}.log")
            processes.append(process)
            wait_port(addresses[name], port, timeout=30, process=process)
        if synchronous:

            def marked() -> bool:
                with Directory(data) as directory:
                    return any(c.synchronous for c in directory.database_copies("DB01"))

            wait_until("DB01\\mbx2 to be synchronous", marked, 60)
        yield addresses["mbx1"]
    finally:
        stop_processes(processes)
        if keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def throughput(address: str, count: int, size: int) -> float:
    """Deliveries per second with CONNECTIONS connections at once, `count` in all."""
    each = max(1, count // CONNECTIONS)
    errors: list[BaseException] = []

    def one_connection(offset: int) -> None:
        try:
            with smtplib.LMTP(address, LMTP_PORT, timeout=60) as client:
                client.ehlo("bench.example.test")
                for number in range(each):
                    deliver(client, message(offset + number, size))
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [
        threading.Thread(target=one_connection, args=(i * each,)) for i in range(CONNECTIONS)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"throughput run failed: {errors[0]!r}")
    return round(each * CONNECTIONS / elapsed, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="measured, per organization")
    parser.add_argument("--size", type=int, default=4096, help="octets per message")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured, per organization")
    parser.add_argument("--keep", action="store_true", help="keep the data folders")
    args = parser.parse_args(argv)
    count = min(args.messages, MAX_MESSAGES)
    ran_on = machine()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": ran_on["commit"],
        "machine": ran_on,
        "messages": count,
        "size": args.size,
    }
    with (
        organization(True, args.keep) as synchronous,
        organization(False, args.keep) as alone,
    ):
        paths = {
            "synchronous": smtplib.LMTP(synchronous, LMTP_PORT, timeout=60),
            "active_only": smtplib.LMTP(alone, LMTP_PORT, timeout=60),
        }
        samples = in_turn(paths, args.warmup, count, args.size)
        for name in paths:
            report[name] = summary(samples[name])
        report["synchronous"]["per_second_4_connections"] = throughput(
            synchronous, count, args.size
        )
        report["active_only"]["per_second_4_connections"] = throughput(alone, count, args.size)
    sync, alone_figures = report["synchronous"], report["active_only"]
    report["added_p50_ms"] = round(sync["p50_ms"] - alone_figures["p50_ms"], 2)
    report["added_p99_ms"] = round(sync["p99_ms"] - alone_figures["p99_ms"], 2)
    report["throughput_ratio"] = round(
        sync["per_second_4_connections"] / alone_figures["per_second_4_connections"], 2
    )
    print(json.dumps({k: report[k] for k in report if k != "machine"}, indent=2))
    print(f"wrote {write_results('synchronous_copy', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
