"""Issue 18's "Done when", scaled to this machine: a flood of connections that never
log in, against a `popguard up --detach` organization, while a user logs in.

Usage (from the repository root):

    .venv/bin/python -m bench.connection_flood [--idle 2000] [--trickle 200]
                                               [--duration 90] [--addresses A,B,C]

In a fresh data folder (removed afterwards, `popguard down` however the run ends) it
opens, against cas1's plain POP3 port, loopback only:

- `--idle` connections from five source addresses (an equal share each, under
  MaxConnectionFromSingleIP) that read the greeting and say nothing; one that is
  closed (evicted, or cut at the login deadline) connects again after RECONNECT_PAUSE,
  so the flood holds the server at its MaxConnections (2,000 by default) throughout;
- `--trickle` connections from a sixth address that send one byte every
  TRICKLE_INTERVAL seconds and never a line end; each one's lifetime is recorded
  when the server closes it, then it connects again.

Meanwhile the demo mailbox logs in through cas1's TLS port every LOGIN_INTERVAL
(USER, PASS, STAT, QUIT), and `test-popconnectivity` runs once. It prints the
login latencies, how the flood's connections ended, the longest a trickling
connection stayed open, cas1's EvictedConnections, whether the `pop3` process is
the same one before and after, and the recovery actions cas1 stored during the run
(`get-recoveryactions --server cas1`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ssl
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from popguard.services.counters import read_counters
from popguard.testing.organization import DEFAULT_ADDRESSES, UpOrganization, up_organization

IDLE_SOURCES = tuple(f"127.0.60.{n}" for n in range(1, 6))  # the five addresses
TRICKLE_SOURCE = "127.0.60.6"
MAX_IDLE = 5 * 450  # under five times the default MaxConnectionFromSingleIP (500)
MAX_TRICKLE = 400
MAX_DURATION = 600.0  # seconds: the run is bounded whatever the options say
TRICKLE_INTERVAL = 10.0  # seconds between two bytes, as in the issue
RECONNECT_PAUSE = 1.0  # seconds before a closed flood connection comes back
LOGIN_INTERVAL = 2.0  # seconds between two logins of the legitimate user
LOGIN_TIMEOUT = 10.0  # seconds for one legitimate login at most
LOGIN_GOAL = 1.0  # seconds: the "a legitimate login works within a second"
CONNECT_TIMEOUT = 10.0
RAMP_BATCH = 100  # flood connections opened at once while ramping up
POP3_PORT, POP3S_PORT = 10110, 10995  # cas1's pop3 and pop3-tls ports


@dataclass
class Tally:
    """How the flood's connections ended, by the server's last line (or lack of one)."""

    opened: int = 0
    connect_errors: int = 0
    endings: collections.Counter[str] = field(default_factory=collections.Counter)
    trickle_lifetimes: list[float] = field(default_factory=list)

    def ended(self, last_line: bytes) -> None:
        text = last_line.decode(errors="replace").strip()
        for fragment, name in (
            ("has not logged in", "evicted"),
            ("login not completed", "login deadline"),
            ("command line not completed", "line deadline"),
            ("idle for too long", "idle deadline"),
            ("too many connections", "refused"),
        ):
            if fragment in text:
                self.endings[name] += 1
                return
        self.endings[f"other: {text[:60]}" if text else "closed without a line"] += 1


async def _last_line_until_closed(reader: asyncio.StreamReader) -> bytes:
    last = b""
    while line := await reader.readline():
        last = line
    return last


async def idle_client(host: str, source: str, until: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    host, POP3_PORT, local_addr=(source, 0)
                )
        except OSError:
            tally.connect_errors += 1
            await asyncio.sleep(RECONNECT_PAUSE)
            continue
        tally.opened += 1
        try:
            async with asyncio.timeout_at(until):
                tally.ended(await _last_line_until_closed(reader))
        except TimeoutError:
            pass  # still open when the run ended
        except OSError:
            tally.endings["connection error"] += 1
        finally:
            writer.close()
        await asyncio.sleep(RECONNECT_PAUSE)


async def trickle_client(host: str, until: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    host, POP3_PORT, local_addr=(TRICKLE_SOURCE, 0)
                )
        except OSError:
            tally.connect_errors += 1
            await asyncio.sleep(RECONNECT_PAUSE)
            continue
        tally.opened += 1
        opened = loop.time()
        last = b""
        try:
            while loop.time() < until:
                writer.write(b"U")
                try:
                    async with asyncio.timeout(TRICKLE_INTERVAL):
                        line = await reader.readline()
                except TimeoutError:
                    continue
                if not line:
                    tally.trickle_lifetimes.append(loop.time() - opened)
                    tally.ended(last)
                    break
                last = line
        except OSError:
            tally.endings["connection error"] += 1
        finally:
            writer.close()
        await asyncio.sleep(RECONNECT_PAUSE)


async def legitimate_logins(
    org: UpOrganization, context: ssl.SSLContext, until: float
) -> tuple[list[float], list[str]]:
    """Latencies of the demo mailbox's logins (connect to STAT), and the failures."""
    address, password = org.demo
    host = org.addresses["cas1"]
    latencies: list[float] = []
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    host, POP3S_PORT, ssl=context, server_hostname=host
                )
                try:
                    replies = [await reader.readline()]
                    for command in (f"USER {address}", f"PASS {password}", "STAT"):
                        writer.write(command.encode() + b"\r\n")
                        replies.append(await reader.readline())
                    latency = time.perf_counter() - started
                    writer.write(b"QUIT\r\n")
                    await reader.readline()
                finally:
                    writer.close()
            if all(reply.startswith(b"+OK") for reply in replies):
                latencies.append(latency)
            else:
                failures.append(next(r for r in replies if not r.startswith(b"+OK")).decode())
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            failures.append(f"{exc.__class__.__name__}: {exc}")
        await asyncio.sleep(LOGIN_INTERVAL)
    return latencies, failures


async def flood(org: UpOrganization, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host = org.addresses["cas1"]
    until = loop.time() + args.duration
    tally = Tally()
    context = ssl.create_default_context(cafile=str(org.ca_file()))
    clients = [
        idle_client(host, IDLE_SOURCES[n % len(IDLE_SOURCES)], until, tally)
        for n in range(args.idle)
    ] + [trickle_client(host, until, tally) for _ in range(args.trickle)]
    tasks = []
    for start in range(0, len(clients), RAMP_BATCH):
        tasks += [asyncio.create_task(c) for c in clients[start : start + RAMP_BATCH]]
        await asyncio.sleep(0.1)
    logins = asyncio.create_task(legitimate_logins(org, context, until))
    # Midway, Exchange's own check of the front end, as an operator would run it.
    await asyncio.sleep(min(30.0, args.duration / 2))
    connectivity = await asyncio.to_thread(
        org.cli, "test-popconnectivity", "--client-access-server", "cas1", "--format", "json"
    )
    latencies, failures = await logins
    await asyncio.gather(*tasks)
    return {
        "tally": tally,
        "latencies": latencies,
        "failures": failures,
        "connectivity": connectivity.strip(),
    }


def pop3_counters(org: UpOrganization) -> dict[str, Any]:
    return read_counters(org.data / "servers" / "cas1" / "counters" / "pop3.json") or {}


def run(args: argparse.Namespace) -> int:
    addresses = tuple(args.addresses.split(",")) if args.addresses else DEFAULT_ADDRESSES
    with up_organization(addresses, False, "popguard-flood-", lambda: args.keep) as org:
        print(f"organization up in {org.data}; waiting for every monitor to be Healthy")
        org.wait_all_healthy(300)
        actions_before = len(org.cli_json("get-recoveryactions", "--server", "cas1"))
        before = pop3_counters(org)
        print(
            f"flood: {args.idle} idle from {len(IDLE_SOURCES)} addresses, {args.trickle}"
            f" trickling one byte every {TRICKLE_INTERVAL:g} s, for {args.duration:g} s"
        )
        result = asyncio.run(flood(org, args))
        after = pop3_counters(org)
        actions = org.cli_json("get-recoveryactions", "--server", "cas1")[actions_before:]
    tally: Tally = result["tally"]
    latencies: list[float] = result["latencies"]
    print(f"flood connections opened: {tally.opened}, connect errors: {tally.connect_errors}")
    print("how the server ended them:", dict(tally.endings.most_common()))
    if tally.trickle_lifetimes:
        print(
            f"trickling connections closed: {len(tally.trickle_lifetimes)}, longest open"
            f" {max(tally.trickle_lifetimes):.1f} s"
        )
    print(
        f"cas1 pop3 EvictedConnections: "
        f"{int(after.get('EvictedConnections', 0)) - int(before.get('EvictedConnections', 0))}"
        f", RejectedConnections: "
        f"{int(after.get('RejectedConnections', 0)) - int(before.get('RejectedConnections', 0))}"
    )
    if latencies:
        print(
            f"legitimate logins: {len(latencies)} ok, {len(result['failures'])} failed;"
            f" latency median {statistics.median(latencies) * 1000:.0f} ms,"
            f" max {max(latencies) * 1000:.0f} ms,"
            f" over {LOGIN_GOAL:g} s: {sum(1 for x in latencies if x > LOGIN_GOAL)}"
        )
    for failure in result["failures"][:5]:
        print(f"  failed login: {failure.strip()}")
    print(f"test-popconnectivity: {result['connectivity'][:300]}")
    same = before.get("ProcessId") == after.get("ProcessId")
    print(f"pop3 process the same before and after: {same}")
    print(f"recovery actions on cas1 during the run: {len(actions)}")
    for action in actions:
        print(f"  {action}")
    ok = same and not actions and not result["failures"] and bool(latencies)
    return 0 if ok and max(latencies) <= LOGIN_GOAL else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--trickle", type=int, default=200)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of flood")
    parser.add_argument("--addresses", help="cas1,mbx1,mbx2 loopback addresses")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    if not (0 <= args.idle <= MAX_IDLE and 0 <= args.trickle <= MAX_TRICKLE):
        parser.error(f"at most {MAX_IDLE} idle and {MAX_TRICKLE} trickling connections")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be between 0 and {MAX_DURATION:g} seconds")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
