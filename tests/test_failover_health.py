"""Active Manager asks the target's own health sets: it never activates a copy on a
server whose engine calls it Unhealthy, records why, and activates there once the
server is healthy again (issue 13, item 3). Real processes on loopback: replication
and health services on both mailbox servers, Active Manager on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from popguard import paths
from popguard.directory.directory import Directory
from popguard.testing.organization import popguard_output, wait_until

from .conftest import Organization, message, running_organization
from .test_synchronous_copy import synchronous


def _unhealthy_sets(org: Organization, server: str) -> list[str]:
    rows = json.loads(popguard_output(org.data, "get-healthreport", server, "--format", "json"))
    return [row["HealthSet"] for row in rows if row["AlertValue"] == "Unhealthy"]


def _decisions(org: Organization, server: str) -> list[dict[str, Any]]:
    try:
        text = paths.server_folder(org.data, server).failover_decisions_file().read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _active(org: Organization, database: str) -> str:
    with Directory(org.data) as directory:
        return directory.active_server(database)


@pytest.mark.timeout(600)
def test_active_manager_waits_for_an_unhealthy_target_to_heal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "popguard.toml").write_text("[active_manager]\nenabled = true\n")
    with running_organization(data, replication=True, health=True) as org:
        user = org.add_mailbox("heal@example.test")
        org.deliver(user, message("kept through the failover"))
        wait_until("DB01\\mbx2 to be synchronous", lambda: synchronous(org, "DB01", "mbx2"), 120)
        # mbx2's back end dies (nothing restarts it here): its engine calls it Unhealthy.
        org.mailbox["mbx2"].kill("pop3be")
        wait_until("mbx2's health to call it Unhealthy",
                   lambda: bool(_unhealthy_sets(org, "mbx2")), 240)  # fmt: skip
        # Now mbx1 can no longer renew its lease: DB01's only other copy is on mbx2.
        org.mailbox["mbx1"].kill("replication")

        def refused_for_health() -> bool:
            return any(d["database"] == "DB01" and d["result"] == "NotMoved"
                       and "mbx2's health sets call it Unhealthy" in d["reason"]
                       for d in _decisions(org, "mbx2"))  # fmt: skip

        wait_until("Active Manager to refuse mbx2 for its health", refused_for_health, 120)
        assert _active(org, "DB01") == "mbx1"
        assert not any(d["result"] == "Succeeded" for d in _decisions(org, "mbx2"))

        # mbx2 heals: its back end runs again, its probes pass, and DB01 moves there.
        org.mailbox["mbx2"].start("pop3be")
        wait_until("DB01 to fail over to mbx2 once it is healthy",
                   lambda: _active(org, "DB01") == "mbx2", 300)  # fmt: skip
        moved = [d for d in _decisions(org, "mbx2") if d["result"] == "Succeeded"]
        assert [(d["database"], d["source"], d["target"]) for d in moved] == [
            ("DB01", "mbx1", "mbx2")
        ]
