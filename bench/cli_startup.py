"""How long one `popguard` command takes from exec to exit, beside `python3 -c pass`.

Runbook loops run a command per server per step, so start-up is what an operator
waits for. Each command runs --runs times in turn with the others (so a busy moment
of the shared machine hits every command alike); the script prints min, median and
max wall time and each command's median as a multiple of the bare interpreter's.

    .venv/bin/python -m bench.cli_startup [--runs 20] [--health]

The commands run on a data folder made for the run (one mailbox server, one
database). --health also starts that server's health service (`popguard serve
health`) and times `get-serverhealth mbx1` against it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard_output, serve, wait_until

POPGUARD = str(Path(sys.executable).parent / "popguard")
HEALTH_START_TIMEOUT = 60.0  # seconds for the health service to answer its API


def _time_once(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode().strip()}")
    return elapsed


def _health_answers(data: Path) -> bool:
    done = subprocess.run(
        [POPGUARD, "--data", str(data), "get-serverhealth", "mbx1"], capture_output=True
    )
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    parser.add_argument("--health", action="store_true", help="also time get-serverhealth")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        data = Path(temporary) / "data"
        address = free_loopback_address()
        popguard_output(data, "new-server", "mbx1", "--role", "mailbox", "--address", address)
        popguard_output(data, "new-mailboxdatabase", "DB01", "--server", "mbx1")
        commands = {
            "python3 -c pass": [sys.executable, "-c", "pass"],
            "popguard --version": [POPGUARD, "--version"],
            "popguard --help": [POPGUARD, "--help"],
            "popguard get-server": [POPGUARD, "--data", str(data), "get-server"],
        }
        health = None
        if args.health:
            health = serve(data, "health", "mbx1", Path(temporary) / "health.log")
            wait_until("the health API", lambda: _health_answers(data), HEALTH_START_TIMEOUT)
            commands["popguard get-serverhealth mbx1"] = [
                POPGUARD, "--data", str(data), "get-serverhealth", "mbx1",
            ]  # fmt: skip
        try:
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, command in commands.items():
                    times[name].append(_time_once(command))
        finally:
            if health is not None:
                health.terminate()
                health.wait(timeout=30)
    reference = statistics.median(times["python3 -c pass"])
    print(f"{args.runs} runs each, seconds of wall time")
    print(
        f"| {'command':<32} | {'min':>6} | {'median':>6} | {'max':>6} | {'median / python':>15} |"
    )
    print(f"|{'-' * 34}|{'-' * 7}:|{'-' * 7}:|{'-' * 7}:|{'-' * 16}:|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(
            f"| {name:<32} | {min(runs):6.3f} | {median:6.3f} | {max(runs):6.3f} "
            f"| {median / reference:15.1f} |"
        )


if __name__ == "__main__":
    main()
