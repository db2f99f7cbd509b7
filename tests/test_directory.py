"""The directory on both engines: every test runs on SQLite and on a real PostgreSQL.

`directory_data` (conftest) is a data folder whose popguard.toml points at a new
PostgreSQL database, or has no [directory] section (SQLite in the folder).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from popguard.directory.directory import (
    CopyStatusReport,
    Directory,
    MonitoringOverride,
    open_engine,
)
from popguard.directory.location import (
    PostgresLocation,
    SqliteLocation,
    directory_location,
)
from popguard.directory.schema import MIGRATIONS, SCHEMA_VERSION
from popguard.directory.settings import PopSettings
from popguard.directory.sql.engine import (
    DirectoryUnavailable,
    numbered_parameters,
    psycopg_statement,
    sqlite_statement,
)
from popguard.errors import NotFoundError, UserError
from popguard.testing import net
from popguard.testing.postgres import PostgresServer


def small_organization(directory: Directory) -> None:
    directory.new_server("cas1", ["frontend"], "127.0.1.1")
    directory.new_server("mbx1", ["mailbox"], "127.0.2.1")
    directory.new_server("mbx2", ["mailbox"], "127.0.3.1")
    directory.new_database("DB01", "mbx1")
    directory.add_database_copy("DB01", "mbx2", 2)


def test_a_new_directory_is_at_the_current_schema_version(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        assert directory.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        organization = directory.organization_id()
    with Directory(directory_data) as again:  # migrating twice changes nothing
        assert again.organization_id() == organization
    assert len(organization) == 16 and int(organization, 16) >= 0


def test_a_newer_directory_is_refused_with_a_clear_message(directory_data: Path) -> None:
    Directory(directory_data).close()
    engine = open_engine(directory_location(directory_data))
    if engine.name == "sqlite":
        engine.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        engine.execute("UPDATE popguard_schema SET version = $1", (SCHEMA_VERSION + 1,))
    engine.close()
    with pytest.raises(UserError, match="newer than this popguard"):
        Directory(directory_data)


def test_servers_and_names_without_case(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        small_organization(directory)
        assert [s.name for s in directory.list_servers()] == ["cas1", "mbx1", "mbx2"]
        assert directory.get_server("MBX1").address == "127.0.2.1"
        assert directory.get_server("mbx1").port("replication") == 64327
        assert "health" in directory.get_server("cas1").ports
        with pytest.raises(UserError, match="already exists"):
            directory.new_server("MBX1", ["mailbox"], "127.0.9.1")
        with pytest.raises(NotFoundError, match="no server named"):
            directory.get_server("mbx9")
        with pytest.raises(UserError, match="not an IP address"):
            directory.new_server("mbx9", ["mailbox"], "not-an-address")
        with pytest.raises(UserError, match="already exists"):
            directory.new_database("db01", "mbx1")


def test_copies_moves_and_one_active_copy(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        small_organization(directory)
        assert [(c.server, c.is_active) for c in directory.database_copies("db01")] == [
            ("mbx1", True),
            ("mbx2", False),
        ]
        directory.claim_move("DB01", "first")
        with pytest.raises(UserError, match="being moved by another command"):
            directory.claim_move("DB01", "second")
        assert directory.move_in_progress("DB01")
        with pytest.raises(UserError, match="taken over"):
            directory.finish_move("DB01", "second", "mbx2", [], source="mbx1")
        report = CopyStatusReport("DB01", "mbx2", "Mounted", 0, 0, 7, None, None, time.time())
        directory.finish_move("DB01", "first", "mbx2", [report], source="mbx1")
        assert directory.active_server("DB01") == "mbx2"
        assert not directory.move_in_progress("DB01")
        assert directory.copy_status_reports()[("DB01", "mbx2")].applied_lsn == 7
        directory.report_copy_status(
            CopyStatusReport("DB01", "mbx2", "Mounted", 0, 0, 9, 1.5, None, time.time())
        )
        assert directory.copy_status_reports()[("DB01", "mbx2")].applied_lsn == 9
        # A reporter's clock an hour back (or ahead) does not age its report: when it
        # was reported is the directory's clock, read back on the reader's.
        for skew in (-3600.0, 3600.0):
            directory.report_copy_status(
                CopyStatusReport("DB01", "mbx2", "Mounted", 0, 0, 9, 1.5, None, time.time() + skew)
            )
            reported = directory.copy_status_reports()[("DB01", "mbx2")].reported
            assert abs(reported - time.time()) < 60, skew
        with pytest.raises(UserError, match="is the active copy"):
            directory.remove_database_copy("DB01", "mbx2")
        directory.remove_database_copy("DB01", "mbx1")
        assert [c.server for c in directory.database_copies()] == ["mbx2"]
    engine = open_engine(directory_location(directory_data))
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        engine.execute(
            "INSERT INTO database_copies (database, server, activation_preference, "
            "is_active) VALUES ('DB01', 'mbx1', 3, 1)"
        )
    engine.close()


def test_mailboxes_settings_and_component_states(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        small_organization(directory)
        directory.new_mailbox("Ann@Example.test", "db01", "hash-1")
        directory.new_mailbox("bob@example.test", "DB01", "hash-2")
        assert directory.get_mailbox("ANN@example.test").database == "DB01"
        assert [m.address for m in directory.list_mailboxes("DB01")] == [
            "ann@example.test",
            "bob@example.test",
        ]
        directory.set_password_hash("ann@example.test", "hash-3")
        assert directory.get_mailbox("ann@example.test").password_hash == "hash-3"
        with pytest.raises(UserError, match="already exists"):
            directory.new_mailbox("ANN@example.test", "DB01", "x")
        directory.remove_mailbox("bob@example.test")
        assert directory.find_mailbox("bob@example.test") is None

        assert directory.pop_settings("mbx1") == (PopSettings(), 0)
        changed = PopSettings().with_changes({"MaxConnections": 77})
        assert directory.set_pop_settings("MBX1", changed) == 1
        assert directory.set_pop_settings("mbx1", changed) == 2
        assert directory.pop_settings("mbx1")[0].MaxConnections == 77

        directory.set_component_state("cas1", "popproxy", "inactive", "maintenance")
        directory.set_component_state("cas1", "PopProxy", "Active", "HealthApi")
        assert directory.component_state("CAS1", "PopProxy") == "Inactive"
        directory.set_component_state("cas1", "PopProxy", "Active", "Maintenance")
        assert directory.component_state("cas1", "PopProxy") == "Active"

        updated = directory.set_mailbox_server("mbx2", auto_activation_policy="blocked")
        assert not updated.may_activate_copies


def test_overrides_repairing_and_repairs(directory_data: Path) -> None:
    now = time.time()
    with Directory(directory_data) as directory:
        small_organization(directory)
        own = MonitoringOverride(
            "mbx1", "POP.Protocol\\PopDeepTestMonitor", "Monitor", "Enabled", "False",
            now, now + 60,
        )  # fmt: skip
        everywhere = MonitoringOverride(
            None, "POP\\PopSelfTestProbe", "Probe", "RecurrenceIntervalSeconds", "30",
            now, now + 60,
        )  # fmt: skip
        first = directory.add_monitoring_override(own)
        second = directory.add_monitoring_override(everywhere)
        assert second > first > 0
        assert [o.id for o in directory.monitoring_overrides("MBX1", now)] == [first, second]
        assert [o.id for o in directory.monitoring_overrides("mbx2", now)] == [second]
        assert len(directory.monitoring_overrides(None, now)) == 2
        assert directory.monitoring_overrides(None, now + 61) == []
        assert (
            directory.remove_monitoring_override(
                "MBX1", "pop.protocol\\popdeeptestmonitor", "Monitor", "enabled"
            )
            == 1
        )
        assert directory.remove_monitoring_override(None, own.identity, "Monitor", "Enabled") == 0
        assert directory.remove_monitoring_override(None, everywhere.identity, "Probe", "x") == 0
        # An override added after `everywhere` expired takes its row away with it.
        later = MonitoringOverride(
            "mbx2", "POP\\PopSelfTestMonitor", "Monitor", "Enabled", "False", now + 61, now + 120
        )  # fmt: skip
        third = directory.add_monitoring_override(later)
        rows = directory.raw_engine().execute("SELECT id FROM monitoring_overrides").fetchall()
        assert [row[0] for row in rows] == [third]
        assert [o.id for o in directory.monitoring_overrides("mbx2", now + 62)] == [third]
        directory.remove_monitoring_override("mbx2", later.identity, "Monitor", "Enabled")

        directory.set_monitor_repairing("mbx1", "POP\\PopSelfTestMonitor", True)
        directory.set_monitor_repairing("mbx1", "POP\\PopSelfTestMonitor", True)
        assert directory.monitors_repairing("MBX1") == {"pop\\popselftestmonitor"}
        directory.set_monitor_repairing("mbx1", "POP\\PopSelfTestMonitor", False)
        assert directory.monitors_repairing("mbx1") == set()

        directory.record_repair("mbx1", "mailbox", "restart", "pop3be", now - 10)
        directory.record_repair("mbx2", "mailbox", "restart", "pop3be", now)
        assert [r[0] for r in directory.repairs_since("mailbox", now - 60)] == ["mbx1", "mbx2"]
        directory.prune_repairs("mbx1", now - 5)
        assert [r[0] for r in directory.repairs_since("mailbox", now - 60)] == ["mbx2"]


def test_another_handles_commit_moves_the_change_counter(directory_data: Path) -> None:
    with Directory(directory_data) as reader, Directory(directory_data) as writer:
        small_organization(writer)
        before = reader.change_counter()
        writer.activate_copy("DB01", "mbx2")
        deadline = time.monotonic() + 10
        while reader.change_counter() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.change_counter() != before
        assert reader.active_server("DB01") == "mbx2"


def test_a_services_cached_reads_end_with_any_change(directory_data: Path) -> None:
    with Directory(directory_data) as service, Directory(directory_data) as operator:
        small_organization(operator)
        service.cache_reads()
        assert service.find_mailbox("late@example.test") is None
        assert service.active_server("DB01") == "mbx1"
        operator.new_mailbox("late@example.test", "DB01", "hash-1")
        operator.activate_copy("DB01", "mbx2")
        deadline = time.monotonic() + 10
        while service.find_mailbox("late@example.test") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.find_mailbox("late@example.test") is not None
        assert service.active_server("DB01") == "mbx2"
        # The service's own write is seen by its next read, NOTIFY or not.
        service.set_password_hash("late@example.test", "hash-2")
        mailbox = service.find_mailbox("late@example.test")
        assert mailbox is not None and mailbox.password_hash == "hash-2"


def test_writers_of_two_threads_take_turns(directory_data: Path) -> None:
    """set_pop_settings reads a revision and writes the next: concurrent writers must
    not give two changes one revision."""
    with Directory(directory_data) as directory:
        small_organization(directory)
    revisions: list[int] = []

    def write(count: int) -> None:
        with Directory(directory_data) as own:
            for n in range(count):
                change = PopSettings().with_changes({"MaxConnections": 100 + n})
                revisions.append(own.set_pop_settings("mbx1", change))

    threads = [threading.Thread(target=write, args=(15,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(revisions) == list(range(1, 46))


def test_leases_are_judged_by_the_directorys_clock(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        small_organization(directory)
        assert 9.0 < directory.renew_lease("MBX1") <= 10.0
        assert 0 < directory.renew_lease("mbx2", seconds=0.3) <= 0.3
        time.sleep(0.5)
        leases = directory.leases()
        assert leases["mbx1"] > 8.0 and leases["mbx2"] < 0
        assert "cas1" not in leases
        with pytest.raises(UserError, match="at most 3600 seconds"):
            directory.renew_lease("mbx1", seconds=0)

        assert directory.claim_role("ActiveManager", "mbx1", seconds=0.3)
        assert not directory.claim_role("ActiveManager", "mbx2")
        assert directory.claim_role("activemanager", "MBX1", seconds=0.3)  # its own, again
        time.sleep(0.5)
        assert directory.claim_role("ActiveManager", "mbx2")
        holder = directory.role_holder("ActiveManager")
        assert holder is not None and holder[0] == "mbx2" and holder[1] > 8


def test_a_failover_is_one_compare_and_set_on_an_expired_lease(directory_data: Path) -> None:
    with Directory(directory_data) as directory:
        small_organization(directory)
        epoch = directory.database_epoch("DB01")
        directory.renew_lease("mbx1", seconds=0.4)
        with pytest.raises(UserError, match=r"lease has .* left"):
            directory.fail_over("DB01", "mbx1", "mbx2", epoch)
        time.sleep(0.6)
        with pytest.raises(UserError, match="activated again meanwhile"):
            directory.fail_over("DB01", "mbx1", "mbx2", epoch + 7)
        with pytest.raises(UserError, match="no longer active on mbx2"):
            directory.fail_over("DB01", "mbx2", "mbx1", epoch)

        # Two deciders at once: exactly one activation.
        outcomes: list[str] = []

        def decide() -> None:
            with Directory(directory_data) as own:
                try:
                    outcomes.append(f"epoch {own.fail_over('DB01', 'mbx1', 'mbx2', epoch)}")
                except UserError as exc:
                    outcomes.append(str(exc))

        threads = [threading.Thread(target=decide) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert f"epoch {epoch + 1}" in outcomes
        assert sum(o.startswith("epoch") for o in outcomes) == 1, outcomes
        assert all("no longer active on mbx1" in o for o in outcomes if o[0] != "e"), outcomes
        assert directory.active_server("DB01") == "mbx2"
        assert directory.database_epoch("db01") == epoch + 1
        directory.activate_copy("DB01", "mbx1")  # a switchover is an activation too
        assert directory.database_epoch("DB01") == epoch + 2


def test_a_sqlite_directory_from_before_replication_gets_its_ports_and_columns(
    tmp_path: Path,
) -> None:
    from popguard import sqlite_util

    old = sqlite3.connect(tmp_path / "directory.sqlite", isolation_level=None)
    sqlite_util.migrate(old, [step.script("sqlite") for step in MIGRATIONS[:2]], "test")
    old.execute(
        "INSERT INTO servers VALUES ('mbx1', '[\"mailbox\"]', '127.0.2.1', "
        '\'{"pop3be": 1110, "pop3be-tls": 1995, "lmtp": 2424}\')'
    )
    old.execute("INSERT INTO servers VALUES ('cas1', '[\"frontend\"]', '127.0.1.1', '{}')")
    old.close()
    with Directory(tmp_path) as directory:
        mbx1, cas1 = directory.get_server("mbx1"), directory.get_server("cas1")
    assert mbx1.port("replication") == 64327 and "replication" not in cas1.ports
    assert mbx1.port("lmtp-peer") == 2425 and "lmtp-peer" not in cas1.ports
    assert mbx1.may_activate_copies and mbx1.auto_activation_policy == "Unrestricted"


# Where the directory is, and what a wrong [directory] section gets --------------------


def write_section(data: Path, text: str) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "popguard.toml").write_text(text)


def test_no_section_is_sqlite_in_the_data_folder(tmp_path: Path) -> None:
    assert directory_location(tmp_path) == SqliteLocation(tmp_path / "directory.sqlite")
    write_section(tmp_path, f'[directory]\npath = "{tmp_path}/shared/dir.sqlite"\n')
    assert directory_location(tmp_path) == SqliteLocation(tmp_path / "shared/dir.sqlite")


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ('url = "mysql://u@h/db"', "must start with postgresql://"),
        ('url = "postgresql://u:secret@h/db"', "must not hold a password"),
        ('url = "postgresql://u@h"', "names no database"),
        ('password_file = "/x"', "password_file needs a url"),
        ('url = "postgresql://u@h/db"\npath = "/x"', "url or path, not both"),
        ("port = 5432", "directory.port: Extra inputs are not permitted"),
    ],
)
def test_a_wrong_directory_section_is_one_clear_line(
    tmp_path: Path, section: str, error: str
) -> None:
    write_section(tmp_path, f"[directory]\n{section}\n")
    with pytest.raises(UserError, match=error) as caught:
        Directory(tmp_path)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "directory.sqlite").exists()  # nothing written


def test_postgresql_login_problems_are_one_clear_line(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.new_database()
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    location = PostgresLocation(url, wrong)
    with pytest.raises(DirectoryUnavailable, match="password authentication failed"):
        Directory(tmp_path, location)
    wrong.chmod(0o644)
    with pytest.raises(UserError, match=r"owner only \(chmod 600\)"):
        Directory(tmp_path, location)
    nobody_listens = f"postgresql://popguard@127.0.0.1:{free_port()}/popguard"
    with pytest.raises(DirectoryUnavailable, match="directory unreachable") as caught:
        Directory(tmp_path, PostgresLocation(nobody_listens, postgres.password_file))
    assert "\n" not in str(caught.value)
    missing = url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(DirectoryUnavailable, match="does not exist"):
        Directory(tmp_path, PostgresLocation(missing, postgres.password_file))


def free_port() -> int:
    return net.free_port("127.0.0.1")


# The one SQL text and its two spellings ------------------------------------------------


@given(st.lists(st.integers(min_value=1, max_value=9), max_size=12), st.text(max_size=20))
def test_numbered_parameters_take_their_values_in_order(numbers: list[int], text: str) -> None:
    literal = text.replace("$", "").replace("'", "")
    sql = " AND ".join(f"c{i} = ${n}" for i, n in enumerate(numbers)) + f" '{literal}'"
    params = [f"value{n}" for n in range(1, 10)]
    statement, ordered = psycopg_statement(sql, params)
    assert ordered == [params[n - 1] for n in numbers]
    assert list(numbered_parameters(sql)) == [n - 1 for n in numbers]
    # Read back as psycopg reads it: %% is a percent sign, %s a placeholder.
    read_back = re.sub(r"%%|%s", lambda m: "%" if m.group() == "%%" else "$?", statement)
    assert read_back == re.sub(r"\$\d+", "$?", sql)
    assert re.findall(r"\?(\d+)", sqlite_statement(sql)) == [str(n) for n in numbers]


# port-directory ----------------------------------------------------------------------


def run_popguard(data: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popguard", "--data", str(data), *argv],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def filled_sqlite_directory(data: Path) -> str:
    with Directory(data) as directory:
        small_organization(directory)
        for n in range(30):
            directory.new_mailbox(f"user{n}@example.test", "DB01", f"hash-{n}")
        directory.set_pop_settings("mbx1", PopSettings().with_changes({"MaxConnections": 9}))
        directory.set_component_state("cas1", "PopProxy", "Inactive", "Maintenance")
        now = time.time()
        directory.add_monitoring_override(
            MonitoringOverride(None, "POP\\PopSelfTestProbe", "Probe", "Enabled", "False",
                               now, now + 3600)
        )  # fmt: skip
        directory.record_repair("mbx1", "mailbox", "restart", "pop3be", now)
        return directory.organization_id()


@pytest.mark.timeout(300)
def test_port_directory_copies_everything_resumes_and_refuses_another_organization(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    data = tmp_path / "one-machine"
    organization = filled_sqlite_directory(data)
    url = postgres.new_database()
    port = ("port-directory", "--to", url, "--password-file", str(postgres.password_file))

    # Cut short: a lock held on one table stops the copy there; kill -9 it then.
    locker = psycopg.connect(url, password=postgres.password, autocommit=True)
    Directory(tmp_path / "schema-only", PostgresLocation(url, postgres.password_file)).close()
    locker.execute("BEGIN")
    locker.execute("LOCK TABLE component_states IN ACCESS EXCLUSIVE MODE")
    process = subprocess.Popen(
        [sys.executable, "-m", "popguard", "--data", str(data), *port],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        waiting = locker.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
            "'component_states'::regclass"
        ).fetchone()
        if waiting and waiting[0]:
            break
        time.sleep(0.05)
    process.kill()
    process.wait(30)
    locker.execute("ROLLBACK")
    locker.close()

    again = run_popguard(data, *port)
    assert again.returncode == 0, again.stderr
    lines = {line.split()[0]: line.split() for line in again.stdout.splitlines() if line}
    assert lines["servers"][1:4] == ["0", "new", "3"]  # copied before the kill
    assert lines["mailboxes"][1] == "0"
    assert lines["component_states"][1] == "1"  # the rest only now
    assert lines["repairs"][1] == "1"
    assert f'url = "{url}"' in again.stdout

    ported = tmp_path / "ported"
    ported.mkdir()
    (ported / "popguard.toml").write_text(postgres.directory_section(url))
    with Directory(ported) as directory, Directory(data) as original:
        assert directory.engine == "postgresql"
        assert directory.organization_id() == organization
        assert directory.list_mailboxes() == original.list_mailboxes()
        assert directory.database_copies() == original.database_copies()
        assert directory.pop_settings("mbx1") == original.pop_settings("mbx1")
        assert directory.component_state("cas1", "PopProxy") == "Inactive"
        assert len(directory.monitoring_overrides(None, time.time())) == 1
        # New generated ids come after the copied ones.
        directory.record_repair("mbx2", "mailbox", "restart", "pop3be", time.time())
        assert len(directory.repairs_since("mailbox", 0)) == 2
        original.new_mailbox("late@example.test", "DB01", "hash-late")

    third = run_popguard(data, *port)
    assert third.returncode == 0, third.stderr
    assert "copied 1 rows" in third.stdout  # only what changed since

    other = tmp_path / "other-organization"
    filled_sqlite_directory(other)
    refused = run_popguard(other, *port)
    assert refused.returncode == 1
    assert "holds another organization" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_port_directory_bad_input_is_one_line(postgres: PostgresServer, tmp_path: Path) -> None:
    empty = run_popguard(tmp_path / "nothing", "port-directory", "--to", postgres.url("x"))
    assert empty.returncode == 1 and "no SQLite directory to copy" in empty.stderr
    filled_sqlite_directory(tmp_path / "d")
    wrong = run_popguard(tmp_path / "d", "port-directory", "--to", "postgresql://u:pw@h/db")
    assert wrong.returncode == 1 and "must not hold a password" in wrong.stderr
    unreachable = run_popguard(
        tmp_path / "d", "port-directory", "--to",
        f"postgresql://popguard@127.0.0.1:{free_port()}/popguard",
    )  # fmt: skip
    assert unreachable.returncode == 1
    assert "directory unreachable" in unreachable.stderr
    for result in (empty, wrong, unreachable):
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_synchronous_mark_is_on_a_passive_copy_and_every_activation_clears_it(
    directory_data: Path,
) -> None:
    with Directory(directory_data) as directory:
        small_organization(directory)

        def marks() -> dict[str, bool]:
            return {c.server: c.synchronous for c in directory.database_copies("db01")}

        assert marks() == {"mbx1": False, "mbx2": False}
        assert directory.copy_count("DB01") == 2 and directory.copy_count("DB99") == 0
        directory.set_copy_synchronous("DB01", "mbx2", True)
        directory.set_copy_synchronous("DB01", "mbx1", True)  # the active copy: no mark
        assert marks() == {"mbx1": False, "mbx2": True}
        directory.set_copy_synchronous("DB01", "mbx2", False)
        assert marks() == {"mbx1": False, "mbx2": False}
        directory.set_copy_synchronous("DB01", "mbx2", True)
        directory.activate_copy("DB01", "mbx2")  # a new active copy has no synchronous copy
        assert marks() == {"mbx1": False, "mbx2": False}
