"""The `popguard` command's edges (issue 17): Exchange spellings, --data after the
command, every server at once, empty results, what clear-fault ended, JSON nulls,
moves that need none, the only front end, a database picked for a new mailbox."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popguard.cli.main import COMMAND_MODULES, command_key, data_first
from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard, serve, wait_until

from .conftest import json_of, wait_for


def bare_popguard(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`popguard` with the arguments exactly as typed (no --data put in front)."""
    return subprocess.run([sys.executable, "-m", "popguard", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    address = free_loopback_address()
    for args in (
        ("new-server", "mbx1", "--role", "mailbox", "--address", address),
        ("new-mailboxdatabase", "DB01", "--server", "mbx1"),
        ("new-server", "cas1", "--role", "frontend", "--address", free_loopback_address()),
    ):
        assert popguard(data, *args).returncode == 0
    return data


def test_the_command_table_names_every_command_of_its_modules() -> None:
    found = {}
    for module_name in set(COMMAND_MODULES.values()):
        module = importlib.import_module(f"popguard.cli.{module_name}")
        found.update({command.name: module_name for command in module.COMMANDS})
    assert found == COMMAND_MODULES
    # No two commands come down to one spelling.
    assert len({command_key(name) for name in COMMAND_MODULES}) == len(COMMAND_MODULES)


@pytest.mark.parametrize("spelling", ["Get-Server", "GET-SERVER", "get-server", "getserver"])
def test_a_command_in_any_exchange_spelling(folder: Path, spelling: str) -> None:
    shown = popguard(folder, spelling, "mbx1", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert [row["Name"] for row in json.loads(shown.stdout)] == ["mbx1"]


def test_usage_errors_and_help_use_the_canonical_names(folder: Path) -> None:
    helped = popguard(folder, "Get-MailboxDatabaseCopyStatus", "--help")
    assert "popguard get-mailboxdatabasecopystatus [OPTIONS]" in helped.stdout.splitlines()[0]
    listed = popguard(folder, "--help")
    assert listed.returncode == 0
    commands = listed.stdout.split("Commands:")[1].split()
    assert "get-serverhealth" in commands and "Get-ServerHealth" not in commands
    one_line_error(popguard(folder, "Get-Nothing"), "No such command 'Get-Nothing'")


@pytest.mark.parametrize(
    "args",
    [
        ("get-server", "mbx1", "--data", "{data}"),
        ("get-server", "--data={data}", "mbx1"),
        ("--data", "{data}", "get-server", "mbx1", "--data", "{data}/"),
    ],
)
def test_data_after_the_command_means_the_same(folder: Path, args: tuple[str, ...]) -> None:
    shown = bare_popguard(*(a.format(data=folder) for a in args), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert [row["Name"] for row in json.loads(shown.stdout)] == ["mbx1"]


def test_two_different_data_folders_are_one_line(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    result = bare_popguard("--data", str(folder), "get-server", "--data", str(other))
    one_line_error(result, f"--data given as {folder} and {other}: give one data folder")
    assert not other.exists()


words = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)


@given(st.lists(words.filter(lambda w: not w.startswith("--data")), max_size=8), st.data())
def test_data_first_moves_only_the_data_option(args: list[str], draw: st.DataObject) -> None:
    assert data_first(args) == args
    if "--" in args:
        return
    at = draw.draw(st.integers(0, len(args)))
    equals = draw.draw(st.booleans())
    inserted = ["--data=D"] if equals else ["--data", "D"]
    assert data_first([*args[:at], *inserted, *args[at:]]) == ["--data", "D", *args]


def test_restart_server_refuses_the_only_front_end(folder: Path) -> None:
    one_line_error(popguard(folder, "restart-server", "cas1"), "cas1 is the only front end")


def test_a_move_to_where_the_database_is_active_says_so(folder: Path) -> None:
    shown = json_of(folder, "move-activemailboxdatabase", "DB01", "--activate-on-server", "MBX1")
    (row,) = shown
    assert row["Status"] == "NotMoved" and row["ErrorMessage"] == "already active on mbx1"
    assert row["ActiveServerAtStart"] == row["ActiveServerAtEnd"] == "mbx1"


def test_json_writes_null_where_there_is_no_value(folder: Path) -> None:
    (copy,) = json_of(folder, "get-mailboxdatabasecopystatus")
    assert copy["LastInspectedLogTime"] is None and copy["CopyQueueLength"] is None
    assert "" not in copy.values()
    table = popguard(folder, "get-mailboxdatabasecopystatus")
    assert "None" not in table.stdout


@pytest.mark.parametrize("command", ["new-mailbox", "set-mailbox"])
def test_a_short_password_is_refused(folder: Path, command: str) -> None:
    if command == "set-mailbox":
        assert popguard(folder, "new-mailbox", "a@b.test", "--database", "DB01").returncode == 0
    args: tuple[str, ...] = (command, "a@b.test", "--password-stdin")
    if command == "new-mailbox":
        args = (*args, "--database", "DB01")
    one_line_error(popguard(folder, *args, stdin="x\n"), "password of 1 characters: at least 8")
    assert popguard(folder, *args, stdin="eight ch\n").returncode == 0


def test_no_database_to_pick_without_a_mounted_active_copy(folder: Path) -> None:
    # No replication service runs here, so no active copy is reported Mounted.
    one_line_error(popguard(folder, "new-mailbox", "a@b.test"),
                   "no database has an active copy that is Mounted: give --database")  # fmt: skip


def test_clear_fault_says_what_it_ended(folder: Path) -> None:
    (folder / "popguard.toml").write_text("[faults]\nenabled = true\n")
    injected = popguard(folder, "inject-fault", "--server", "mbx1", "--service", "pop3be",
                        "--kind", "slow", "--seconds", "3")  # fmt: skip
    assert injected.returncode == 0, injected.stderr
    cleared = popguard(folder, "clear-fault", "--server", "mbx1", "--service", "pop3be")
    assert cleared.stdout.strip() == "mbx1/pop3be: ended slow (3s a reply)"
    again = popguard(folder, "clear-fault", "--server", "mbx1", "--service", "pop3be")
    assert again.stdout.strip() == "mbx1/pop3be: no fault to end"


@pytest.fixture
def health_of_mbx1(folder: Path, tmp_path: Path) -> Iterator[Path]:
    """mbx1's health service alone: its probes find nothing running, but no monitor
    reaches an alert within the test (4 failures at 60 s apart), so nothing is repaired."""
    health = serve(folder, "health", "mbx1", tmp_path / "health.log")
    try:
        wait_until("mbx1's health API",
                   lambda: popguard(folder, "get-healthreport", "mbx1").returncode == 0,
                   60)  # fmt: skip
        yield folder
    finally:
        health.terminate()
        health.wait(timeout=30)


def test_health_commands_without_a_server_cover_every_server(health_of_mbx1: Path) -> None:
    data = health_of_mbx1
    rows = json_of(data, "get-serverhealth")
    mbx1 = [r for r in rows if r["Server"] == "mbx1"]
    assert mbx1 and all("AlertValue" in r for r in mbx1)
    # cas1's health service does not run: one row says so, the others still show.
    (cas1,) = [r for r in rows if r["Server"] == "cas1"]
    assert "the health service of cas1 does not answer" in cas1["Error"]
    table = popguard(data, "Get-HealthReport")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[0] == "Server" and "does not answer" in table.stdout
    assert {r["Server"] for r in json_of(data, "get-alerts")} == {"cas1"}


def test_empty_results_say_so(health_of_mbx1: Path) -> None:
    data = health_of_mbx1
    actions = popguard(data, "get-recoveryactions", "--server", "mbx1")
    assert actions.stdout.strip() == "no recovery actions on mbx1 in the last 7 days"
    assert json_of(data, "get-recoveryactions", "--server", "mbx1") == []
    alerts = popguard(data, "get-alerts", "--server", "mbx1")
    assert alerts.stdout.strip() == "no alerts on mbx1"


def test_new_mailbox_picks_the_emptiest_mounted_database(detached_organization: Path) -> None:
    data = detached_organization

    def mounted() -> bool:
        rows = json_of(data, "get-mailboxdatabasecopystatus")
        return [r["Status"] for r in rows].count("Mounted") == 2

    wait_for("both active copies Mounted", mounted)
    before = {db: 0 for db in ("DB01", "DB02")}
    for mailbox in json_of(data, "get-mailbox"):
        before[mailbox["Database"]] += 1
    emptiest = min(before, key=lambda db: (before[db], db))
    created = popguard(data, "new-mailbox", "picked@example.test", "--format", "json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)[0]["Database"] == emptiest
    assert f"new-mailbox: in {emptiest}, which has the fewest mailboxes" in created.stderr


def test_new_webuser_refuses_bad_input_in_one_line(folder: Path) -> None:
    made = popguard(folder, "new-webuser", "alice", "--role", "viewer", "--password-stdin",
                    "--format", "json", stdin="a long enough password\n")  # fmt: skip
    assert made.returncode == 0, made.stderr
    (row,) = json.loads(made.stdout)
    assert (row["Name"], row["Role"]) == ("alice", "viewer") and "Password" not in row
    for args, stdin, said in (
        (("alice", "--role", "viewer"), "another long password\n", "web user alice already"),
        (("bob", "--role", "viewer"), "short\n", "at least 12 characters"),
        (("bob", "--role", "viewer"), "\n", "no password on standard input"),
        (("9bob", "--role", "operator"), "a long enough password\n", "not a valid web user"),
    ):
        refused = popguard(folder, "new-webuser", *args, "--password-stdin", stdin=stdin)
        assert refused.returncode == 1 and said in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    unknown_role = popguard(folder, "new-webuser", "carol", "--role", "admin", "--password-stdin",
                            stdin="a long enough password\n")  # fmt: skip
    assert unknown_role.returncode == 1 and "admin" in unknown_role.stderr
    listed = json_of(folder, "get-webuser")
    assert [(u["Name"], u["Role"]) for u in listed] == [("alice", "viewer")]
    assert "argon2" not in json.dumps(listed)
