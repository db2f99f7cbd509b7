"""Real POP3 clients against popguard's back end, and a real Postfix delivering by LMTP.

Each client retrieves and deletes mail over STLS and over implicit TLS, checking
the server certificate against the organization's CA. getmail6 has no STLS
support at all, so it is tried over implicit TLS only (see realclients.py).
"""

from __future__ import annotations

import poplib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import realclients

from .conftest import (
    PASSWORD,
    MailboxServer,
    Organization,
    message,
    running_mailbox_server,
    running_organization,
)

CASES = [
    (client, mode)
    for client in ("curl", "fetchmail", "mpop", "getmail", "poplib")
    for mode in realclients.TLS_MODES
    if not (client == "getmail" and mode == "stls")
]


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailboxServer]:
    """A mailbox server with the default LoginType, SecureLogin: TLS before credentials."""
    with running_mailbox_server(tmp_path_factory.mktemp("realclients") / "data") as server:
        yield server


def _stat(server: MailboxServer, user: str) -> int:
    client = poplib.POP3_SSL(server.address, server.pop3s_port, context=server.ssl_context())
    client.user(user)
    client.pass_(PASSWORD)
    count = client.stat()[0]
    client.quit()
    return count


@pytest.mark.parametrize(("client", "mode"), CASES)
def test_client_retrieves_and_deletes(
    secure_server: MailboxServer, tmp_path: Path, client: str, mode: realclients.TlsMode
) -> None:
    fetch: Callable[..., list[bytes]] = realclients.CLIENTS[client]
    user = secure_server.add_mailbox(f"{client}-{mode}-{secrets.token_hex(3)}@example.test")
    sent = [
        message("plain"),
        message("dots", body=".leading dot\r\n..two dots\r\n.\r\nend\r\n"),
        message("large", size=300_000),
    ]
    for content in sent:
        secure_server.deliver(user, content)
    port = secure_server.pop3_port if mode == "stls" else secure_server.pop3s_port

    def run(keep: bool) -> list[bytes]:
        return fetch(
            secure_server.address,
            port,
            mode,
            secure_server.cafile,
            user,
            PASSWORD,
            keep=keep,
            workdir=tmp_path,
        )

    kept = run(keep=True)
    assert [realclients.comparable(m) for m in kept] == [realclients.comparable(m) for m in sent]
    assert _stat(secure_server, user) == 3
    fetched = run(keep=False)
    assert [realclients.comparable(m) for m in fetched] == [realclients.comparable(m) for m in sent]
    assert _stat(secure_server, user) == 0


@pytest.mark.parametrize("mode", realclients.TLS_MODES)
def test_mail_from_postfix_is_read_and_deleted_by_every_client(
    secure_server: MailboxServer, tmp_path: Path, mode: realclients.TlsMode
) -> None:
    clients = [name for name in realclients.CLIENTS if not (name == "getmail" and mode == "stls")]
    users = {
        name: secure_server.add_mailbox(f"postfix-{name}-{secrets.token_hex(3)}@example.test")
        for name in clients
    }
    sent = {name: message(f"via postfix for {name}") for name in clients}
    smtp_port = 10025 if mode == "stls" else 10026
    postfix = realclients.start_postfix_to_lmtp(
        tmp_path,
        secure_server.address,
        smtp_port,
        secure_server.address,
        secure_server.lmtp_port,
        "example.test",
    )
    try:
        for name in clients:
            realclients.send_via_smtp(
                secure_server.address, smtp_port, "sender@example.test", users[name], sent[name]
            )
        realclients.wait_for_postfix_delivery(postfix, len(clients))
    finally:
        postfix.stop()
    port = secure_server.pop3_port if mode == "stls" else secure_server.pop3s_port
    for name in clients:
        (got,) = realclients.CLIENTS[name](
            secure_server.address,
            port,
            mode,
            secure_server.cafile,
            users[name],
            PASSWORD,
            keep=False,
            workdir=tmp_path / name,
            raw=True,
        )
        got = realclients.to_crlf(got)
        # Postfix adds its Received: line; the original message follows unchanged.
        head, _, body = sent[name].partition(b"\r\n\r\n")
        assert got.endswith(body), name
        assert b"(Postfix)" in got, name
        for field in head.split(b"\r\n"):
            assert field in got, (name, field)
        assert _stat(secure_server, users[name]) == 0, name


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Organization]:
    """A front end (SecureLogin) before two mailbox servers."""
    with running_organization(tmp_path_factory.mktemp("proxied") / "data") as org:
        yield org


@pytest.mark.parametrize(("client", "mode"), CASES)
def test_client_through_the_front_end(
    proxied: Organization, tmp_path: Path, client: str, mode: realclients.TlsMode
) -> None:
    fetch: Callable[..., list[bytes]] = realclients.CLIENTS[client]
    database = "DB01" if mode == "stls" else "DB02"  # both mailbox servers
    user = proxied.add_mailbox(f"{client}-{mode}-{secrets.token_hex(3)}@example.test", database)
    sent = [message("one"), message("dots", body=".a\r\n..b\r\n"), message("big", size=500_000)]
    for content in sent:
        proxied.deliver(user, content)
    port = proxied.pop3_port if mode == "stls" else proxied.pop3s_port
    for keep in (True, False):
        got = fetch(
            proxied.frontend_address,
            port,
            mode,
            proxied.cafile,
            user,
            PASSWORD,
            keep=keep,
            workdir=tmp_path / str(keep),
        )
        assert [realclients.comparable(m) for m in got] == [realclients.comparable(m) for m in sent]
    assert (
        realclients.fetch_with_poplib(
            proxied.frontend_address, proxied.pop3s_port, "implicit", proxied.cafile, user,
            PASSWORD, keep=True,
        )
        == []
    )  # fmt: skip
