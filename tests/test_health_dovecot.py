"""The same probes and monitors on a POP3 server popguard did not build: a real Dovecot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from popguard.health.external import config_file
from popguard.testing.organization import popguard

from .conftest import running_organization
from .dovecot_server import private_dovecot

HOST = "127.0.9.5"
USER, PASSWORD = "watcher", "watch this"


def rows_for(data: Path, resource: str) -> dict[str, dict[str, Any]]:
    shown = popguard(data, "get-serverhealth", "mbx1", "--health-set", "POP.Protocol",
                     "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return {r["Name"]: r for r in json.loads(shown.stdout) if r["TargetResource"] == resource}


def wait_for(data: Path, resource: str, monitor: str, value: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    row: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        row = rows_for(data, resource).get(monitor)
        if row is not None and row["AlertValue"] == value:
            return
        time.sleep(0.5)
    raise AssertionError(f"{monitor} on {resource} never became {value}: {row}")


def test_a_dovecot_is_watched_and_goes_unhealthy_when_stopped(tmp_path: Path) -> None:
    with (
        private_dovecot(HOST, USER, PASSWORD) as dovecot,
        running_organization(tmp_path / "data", health=True) as org,
    ):
        dovecot.fill([b"Subject: watched\n\nhello\n"])
        credentials = tmp_path / "dovecot1.creds"
        credentials.write_text(f"{USER}\n{PASSWORD}\n")
        credentials.chmod(0o600)
        config_file(org.data).write_text(
            f"""
[[pop3_servers]]
name = "dovecot1"
host = "{HOST}"
port = {dovecot.implicit_port}
tls = "tls"
credentials_file = "{credentials}"
ca_file = "{dovecot.pki.ca_file}"
watched_by = "mbx1"
"""
        )
        for monitor in ("PopSelfTestMonitor", "PopDeepTestMonitor"):
            wait_for(org.data, "dovecot1", monitor, "Healthy")
        shown = popguard(org.data, "invoke-monitoringprobe",
                         "POP.Protocol\\PopDeepTestProbe\\dovecot1", "--server", "mbx1",
                         "--format", "json")  # fmt: skip
        (result,) = json.loads(shown.stdout)
        assert result["ResultType"] == "Succeeded", result
        assert "C: PASS ****" in result["ExecutionContext"] and PASSWORD not in shown.stdout

        dovecot.server.stop()
        wait_for(org.data, "dovecot1", "PopSelfTestMonitor", "Unhealthy")
        row = rows_for(org.data, "dovecot1")["PopSelfTestMonitor"]
        assert "cannot connect" in row["Error"]
        # popguard's own back end on mbx1 is still fine.
        assert rows_for(org.data, "pop3be")["PopSelfTestMonitor"]["AlertValue"] == "Healthy"
