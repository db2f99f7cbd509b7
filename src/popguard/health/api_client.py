"""Asking a server's health service over its API (HTTPS, the organization's CA, the
bearer token): what the health commands and the web page both read."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popguard.errors import UserError
from popguard.net.health_api import api_tls, api_token, request

if TYPE_CHECKING:
    from popguard.directory.directory import Directory, Server


def ask(data: Path, directory: Directory, server_name: str, method: str, path: str,
        body: Any = None) -> Any:  # fmt: skip
    server = directory.get_server(server_name)
    return request(server, api_token(data), api_tls(data), method, path, body)


def ask_each(
    data: Path, directory: Directory, server_name: str | None, path: str | Callable[[str], str]
) -> list[dict[str, Any]]:
    """The rows of one server, or of every server of the organization (`path` may
    differ per server: a function of its name). Asked of every server, a health
    service that does not answer is one row saying so: the others' rows still show."""
    path_of = path if callable(path) else lambda _: path
    if server_name is not None:
        rows: list[dict[str, Any]] = ask(data, directory, server_name, "GET", path_of(server_name))
        return rows
    servers = directory.list_servers()
    token, tls = api_token(data), api_tls(data)

    def one(server: Server) -> list[dict[str, Any]]:
        try:
            answer: list[dict[str, Any]] = request(server, token, tls, "GET", path_of(server.name))
        except UserError as exc:
            return [{"Server": server.name, "Error": str(exc)}]
        return answer

    # At once, so that one hung server costs one timeout, not one per server after it.
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        return [row for rows in pool.map(one, servers) for row in rows]
