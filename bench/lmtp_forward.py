"""Mail in that follows the active copy: what a delivery costs when the MTA hands it to
a mailbox server that does not hold the recipient's active copy.

    .venv/bin/python -m bench.lmtp_forward [--messages 400] [--size 4096] [--warmup 20]

A fresh data folder, set up through the `popguard` command: mbx1 and mbx2 on loopback
addresses of their own, each running `serve delivery`; DB01 active on mbx1, DB02 on
mbx2, one mailbox in DB02. Two LMTP connections stay open, as an MTA's connection cache
keeps them: one to mbx2 (direct: the copy is there) and one to mbx1 (forwarded: mbx1
hands each message to mbx2's lmtp-peer port, a new TLS connection per transaction, and
relays mbx2's reply). Messages go one at a time, direct and forwarded in turn, so both
paths see the same machine; each is timed from MAIL to the reply after DATA, as the MTA
waits for it. Prints p50/p99 of each, the added latency and the ratio forwarded/direct,
and writes bench/results/lmtp_forward-DATE.json. At most `--messages` per path.
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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.report import machine, percentile, write_results
from popguard.testing.net import free_loopback_address, wait_port
from popguard.testing.organization import popguard_output, serve
from popguard.testing.processes import stop_processes

USER = "forwarded@popguard.test"
LMTP_PORT = 2424
MAILBOX_PORTS = (2424, 2425)  # what `serve delivery` binds on its server's address
MAX_MESSAGES = 10_000  # a bound on one run, whatever --messages says


def message(number: int, size: int) -> bytes:
    head = f"From: load@example.test\r\nSubject: forward bench {number}\r\n\r\n".encode()
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


@contextlib.contextmanager
def organization(keep: bool) -> Iterator[tuple[Path, dict[str, str]]]:
    """mbx1 and mbx2 with their delivery services; DB01 on mbx1, DB02 on mbx2."""
    folder = Path(tempfile.mkdtemp(prefix="popguard-bench-forward-"))
    data = folder / "data"
    data.mkdir(mode=0o700)
    processes: list[subprocess.Popen[bytes]] = []
    addresses: dict[str, str] = {}
    try:
        for name, database in (("mbx1", "DB01"), ("mbx2", "DB02")):
            address = free_loopback_address(MAILBOX_PORTS)
            popguard_output(data, "new-server", name, "--role", "mailbox", "--address", address)
            popguard_output(data, "new-mailboxdatabase", database, "--server", name)
            addresses[name] = address
        popguard_output(data, "new-mailbox", USER, "--database", "DB02", "--password-stdin",
                        stdin="bench password\n")  # fmt: skip
        for name, address in addresses.items():
            process = serve(data, "delivery", name, data / f"{name}-delivery.log")
            processes.append(process)
            wait_port(address, LMTP_PORT, timeout=30, process=process)
        yield data, addresses
    finally:
        stop_processes(processes)
        if keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def deliver(client: smtplib.LMTP, content: bytes) -> float:
    """Seconds from MAIL to the reply after DATA; raises unless the reply is 250."""
    started = time.perf_counter()
    client.mail("load@example.test")
    code, reply = client.rcpt(USER)
    if code != 250:
        raise RuntimeError(f"RCPT: {code} {reply!r}")
    code, reply = client.data(content)
    elapsed = time.perf_counter() - started
    if code != 250:
        raise RuntimeError(f"DATA: {code} {reply!r}")
    return elapsed


def in_turn(
    paths: dict[str, smtplib.LMTP], warmup: int, count: int, size: int
) -> dict[str, list[float]]:
    """One message on each path in turn, `warmup` unmeasured rounds then `count`
    measured, so every path sees the same machine; closes the connections."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for client in paths.values():
            client.ehlo("bench.example.test")
        number = 0
        for round_number in range(warmup + count):
            for name, client in paths.items():
                number += 1
                elapsed = deliver(client, message(number, size))
                if round_number >= warmup:
                    samples[name].append(elapsed)
    finally:
        for client in paths.values():
            with contextlib.suppress(Exception):
                client.quit()
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    def ms(fraction: float) -> float:
        value = percentile(samples, fraction)
        return round((value or 0.0) * 1000, 2)

    return {"p50_ms": ms(0.50), "p90_ms": ms(0.90), "p99_ms": ms(0.99), "count": len(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400, help="measured, per path")
    parser.add_argument("--size", type=int, default=4096, help="octets per message")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured, per path")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
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
    with organization(args.keep) as (_, addresses):
        paths = {
            "direct": smtplib.LMTP(addresses["mbx2"], LMTP_PORT, timeout=60),
            "forwarded": smtplib.LMTP(addresses["mbx1"], LMTP_PORT, timeout=60),
        }
        samples = in_turn(paths, args.warmup, count, args.size)
    for name in paths:
        report[name] = summary(samples[name])
    direct, forwarded = report["direct"], report["forwarded"]
    report["added_p50_ms"] = round(forwarded["p50_ms"] - direct["p50_ms"], 2)
    report["added_p99_ms"] = round(forwarded["p99_ms"] - direct["p99_ms"], 2)
    report["ratio_p50"] = round(forwarded["p50_ms"] / direct["p50_ms"], 2)
    report["ratio_p99"] = round(forwarded["p99_ms"] / direct["p99_ms"], 2)
    print(json.dumps({k: report[k] for k in report if k != "machine"}, indent=2))
    print(f"wrote {write_results('lmtp_forward', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
