"""`popguard serve pop3|pop3be|delivery`: a master and its workers (net/workers.py).

The same entry point is the master when started by the supervisor and a worker when
started by the master (`POPGUARD_WORKER` in its environment). The master binds the
service's ports, starts the server's WorkerProcesses workers (a POP setting of the
server; 0, the default, means one per core; followed live), and keeps here what the
workers share: the POP3 connection limits (`server_limits`), the failed-login
delays (each worker's outcome is passed on to the others) and the summed counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popguard.directory.settings import PopSettings
from popguard.errors import UserError
from popguard.net.serving import run_until_stopped
from popguard.net.workers import (
    LOCAL_ENDPOINT,
    Endpoint,
    LocalSocket,
    Master,
    Worker,
    WorkerSetup,
    bind,
    bind_local,
    default_worker_count,
    die_with_master,
    worker_setup,
)
from popguard.services.context import ServerContext
from popguard.services.counters import SummedCounters
from popguard.services.server_limits import ConnectionTable, Key

log = logging.getLogger("popguard.workers")


class ServiceMaster:
    """The Coordinator of one service's master."""

    def __init__(self, context: ServerContext, service: str, limits: bool) -> None:
        self.context = context
        self.service = service
        self.counters = SummedCounters(service)
        self.counters_file = context.folder.counters_file(service)
        self._version = -1
        self.settings = PopSettings()
        self._refresh_settings()
        self.table = ConnectionTable(lambda: self.settings, self._evict) if limits else None
        self.master: Master | None = None

    def _refresh_settings(self) -> None:
        directory = self.context.directory
        try:
            version = directory.change_counter()
            if version != self._version:
                self.settings = directory.pop_settings(self.context.server.name)[0]
                self._version = version
        except Exception:
            # The workers' own reads say what is wrong; the master keeps what it has.
            self._version = -1

    def worker_count(self) -> int:
        return self.settings.WorkerProcesses or default_worker_count()

    def _evict(self, key: Key) -> None:
        worker = self.master.workers.get(key[0]) if self.master else None
        if worker is not None:
            worker.send({"op": "evict", "session": key[1]})

    def handle(self, worker: Worker, message: dict[str, Any]) -> dict[str, Any] | None:
        op = message.get("op")
        key = (worker.ident, str(message.get("session", "")))
        table = self.table
        if op == "report":
            self.counters.take(worker.ident, message)
        elif op == "login" and self.master is not None:
            # A failed (or successful) login is every worker's to know: the next guess
            # may land on any of them.
            for other in self.master.workers.values():
                if other is not worker:
                    other.send(message)
        elif table is None:
            return {"error": f"{self.service} keeps no connection limits"}
        elif op == "admit":
            refusal = table.admit(key, str(message["ip"]), bool(message.get("local")))
            return {"refusal": refusal}
        elif op == "logged_in":
            table.logged_in(key)
        elif op == "user":
            return {"ok": table.take_user(key, str(message["user"]))}
        elif op == "user_done":
            table.give_back_user(key)
        elif op == "closed":
            table.closed(key)
        else:
            return {"error": f"unknown request {op!r}"}
        return None

    def worker_gone(self, worker: Worker) -> None:
        if self.table is not None:
            self.table.worker_gone(worker.ident)
        self.counters.forget(worker.ident)
        if not worker.retiring and not (self.master and self.master.stopping):
            self.counters.worker_deaths += 1

    def worker_hung(self, worker: Worker, silent: float) -> None:
        self.counters.hung_workers += 1
        record = {"at": time.time(), "service": self.service, "slot": worker.slot,
                  "pid": worker.pid, "silent": round(silent, 1)}  # fmt: skip
        path = self.context.folder.hung_workers_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
        except OSError as exc:
            log.error("cannot record the hung worker in %s: %s", path, exc)

    def tick(self, workers: list[Worker]) -> None:
        self._refresh_settings()
        self.counters.publish(self.counters_file, [w.pid for w in workers])


def serve_with_workers(
    data: Path,
    server_name: str,
    service: str,
    role: str,
    endpoints: tuple[str, ...],
    worker_main: Callable[[WorkerSetup], None],
    limits: bool,
    local_socket: bool = False,
) -> None:
    """Run as the master of `service`, or, in a worker, `worker_main`; with
    `local_socket`, the workers also serve the server's Unix socket (LOCAL_ENDPOINT)."""
    setup = worker_setup()
    if setup is not None:
        die_with_master(setup)
        worker_main(setup)
        return
    context = ServerContext.open(data, server_name, role)
    server = context.server
    sockets = {}
    local: LocalSocket | None = None
    try:
        for name in endpoints:
            sockets[name] = bind(Endpoint(name, server.address, server.port(name)))
        if local_socket:
            local = bind_local(context.folder.local_socket_file(service))
    except OSError as exc:
        for sock in sockets.values():
            sock.close()
        raise UserError(str(exc.strerror)) from None
    if local is not None:
        sockets[LOCAL_ENDPOINT] = local.sock
    coordinator = ServiceMaster(context, service, limits)
    master = Master(service, sockets, coordinator.worker_count, coordinator)
    coordinator.master = master

    async def main(stop: asyncio.Event) -> None:
        try:
            await master.run(stop)
        finally:
            if local is not None:
                local.remove()
            context.close()

    # The master only starts processes and answers small requests: asyncio's own
    # loop, whose child watcher and pass_fds are known to work.
    run_until_stopped(main, fast_loop=False)
