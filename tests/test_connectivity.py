"""test-popconnectivity against a running organization, as an operator types it."""

from __future__ import annotations

import json

from popguard import paths
from popguard.store.mailbox_database import MailboxDatabase
from popguard.testing.organization import popguard

from .conftest import PASSWORD, Organization


def message_count(org: Organization, address: str) -> int:
    with org.directory() as directory:
        database = directory.get_mailbox(address).database
        active = directory.active_server(database)
    store = MailboxDatabase(
        paths.server_folder(org.data, active).database_copy_file(database), database
    )
    try:
        return len(store.maildrop(address))
    finally:
        store.close()


def steps(shown: str) -> dict[str, dict[str, object]]:
    return {row["Scenario"]: row for row in json.loads(shown)}


def test_every_step_through_the_front_end(watched_organization: Organization) -> None:
    org = watched_organization
    user = org.add_mailbox("tess@example.test")
    for connection_type, expected in (
        ("tls", ["Deliver test message", "Connect", "TLS", "Login", "List", "Retrieve", "Delete"]),
        ("ssl", ["Deliver test message", "Connect", "TLS", "Login", "List", "Retrieve", "Delete"]),
    ):
        shown = popguard(org.data, "test-popconnectivity", "--client-access-server", "cas1",
                         "--mailbox-credential", user, "--connection-type", connection_type,
                         "--format", "json", stdin=PASSWORD + "\n")  # fmt: skip
        assert shown.returncode == 0, (shown.stdout, shown.stderr)
        result = steps(shown.stdout)
        assert list(result) == expected
        assert all(r["Result"] == "Success" and r["CasServer"] == "cas1" for r in result.values())
        assert all(isinstance(r["Latency(MS)"], float) for r in result.values())
    # The test message was deleted again: the mailbox is as it was.
    client_view = popguard(org.data, "test-popconnectivity", "--client-access-server", "cas1",
                           "--light-mode", "--format", "json")  # fmt: skip
    assert client_view.returncode == 0, client_view.stderr
    assert list(steps(client_view.stdout)) == ["Connect", "TLS", "Login"]


def test_the_failing_step_says_why_and_the_rest_are_skipped(
    watched_organization: Organization,
) -> None:
    org = watched_organization
    user = org.add_mailbox("ugo@example.test")
    wrong = popguard(org.data, "test-popconnectivity", "--client-access-server", "cas1",
                     "--mailbox-credential", user, "--format", "json",
                     stdin="not the password\n")  # fmt: skip
    assert wrong.returncode == 1
    result = steps(wrong.stdout)
    assert result["Login"]["Result"] == "Failure" and "[AUTH]" in str(result["Login"]["Error"])
    assert [result[s]["Result"] for s in ("List", "Retrieve", "Delete")] == ["Skipped"] * 3
    assert wrong.stderr.strip().startswith("popguard: Login failed: login: -ERR [AUTH]")
    # The test message it delivered is not left in the user's mailbox.
    assert message_count(org, user) == 0
    # LMTP down: the delivery fails, but connect, TLS and login are tested all the same.
    org.mailbox["mbx1"].kill("delivery")
    try:
        undelivered = popguard(org.data, "test-popconnectivity", "--client-access-server",
                               "cas1", "--mailbox-credential", user, "--format", "json",
                               stdin=PASSWORD + "\n")  # fmt: skip
    finally:
        org.mailbox["mbx1"].start("delivery")
    result = steps(undelivered.stdout)
    assert result["Deliver test message"]["Result"] == "Failure", result
    assert [result[s]["Result"] for s in ("Connect", "TLS", "Login")] == ["Success"] * 3
    assert [result[s]["Result"] for s in ("List", "Retrieve", "Delete")] == ["Skipped"] * 3
    # Plaintext against a front end that requires TLS: refused at login, as a client would be.
    plain = popguard(org.data, "test-popconnectivity", "--client-access-server", "cas1",
                     "--connection-type", "plaintext", "--light-mode",
                     "--format", "json")  # fmt: skip
    assert steps(plain.stdout)["Login"]["Result"] == "Failure"
    # Nothing listening on that port: the connection fails, and nothing else is tried.
    nowhere = popguard(org.data, "test-popconnectivity", "--client-access-server", "cas1",
                       "--port-client-access-server", "9", "--light-mode",
                       "--format", "json")  # fmt: skip
    result = steps(nowhere.stdout)
    assert result["Connect"]["Result"] == "Failure" and "cannot connect" in str(
        result["Connect"]["Error"]
    )
    assert result["TLS"]["Result"] == "Skipped" and result["Login"]["Result"] == "Skipped"
    for args, message in (
        (("--client-access-server", "mbx1"), "mbx1 is not a client access server"),
        (("--client-access-server", "cas9"), "no server named 'cas9'"),
        (("--client-access-server", "cas1", "--connection-type", "carrier-pigeon"),
         "Invalid value"),
    ):  # fmt: skip
        shown = popguard(org.data, "test-popconnectivity", *args)
        assert shown.returncode == 1 and message in shown.stderr, shown.stderr
        assert len(shown.stderr.strip().splitlines()) == 1
