"""Where the web page listens on a host whose front end has a real address (a network
namespace of the test's own): on loopback by default, in plain HTTP; told to listen on
the host's address, HTTPS only, with the organization's certificate and a Secure
session cookie."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard.testing.hosts import Host, HostNetwork
from popguard.testing.organization import popguard_output, wait_until

WEB_PORT = 8088


@pytest.fixture
def host() -> Iterator[Host]:
    with HostNetwork.make(["front"]) as network:
        yield network["front"]


def curl(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.command("curl", "-sS", "--max-time", "5", *args),
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def serve_web(host: Host, data: Path, log: Path, *listen: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "popguard", "--data", str(data), "serve", "web",
               "--server", "cas1", *listen]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(host.command(*command), stdout=out, stderr=out)


def test_the_page_is_on_loopback_by_default_and_https_elsewhere(host: Host, tmp_path: Path) -> None:
    data = tmp_path / "data"
    popguard_output(data, "new-server", "cas1", "--role", "frontend", "--address", host.address)
    popguard_output(data, "new-webuser", "op", "--role", "operator", "--password-stdin",
                    stdin="a long enough password\n")  # fmt: skip
    log = tmp_path / "web.log"
    process = serve_web(host, data, log)
    try:
        wait_until("the page on the host's loopback",
                   lambda: curl(host, "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{WEB_PORT}/login").stdout == "200",
                   30)  # fmt: skip
        # Not on the host's own address: no one off the host reaches it.
        outside = curl(host, f"http://{host.address}:{WEB_PORT}/login")
        assert outside.returncode != 0, outside.stdout
    finally:
        process.terminate()
        process.wait(30)

    process = serve_web(host, data, log, "--listen", host.address)
    ca = str(data / "tls" / "ca.pem")
    url = f"https://{host.address}:{WEB_PORT}/login"
    try:
        wait_until("the page over HTTPS",
                   lambda: curl(host, "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}",
                                url).stdout == "200", 30)  # fmt: skip
        headers = curl(host, "--cacert", ca, "-D", "-", "-o", "/dev/null", url).stdout
        cookie = next(
            line for line in headers.splitlines() if line.lower().startswith("set-cookie")
        )
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # No plain HTTP beside it.
        plain = curl(host, f"http://{host.address}:{WEB_PORT}/login")
        assert plain.returncode != 0 or "HTTP/" not in plain.stdout
    finally:
        process.terminate()
        process.wait(30)
    assert "web page on https://" in log.read_text()
