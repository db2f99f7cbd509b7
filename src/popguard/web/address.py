"""Where the web page listens and its URL: loopback by default, HTTPS anywhere else.
A leaf, so that `popguard up` can say the URL without loading the page's code."""

from __future__ import annotations

import ipaddress

from popguard.errors import UserError

FALLBACK_ADDRESS = "127.0.0.1"


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def listen_address(server_address: str, wanted: str | None = None) -> str:
    """Where the page listens: `wanted`, else the server's address if it is loopback
    (each logical server of `popguard up` has one), else 127.0.0.1."""
    if wanted:
        try:
            ipaddress.ip_address(wanted)
        except ValueError:
            raise UserError(f"--listen wants an IP address, got {wanted!r}") from None
        return wanted
    return server_address if is_loopback(server_address) else FALLBACK_ADDRESS


def page_url(address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    scheme = "http" if is_loopback(address) else "https"
    return f"{scheme}://{host}:{port}/"
