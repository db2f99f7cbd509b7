"""The wire of a server's health API (HTTPS, the organization's CA, the bearer token):
one request, and the token and trust it needs. Below the health engine, so that the
replication service (Active Manager asks a target's health) and the commands both
use it; health/api_client.py builds the commands' questions on it."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popguard import paths
from popguard.errors import UserError

if TYPE_CHECKING:
    from popguard.directory.directory import Server

API_TIMEOUT = 10.0
INVOKE_TIMEOUT = 120.0


def api_token(data: Path) -> str:
    try:
        return paths.api_token_file(data).read_text().strip()
    except OSError:
        raise UserError(
            f"no health API token in {paths.api_token_file(data)}: has a health service "
            "ever run (popguard serve health)?"
        ) from None


def api_tls(data: Path) -> ssl.SSLContext:
    """Trusts the organization's CA alone: the health API speaks HTTPS with the
    organization's certificates, on this host or another."""
    ca = paths.tls_dir(data) / "ca.pem"
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except OSError:
        raise UserError(
            f"no organization CA certificate in {ca}: has popguard run here, or were this "
            "host's credentials imported (import-server-credentials)?"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def request(
    server: Server,
    token: str,
    tls: ssl.SSLContext,
    method: str,
    path: str,
    body: Any = None,
    timeout: float | None = None,
) -> Any:
    """One call of SERVER's health API. http.client, not httpx: this runs in every
    health command, and httpx's import alone costs more than the whole request."""
    address, port = server.address, server.port("health")
    if timeout is None:
        timeout = INVOKE_TIMEOUT if path == "invoke" else API_TIMEOUT
    headers = {"Authorization": f"Bearer {token}"}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPSConnection(address, port, timeout=timeout, context=tls)
    try:
        connection.request(method, f"/v1/{path}", body=payload, headers=headers)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        raise UserError(
            f"the health service of {server.name} does not answer at {address}:{port} "
            f"({exc or type(exc).__name__}); is `popguard serve health --server {server.name}` "
            "running?"
        ) from None
    finally:
        connection.close()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if response.status != 200:
        reason = answer.get("error", text) if isinstance(answer, dict) else text
        raise UserError(f"{server.name}: {reason}")
    if answer is None:
        raise UserError(f"{server.name}: the health API answered with no JSON")
    return answer
