"""popguard's back end with 1 and with 2 worker processes, figures paired in one run.

Usage (from the repository root):

    .venv/bin/python -m bench.workers [--duration 4] [--clients 16] [--rounds 2]
                                      [--baseline-bin OTHER/.venv/bin/popguard]

For each round, the back end (`serve pop3be`, `delivery` beside it) is started with
WorkerProcesses 1, primed (every user logs in once, as bench.pop3_backend does),
measured (logins/s, RETR MB/s of 1 MiB messages, with the same load generator as
bench.pop3_backend), stopped, and started again with 2; the order alternates from
round to round so that a drift of the machine's load falls on both. With
`--baseline-bin`, a popguard from before the workers (one process per service) is
measured in each round too, as "x0". It prints each figure, the server's CPU per
login and per MB (the master's whole process tree), and the ratio 2 workers / 1
worker; the best of the rounds is kept.
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

from bench.mail import standard_messages, user_names
from bench.pop3_backend import (
    MODES,
    Run,
    base_parser,
    check_args,
    machine_info,
    measure,
    wait_quiet,
)
from bench.popguard_server import Popguard
from bench.preflight import prime_logins

COUNTS = (1, 2)
BASELINE = 0  # the count under which the baseline's figures are kept


def per_op(run: Run | None) -> str:
    """The server's CPU per login or per MB, in ms."""
    if run is None:
        return "-"
    rate = run.ops_per_s if run.mode == "logins" else run.mb_per_s
    return f"{1000 * run.server_cores / rate:.2f}" if rate else "-"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], "implicit TLS on pop3be-tls")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-bin", type=Path, default=None)
    parser.set_defaults(clients="16", users=64, quiet_wait=5.0)
    args = check_args(parser, parser.parse_args(argv))
    machine = machine_info()
    print(f"{machine['date']}: {machine['cpu']}, {machine['nproc']} cores", flush=True)
    users = tuple(user_names(args.users))
    targets: list[tuple[int, Path]] = [(count, args.popguard_bin) for count in COUNTS]
    if args.baseline_bin is not None:
        targets.insert(0, (BASELINE, args.baseline_bin))
    runs: dict[tuple[int, str, int], list[Run]] = {}
    for round_ in range(args.rounds):
        order = targets if round_ % 2 == 0 else list(reversed(targets))
        for count, cli in order:
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(
                    Popguard(
                        cli,
                        f"127.0.2.{random.randint(2, 250)}",
                        users,
                        args.password,
                        standard_messages(),
                        worker_processes=count,
                    )
                )
                problems = prime_logins(server.address, server.port, users, args.password)
                if problems:
                    print(f"  priming: {problems[0]}", flush=True)
                for mode in MODES:
                    for clients in args.clients:
                        wait_quiet(0.3 * (machine["nproc"] or 1), args.quiet_wait)
                        run = measure(f"popguard x{count}", server, mode, clients, args, users)
                        runs.setdefault((count, mode, clients), []).append(run)
    print("\n| clients | figure | x0 | 1 worker | 2 workers | 2/1 | CPU ms/op x0 | x1 | x2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for clients in args.clients:
        for mode in MODES:
            best = {
                count: max(found, key=lambda r: r.value)
                for count in (BASELINE, *COUNTS)
                if (found := runs.get((count, mode, clients)))
            }
            one, two, zero = best[1], best[2], best.get(BASELINE)
            unit = "logins/s" if mode == "logins" else "RETR MB/s"
            ratio = f"{two.value / one.value:.2f}" if one.value else "-"
            print(
                f"| {clients} | {unit} | {f'{zero.value:.0f}' if zero else '-'} "
                f"| {one.value:.0f} | {two.value:.0f} | {ratio} "
                f"| {per_op(zero)} | {per_op(one)} | {per_op(two)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
