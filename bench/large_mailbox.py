"""A mailbox that leaves its mail on the server: one POP3 session on 50,000 messages,
popguard's back end beside Dovecot (issue 14, item 6).

    .venv/bin/python -m bench.large_mailbox [--messages 50000] [--size 2048] [--rounds 5]

As root (Dovecot is started as root), from the repository root. Two servers with one
mailbox each holding the same `--messages` messages of `--size` octets (bench.mail's,
CRLF lines), each on a loopback address of its own:

- popguard: a fresh data folder set up through the `popguard` command (mbx1, DB01, one
  mailbox, PlainTextLogin), its store filled through the store's own API before the
  service starts (MailboxDatabase.deliver_many: the same rows, UIDs and change-log
  entries a delivery writes, in one transaction instead of one fsync per message),
  then `popguard serve pop3be`;
- Dovecot (popguard.testing.dovecot, default profile: a new pop3-login and pop3
  process per connection), its maildir written directly, one file per message in
  cur/ named with S= and W= as Dovecot names the files it saves.

Each server gets one unmeasured session first (popguard's password cache and
Dovecot's index and uidlist are then warm, as for a client polling every few
minutes). Then `--rounds` rounds, the servers taking turns (which one goes first
alternates): one session each, a raw-socket client timing connect+greeting+USER/PASS,
STAT, UIDL (the whole list), LIST (the whole list) and QUIT. Server memory: the RSS of
`serve pop3be` before the session and after it, and its peak during the session (the
kernel's VmHWM, reset with /proc/PID/clear_refs before the session, read before QUIT);
for Dovecot the peak RSS (VmHWM) and the unique memory (USS) of the session's pop3 and
pop3-login processes, read before QUIT (they exist only for the session), and the RSS
of its resident processes. Server CPU per session likewise. Prints the medians and the
ratios popguard/Dovecot and writes bench/results/large_mailbox-DATE.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from bench.mail import make_message
from bench.report import machine, write_results
from popguard.paths import server_folder
from popguard.store.mailbox_database import MailboxDatabase
from popguard.testing.dovecot import Dovecot
from popguard.testing.net import SERVER_PORTS, free_loopback_address, wait_for_greeting
from popguard.testing.organization import popguard_output, serve
from popguard.testing.processes import stop_processes

USER = "keeper@popguard.test"
PASSWORD = "bench password"
SERVER, DATABASE = "mbx1", "DB01"
MAX_MESSAGES = 100_000  # a bound on one run, whatever --messages says
MAX_ROUNDS = 20
FILL_BATCH = 10_000  # messages per store transaction while filling popguard
SESSION_TIMEOUT = 120.0  # seconds for any one reply
STEPS = ("login", "stat", "uidl", "list", "quit")
KIB = 1024


def messages(count: int, size: int) -> Iterator[bytes]:
    """The same `count` messages for both servers, made as they are written."""
    for number in range(1, count + 1):
        yield make_message(f"keep{number}", size).data


# -- a POP3 client that costs little, the same for both servers ------------------------


class Pop3Error(RuntimeError):
    """The server answered -ERR, or not POP3."""


class RawPop3:
    """Plain sockets: a status line, or a multi-line answer counted, not parsed."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_connection((address, port), timeout=SESSION_TIMEOUT)
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise Pop3Error("the server closed the connection")
        self.buffer += chunk

    def status(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        if not line.startswith(b"+OK"):
            raise Pop3Error(f"server answered {line[:200]!r}")
        return line

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.status()

    def listing(self, text: str) -> tuple[int, int]:
        """A multi-line answer: its lines and octets after the status line."""
        self.command(text)
        start = 0
        while (end := self.buffer.find(b"\r\n.\r\n", start)) < 0 and not (
            self.buffer.startswith(b".\r\n")
        ):
            start = max(0, len(self.buffer) - 4)
            self._fill()
        body = 0 if end < 0 else end + 2  # an empty listing is ".\r\n" alone
        lines = self.buffer.count(b"\r\n", 0, body)
        del self.buffer[: body + 3]
        return lines, body


# -- the servers ------------------------------------------------------------------------


class Target(Protocol):
    name: str
    address: str
    port: int

    def before(self) -> dict[str, float]: ...
    def during(self) -> dict[str, float]: ...
    def after(self, before: dict[str, float]) -> dict[str, float]: ...


def _peak_rss_kib(pid: int) -> float:
    """The kernel's peak RSS of a process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return 0.0


def _reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class PopguardTarget:
    """`popguard serve pop3be` for mbx1, its store filled before it starts."""

    name = "popguard"

    def __init__(self, folder: Path, count: int, size: int) -> None:
        self.data = folder / "popguard"
        self.data.mkdir(mode=0o700)
        self.address = free_loopback_address(SERVER_PORTS)
        popguard_output(
            self.data, "new-server", SERVER, "--role", "mailbox", "--address", self.address
        )
        popguard_output(self.data, "new-mailboxdatabase", DATABASE, "--server", SERVER)
        popguard_output(
            self.data, "set-popsettings", "--server", SERVER, "--login-type", "PlainTextLogin"
        )
        popguard_output(
            self.data,
            "new-mailbox",
            USER,
            "--database",
            DATABASE,
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        info = json.loads(popguard_output(self.data, "get-server", SERVER, "--format", "json"))
        self.port = int((info[0] if isinstance(info, list) else info)["Ports"]["pop3be"])
        started = time.perf_counter()
        store = MailboxDatabase(
            server_folder(self.data, SERVER).database_copy_file(DATABASE), DATABASE
        )
        try:
            source = messages(count, size)
            for _ in range(0, count, FILL_BATCH):
                store.deliver_many(USER, itertools.islice(source, FILL_BATCH))
        finally:
            store.close()
        self.fill_seconds = time.perf_counter() - started
        self.store_bytes = sum(
            path.stat().st_size
            for path in server_folder(self.data, SERVER)
            .database_copy_file(DATABASE)
            .parent.iterdir()
        )
        self.process = serve(self.data, "pop3be", SERVER, self.data / "pop3be.log")
        wait_for_greeting(self.address, self.port, timeout=60)
        self.ps = psutil.Process(self.process.pid)

    def stop(self) -> None:
        stop_processes([self.process])

    def _rss_kib(self) -> float:
        # pop3be has no worker processes today; any it had would be counted too.
        tree = [self.ps, *self.ps.children(recursive=True)]
        return sum(p.memory_info().rss for p in tree) / KIB

    def before(self) -> dict[str, float]:
        _reset_peak(self.ps.pid)
        return {"rss_before_kib": self._rss_kib(), "cpu": _cpu(self.ps)}

    def during(self) -> dict[str, float]:
        return {"peak_rss_kib": _peak_rss_kib(self.ps.pid)}

    def after(self, before: dict[str, float]) -> dict[str, float]:
        return {"rss_after_kib": self._rss_kib(), "cpu_ms": 1000 * (_cpu(self.ps) - before["cpu"])}


class DovecotTarget:
    """A private Dovecot (default profile) with the same messages in its maildir."""

    name = "dovecot"

    def __init__(self, folder: Path, count: int, size: int, stack: contextlib.ExitStack) -> None:
        self.dovecot = stack.enter_context(
            Dovecot("default", free_loopback_address(()), [USER], PASSWORD, [], workdir=folder)
        )
        started = time.perf_counter()
        self.dovecot.fill(USER, messages(count, size), sizes_in_names=True)
        self.fill_seconds = time.perf_counter() - started
        self.address, self.port = self.dovecot.address, self.dovecot.port
        self.master = psutil.Process(self.dovecot.pids[0])
        self.residents: set[int] = set()

    def _tree(self) -> list[psutil.Process]:
        return [self.master, *self.master.children(recursive=True)]

    def _session(self) -> list[psutil.Process]:
        """The processes that serve this session: made for it, gone after it."""
        return [p for p in self._tree() if p.pid not in self.residents]

    def before(self) -> dict[str, float]:
        tree = self._tree()
        self.residents = {p.pid for p in tree}
        return {"rss_before_kib": sum(p.memory_info().rss for p in tree) / KIB}

    def during(self) -> dict[str, float]:
        session = self._session()
        names = sorted(p.name() for p in session)
        if "pop3" not in names:
            raise RuntimeError(f"no Dovecot pop3 process for the session (new: {names})")
        pop3 = [p for p in session if p.name() == "pop3"]
        return {
            "peak_rss_kib": sum(_peak_rss_kib(p.pid) for p in session),
            "pop3_peak_rss_kib": sum(_peak_rss_kib(p.pid) for p in pop3),
            "session_uss_kib": sum(p.memory_full_info().uss for p in session) / KIB,
            "pop3_uss_kib": sum(p.memory_full_info().uss for p in pop3) / KIB,
            "cpu_ms": 1000 * sum(_cpu(p) for p in session),
        }

    def after(self, before: dict[str, float]) -> dict[str, float]:
        return {"rss_after_kib": sum(p.memory_info().rss for p in self._tree()) / KIB}


# -- one session ---------------------------------------------------------------------------


@dataclass
class Session:
    target: str
    round: int
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    stat: str = ""
    uidl_lines: int = 0
    uidl_octets: int = 0
    list_lines: int = 0
    list_octets: int = 0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def session(target: Target, number: int) -> Session:
    """Log in, STAT, UIDL, LIST, QUIT; each step timed, the server's memory around it."""
    result = Session(target.name, number)
    memory = target.before()
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[step] = now - clock
        clock = now

    client = RawPop3(target.address, target.port)
    try:
        client.status()
        client.command(f"USER {USER}")
        client.command(f"PASS {PASSWORD}")
        lap("login")
        result.stat = client.command("STAT").decode().strip()
        lap("stat")
        result.uidl_lines, result.uidl_octets = client.listing("UIDL")
        lap("uidl")
        result.list_lines, result.list_octets = client.listing("LIST")
        lap("list")
        during = target.during()  # before QUIT: Dovecot's session processes still live
        clock = time.perf_counter()
        client.command("QUIT")
        lap("quit")
    finally:
        client.close()
    time.sleep(0.2)  # let the server finish the session (Dovecot's processes exit)
    result.memory = {**memory, **during, **target.after(memory)}
    result.memory.pop("cpu", None)
    return result


def check(result: Session, count: int, size: int) -> list[str]:
    """What a session got wrong: every server must show every message, in full."""
    problems = []
    if result.stat.split()[1:3] != [str(count), str(count * size)]:
        problems.append(f"{result.target} STAT said {result.stat!r}, not {count} {count * size}")
    for what, lines in (("UIDL", result.uidl_lines), ("LIST", result.list_lines)):
        if lines != count:
            problems.append(f"{result.target} {what} listed {lines} messages, not {count}")
    return problems


# -- the report -----------------------------------------------------------------------------


def medians(sessions: list[Session]) -> dict[str, float]:
    out = {
        f"{step}_ms": 1000 * statistics.median(s.seconds[step] for s in sessions) for step in STEPS
    }
    out["total_ms"] = 1000 * statistics.median(s.total for s in sessions)
    for key in sessions[0].memory:
        out[key] = statistics.median(s.memory[key] for s in sessions)
    return {k: round(v, 2) for k, v in out.items()}


def table(report: dict[str, Any]) -> str:
    pg, dc = report["popguard"], report["dovecot"]
    rows = [
        *((f"{step} ms", f"{step}_ms") for step in (*STEPS, "total")),
        ("server CPU ms", "cpu_ms"),
    ]
    lines = [
        f"{'median of ' + str(report['rounds']) + ' sessions':28} {'popguard':>10} "
        f"{'Dovecot':>10} {'ratio':>7}"
    ]
    for label, key in rows:
        ratio = pg[key] / dc[key] if dc[key] else float("nan")
        lines.append(f"{label:28} {pg[key]:10.1f} {dc[key]:10.1f} {ratio:7.2f}")
    lines.append("server memory, MiB:")
    mib = 1 / KIB
    lines.append(
        f"  popguard pop3be RSS before {pg['rss_before_kib'] * mib:.1f}, peak during "
        f"{pg['peak_rss_kib'] * mib:.1f} (+{pg['added_peak_kib'] * mib:.1f}), after "
        f"{pg['rss_after_kib'] * mib:.1f}"
    )
    lines.append(
        f"  Dovecot resident processes RSS {dc['rss_before_kib'] * mib:.1f}; the "
        f"session's pop3 peak RSS {dc['pop3_peak_rss_kib'] * mib:.1f} (unique "
        f"{dc['pop3_uss_kib'] * mib:.1f}), pop3+pop3-login peak "
        f"{dc['peak_rss_kib'] * mib:.1f} (unique {dc['session_uss_kib'] * mib:.1f})"
    )
    lines.append(
        f"  added by a session: popguard {pg['added_peak_kib'] * mib:.1f}, Dovecot "
        f"{dc['session_uss_kib'] * mib:.1f} (unique) -> ratio "
        f"{pg['added_peak_kib'] / max(dc['session_uss_kib'], 1):.2f}"
    )
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind, so the servers are stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help=f"at most {MAX_MESSAGES}")
    parser.add_argument("--size", type=int, default=2048, help="octets per message")
    parser.add_argument(
        "--rounds", type=int, default=5, help=f"sessions each, at most {MAX_ROUNDS}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data folders")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("Dovecot is started as root: run this as root.", file=sys.stderr)
        return 2
    count = max(1, min(args.messages, MAX_MESSAGES))
    rounds = max(1, min(args.rounds, MAX_ROUNDS))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ran_on = machine()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": ran_on["commit"],
        "machine": ran_on,
        "messages": count,
        "size": args.size,
        "rounds": rounds,
    }
    folder = Path(tempfile.mkdtemp(prefix="popguard-bench-large-"))
    folder.chmod(0o755)  # Dovecot's unprivileged processes reach their folder through it
    popguard: PopguardTarget | None = None
    sessions: list[Session] = []
    problems: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            print(f"filling both mailboxes with {count} messages of {args.size} octets", flush=True)
            popguard = PopguardTarget(folder, count, args.size)
            dovecot = DovecotTarget(folder, count, args.size, stack)
            report["fill_seconds"] = {
                "popguard": round(popguard.fill_seconds, 2),
                "dovecot": round(dovecot.fill_seconds, 2),
            }
            report["popguard_store_bytes"] = popguard.store_bytes
            targets: list[Target] = [popguard, dovecot]
            report["idle_rss_kib"] = {  # before any session: what the warm-up adds stays
                target.name: round(target.before()["rss_before_kib"], 1) for target in targets
            }
            for target in targets:  # unmeasured: warm caches, index and uidlist
                problems += check(session(target, 0), count, args.size)
            for number in range(1, rounds + 1):
                for target in targets if number % 2 else targets[::-1]:
                    result = session(target, number)
                    problems += check(result, count, args.size)
                    sessions.append(result)
                    steps = ", ".join(f"{k} {1000 * v:.1f}" for k, v in result.seconds.items())
                    print(
                        f"  round {number} {target.name:8}: total {1000 * result.total:7.1f} "
                        f"ms ({steps}); peak RSS {result.memory['peak_rss_kib'] / KIB:.1f} MiB",
                        flush=True,
                    )
    finally:
        if popguard is not None:
            popguard.stop()
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    for name in ("popguard", "dovecot"):
        report[name] = medians([s for s in sessions if s.target == name])
    pg = report["popguard"]
    pg["added_peak_kib"] = round(pg["peak_rss_kib"] - pg["rss_before_kib"], 2)
    report["ratio_total"] = round(pg["total_ms"] / report["dovecot"]["total_ms"], 2)
    report["sessions"] = [{**asdict(s), "total": s.total} for s in sessions]
    report["problems"] = problems
    print(table(report))
    idle = report["idle_rss_kib"]
    print(f"  before any session: popguard pop3be {idle['popguard'] / KIB:.1f} MiB, Dovecot's "
          f"resident processes {idle['dovecot'] / KIB:.1f} MiB")  # fmt: skip
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"wrote {write_results('large_mailbox', report)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
