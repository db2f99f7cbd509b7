"""A directory read that waits for a pooled connection when an outage begins gives up
as soon as its process finds the directory unreachable, and answers from memory.

Found in the outage test: a passive copy's replicator was behind its own status report
in its directory thread, and the report's wait for a connection held the thread for
the pool's whole timeout. The copy's next pull came too late for a delivery's 3 s
wait for its synchronous copy, and the delivery answered 451."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from popguard.directory.directory import Directory
from popguard.directory.sql import postgres_engine
from popguard.testing.postgres import PostgresServer


def test_a_read_waiting_for_the_pool_gives_up_when_the_outage_is_found(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without waiting in slices, the read below would wait this long for the pool.
    monkeypatch.setattr(postgres_engine, "CONNECT_TIMEOUT", 600)
    data = tmp_path / "data"
    data.mkdir()
    (data / "popguard.toml").write_text(postgres.directory_section(postgres.new_database()))
    with Directory(data) as directory, Directory(data) as other:
        directory.new_server("mbx1", ["mailbox"], "127.0.0.1")
        directory.change_counter()  # the process's LISTEN connection, as a service has
        remembered = directory.list_servers()
        engine: Any = directory.raw_engine()
        pool = engine._pool
        held = [pool.getconn() for _ in range(postgres_engine.POOL_SIZE)]
        answers: list[object] = []

        def read() -> None:  # another thread of the same process, its own handle
            try:
                answers.append(other.list_servers())
            except Exception as exc:  # reported by the assertion below
                answers.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        try:
            reader.start()
            deadline = time.monotonic() + 30
            while pool.get_stats().get("requests_waiting", 0) == 0:
                assert time.monotonic() < deadline, "the read never waited for the pool"
                time.sleep(0.05)
            postgres.pg_ctl("stop")
            try:
                reader.join(timeout=60)
                assert not reader.is_alive(), "the read still waits for the pool"
            finally:
                for connection in held:
                    pool.putconn(connection)
                postgres.pg_ctl("start")
        finally:
            reader.join(timeout=5)
    assert [s.name for s in answers[0]] == [s.name for s in remembered], answers  # type: ignore[attr-defined]
