"""A legitimate user's first login while a guesser attacks, before and after a change.

Usage (from the repository root):

    .venv/bin/python -m bench.login_under_attack [--attackers 40,60] [--samples 5]
                                                 [--baseline main] [--phase-limit 90]

For each code under test (this worktree's, and with --baseline the source tree of that
commit, extracted with `git archive` and run by the same Python), a fresh back end and
front end (`popguard serve pop3be|pop3` via bench/popguard_server.py, plain logins,
every server on a loopback address of its own) and then:

- alone: `--samples` first logins, each as a user who never logged in (so the front end
  and the back end each run one argon2id verification) from a loopback address of its
  own: connect, USER, PASS, STAT, QUIT, timed from connect to STAT's reply;
- under attack, for each N in --attackers: N connections from one loopback address
  keep sending wrong passwords for one user, each a new connection (connect, USER,
  PASS, close), as fast as the front end answers; after a 2 s ramp the same
  `--samples` first logins are timed. It reports the median and worst first-login
  latency, the ratio to the alone figure, the guesses answered per second, and the
  front end's resident memory (largest sample, every 0.2 s).

Every phase stops after --phase-limit seconds; at its end the attacking sockets are
shut down. Results go to bench/results/login_under_attack-DATE.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import poplib
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.popguard_server import Popguard
from bench.report import machine, write_results
from popguard.testing.net import free_loopback_address

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
RAMP = 2.0  # seconds of attack before the first timed login
CLIENT_TIMEOUT = 60.0  # seconds for one POP3 command of the benchmark's clients
RSS_INTERVAL = 0.2  # seconds between two looks at the front end's memory
SPARE_USERS = 24  # fresh users: one per timed login and one victim per attack


@dataclass
class Phase:
    attackers: int
    logins_ms: list[float] = field(default_factory=list)
    failed_logins: int = 0  # timed logins that did not succeed within the limit
    guesses: int = 0
    guesses_per_second: float = 0.0
    frontend_rss_mb: float = 0.0


class SourcedPOP3(poplib.POP3):
    """poplib from a chosen loopback source address, so each client is its own host."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=CLIENT_TIMEOUT)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self._source, 0))


def first_login_ms(host: str, port: int, user: str) -> float | None:
    """Milliseconds from connect to STAT's reply for one first login, or None."""
    started = time.perf_counter()
    try:
        client = SourcedPOP3(host, port, free_loopback_address(()))
        client.user(user)
        client.pass_(PASSWORD)
        client.stat()
        elapsed = (time.perf_counter() - started) * 1000.0
        client.quit()
    except (OSError, poplib.error_proto):
        return None
    return elapsed


class Attack:
    """N threads guessing from one address until stopped; each guess a new connection."""

    def __init__(self, host: str, port: int, victim: str, connections: int) -> None:
        self._host, self._port, self._victim = host, port, victim
        self._source = free_loopback_address(())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.guesses = 0
        self._threads = [threading.Thread(target=self._guess) for _ in range(connections)]

    def _guess(self) -> None:
        while not self._stop.is_set():
            try:
                client = SourcedPOP3(self._host, self._port, self._source)
            except OSError:
                continue
            with self._lock:
                self._sockets.add(client.sock)
            try:
                client.user(self._victim)
                client.pass_("not the password")
            except poplib.error_proto:
                with self._lock:
                    self.guesses += 1
            except OSError:
                pass
            finally:
                with self._lock:
                    self._sockets.discard(client.sock)
                client.close()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def watching_memory(pid: int) -> Iterator[list[float]]:
    samples: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(RSS_INTERVAL):
            with contextlib.suppress(OSError):
                samples.append(rss_mb(pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield samples
    finally:
        done.set()
        watcher.join()


def run_phase(server: Popguard, users: Iterator[str], attackers: int, args: Any) -> Phase:
    host = server.frontend_address
    assert host is not None
    port = server.frontend_ports["pop3"]
    phase = Phase(attackers)
    deadline = time.monotonic() + args.phase_limit
    attack = Attack(host, port, next(users), attackers) if attackers else None
    with watching_memory(server.frontend_pids[0]) as memory:
        started = time.monotonic()
        if attack is not None:
            attack.start()
            time.sleep(RAMP)
        for _ in range(args.samples):
            if time.monotonic() > deadline:
                break
            elapsed = first_login_ms(host, port, next(users))
            if elapsed is None:
                phase.failed_logins += 1
            else:
                phase.logins_ms.append(elapsed)
        if attack is not None:
            phase.guesses = attack.guesses
            phase.guesses_per_second = round(attack.guesses / (time.monotonic() - started), 2)
            attack.stop()
    phase.frontend_rss_mb = round(max(memory, default=0.0), 1)
    return phase


def extracted(commit: str, into: Path) -> Path:
    """A `popguard` command that runs `commit`'s source tree with this Python."""
    archive = subprocess.run(
        ["git", "archive", commit, "src"], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    command = into / "popguard"
    command.write_text(
        f'#!/bin/sh\nPYTHONPATH={into / "src"} exec {sys.executable} -m popguard "$@"\n'
    )
    command.chmod(0o755)
    return command


def measure(cli: Path, args: Any, workdir: Path) -> list[Phase]:
    users = [f"user{n:03d}@example.test" for n in range(SPARE_USERS)]
    server = Popguard(
        cli,
        free_loopback_address(),
        users,
        PASSWORD,
        [],
        workdir=workdir,
        frontend_address=free_loopback_address(),
    )
    fresh = iter(users)
    with server:
        return [run_phase(server, fresh, n, args) for n in [0, *args.attackers]]


def show(name: str, phases: list[Phase]) -> None:
    alone = statistics.median(phases[0].logins_ms) if phases[0].logins_ms else float("nan")
    print(f"\n{name}")
    print("attackers  median ms  worst ms  ratio  failed  guesses/s  front end RSS MB")
    for phase in phases:
        median = statistics.median(phase.logins_ms) if phase.logins_ms else float("nan")
        worst = max(phase.logins_ms, default=float("nan"))
        print(
            f"{phase.attackers:>9}  {median:>9.0f}  {worst:>8.0f}  {median / alone:>5.2f}"
            f"  {phase.failed_logins:>6}  {phase.guesses_per_second:>9.2f}"
            f"  {phase.frontend_rss_mb:>16.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--attackers", type=lambda s: [int(n) for n in s.split(",")], default=[40, 60]
    )
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--baseline", help="a commit to measure the same way first")
    parser.add_argument("--phase-limit", type=float, default=90.0)
    args = parser.parse_args(argv)
    if args.samples * (1 + len(args.attackers)) > SPARE_USERS - len(args.attackers):
        parser.error(f"at most {SPARE_USERS} users: fewer --samples or --attackers")
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="login-under-attack-") as scratch:
        workdir = Path(scratch)
        runs: list[tuple[str, Path]] = []
        if args.baseline:
            base = workdir / "baseline"
            base.mkdir()
            runs.append((f"baseline {args.baseline}", extracted(args.baseline, base)))
        runs.append(("this tree", REPO / ".venv" / "bin" / "popguard"))
        for name, cli in runs:
            phases = measure(cli, args, workdir)
            show(name, phases)
            report["runs"][name] = [asdict(phase) for phase in phases]
    print(f"\nresults: {write_results('login_under_attack', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
