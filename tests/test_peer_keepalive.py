"""A replication peer whose connection closes under a read without an answer
(replication/peer.py): once more on a new connection, which tells a peer that was
stopping (PeerUnavailable) or closed a kept-alive connection (the answer) from one that
refuses our certificate (PeerRefused). The server is a small TLS server of the test's
own, with the organization's certificates, that closes when told to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from popguard.directory.directory import Server
from popguard.net.tls import TlsMaterial
from popguard.replication.peer import PeerRefused, PeerUnavailable, ReplicationPeer
from popguard.testing.net import free_loopback_address

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
          b'{"lsn": 42}')  # fmt: skip


async def closing_peer(
    material: TlsMaterial, address: str, unanswered: int, then_stop: bool
) -> tuple[asyncio.Server, int, list[int]]:
    """A peer that closes the first `unanswered` requests without a word (and, with
    `then_stop`, stops listening after the first), and answers those after."""
    context = material.mutual_server_context(material.replication_identity("mbx9", address))
    seen: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                seen.append(len(seen) + 1)
                if len(seen) <= unanswered:
                    if then_stop:
                        server.close()
                    return
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, address, 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    return server, port, seen


@pytest.mark.parametrize(
    ("unanswered", "then_stop", "outcome"),
    [
        (1, False, "answered"),  # a kept-alive connection closed as the request left
        (1, True, PeerUnavailable),  # a peer that was stopping
        (5, False, PeerRefused),  # every connection closed: it refuses our certificate
    ],
)
async def test_a_read_closed_without_an_answer_is_tried_once_more(
    tmp_path: Path, unanswered: int, then_stop: bool, outcome: object
) -> None:
    material = TlsMaterial(tmp_path / "tls")
    address = free_loopback_address()
    server, port, seen = await closing_peer(material, address, unanswered, then_stop)
    me = material.replication_identity("mbx1", "127.0.0.1")
    peer = ReplicationPeer(
        Server("mbx9", ("mailbox",), address, {"replication": port}),
        material.mutual_client_context(me),
    )
    try:
        async with peer:
            if outcome == "answered":
                assert await peer.head("DB01") == {"lsn": 42}
                assert len(seen) == 2
            else:
                assert isinstance(outcome, type)
                with pytest.raises(outcome):
                    await peer.head("DB01")
                assert len(seen) == (1 if then_stop else 2)  # one retry, not more
            # A write is never sent twice: the peer may have done it.
            if not then_stop:
                seen.clear()
                with pytest.raises(PeerRefused):
                    await peer.dismount("DB01")
                assert len(seen) == 1
    finally:
        server.close()
        await server.wait_closed()
