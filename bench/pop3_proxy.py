"""Benchmark popguard's POP3 front end (proxy) against Dovecot used as a proxy, in one run.

Usage (from the repository root, as root because Dovecot is started as root):

    .venv/bin/python -m bench.pop3_proxy [--duration 5] [--clients 1,16,64]
                                         [--only dovecot|popguard] [--profile]

The same load generator (popguard.testing.loadgen) measures logins per second (connect,
USER/PASS, STAT, QUIT) and RETR throughput of 1 MiB messages in MB/s, at each
concurrency, for:

- popguard-direct: popguard's back end (`popguard serve pop3be`, its plain port);
- popguard-proxy: the same back end through popguard's front end (`popguard serve
  pop3` on a client access server of its own); the back end is on the front end's
  host, so the front end logs in to it on its Unix socket, without TLS (the default);
- popguard-proxy-tls: the same front end with SameHostBackendTls on, so that it
  logs in over TLS (port pop3be-tls, verified), as it does to a back end on another
  host: the leg to compare with Dovecot's TLS leg;
- dovecot-direct: Dovecot, high-performance profile (as in bench/pop3_backend.py);
- dovecot-proxy: the same Dovecot through a second Dovecot instance, also
  high-performance, whose passdb answers `proxy=y host=... port=...`: it checks the
  password itself, then logs in to the back end with it; plain TCP between them;
- dovecot-proxy-tls: the same through a third instance whose leg to the back end
  is TLS with a verified certificate (`ssl=yes`), like popguard's.

Every server has its own loopback address; the back ends hold the same users,
password and mail. The script prints every figure, the ratios proxied/direct for
popguard and for Dovecot, how the two overheads compare with each other and with
the goals (at least 70% of direct logins/s and 90% of direct RETR MB/s through the
front end), the CPU each side used, and writes a JSON file and a Markdown snippet
to bench/results/. With --profile it also samples popguard's front end and back
end with py-spy during one login run and one RETR run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import functools
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import machine_sample, trees_cpu
from bench.mail import BIG_COUNT, SMALL_COUNT, standard_messages, user_names
from bench.pop3_backend import (
    MODES,
    REPO,
    Report,
    Run,
    base_parser,
    check_args,
    check_generator,
    generator_verdict,
    machine_info,
    measure,
    notes_markdown,
    preflight,
    prepare_run,
    run_figures,
    run_options,
    start_run,
    wait_quiet,
    write_report,
)
from bench.popguard_server import Popguard, PopguardError
from bench.preflight import cold_login_cost, prime_logins
from popguard.testing.dovecot import Dovecot
from popguard.testing.loadgen import Mode

TARGETS = (
    "popguard-direct",
    "popguard-proxy",
    "popguard-proxy-tls",
    "dovecot-direct",
    "dovecot-proxy",
    "dovecot-proxy-tls",
)
# (label, proxied target, direct target): the ratios the report is about.
PAIRS = (
    ("popguard", "popguard-proxy", "popguard-direct"),
    ("popguard, TLS leg", "popguard-proxy-tls", "popguard-direct"),
    ("Dovecot", "dovecot-proxy", "dovecot-direct"),
    ("Dovecot, TLS leg", "dovecot-proxy-tls", "dovecot-direct"),
)
# popguard proxied (same host, Unix socket) / direct, at least: issue 15's goals. Its
# TLS leg's ratio is to be at least Dovecot's TLS leg's (issue 15, across hosts).
GOALS = {"logins": 0.50, "retr": 0.60}
# Dovecot's certificates here are ECDSA P-256 like popguard's, so that a TLS
# handshake costs both the same kind of signature.
DOVECOT_KEY = "ec-p256"
CACHE_MARGIN = 5.0  # seconds: re-prime this long before popguard's cache could expire


@dataclass
class Target:
    """One thing to measure: where a client connects, and whose CPU counts."""

    name: str
    address: str
    port: int
    tls_port: int
    ca_file: Path | None
    pids: list[int]  # the server's CPU: the proxy's process tree and the back end's
    proxy_pids: list[int] = field(default_factory=list)  # the proxy's part (none if direct)
    auth_cache: bool = False  # popguard: remembers verified passwords for a while
    # Run before each figure (and the preflight) on this target: popguard's two proxy
    # targets are one front end whose same-host leg is switched between them.
    prepare: Callable[[], None] | None = None


@dataclass
class ProxyRun(Run):
    """A Run plus the CPU of the proxy alone (0 for a direct target)."""

    proxy_cores: float = 0.0


@dataclass
class Profile:
    """py-spy samples of one popguard process during one figure."""

    process: str  # "front end" or "back end"
    mode: str
    clients: int
    raw_file: str
    samples: int
    top_self: list[tuple[str, float]]  # function, share of the samples
    top_total: list[tuple[str, float]]
    tls_share: float  # samples with the ssl module (TLS) on the stack
    figure: float  # the figure measured while sampling (disturbed by the sampler)
    error: str = ""


@dataclass
class ProxyReport(Report):
    profiles: list[Profile] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)


class PartProbe:
    """The CPU probe of one figure: machine, whole server, and the proxy's part."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.proxy: list[float] = []

    def __call__(self) -> dict[str, float]:
        sample = machine_sample()
        self.proxy.append(trees_cpu(self.target.proxy_pids) if self.target.proxy_pids else 0.0)
        return {"machine_busy": sample.busy, "server_cpu": trees_cpu(self.target.pids)}

    def proxy_cpu(self) -> float:
        return self.proxy[-1] - self.proxy[0] if len(self.proxy) >= 2 else 0.0


# -- the servers -------------------------------------------------------------------


def start_popguard(
    args: argparse.Namespace, users: tuple[str, ...], stack: contextlib.ExitStack
) -> list[Target]:
    """mbx1 (pop3be + delivery) and cas1 (the front end) in one data directory."""
    octet = random.randint(2, 250)
    pg = stack.enter_context(
        Popguard(
            args.popguard_bin,
            f"127.0.2.{octet}",
            users,
            args.password,
            standard_messages(),
            frontend_address=f"127.0.3.{octet}",
        )
    )
    assert pg.frontend_address is not None
    leg = SameHostLeg(pg)
    return [
        Target(
            "popguard-direct",
            pg.address,
            pg.port,
            pg.tls_port,
            pg.ca_file,
            pg.backend_pids,
            auth_cache=True,
        ),
        *(
            Target(
                name,
                pg.frontend_address,
                pg.frontend_ports["pop3"],
                pg.frontend_ports.get("pop3-tls", 0),
                pg.ca_file,
                pg.pids,
                pg.frontend_pids,
                auth_cache=True,
                prepare=functools.partial(leg.use, tls=tls),
            )
            for name, tls in (("popguard-proxy", False), ("popguard-proxy-tls", True))
        ),
    ]


class SameHostLeg:
    """Switches cas1's SameHostBackendTls, and waits until its workers have applied it."""

    APPLY_PATIENCE = 15.0

    def __init__(self, pg: Popguard) -> None:
        self.pg = pg
        self.tls: bool | None = None

    def use(self, tls: bool) -> None:
        if self.tls is tls:
            return
        counters = self.pg.data / "servers" / "cas1" / "counters" / "pop3.json"
        before = _settings_revision(counters)
        self.pg.run(
            "set-popsettings", "--server", "cas1", "--same-host-backend-tls", str(tls).lower()
        )
        deadline = time.monotonic() + self.APPLY_PATIENCE
        # Every worker reports the revision it applied; the master's sum shows the least.
        while _settings_revision(counters) <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        if _settings_revision(counters) <= before:
            raise PopguardError("cas1 did not apply SameHostBackendTls within 15 s")
        self.tls = tls


def _settings_revision(counters: Path) -> int:
    try:
        return int(json.loads(counters.read_text()).get("SettingsRevision", 0))
    except (OSError, ValueError):
        return 0


def start_dovecot(
    args: argparse.Namespace, users: tuple[str, ...], stack: contextlib.ExitStack
) -> list[Target]:
    """A back end and one or two proxies in front of it, each a Dovecot of its own."""
    octet = random.randint(2, 250)
    backend_address = f"127.0.5.{octet}"
    proxy_address, proxy_tls_address = f"127.0.6.{octet}", f"127.0.7.{octet}"
    proxies = [proxy_address] + ([proxy_tls_address] if args.tls_leg else [])
    common: dict[str, Any] = {"scheme": args.dovecot_scheme, "key_type": DOVECOT_KEY}
    backend = stack.enter_context(
        Dovecot(
            "highperf",
            backend_address,
            users,
            args.password,
            [message.data for message in standard_messages()],
            tls=args.tls or args.tls_leg,
            # The proxies send XCLIENT (the real client address) to a back end that
            # trusts them, as a production set-up would.
            extra_config=f"login_trusted_networks = {' '.join(f'{a}/32' for a in proxies)}\n",
            name="backend",
            **common,
        )
    )
    targets = [
        Target(
            "dovecot-direct",
            backend.address,
            backend.port,
            backend.tls_port,
            backend.ca_file,
            backend.pids,
        )
    ]
    proxy = stack.enter_context(
        Dovecot(
            "highperf",
            proxy_address,
            users,
            args.password,
            [],
            tls=args.tls,
            mail=False,
            passdb_extra=(
                f"proxy=y host={backend.address} port={backend.port} source_ip={proxy_address}"
            ),
            name="proxy",
            **common,
        )
    )
    targets.append(
        Target(
            "dovecot-proxy",
            proxy.address,
            proxy.port,
            proxy.tls_port,
            proxy.ca_file,
            proxy.pids + backend.pids,
            proxy.pids,
        )
    )
    if args.tls_leg:
        # Dovecot 2.3's login proxy ignores ssl_client_ca_file (login-proxy.c clears
        # it: the login process is chrooted and must not block on disk). It verifies
        # against OpenSSL's default store instead, so that store is pointed at the
        # back end's certificate with SSL_CERT_FILE, and pop3-login runs without a
        # chroot so that it can read the file when it makes its first TLS context.
        proxy_tls = stack.enter_context(
            Dovecot(
                "highperf",
                proxy_tls_address,
                users,
                args.password,
                [],
                tls=args.tls,
                mail=False,
                passdb_extra=(
                    f"proxy=y host={backend.address} port={backend.tls_port} ssl=yes "
                    f"source_ip={proxy_tls_address}"
                ),
                extra_config=(
                    "import_environment = TZ CORE_OUTOFMEM CORE_ERROR "
                    f"SSL_CERT_FILE={backend.ca_file}\n"
                    "service pop3-login {\n  chroot =\n}\n"
                ),
                name="proxy-tls",
                **common,
            )
        )
        targets.append(
            Target(
                "dovecot-proxy-tls",
                proxy_tls.address,
                proxy_tls.port,
                proxy_tls.tls_port,
                proxy_tls.ca_file,
                proxy_tls.pids + backend.pids,
                proxy_tls.pids,
            )
        )
    return targets


def _endpoint(target: Target, args: argparse.Namespace) -> tuple[int, str | None]:
    if args.tls and target.tls_port and target.ca_file is not None:
        return target.tls_port, str(target.ca_file)
    return target.port, None


class Primer:
    """Logs every user in once on every target before measuring (steady state), and
    again on popguard's targets before its authentication cache forgets them.

    popguard remembers a verified password for AUTH_CACHE_TTL seconds from the
    verification, without extending it on use. A run is longer than that, so before
    a figure that could outlast the oldest entry, this waits until the newest entry
    has expired too (a still-valid entry would not be renewed) and primes again.
    popguard's two targets share the back end's cache, so they are primed together.
    """

    def __init__(
        self, targets: dict[str, Target], args: argparse.Namespace, users: tuple[str, ...]
    ) -> None:
        from popguard.directory.passwords import AUTH_CACHE_TTL

        self.ttl = float(AUTH_CACHE_TTL)
        self.targets = targets
        self.args = args
        self.users = users
        self.first: float | None = None  # when the oldest cached entry was made, at the latest
        self.last = 0.0  # when the newest one was made, at the latest
        self.reprimes = 0
        self.waited = 0.0

    def prime(self, target: Target, since: float | None = None) -> list[str]:
        """Log every user in on `target`; `since`: when its cache may have started
        filling (the preflight's logins come before the priming)."""
        port, ca = _endpoint(target, self.args)
        started = time.monotonic() if since is None else since
        problems = prime_logins(target.address, port, self.users, self.args.password, ca)
        if target.auth_cache:
            self.first = started if self.first is None else min(self.first, started)
            self.last = time.monotonic()
        return problems

    def ensure(self, target: Target, budget: float) -> list[str]:
        """Before a figure of at most `budget` seconds on `target`."""
        if not target.auth_cache or self.first is None:
            return []
        if time.monotonic() + budget < self.first + self.ttl - CACHE_MARGIN:
            return []
        wait = max(0.0, self.last + self.ttl + 1.0 - time.monotonic())
        print(
            f"popguard's authentication cache ({self.ttl:.0f} s) runs out: waiting "
            f"{wait:.0f} s for it to empty, then logging every user in again",
            flush=True,
        )
        time.sleep(wait)
        self.waited += wait
        self.reprimes += 1
        self.first = None
        problems: list[str] = []
        for other in self.targets.values():
            if other.auth_cache:
                problems += self.prime(other)
        return problems


def figure_budget(args: argparse.Namespace) -> float:
    """Seconds from the start of a figure to the end of its measured window, and a bit."""
    return 2.0 + float(args.warmup) + float(args.duration) + 5.0


def measure_target(
    target: Target,
    mode: Mode,
    clients: int,
    args: argparse.Namespace,
    users: tuple[str, ...],
) -> ProxyRun:
    probe = PartProbe(target)
    run = measure(target.name, target, mode, clients, args, users, probe=probe)
    proxy_cores = probe.proxy_cpu() / max(run.window, 1e-9)
    if target.proxy_pids:
        print(
            f"      of the server's {run.server_cores:.2f} cores, the proxy used {proxy_cores:.2f}",
            flush=True,
        )
    return ProxyRun(**vars(run), proxy_cores=proxy_cores)


# -- profiling ------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': lines merged, paths shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if "popguard" in parts or "asyncio" in parts else Path(path).name
    return f"{name} ({short})" if where else name


# Frames of the event loop (and of worker threads) itself: everything above them in
# a stack (main, click, serve...) is the same in every sample and says nothing.
_LOOP_FRAMES = (
    "Runner.run (asyncio/runners.py)",
    "BaseEventLoop.run_forever (asyncio/base_events.py)",
    "BaseEventLoop._run_once (asyncio/base_events.py)",
    "Handle._run (asyncio/events.py)",
    "_worker (thread.py)",
    "Thread.run (threading.py)",
)
LOOP_INTERNALS = "[event loop internals: uvloop's C code, system calls]"


@dataclass
class StackSummary:
    samples: int = 0
    top_self: list[tuple[str, float]] = field(default_factory=list)
    top_total: list[tuple[str, float]] = field(default_factory=list)
    tls_share: float = 0.0  # samples with the ssl module on the stack


def summarize_raw(path: Path, top: int = 15) -> StackSummary:
    """From py-spy's raw output (one collapsed stack and its count per line): the
    functions most often on top of the stack (self time) and anywhere on it (total
    time), counted below the event loop; a sample whose stack ends in the loop itself
    was spent in the loop's own code (with uvloop: C code, socket calls, polling)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = tls = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        cut = max((i for i, f in enumerate(frames) if f in _LOOP_FRAMES), default=-1)
        frames = frames[cut + 1 :]
        samples += n
        own[frames[-1] if frames else LOOP_INTERNALS] += n
        for name in set(frames) or {LOOP_INTERNALS}:
            total[name] += n
        if any("(ssl.py)" in f for f in frames):
            tls += n
    if samples == 0:
        return StackSummary()
    return StackSummary(
        samples,
        [(name, n / samples) for name, n in own.most_common(top)],
        [(name, n / samples) for name, n in total.most_common(top)],
        tls / samples,
    )


def profile_popguard(
    report: ProxyReport,
    targets: dict[str, Target],
    pg_procs: dict[str, int],
    args: argparse.Namespace,
    users: tuple[str, ...],
    primer: Primer,
) -> None:
    """One login figure and one RETR figure through the front end, with py-spy
    sampling the front end and the back end (not part of the tables: the sampler
    takes CPU from the 2 cores)."""
    target = targets["popguard-proxy"]
    if target.prepare is not None:
        target.prepare()
    spy = Path(args.py_spy)
    if not spy.exists():
        report.notes.append(f"profile skipped: {spy} not found (pip install py-spy)")
        return
    clients = args.profile_clients
    seconds = math.ceil(2.0 + args.warmup + args.duration)
    for mode in MODES:
        for problem in primer.ensure(target, figure_budget(args) + seconds):
            report.notes.append(f"popguard re-priming: {problem}")
        wait_quiet(args.quiet_wait)
        spies: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        for process, pid in pg_procs.items():
            out = args.out_dir / f"pop3_proxy-{report.started}-pyspy-{process}-{mode}.txt"
            cmd = [str(spy), "record", "-p", str(pid), "-d", str(seconds), "-f", "raw"]
            cmd += ["-o", str(out), "--nonblocking"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            spies.append((process, out, proc))
        print(f"profiling popguard {mode} with {clients} clients (py-spy, {seconds} s)", flush=True)
        try:
            run = measure_target(target, mode, clients, args, users)
            figure = run.value
        except RuntimeError as exc:
            figure = 0.0
            report.notes.append(f"profiled run failed: {exc}")
        for process, out, proc in spies:
            try:
                output, _ = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child
                output, _ = proc.communicate(timeout=10)
            error = "" if out.exists() else output.decode(errors="replace").strip()[-300:]
            summary = summarize_raw(out) if out.exists() else StackSummary()
            report.profiles.append(
                Profile(
                    process=process,
                    mode=mode,
                    clients=clients,
                    raw_file=str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
                    samples=summary.samples,
                    top_self=summary.top_self,
                    top_total=summary.top_total,
                    tls_share=summary.tls_share,
                    figure=figure,
                    error=error,
                )
            )
        time.sleep(args.pause)


# -- the report -----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(report: Report, proxied: str, direct: str, mode: Mode, clients: int) -> float | None:
    p, d = report.find(proxied, mode, clients), report.find(direct, mode, clients)
    if p is None or d is None or d.value == 0:
        return None
    return p.value / d.value


def _per_op(run: Run | None, cores: float | None = None) -> float | None:
    """Server CPU per operation: microseconds per login, milliseconds per MB."""
    if run is None or run.value == 0:
        return None
    used = run.server_cores if cores is None else cores
    return used / run.value * (1e6 if run.mode == "logins" else 1e3)


def tables(report: ProxyReport, clients: list[int]) -> str:
    out: list[str] = []
    titles = {
        "logins": "Logins per second (connect, USER/PASS, STAT, QUIT)",
        "retr": "RETR throughput, MB/s (1 MiB messages)",
    }
    pairs = [p for p in PAIRS if any(r.target == p[1] for r in report.runs)]
    for mode in MODES:
        out.append(f"**{titles[mode]}**\n")
        head = ["clients"]
        for label, _proxied, _direct in pairs:
            head += [f"{label}: direct", "proxied", "proxied / direct"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---:|" * len(head))
        for c in clients:
            cells = [str(c)]
            for _label, proxied, direct in pairs:
                d, p = report.find(direct, mode, c), report.find(proxied, mode, c)
                r = ratio(report, proxied, direct, mode, c)
                cells += [
                    _fmt(None if d is None else d.value),
                    _fmt(None if p is None else p.value),
                    _fmt(r, 2),
                ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(goals_table(report, clients))
    out.append(cost_table(report, clients))
    nproc = report.machine["nproc"]
    out.append(
        f"**CPU during each measured window** (cores busy, of {nproc}; generator = all "
        "load-generator workers, with the part spent in the kernel; busiest = its busiest "
        "worker as a share of one core; server = the server's whole process trees, proxy "
        "and back end; proxy = the proxy's part of it; other = busy cores charged to "
        "neither: kernel network work, this script, anything else running; idle before = "
        "idle cores just before the run)\n"
    )
    out.append(
        "| target | mode | clients | rep | errors | generator cores (kernel part) "
        "| busiest worker | server cores | proxy cores | machine cores | other | idle before |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in report.runs:
        proxy = run.proxy_cores if isinstance(run, ProxyRun) else 0.0
        out.append(
            f"| {run.target} | {run.mode} | {run.clients} | {run.repetition} | {run.errors} | "
            f"{run.gen_cores:.2f} ({100 * run.gen_sys_share:.0f}%) | "
            f"{100 * run.gen_max_worker_share:.0f}% | {run.server_cores:.2f} | "
            f"{proxy:.2f} | {run.machine_busy_cores:.2f} | {run.other_cores:.2f} | "
            f"{nproc - run.background_before:.2f} |"
        )
    out.append("")
    return "\n".join(out)


def goal_rows(report: Report, clients: list[int]) -> list[dict[str, Any]]:
    """popguard's ratio against the goal and against Dovecot's, per mode and concurrency."""
    rows = []
    for mode in MODES:
        for c in clients:
            pg = ratio(report, "popguard-proxy", "popguard-direct", mode, c)
            pg_tls = ratio(report, "popguard-proxy-tls", "popguard-direct", mode, c)
            dv = ratio(report, "dovecot-proxy", "dovecot-direct", mode, c)
            dt_ = ratio(report, "dovecot-proxy-tls", "dovecot-direct", mode, c)
            rows.append(
                {
                    "mode": mode,
                    "clients": c,
                    "popguard_ratio": pg,
                    "goal": GOALS[mode],
                    "goal_met": None if pg is None else pg >= GOALS[mode],
                    "dovecot_ratio": dv,
                    "dovecot_tls_leg_ratio": dt_,
                    "no_worse_than_dovecot": None if pg is None or dv is None else pg >= dv,
                    "no_worse_than_dovecot_tls_leg": (
                        None if pg is None or dt_ is None else pg >= dt_
                    ),
                    "popguard_tls_leg_ratio": pg_tls,
                    "tls_leg_no_worse_than_dovecot_tls_leg": (
                        None if pg_tls is None or dt_ is None else pg_tls >= dt_
                    ),
                }
            )
    return rows


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def goals_table(report: Report, clients: list[int]) -> str:
    out = [
        "**Goals** (issue 15: through popguard's front end to a back end on its host, at "
        "least 0.50 of direct logins/s and 0.60 of direct RETR MB/s; over a TLS leg, a "
        "ratio at least that of Dovecot's proxy with a TLS leg)\n",
        "| mode | clients | popguard same host / direct | goal | met | Dovecot plain leg "
        "| popguard TLS leg / direct | Dovecot TLS leg | no worse |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for row in goal_rows(report, clients):
        out.append(
            f"| {row['mode']} | {row['clients']} | {_fmt(row['popguard_ratio'], 2)} | "
            f"{row['goal']:.2f} | {_yes(row['goal_met'])} | {_fmt(row['dovecot_ratio'], 2)} | "
            f"{_fmt(row['popguard_tls_leg_ratio'], 2)} | "
            f"{_fmt(row['dovecot_tls_leg_ratio'], 2)} | "
            f"{_yes(row['tls_leg_no_worse_than_dovecot_tls_leg'])} |"
        )
    out.append("")
    return "\n".join(out)


def cost_table(report: Report, clients: list[int]) -> str:
    """Server CPU per operation, and the proxy's part of it."""
    names = [t for t in TARGETS if any(r.target == t for r in report.runs)]
    out = [
        "**Server CPU per operation** (all server processes, proxy and back end: CPU-us "
        "per login, CPU-ms per MB; in brackets the proxy's own part)\n",
        "| mode | clients | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for mode in MODES:
        for c in clients:
            cells = []
            for name in names:
                run = report.find(name, mode, c)
                cell = _fmt(_per_op(run), 0 if mode == "logins" else 2)
                if isinstance(run, ProxyRun) and name.endswith(("proxy", "proxy-tls")):
                    part = _per_op(run, run.proxy_cores)
                    cell += f" ({_fmt(part, 0 if mode == 'logins' else 2)})"
                cells.append(cell)
            out.append(f"| {mode} | {c} | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


def summary_lines(report: Report, clients: list[int]) -> list[str]:
    """Plain-language verdicts on the goals."""
    lines = []
    rows = [r for r in goal_rows(report, clients) if r["popguard_ratio"] is not None]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        missed = [r for r in mine if not r["goal_met"]]
        what = "logins/s" if mode == "logins" else "RETR MB/s"
        ratios = ", ".join(f"{r['popguard_ratio']:.2f} at {r['clients']}" for r in mine)
        lines.append(
            f"popguard {what} through the front end / direct: {ratios} (goal "
            f"{GOALS[mode]:.2f}): "
            + (
                "met at every concurrency."
                if not missed
                else f"missed at {', '.join(str(r['clients']) for r in missed)} clients."
            )
        )
        for key, label in (
            ("no_worse_than_dovecot", "same host, against Dovecot's proxy with a plain leg"),
            ("tls_leg_no_worse_than_dovecot_tls_leg", "TLS leg, against Dovecot's TLS leg"),
        ):
            known = [r for r in mine if r[key] is not None]
            if known:
                worse = [r for r in known if not r[key]]
                lines.append(
                    f"  Ratio, {label}: "
                    + (
                        "no worse at every concurrency."
                        if not worse
                        else f"worse at {', '.join(str(r['clients']) for r in worse)} clients."
                    )
                )
    return lines


def profile_text(report: ProxyReport) -> str:
    if not report.profiles:
        return ""
    out = [
        "**Where popguard's proxied time goes** (py-spy --nonblocking, samples of busy "
        "threads, counted below the event loop; self = on top of the stack, total = "
        "anywhere on it; a profiled figure is measured with the sampler running and is "
        "not in the tables)\n"
    ]
    for prof in report.profiles:
        head = (
            f"- {prof.process}, {prof.mode} with {prof.clients} clients "
            f"({prof.samples} samples, {100 * prof.tls_share:.0f}% with the ssl module on "
            f"the stack; figure {prof.figure:,.1f} while sampled; `{prof.raw_file}`)"
        )
        if prof.error:
            out.append(f"{head}: py-spy failed: {prof.error}")
            continue
        out.append(head + ":")
        out.append(
            "  - self: "
            + "; ".join(f"{name} {100 * share:.0f}%" for name, share in prof.top_self[:8])
        )
        out.append(
            "  - total: "
            + "; ".join(f"{name} {100 * share:.0f}%" for name, share in prof.top_total[:10])
        )
    out.append("")
    return "\n".join(out)


def markdown(report: ProxyReport, clients: list[int], command: str) -> str:
    m = report.machine
    opts = report.options
    lines = [
        f"### POP3 front end (proxy): popguard vs Dovecot's proxy ({m['date']})",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['mem_total_mib']} MiB RAM "
        f"({m['mem_available_mib']} MiB available), Linux {m['kernel']}, "
        f"Python {m['python']}, Dovecot {m['dovecot']}, {m.get('popguard', '?')}.",
        f"Command: `{command.strip()}` (as root, from the repository root).",
        "popguard: `serve pop3be` + `serve delivery` on mbx1 (direct: its plain pop3be port); "
        "`serve pop3` on cas1 (proxied: its pop3 port), which verifies the password "
        "(argon2id, then its 5-minute cache), connects to mbx1, logs in "
        "there with AUTH PLAIN and relays bytes. mbx1 is on cas1's host: by default the "
        "front end reaches it on its Unix socket, without TLS (popguard proxy); with "
        "SameHostBackendTls on (switched live between the figures) on its pop3be-tls port "
        "(TLS, verified against the organization's CA; TLS 1.2, resuming the session of the "
        "last full handshake for up to 5 minutes) as it does a back end on another host "
        "(popguard, TLS leg).",
        "Dovecot: every instance in the high-performance profile (pop3-login service_count "
        f"= 0, process_min_avail = {m['nproc']}; pop3 service_count = 1000). Direct: the "
        "back end. Proxied: a second instance whose passwd-file passdb verifies the "
        "password and returns `proxy=y host=BACKEND port=PORT source_ip=PROXY`; the back "
        "end has the proxies in login_trusted_networks (XCLIENT). Plain leg: plain TCP from "
        "proxy to back end. TLS leg: a third instance with `ssl=yes` (verified; Dovecot "
        "2.3 ignores ssl_client_ca_file in its login proxy, so the back end's certificate "
        "is given through SSL_CERT_FILE and pop3-login runs without chroot). Dovecot's "
        "certificate is ECDSA P-256, like popguard's.",
        f"Mail: each of {opts['users']} users has {BIG_COUNT} messages of 1 MiB and "
        f"{SMALL_COUNT} small ones; one password for all (Dovecot passwd-file scheme "
        f"{opts['dovecot_scheme']}). Each figure: {opts['warmup']:g} s warm-up, then "
        f"{opts['duration']:g} s measured"
        + (f", best of {opts['repeat']} runs" if opts["repeat"] > 1 else "")
        + "; the targets take turns for each figure. MB = 10^6 bytes. "
        + (
            "Clients use implicit TLS (POP3S) to every target."
            if opts["tls"]
            else "Clients use plain TCP on loopback to every target."
        ),
        "",
        tables(report, clients),
        *summary_lines(report, clients),
        "",
        generator_verdict(report),
        "",
        profile_text(report),
    ]
    return "\n".join(lines + notes_markdown(report))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser(
        __doc__.split("\n\n")[0],
        "clients use implicit TLS to every target (popguard's pop3-tls and pop3be-tls "
        "ports, verified with DATA/tls/ca.pem; Dovecot with self-signed certificates)",
    )
    parser.add_argument(
        "--no-tls-leg",
        dest="tls_leg",
        action="store_false",
        help="skip dovecot-proxy-tls (Dovecot's proxy with a TLS leg to its back end)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, sample popguard's front end and back end with py-spy during "
        "one login and one RETR figure through the front end",
    )
    parser.add_argument("--profile-clients", type=int, default=16)
    parser.add_argument("--py-spy", default=str(REPO / ".venv" / "bin" / "py-spy"))
    args = check_args(parser, parser.parse_args(argv))
    if args.profile_clients < 1 or args.profile_clients > args.users:
        parser.error("--profile-clients must be between 1 and --users")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not prepare_run(args):
        return 2
    users = tuple(user_names(args.users))
    report = ProxyReport(
        started=dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        machine=machine_info(),
        options=run_options(
            args,
            dovecot_key=DOVECOT_KEY,
            tls_leg=args.tls_leg,
            profile=args.profile,
            goals=GOALS,
        ),
    )
    command = start_run("pop3_proxy", report, argv, f"clients {args.clients}")
    with contextlib.ExitStack() as stack:
        targets: dict[str, Target] = {}
        pg_procs: dict[str, int] = {}
        starters = [("popguard", start_popguard), ("dovecot", start_dovecot)]
        for group, starter in starters:
            if args.only is not None and args.only != group:
                continue
            print(f"{group}: starting", flush=True)
            started = time.monotonic()
            try:
                for target in starter(args, users, stack):
                    targets[target.name] = target
            except (PopguardError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                report.failures[group] = str(exc)
                print(f"{group}: FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            print(f"{group}: ready in {time.monotonic() - started:.1f}s", flush=True)
        if "popguard-proxy" in targets:
            proxy, direct = targets["popguard-proxy"], targets["popguard-direct"]
            pg_procs = {"frontend": proxy.proxy_pids[0], "backend": direct.pids[0]}
        for target in targets.values():
            report.targets[target.name] = {
                "address": target.address,
                "port": target.port,
                "tls_port": target.tls_port,
            }
            print(f"{target.name}: {target.address}:{target.port}", flush=True)

        # Preflight on every target, proxies included: a wrong password is refused,
        # STAT counts the mail, RETR returns the body intact.
        primer = Primer(targets, args, users)
        for name, target in list(targets.items()):
            if target.prepare is not None:
                target.prepare()
            port, ca = _endpoint(target, args)
            checked = time.monotonic()
            problems = preflight(
                report,
                name,
                (target.address, port, ca),
                args,
                users,
                functools.partial(primer.prime, target, since=checked),
            )
            if problems:
                report.failures[name] = f"preflight: {problems[0]}"
                del targets[name]
        if any(t.auth_cache for t in targets.values()):
            report.notes.append(
                "Before measuring, every user logged in once on every target (steady "
                "state: users poll every few minutes). popguard's front end and back end "
                "then answer from their 5-minute authentication caches; a user's first "
                "login in 5 minutes costs one argon2id verification on each, "
                f"{cold_login_cost():.0f} ms of CPU here."
            )

        budget = figure_budget(args)

        def before(name: str) -> list[str]:
            target = targets[name]
            if target.prepare is not None:
                target.prepare()
            return primer.ensure(target, budget)

        run_figures(
            report,
            args,
            list(targets),
            lambda name, mode, clients: measure_target(targets[name], mode, clients, args, users),
            before=before,
        )
        if args.generator_check:
            check_generator(report, targets, args, users, before=before)
        if args.profile and pg_procs:
            profile_popguard(report, targets, pg_procs, args, users, primer)
        if primer.reprimes:
            report.notes.append(
                f"popguard's authentication cache ran out {primer.reprimes} time(s) during "
                f"the run; the script waited {primer.waited:.0f} s in all for it to empty "
                "and logged every user in again, so that no figure includes a cold login."
            )
        print("stopping servers", flush=True)

    text = tables(report, args.clients)
    print()
    print(text)
    for line in summary_lines(report, args.clients):
        print(line)
    print()
    print(generator_verdict(report))
    if report.profiles:
        print()
        print(profile_text(report))
    for name, msg in report.failures.items():
        print(f"{name} not measured: {msg.splitlines()[0]}")

    write_report(
        report,
        args.out_dir / f"pop3_proxy-{report.started}",
        markdown(report, args.clients, command),
        targets=report.targets,
        ratios={
            label: {
                mode: {str(c): ratio(report, proxied, direct, mode, c) for c in args.clients}
                for mode in MODES
            }
            for label, proxied, direct in PAIRS
        },
        goals=goal_rows(report, args.clients),
        summary=summary_lines(report, args.clients),
        profiles=[vars(p) for p in report.profiles],
    )
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
