"""Server CPU per login and per MB through popguard's front end, and direct.

Throughput on a shared 2-core machine is noisy; the CPU a server process spends
per operation is not (much). This starts popguard's back end and front end (as
bench/pop3_proxy.py does), then for each round and target runs a fixed number of
logins and RETRs with the load generator and reads the utime+stime of the front
end (`serve pop3`) and the back end (`serve pop3be`) from /proc around the
measured window:

    .venv/bin/python -m bench.cpu_per_op [--users 32] [--logins 3000] [--retrs 300]
                                         [--clients 16] [--rounds 3]

Prints, per round, microseconds of CPU per login and milliseconds per MB for each
process, and the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cpu import tree_cpu
from bench.mail import standard_messages, user_names
from bench.popguard_server import FRONTEND, Popguard
from bench.preflight import check_server, prime_logins
from popguard import paths
from popguard.services.counters import PUBLISH_INTERVAL, read_counters
from popguard.testing.loadgen import LoadConfig, Mode, run_load

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--password", default="benchpass")
    parser.add_argument("--logins", type=int, default=3000, help="logins per measurement")
    parser.add_argument("--retrs", type=int, default=300, help="1 MiB RETRs per measurement")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["proxy", "direct"], default=None)
    parser.add_argument(
        "--spy",
        type=Path,
        default=None,
        help="in an extra round, py-spy (--native) both processes, raw stacks to this folder",
    )
    parser.add_argument("--octet", type=int, default=77, help="127.0.2.N / 127.0.3.N")
    args = parser.parse_args(argv)

    users = tuple(user_names(args.users))
    cli = REPO / ".venv" / "bin" / "popguard"
    with Popguard(
        cli,
        f"127.0.2.{args.octet}",
        users,
        args.password,
        standard_messages(),
        frontend_address=f"127.0.3.{args.octet}",
    ) as pg:
        assert pg.frontend_address is not None
        backend = pg.procs["pop3be"].pid
        frontend = pg.procs["pop3"].pid
        targets = {
            "proxy": (pg.frontend_address, pg.frontend_ports["pop3"]),
            "direct": (pg.address, pg.port),
        }
        if args.only:
            targets = {args.only: targets[args.only]}
        for name, (host, port) in targets.items():
            problems = check_server(host, port, users[0], args.password, standard_messages())
            problems += prime_logins(host, port, users, args.password)
            if problems:
                print(f"{name}: {problems}", file=sys.stderr)
                return 1

        def probe() -> dict[str, float]:
            return {"fe": tree_cpu(frontend), "be": tree_cpu(backend)}

        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.rounds + (1 if args.spy else 0)):
            for name, (host, port) in targets.items():
                runs: tuple[tuple[Mode, int], ...] = (("logins", args.logins), ("retr", args.retrs))
                for mode, count in runs:
                    cfg = LoadConfig(
                        host=host,
                        port=port,
                        mode=mode,
                        clients=args.clients,
                        users=users,
                        password=args.password,
                        duration=60.0,
                        warmup=0.5,
                        max_ops=count,
                        loop="uvloop",
                    )
                    spies = []
                    if args.spy and round_ == args.rounds:
                        args.spy.mkdir(parents=True, exist_ok=True)
                        for process, pid in (("frontend", frontend), ("backend", backend)):
                            out = args.spy / f"{name}-{mode}-{process}.txt"
                            cmd = [str(REPO / ".venv" / "bin" / "py-spy"), "record", "-p"]
                            cmd += [str(pid), "-d", "8", "-f", "raw", "-o", str(out)]
                            cmd += ["--native", "-r", "200"]
                            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
                    res = run_load(cfg, probe)
                    for spy in spies:
                        spy.wait()
                    if res.errors:
                        print(f"  errors: {res.error_samples}", file=sys.stderr)
                    fe, be = res.probes["fe"], res.probes["be"]
                    if mode == "logins":
                        per = 1e6 / max(res.ops, 1)
                        unit, rate = "us/login", f"{res.ops_per_s:8.1f}/s"
                    else:
                        per = 1e3 / max(res.bytes / 1e6, 1e-9)
                        unit, rate = "ms/MB", f"{res.mb_per_s:8.1f} MB/s"
                    if round_ < args.rounds:  # not the profiled round
                        results.setdefault((name, mode), []).append((fe * per, be * per))
                    print(
                        f"round {round_} {name:6} {mode:6} ops={res.ops:5} {rate}  "
                        f"front end {fe * per:8.3f} {unit}  back end {be * per:8.3f} {unit}",
                        flush=True,
                    )
        time.sleep(2 * PUBLISH_INTERVAL)
        published = (
            read_counters(paths.server_folder(pg.data, FRONTEND).counters_file("pop3")) or {}
        )
        print(
            f"front end: {published.get('SuccessfulLogins')} logins, "
            f"{published.get('BackendTlsResumed', '?')} resumed TLS sessions to the back end"
        )
        print("median over rounds:")
        for (name, measured), values in results.items():
            unit = "us/login" if measured == "logins" else "ms/MB"
            fe_med = statistics.median(v[0] for v in values)
            be_med = statistics.median(v[1] for v in values)
            print(
                f"  {name:6} {measured:6} front end {fe_med:8.3f}  back end {be_med:8.3f}  "
                f"total {fe_med + be_med:8.3f} {unit}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
