"""Benchmark popguard's POP3 back end against Dovecot, in one run on one machine.

Usage (from the repository root, as root because Dovecot is started as root):

    .venv/bin/python -m bench.pop3_backend [--duration 5] [--clients 1,16,64]
                                           [--only dovecot|popguard]

The same load generator (popguard.testing.loadgen) measures, one after the other:

- Dovecot (dovecot-pop3d) in its default configuration,
- Dovecot in its high-performance configuration,
- popguard's back end (`popguard serve pop3be`),

each on a loopback address of its own, with the same users, password and mail:
logins per second (connect, USER/PASS, STAT, QUIT) and RETR throughput of 1 MiB
messages in MB/s (10**6 bytes), at each concurrency. It prints every figure, the
ratios popguard/Dovecot, and how busy the load generator, the server and the whole
machine were, then writes a JSON file and a Markdown snippet to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.cpu import machine_sample, trees_cpu
from bench.mail import BIG_COUNT, BIG_SIZE, SMALL_COUNT, standard_messages, user_names
from bench.popguard_server import Popguard, PopguardError
from bench.preflight import check_server, cold_login_cost, prime_logins
from popguard.testing.dovecot import Dovecot
from popguard.testing.loadgen import LoadConfig, LoadResult, Mode, resolve_loop, run_load

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MODES: tuple[Mode, ...] = ("logins", "retr")
TARGETS = ("dovecot-default", "dovecot-highperf", "popguard")
SATURATED = 0.9  # a worker above this share of one core may be holding the run back
QUIET = 0.2  # busy cores below which the machine counts as idle before a run
CHECK_GAIN = 0.15  # a figure this much higher with more generator means it was limiting
NOISY = 0.3  # cores busy with neither generator nor server: something else was running


class Server(Protocol):
    """What the benchmark needs from a running server."""

    address: str

    @property
    def port(self) -> int: ...

    @property
    def tls_port(self) -> int: ...  # implicit TLS (POP3S); 0 if there is none

    @property
    def ca_file(self) -> Path | None: ...  # what the client verifies the TLS port with

    @property
    def pids(self) -> list[int]: ...


@dataclass
class Run:
    """One measurement: one target, one mode, one concurrency."""

    target: str
    mode: Mode
    clients: int
    ops_per_s: float
    mb_per_s: float
    ops: int
    errors: int
    error_samples: list[str]
    window: float
    gen_cores: float
    gen_max_worker_share: float
    gen_workers: int
    gen_children_cpu: float
    gen_sys_share: float
    loop: str
    bytes_per_read: float
    server_cores: float
    machine_busy_cores: float
    background_before: float = 0.0  # busy cores on the machine just before the run
    repetition: int = 1

    @property
    def other_cores(self) -> float:
        """Busy cores charged to neither side: kernel softirq work, this script, and
        any other program on the machine (a high value means a noisy machine)."""
        return max(0.0, self.machine_busy_cores - self.gen_cores - self.server_cores)

    @property
    def value(self) -> float:
        """The headline figure of the mode: logins/s or MB/s."""
        return self.ops_per_s if self.mode == "logins" else self.mb_per_s


@dataclass
class Report:
    started: str
    machine: dict[str, Any]
    options: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Re-runs with twice the generator processes: (base run, re-run) pairs.
    checks: list[tuple[Run, Run]] = field(default_factory=list)

    def find(self, target: str, mode: Mode, clients: int) -> Run | None:
        """The best of the repetitions of one figure (the least disturbed one)."""
        runs = [r for r in self.runs if (r.target, r.mode, r.clients) == (target, mode, clients)]
        return max(runs, key=lambda r: r.value, default=None)


def _cmd(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info() -> dict[str, Any]:
    """Date, CPU model, core count and memory, as the Markdown snippet states them."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    meminfo = {
        line.split(":")[0]: int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.split(":")[0] in ("MemTotal", "MemAvailable")
    }
    return {
        "date": _cmd("date"),
        "cpu": model,
        "nproc": int(_cmd("nproc") or os.cpu_count() or 0),
        "mem_total_mib": meminfo.get("MemTotal", 0) // 1024,
        "mem_available_mib": meminfo.get("MemAvailable", 0) // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": _cmd("dovecot", "--version"),
        "popguard": _cmd(str(REPO / ".venv" / "bin" / "popguard"), "--version"),
    }


def wait_quiet(limit: float, sample: float = 0.5) -> float:
    """Wait (at most `limit` seconds) until the machine is nearly idle; return how
    many cores were busy in the last sample. Other programs on a shared machine
    would otherwise take cores from whichever server happens to be measured."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_sample()
        time.sleep(sample)
        busy = (machine_sample().busy - before.busy) / sample
        if busy < QUIET or time.monotonic() >= deadline:
            return busy


def _probe(server: Server) -> Callable[[], dict[str, float]]:
    def probe() -> dict[str, float]:
        sample = machine_sample()
        return {"machine_busy": sample.busy, "server_cpu": trees_cpu(server.pids)}

    return probe


def measure(
    target: str,
    server: Server,
    mode: Mode,
    clients: int,
    args: argparse.Namespace,
    users: tuple[str, ...],
    workers: int | None = None,
    probe: Callable[[], dict[str, float]] | None = None,
) -> Run:
    """One figure: one mode at one concurrency against one running server.

    `probe` replaces the default CPU probe (machine and server); it must return at
    least the keys `machine_busy` and `server_cpu` (cumulative CPU seconds).
    """
    port, ca = server.port, None
    if args.tls:
        if not server.tls_port or server.ca_file is None:
            raise RuntimeError(f"{target} has no TLS port or no CA file to verify it with")
        port, ca = server.tls_port, str(server.ca_file)
    cfg = LoadConfig(
        host=server.address,
        port=port,
        mode=mode,
        clients=clients,
        users=users,
        password=args.password,
        duration=args.duration,
        warmup=args.warmup,
        max_ops=args.max_ops,
        loop=args.loop,
        workers=args.workers if workers is None else workers,
        tls_ca=ca,
    )
    res: LoadResult = run_load(cfg, probe or _probe(server))
    window = max(res.window, 1e-9)
    run = Run(
        target=target,
        mode=mode,
        clients=clients,
        ops_per_s=res.ops_per_s,
        mb_per_s=res.mb_per_s,
        ops=res.ops,
        errors=res.errors,
        error_samples=res.error_samples,
        window=res.window,
        gen_cores=res.gen_cores,
        gen_max_worker_share=res.gen_max_worker_share,
        gen_workers=len(res.workers),
        gen_children_cpu=res.gen_children_cpu,
        gen_sys_share=res.gen_sys_share,
        loop=cfg.loop,
        bytes_per_read=res.bytes_per_read,
        server_cores=res.probes.get("server_cpu", 0.0) / window,
        machine_busy_cores=res.probes.get("machine_busy", 0.0) / window,
    )
    unit = (
        f"{run.ops_per_s:8.1f} logins/s"
        if mode == "logins"
        else (f"{run.mb_per_s:8.1f} MB/s     ({run.bytes_per_read / 1024:4.0f} KiB/read)")
    )
    print(
        f"  {target:17} {mode:6} {clients:3} clients: {unit}  errors {run.errors:<4} "
        f"generator {run.gen_cores:.2f} cores (busiest worker "
        f"{100 * run.gen_max_worker_share:3.0f}%)  server {run.server_cores:.2f} "
        f"cores  machine {run.machine_busy_cores:.2f} cores (other {run.other_cores:.2f})",
        flush=True,
    )
    for sample in run.error_samples:
        print(f"      error: {sample}", flush=True)
    return run


def start_target(
    target: str, args: argparse.Namespace, users: tuple[str, ...], stack: contextlib.ExitStack
) -> Server:
    """Start one server; `stack` stops it at the end, whatever happens."""
    messages = standard_messages()
    octet = random.randint(2, 250)
    if target.startswith("dovecot-"):
        profile = target.removeprefix("dovecot-")
        # Each Dovecot gets its own third octet too, so two never share an address.
        third = 4 + TARGETS.index(target)
        return stack.enter_context(
            Dovecot(
                profile,
                f"127.0.{third}.{octet}",
                users,
                args.password,
                [message.data for message in messages],
                scheme=args.dovecot_scheme,
                tls=args.tls,
            )
        )
    return stack.enter_context(
        Popguard(args.popguard_bin, f"127.0.2.{octet}", users, args.password, messages)
    )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _value(run: Run | None) -> float | None:
    return None if run is None else run.value


def _ratio(a: Run | None, b: Run | None) -> str:
    if a is None or b is None or b.value == 0:
        return "-"
    return f"{a.value / b.value:.2f}"


def tables(report: Report, clients: list[int]) -> str:
    """The figures and ratios as Markdown tables (printed as they are, too)."""
    out: list[str] = []
    titles = {
        "logins": "Logins per second (connect, USER/PASS, STAT, QUIT)",
        "retr": "RETR throughput, MB/s (1 MiB messages)",
    }
    for mode in MODES:
        out.append(f"**{titles[mode]}**\n")
        out.append(
            "| clients | Dovecot default | Dovecot high-perf | popguard "
            "| popguard / default | popguard / high-perf |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|")
        for c in clients:
            dd = report.find("dovecot-default", mode, c)
            dh = report.find("dovecot-highperf", mode, c)
            pg = report.find("popguard", mode, c)
            out.append(
                f"| {c} | {_fmt(_value(dd))} | {_fmt(_value(dh))} | "
                f"{_fmt(_value(pg))} | {_ratio(pg, dd)} | {_ratio(pg, dh)} |"
            )
        out.append("")
    nproc = report.machine["nproc"]
    out.append(
        f"**CPU during each measured window** (cores busy, of {nproc}; "
        "generator = all load-generator workers, with the part spent in the kernel; "
        "busiest = its busiest worker as a share of one core; server = the "
        "server's whole process tree; other = busy cores charged to neither: "
        "kernel network work, this script, anything else running; idle before = "
        "idle cores just before the run)\n"
    )
    out.append(
        "| target | mode | clients | rep | errors | generator cores (kernel part) "
        "| busiest worker | server cores | machine cores | other | idle before |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in report.runs:
        out.append(
            f"| {run.target} | {run.mode} | {run.clients} | {run.repetition} | {run.errors} | "
            f"{run.gen_cores:.2f} ({100 * run.gen_sys_share:.0f}%) | "
            f"{100 * run.gen_max_worker_share:.0f}% | {run.server_cores:.2f} | "
            f"{run.machine_busy_cores:.2f} | {run.other_cores:.2f} | "
            f"{nproc - run.background_before:.2f} |"
        )
    out.append("")
    return "\n".join(out)


def generator_verdict(report: Report) -> str:
    """Whether the load generator could have been the bottleneck, and how we know."""
    if not report.runs:
        return "No run completed."
    busiest = max(report.runs, key=lambda r: r.gen_max_worker_share)
    most = max(report.runs, key=lambda r: r.gen_cores)
    nproc = report.machine["nproc"]
    saturated = [r for r in report.runs if r.gen_max_worker_share >= SATURATED]
    noisy = [r for r in report.runs if r.other_cores > NOISY]
    logins = [r for r in report.runs if r.mode == "logins" and r.ops_per_s > 0]
    retr = [r for r in report.runs if r.mode == "retr" and r.mb_per_s > 0]
    lines = [
        f"Load generator ({busiest.loop} event loop, up to "
        f"{max(r.gen_workers for r in report.runs)} worker process(es)): its busiest "
        "worker used at most "
        f"{100 * busiest.gen_max_worker_share:.0f}% of a core ({busiest.target} "
        f"{busiest.mode}, {busiest.clients} clients); all workers together at most "
        f"{most.gen_cores:.2f} of {nproc} cores ({most.target} {most.mode}, "
        f"{most.clients} clients)."
    ]
    costs = []
    if logins:
        costs.append(
            f"{max(r.gen_cores / r.ops_per_s for r in logins) * 1e6:.0f} CPU-us per login cycle"
        )
    if retr:
        costs.append(f"{max(r.gen_cores / r.mb_per_s for r in retr) * 1e3:.2f} CPU-ms per MB read")
    if costs:
        kernel = sum(r.gen_cores * r.gen_sys_share for r in report.runs) / max(
            sum(r.gen_cores for r in report.runs), 1e-9
        )
        lines.append(
            f"It cost at most {' and '.join(costs)}, {100 * kernel:.0f}% of it "
            "in the kernel (loopback TCP, which any client pays)."
        )
    if saturated:
        names = ", ".join(f"{r.target} {r.mode} {r.clients}" for r in saturated)
        lines.append(
            f"A worker was above {100 * SATURATED:.0f}% of a core in: {names}; "
            "those figures may be limited by the generator."
        )
    else:
        lines.append(
            f"No worker reached {100 * SATURATED:.0f}% of a core: every worker spent "
            "part of the window waiting for the server. A worker well below a "
            "full core can still add latency when several of its connections "
            "are busy at once, hence the cross-check below."
        )
    lines.append(
        "It does share the machine with the server: where 'machine cores' is close to "
        f"{nproc}, the cores the generator used were not available to the server."
    )
    per_mb = {
        t: sum(r.gen_cores for r in rs) / sum(r.mb_per_s for r in rs) * 1e3
        for t in dict.fromkeys(r.target for r in retr)
        if (rs := [r for r in retr if r.target == t])
    }
    if per_mb:
        lines.append(
            "Generator CPU per MB read: "
            + ", ".join(f"{t} {v:.2f} ms" for t, v in per_mb.items())
            + "."
        )
        if max(per_mb.values()) > 1.5 * min(per_mb.values()):
            lines.append(
                "The difference is kernel time: on loopback, data that a server hands "
                "to the kernel in large writes is pushed through TCP when the reader's "
                "ACKs open the window, i.e. inside the reader's system calls, so part "
                "of that server's sending cost is charged to the generator (see the "
                "kernel part and the KiB per read of each run)."
            )
    for base, more in report.checks:
        change = more.value / base.value - 1 if base.value else 0.0
        lines.append(
            f"Cross-check: {base.target} {base.mode} with {base.clients} clients gave "
            f"{base.value:,.1f} with {base.gen_workers} generator process(es) and "
            f"{more.value:,.1f} ({100 * change:+.0f}%) with {more.gen_workers}"
            + (
                ": more generator capacity did not raise the figure."
                if change < CHECK_GAIN
                else ": the figure rose with more generator capacity, so the generator may "
                "have limited it."
            )
        )
    if noisy:
        names = ", ".join(f"{r.target} {r.mode} {r.clients}" for r in noisy)
        lines.append(
            f"Other work took more than {NOISY:.2f} cores during: {names}; "
            "those figures may be low because of it."
        )
    return " ".join(lines)


def check_generator(
    report: Report,
    servers: Mapping[str, Server],
    args: argparse.Namespace,
    users: tuple[str, ...],
    before: Callable[[str], object] | None = None,
) -> None:
    """Measure again, with twice the generator processes, the figure of each mode in
    which the generator's busiest worker was busiest. Were the generator the limit,
    more of it would raise the figure; if the figure stays, the server sets the pace.
    `before`, if given, is called with the target's name before it is measured."""
    for mode in MODES:
        best = [
            r
            for t in servers
            for c in args.clients
            if (r := report.find(t, mode, c)) is not None and c >= 2 * r.gen_workers
        ]
        if not best:
            continue
        base = max(best, key=lambda r: r.gen_max_worker_share)
        if before is not None:
            before(base.target)
        wait_quiet(args.quiet_wait)
        print(
            f"generator cross-check: {base.target} {mode} {base.clients} clients with "
            f"{2 * base.gen_workers} generator processes",
            flush=True,
        )
        try:
            more = measure(
                base.target,
                servers[base.target],
                mode,
                base.clients,
                args,
                users,
                workers=2 * base.gen_workers,
            )
        except RuntimeError as exc:
            report.notes.append(f"generator cross-check failed: {exc}")
            continue
        report.checks.append((base, more))
        time.sleep(args.pause)


def markdown(report: Report, clients: list[int], command: str) -> str:
    m = report.machine
    lines = [
        f"### POP3 back end: popguard vs Dovecot ({m['date']})",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['mem_total_mib']} MiB RAM "
        f"({m['mem_available_mib']} MiB available), Linux {m['kernel']}, "
        f"Python {m['python']}, Dovecot {m['dovecot']}.",
        f"Command: `{command.strip()}` (as root, from the repository root).",
        f"Dovecot default: stock service settings (a new pop3-login and a new pop3 process "
        f"for every connection). Dovecot high-perf: pop3-login service_count = 0, "
        f"process_min_avail = {m['nproc']}, vsz_limit = 1G; pop3 service_count = 1000, "
        f"process_min_avail = {m['nproc']}; mail_max_userip_connections = 100. "
        f"popguard: {m.get('popguard', '?')}, `popguard serve pop3be`.",
        f"Mail: each of {report.options['users']} users has {BIG_COUNT} messages of "
        f"1 MiB and {SMALL_COUNT} small ones; one password for all "
        f"(Dovecot passwd-file scheme {report.options['dovecot_scheme']}). "
        f"Each figure: {report.options['warmup']:g} s warm-up, then "
        f"{report.options['duration']:g} s measured"
        + (f", best of {report.options['repeat']} runs" if report.options["repeat"] > 1 else "")
        + "; the servers take turns for each figure. MB = 10^6 bytes. "
        + (
            "Connections use implicit TLS (POP3S)."
            if report.options["tls"]
            else "Plain TCP on loopback, no TLS."
        ),
        "",
        tables(report, clients),
        generator_verdict(report),
        "",
    ]
    return "\n".join(lines + notes_markdown(report))


def notes_markdown(report: Report) -> list[str]:
    """The Markdown report's last lines: the notes, and what was not measured."""
    lines = [*(f"- {n}" for n in report.notes), ""] if report.notes else []
    if report.failures:
        lines.append("Not measured:")
        lines += [f"- {t}: {msg.splitlines()[0]}" for t, msg in report.failures.items()]
        lines.append("")
    return lines


def base_parser(description: str, tls_help: str) -> argparse.ArgumentParser:
    """The options every server benchmark here shares (bench.pop3_proxy uses them too)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per figure")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated concurrencies")
    parser.add_argument("--only", choices=["dovecot", "popguard"])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--password", default="benchpass")
    parser.add_argument(
        "--max-ops",
        type=int,
        default=1_000_000,
        help="stop a measurement after this many operations",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="load generator processes (0: by mode: logins one per two cores, RETR one per core)",
    )
    parser.add_argument(
        "--dovecot-scheme",
        default="PLAIN",
        help="passwd-file scheme for Dovecot: PLAIN, SHA512-CRYPT, ARGON2ID...",
    )
    parser.add_argument("--popguard-bin", type=Path, default=REPO / ".venv" / "bin" / "popguard")
    parser.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="load generator event loop (auto: uvloop if installed)",
    )
    parser.add_argument("--tls", action="store_true", help=tls_help)
    parser.add_argument(
        "--repeat", type=int, default=1, help="take every figure this many times and keep the best"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="wait up to this many seconds for an idle machine before each figure (0: do not wait)",
    )
    parser.add_argument(
        "--no-generator-check",
        dest="generator_check",
        action="store_false",
        help="skip re-measuring with twice the generator processes",
    )
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between figures")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate and normalise the options of base_parser (parser.error exits)."""
    args.loop = resolve_loop(args.loop)
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients needs positive numbers")
    if args.users < max(args.clients):
        # popguard holds a POP3 mailbox lock: two sessions of one user cannot both
        # RETR, so every client needs a user of its own.
        parser.error(f"--users ({args.users}) must be at least the largest --clients")
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be between 1 and 10")
    if args.duration <= 0 or args.duration > 600:
        parser.error("--duration must be in (0, 600] seconds")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(
        __doc__.split("\n\n")[0],
        "implicit TLS: Dovecot with a self-signed certificate, popguard's "
        "pop3be-tls port verified with DATA/tls/ca.pem",
    )
    return check_args(parser, parser.parse_args(argv))


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Python dies on SIGTERM without unwinding; raising instead lets the ExitStack
    # stop the servers we started (e.g. when run under `timeout`).
    raise SystemExit(128 + signum)


def prepare_run(args: argparse.Namespace) -> bool:
    """Stop cleanly on SIGTERM; False (after saying why) when Dovecot cannot start."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if os.geteuid() != 0 and args.only != "popguard":
        print(
            "Dovecot is started as root: run this as root (or with --only popguard).",
            file=sys.stderr,
        )
        return False
    return True


def run_options(args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    """The options a report records, those of both benchmarks first."""
    return {
        "duration": args.duration,
        "warmup": args.warmup,
        "clients": args.clients,
        "users": args.users,
        "max_ops": args.max_ops,
        "workers": args.workers,
        "dovecot_scheme": args.dovecot_scheme,
        "message_size": BIG_SIZE,
        "loop": args.loop,
        "tls": args.tls,
        "repeat": args.repeat,
        **more,
    }


def start_run(module: str, report: Report, argv: list[str] | None, what: str) -> str:
    """Say what runs where; the command line, for the Markdown report."""
    print(
        f"{report.machine['date']}: {report.machine['cpu']}, {report.machine['nproc']} "
        f"cores; {what}",
        flush=True,
    )
    return f".venv/bin/python -m bench.{module} " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )


def preflight(
    report: Report,
    name: str,
    endpoint: tuple[str, int, str | None],
    args: argparse.Namespace,
    users: tuple[str, ...],
    prime: Callable[[], list[str]],
) -> list[str]:
    """A wrong password is refused, STAT counts the mail, RETR returns the body intact;
    then prime() logs every user in. The problems, noted in the report."""
    address, port, ca = endpoint
    try:
        problems = check_server(address, port, users[0], args.password, standard_messages(), ca)
    except OSError as exc:
        problems = [f"could not talk to the server: {exc!r}"]
    if not problems:
        problems = prime()
    for problem in problems:
        report.notes.append(f"{name} preflight: {problem}")
        print(f"{name}: PREFLIGHT PROBLEM: {problem}", file=sys.stderr, flush=True)
    return problems


def run_figures(
    report: Report,
    args: argparse.Namespace,
    targets: list[str],
    measure_one: Callable[[str, Mode, int], Run],
    before: Callable[[str], list[str]] = lambda _target: [],
) -> None:
    """Every figure `--repeat` times, the targets taking turns for each; `before` runs
    ahead of each figure and returns what to note."""
    figures = [(m, c, t) for m in MODES for c in args.clients for t in targets]
    for rep in range(args.repeat):
        if args.repeat > 1:
            print(f"repetition {rep + 1} of {args.repeat}", flush=True)
        for mode, clients, target in figures:
            for problem in before(target):
                report.notes.append(f"{target} re-priming: {problem}")
            background = wait_quiet(args.quiet_wait)
            try:
                run = measure_one(target, mode, clients)
            except RuntimeError as exc:
                report.failures[f"{target} {mode} {clients}"] = str(exc)
                print(f"{target}: FAILED: {exc}", file=sys.stderr, flush=True)
            else:
                run.background_before = background
                run.repetition = rep + 1
                report.runs.append(run)
            time.sleep(args.pause)  # let the server settle (TIME_WAIT, processes)


def write_report(report: Report, stem: Path, markdown_text: str, **more: Any) -> None:
    """STEM.json (every figure and note) and STEM.md (for BENCHMARKS.md)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "started": report.started,
        "machine": report.machine,
        "options": report.options,
        "runs": [{**vars(r), "value": r.value} for r in report.runs],
        **more,
        "failures": report.failures,
        "notes": report.notes,
        "generator_verdict": generator_verdict(report),
        "generator_checks": [{"base": vars(b), "more_workers": vars(m)} for b, m in report.checks],
    }
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown_text)
    print(f"\nwrote {stem}.json and {stem}.md (Markdown for BENCHMARKS.md)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not prepare_run(args):
        return 2
    users = tuple(user_names(args.users))
    targets = [t for t in TARGETS if args.only is None or t.startswith(args.only)]
    report = Report(
        started=dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        machine=machine_info(),
        options=run_options(args, targets=targets),
    )
    if args.dovecot_scheme.upper() == "PLAIN" and "popguard" in targets:
        report.notes.append(
            "Dovecot compares a plaintext password from its passwd-file; popguard "
            "stores only argon2id hashes and, after a user's first login, checks "
            "the password against its authentication cache (a keyed digest)."
        )
    what = f"targets {', '.join(targets)}; clients {args.clients}"
    command = start_run("pop3_backend", report, argv, what)
    with contextlib.ExitStack() as stack:
        # All servers run side by side (an idle one costs nothing) and each figure is
        # taken from each server in turn: if something else loads the machine for a
        # while, it hits all of them alike instead of skewing one server's figures.
        servers: dict[str, Server] = {}
        for target in targets:
            print(f"{target}: starting", flush=True)
            started = time.monotonic()
            try:
                servers[target] = start_target(target, args, users, stack)
            except (PopguardError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                report.failures[target] = str(exc)
                print(f"{target}: FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            server = servers[target]
            if isinstance(server, Popguard) and server.delivery_note != "LMTP":
                report.notes.append(f"popguard mail delivery: {server.delivery_note}")
            print(
                f"{target}: on {server.address}:{server.port} "
                f"(ready in {time.monotonic() - started:.1f}s)",
                flush=True,
            )
            tls = args.tls and server.ca_file is not None
            port = server.tls_port if tls else server.port
            ca = str(server.ca_file) if tls else None
            preflight(
                report,
                target,
                (server.address, port, ca),
                args,
                users,
                functools.partial(prime_logins, server.address, port, users, args.password, ca),
            )
        if "popguard" in servers:
            report.notes.append(
                "Before measuring, every user logged in once on every server (steady state: "
                "users poll every few minutes). popguard then answers from its 5-minute "
                "authentication cache; a user's first login in 5 minutes costs one argon2id "
                f"verification, {cold_login_cost():.0f} ms of CPU here."
            )
        run_figures(
            report,
            args,
            list(servers),
            lambda t, mode, clients: measure(t, servers[t], mode, clients, args, users),
        )
        if args.generator_check:
            check_generator(report, servers, args, users)
        print("stopping servers", flush=True)

    text = tables(report, args.clients)
    print()
    print(text)
    print(generator_verdict(report))
    for target, msg in report.failures.items():
        print(f"{target} not measured: {msg.splitlines()[0]}")

    stem = args.out_dir / f"pop3_backend-{report.started}"
    write_report(report, stem, markdown(report, args.clients, command))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
